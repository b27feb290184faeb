"""What ``bench_policies`` compares our engine with; its docstring says how each runs.

* ``hf-generate``: static batches of ``model.generate``; ``hf-cb``: transformers' own continuous
  batching.
* The ideal: our own forward with no scheduling, built as a component user would build it, with
  no engine: a ``KVCache`` of the engine's size and page size, the backend the engine would pick,
  the model switched to paged attention, and a ``ModelRunner`` executing hand-built
  ``ForwardBatch``es whose pages come from the cache's pool.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from harness import Clock, block_table, interleaved, synchronizer
from torch.nn.utils.rnn import pad_sequence
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.streamers import BaseStreamer
from workload import KV_MEMORY, MAX_PREFILL_TOKENS, RunResult, Workload

from baton_paged.allocator import KVCache, KVCacheSpec, PagePool, pages_needed
from baton_paged.attention import attach, detach
from baton_paged.config import EngineConfig
from baton_paged.model.loading import choose_attention, choose_executor
from baton_paged.model.runner import ModelRunner, model_forward
from baton_paged.sched.plan import ForwardBatch, ScheduledRow

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
CB_SETUP = CB_SETTINGS | {"max_requests_per_batch": "B", "attn_implementation": "sdpa"}
CB_SETUP["eos_token_id"] = -1
"""hf-cb's whole setup, for the results (greedy, EOS disabled with -1, B requests per forward)."""


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


def run_hf_generate(model, workload: Workload, batch_size: int, result: RunResult) -> None:
    """Chunks of B in arrival order, each generating its longest budget for every row."""
    pad = model.config.pad_token_id or 0
    ttfts, produced, generated = [], [], 0
    with Clock() as clock:
        for lo in range(0, len(workload.prompts), batch_size):
            prompts = workload.prompts[lo : lo + batch_size]
            rows = [torch.tensor(p) for p in prompts]  # left-padded, as generate wants them
            ids = pad_sequence(rows, batch_first=True, padding_value=pad, padding_side="left")
            ones = [torch.ones_like(row) for row in rows]
            mask = pad_sequence(ones, batch_first=True, padding_side="left")
            n = max(workload.budgets[lo : lo + batch_size])
            streamer = FirstTokenClock()
            budget = {"max_new_tokens": n, "min_new_tokens": n, "pad_token_id": pad}
            out = model.generate(
                ids, attention_mask=mask, do_sample=False, streamer=streamer, **budget
            )
            new = out.shape[1] - ids.shape[1]
            generated += new * len(prompts)
            produced += [new] * len(prompts)
            ttfts += [streamer.first - clock.start] * len(prompts)
    budgets = workload.budgets
    exact = all(p >= b for p, b in zip(produced, budgets, strict=True))
    result.record(clock, produced, budgets, ttfts, exact)
    chunks = math.ceil(len(workload.prompts) / batch_size)
    useful = round(result.useful_tokens / generated, 4)
    result.extra = {"generated_tokens": generated, "useful_share": useful, "chunks": chunks}


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
                unfinished = len(ids) - len(results)
                raise TimeoutError(f"{unfinished} requests unfinished after {timeout_s}s")
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
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=budget)
    cb = ContinuousBatchingConfig(max_requests_per_batch=batch_size, seed=0, **CB_SETTINGS)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    manager.start()
    try:
        manager.add_request(workload.prompts[0][:16], request_id="warmup", max_new_tokens=2)
        collect_cb(manager, {"warmup"})
        ids = [str(i) for i in range(len(workload.prompts))]
        with Clock() as clock:
            for rid, prompt, budget in zip(ids, workload.prompts, workload.budgets, strict=True):
                manager.add_request(prompt, rid, max_new_tokens=budget, record_timestamps=True)
            results = collect_cb(manager, set(ids))
        resolved = manager.continuous_batching_config
    finally:
        manager.stop(block=True)
    outs = [results[rid] for rid in ids]
    produced = [len(out.generated_tokens) for out in outs]
    ttfts = [out.timestamps[0] - out.created_time for out in outs]
    result.record(clock, produced, workload.budgets, ttfts, produced == workload.budgets)
    settings = ("max_requests_per_batch", "max_batch_tokens", "num_blocks", "page_size")
    result.extra = {key: getattr(resolved, key) for key in settings}
    result.extra["attn_implementation"] = model.config._attn_implementation


PEERS = {"hf-generate": run_hf_generate, "hf-cb": run_hf_cb}
"""Each peer's run: (model, workload, batch size, result to fill)."""


# The ideal: our forward, no scheduling ---------------------------------------------------------


@contextmanager
def paged_runner(model) -> Iterator[ModelRunner]:
    """A runner over a cache of our engine's size, with the backend, page size and forward (the
    native executor where it runs) the engine would choose; ``model`` runs paged attention until
    the block ends."""
    weights = next(model.parameters())
    config = EngineConfig(
        dtype=str(weights.dtype).removeprefix("torch."), device=str(weights.device)
    )
    page_size, backend = choose_attention(config, model)
    spec = KVCacheSpec.from_model_config(model.config, page_size, weights.dtype)
    cache = KVCache.from_budget(spec, KV_MEMORY, weights.device)
    max_len = model.config.max_position_embeddings
    attach(model, max_len)
    try:
        yield ModelRunner(
            model_forward(model, choose_executor(config, model, max_len)), cache, backend
        )
    finally:
        detach(model)


