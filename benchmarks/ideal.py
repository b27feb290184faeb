"""The ideal throughput of this machine for a workload: our own forward with no scheduling.

Ideal time = prefill of all prompts (packed in arrival order into forwards of at most the
engine's prefill budget, as the engine packs them) + ceil(total budget / B) decode steps of a
full batch of B, each row at a representative context (mean prompt + half the mean budget).

Built as a component user would build it, with no engine: a ``KVCache`` of the engine's size and
page size, the backend the engine would pick, the model switched to paged attention, and a
``ModelRunner`` executing hand-built ``ForwardBatch``es whose pages come from the cache's pool.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
from harness import interleaved, synchronizer
from workload import Workload

from baton_paged.allocator import KVCache, KVCacheSpec, PagePool, pages_needed
from baton_paged.attention import (
    AUTO,
    AttentionRequirements,
    attach,
    create_backend,
    detach,
    suggested_page_size,
)
from baton_paged.model_runner import ModelRunner
from baton_paged.sched.plan import ForwardBatch, ScheduledRow


@contextmanager
def paged_runner(model, kv_memory: str) -> Iterator[ModelRunner]:
    """A runner over a cache of ``kv_memory`` with the automatic backend and its page size;
    ``model`` runs paged attention until the block ends."""
    weights = next(model.parameters())
    geometry = KVCacheSpec.from_model_config(model.config)
    heads = (geometry.head_dim, model.config.num_attention_heads, geometry.num_kv_heads)
    req = AttentionRequirements(weights.device, weights.dtype, 1, *heads)
    page_size = suggested_page_size(AUTO, req)
    backend = create_backend(AUTO, replace(req, page_size=page_size))
    spec = KVCacheSpec.from_model_config(model.config, page_size, weights.dtype)
    cache = KVCache.from_budget(spec, kv_memory, weights.device)
    attach(model, model.config.max_position_embeddings)
    try:
        yield ModelRunner(model, cache, backend)
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
    """A block table of freshly allocated pages, one row per length, padded with page 0."""
    rows = [pool.allocate(pages_needed(n, page_size)) for n in lengths]
    table = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int32)
    for i, row in enumerate(rows):
        table[i, : len(row)] = row
    return table


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


def measure_ideal(
    model, workload: Workload, batch_sizes: list[int], kv_memory: str, prefill_budget: int
) -> dict:
    """Our forward alone: all prefills, and one full decode step per batch size."""
    prompt_mean = statistics.mean(len(p) for p in workload.prompts)
    context = round(prompt_mean + statistics.mean(workload.budgets) / 2)
    sync = synchronizer(next(model.parameters()).device)
    with paged_runner(model, kv_memory) as runner:
        forwards = prefill_forwards(runner.cache, workload.prompts, prefill_budget)
        prefill = {"prefill": lambda: [runner.execute(f) for f in forwards]}
        prefill_s = interleaved(prefill, repeats=3, sync=sync)["prefill"]
        per_batch = {}
        for b in batch_sizes:
            forward = decode_forward(runner.cache, b, context, model.config.vocab_size)
            step = {"decode": lambda f=forward: runner.execute(f)}
            step_s = interleaved(step, repeats=20, sync=sync, warmup=3)["decode"]
            steps = math.ceil(workload.total_budget / b)
            ideal_s = prefill_s + steps * step_s
            per_batch[b] = {
                "decode_step_ms": round(step_s * 1e3, 3),
                "decode_steps": steps,
                "ideal_s": round(ideal_s, 3),
                "ideal_tokens_per_s": round(workload.total_budget / ideal_s, 2),
            }
    return {
        "prefill_s": round(prefill_s, 4),
        "prefill_forwards": len(forwards),
        "decode_context": context,
        "per_batch": per_batch,
    }
