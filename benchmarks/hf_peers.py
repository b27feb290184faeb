"""The two Hugging Face peers ``bench_policies`` compares our engine with (its docstring says
how each runs): ``hf-generate``, static batches of ``model.generate``, and ``hf-cb``,
transformers' own continuous batching.
"""

from __future__ import annotations

import math
import time

import torch
from harness import Clock
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.streamers import BaseStreamer
from workload import MAX_PREFILL_TOKENS, RunResult, Workload

PEERS = ("hf-generate", "hf-cb")
CB_SETTINGS = {
    "max_batch_tokens": MAX_PREFILL_TOKENS,
    "num_blocks": 128,
    "page_size": 256,
    "allow_block_sharing": False,
    "use_cuda_graph": False,
    "use_async_batching": False,
    "scheduler_type": "fifo",
}
"""hf-cb's batching besides B requests per forward: our prefill budget as its token budget, its
default 256-token pages, 128 x 256 = 32768 tokens of cache (more than 32 requests at 256 + 512
tokens need; its sizing also reserves a [max_batch_tokens, cache tokens] attention mask, so 2 GiB
would not fit), no prefix sharing (the random prompts share nothing, so it could only add
hashing), no CUDA graphs or async (CPU)."""
CB_SETUP = CB_SETTINGS | {
    "max_requests_per_batch": "B",
    "attn_implementation": "sdpa",
    "eos_token_id": -1,
}
"""hf-cb's whole setup, for the results (greedy, EOS disabled with -1, B requests per forward)."""


def run_peer(system: str, model, workload: Workload, batch_size: int, result: RunResult) -> None:
    run = run_hf_generate if system == "hf-generate" else run_hf_cb
    run(model, workload, batch_size, result)


# HF static generate ----------------------------------------------------------------------------


class FirstTokenClock(BaseStreamer):
    """Notes when ``generate`` hands out its first new tokens (its second ``put``)."""

    def __init__(self):
        self.puts = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def run_hf_generate(model, workload: Workload, batch_size: int, result: RunResult) -> None:
    """Chunks of B in arrival order, each generating its longest budget for every row."""
    pad = model.config.pad_token_id or 0
    ttfts, produced, generated = [], [], 0
    with Clock() as clock:
        for lo in range(0, len(workload.prompts), batch_size):
            prompts = workload.prompts[lo : lo + batch_size]
            ids, mask = left_padded(prompts, pad)
            n = max(workload.budgets[lo : lo + batch_size])
            streamer = FirstTokenClock()
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad,
                streamer=streamer,
            )
            new = out.shape[1] - ids.shape[1]
            generated += new * len(prompts)
            produced += [new] * len(prompts)
            ttfts += [streamer.first - clock.start] * len(prompts)
    budgets = workload.budgets
    exact = all(p >= b for p, b in zip(produced, budgets, strict=True))
    result.record(clock, produced, budgets, ttfts, exact)
    result.extra = {
        "generated_tokens": generated,
        "useful_share": round(result.useful_tokens / generated, 4),
        "chunks": math.ceil(len(workload.prompts) / batch_size),
    }


# transformers continuous batching --------------------------------------------------------------


def collect_cb(manager, ids: set[str], timeout_s: float = 600.0) -> dict:
    """Results of ``ids`` as they finish; raises if the manager dies or stalls."""
    results = {}
    deadline = time.perf_counter() + timeout_s
    while len(results) < len(ids):
        out = manager.get_result(timeout=0.5)
        if out is None:
            if not manager.is_running():
                raise RuntimeError("the continuous batching thread stopped early")
            if time.perf_counter() > deadline:
                raise TimeoutError(
                    f"{len(ids) - len(results)} requests unfinished after {timeout_s}s"
                )
            continue
        if out.error is not None:
            raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        if out.is_finished() and out.request_id in ids:
            results[out.request_id] = out
    return results


def run_hf_cb(model, workload: Workload, batch_size: int, result: RunResult) -> None:
    """Start the manager (its cache is built then), warm it on one short request, then time the
    whole workload from the first ``add_request`` to the last result."""
    # Greedy, EOS off (-1 never occurs), B requests per forward.
    budget = max(workload.budgets)
    generation = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=budget)
    cb = ContinuousBatchingConfig(max_requests_per_batch=batch_size, seed=0, **CB_SETTINGS)
    manager = model.init_continuous_batching(
        generation_config=generation, continuous_batching_config=cb
    )
    manager.start()
    try:
        manager.add_request(workload.prompts[0][:16], request_id="warmup", max_new_tokens=2)
        collect_cb(manager, {"warmup"})
        ids = {str(i) for i in range(len(workload.prompts))}
        with Clock() as clock:
            for i, (prompt, budget) in enumerate(
                zip(workload.prompts, workload.budgets, strict=True)
            ):
                manager.add_request(
                    prompt, request_id=str(i), max_new_tokens=budget, record_timestamps=True
                )
            results = collect_cb(manager, ids)
        resolved = manager.continuous_batching_config
    finally:
        manager.stop(block=True)
    outs = [results[str(i)] for i in range(len(workload.budgets))]
    produced = [len(out.generated_tokens) for out in outs]
    ttfts = [out.timestamps[0] - out.created_time for out in outs]
    result.record(clock, produced, workload.budgets, ttfts, produced == workload.budgets)
    result.extra = {
        "max_requests_per_batch": resolved.max_requests_per_batch,
        "max_batch_tokens": resolved.max_batch_tokens,
        "num_blocks": resolved.num_blocks,
        "page_size": resolved.page_size,
        "attn_implementation": model.config._attn_implementation,
    }