def packed(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of consecutive prompts in groups of at most ``budget`` tokens (a longer prompt
    runs alone): how the engine packs admitted prompts into prefill forwards."""
    groups: list[list[int]] = []
    used = budget
    for i, n in enumerate(lengths):
        if used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def table_for(pool: PagePool, lengths: list[int], page_size: int) -> np.ndarray:
    """A block table of freshly allocated pages, one row per length."""
    return block_table([pool.allocate(pages_needed(n, page_size)) for n in lengths])


def prefill_forwards(cache: KVCache, prompts: list[list[int]], budget: int) -> list[ForwardBatch]:
    forwards = []
    for group in packed([len(p) for p in prompts], budget):
        rows = tuple(ScheduledRow(str(i), 0, tuple(prompts[i]), sample=True) for i in group)
        table = table_for(cache.pool, [len(prompts[i]) for i in group], cache.spec.page_size)
        forwards.append(ForwardBatch(rows, table))
    return forwards


def decode_forward(cache: KVCache, batch_size: int, context: int, vocab: int) -> ForwardBatch:
    """B rows each computing position ``context - 1`` over ``context`` tokens of K/V."""
    rng = np.random.default_rng(1)
    rows = tuple(
        ScheduledRow(f"d{i}", context - 1, (int(rng.integers(1, vocab)),), sample=True, decode=True)
        for i in range(batch_size)
    )
    return ForwardBatch(rows, table_for(cache.pool, [context] * batch_size, cache.spec.page_size))


def fcfs_decode_steps(budgets: list[int], batch_size: int) -> dict[int, int]:
    """How many decode steps at each batch size a scheduler with no overhead of its own runs:
    requests join in order whenever a slot is free, each prefill gives a request's first token,
    and every step gives each live request one more. No schedule has fewer steps at the same
    max batch (the longest budget alone needs its own length), and only the tail runs below
    ``batch_size``."""
    queue, live, steps = list(budgets), [], {}
    while queue or live:
        while queue and len(live) < batch_size:
            live.append(queue.pop(0) - 1)
        live = [left for left in live if left > 0]
        if live:
            steps[len(live)] = steps.get(len(live), 0) + 1
            live = [left - 1 for left in live]
    return steps


def mean_size(schedule: dict[int, int]) -> float:
    return sum(size * count for size, count in schedule.items()) / sum(schedule.values())


def measure_ideal(model, workload: Workload, batch_sizes: list[int]) -> dict:
    """Our forward alone, with our engine's KV and prefill budgets: all prompts prefilled, then
    the decode steps of ``fcfs_decode_steps``, each timed at its own batch size (at the
    workload's mean context). Beside it, the old full-batch bound: ceil(total budget / B) full
    steps, which the long tail makes unreachable for any scheduler."""
    prompt_mean = statistics.mean(len(p) for p in workload.prompts)
    context = round(prompt_mean + statistics.mean(workload.budgets) / 2)
    sync = synchronizer(next(model.parameters()).device)
    schedules = {b: fcfs_decode_steps(workload.budgets, b) for b in batch_sizes}
    with paged_runner(model) as runner:
        forwards = prefill_forwards(runner.cache, workload.prompts, MAX_PREFILL_TOKENS)
        prefill = {"prefill": lambda: [runner.execute(f) for f in forwards]}
        prefill_s = interleaved(prefill, repeats=3, sync=sync)["prefill"]
        sizes = sorted({*batch_sizes, *(size for steps in schedules.values() for size in steps)})
        vocab = model.config.vocab_size
        steps = {b: decode_forward(runner.cache, b, context, vocab) for b in sizes}
        cases = {b: (lambda f=forward: runner.execute(f)) for b, forward in steps.items()}
        step_s = interleaved(cases, repeats=10, sync=sync, warmup=2)
    per_batch = {}
    for b, schedule in schedules.items():
        decode_s = sum(count * step_s[size] for size, count in schedule.items())
        full_s = prefill_s + math.ceil(workload.total_budget / b) * step_s[b]
        per_batch[b] = {
            "decode_step_ms": round(step_s[b] * 1e3, 3),
            "decode_steps": sum(schedule.values()),
            "mean_batch_size": round(mean_size(schedule), 2),
            "decode_s": round(decode_s, 3),
            "ideal_s": round(prefill_s + decode_s, 3),
            "ideal_tokens_per_s": round(workload.total_budget / (prefill_s + decode_s), 2),
            "full_batch_tokens_per_s": round(workload.total_budget / full_s, 2),
        }
    ideal = {"prefill_s": round(prefill_s, 4), "prefill_forwards": len(forwards)}
    return ideal | {"decode_context": context, "per_batch": per_batch}
