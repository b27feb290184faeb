"""Attention benchmark: one step of attention over the paged cache per backend vs dense SDPA.

    python benchmarks/bench_attention.py [--threads 1] [--repeats 200] [--device cpu]
    python benchmarks/bench_attention.py --device cuda [--dtype bfloat16|float16]
    python benchmarks/bench_attention.py --device cpu --smoke [--out DIR]

Two modes: on the CPU, one decode step at one small shape (``results/attention-cpu.json``); on
CUDA, a sweep of shapes each set against the memory-bandwidth bound (``results/attention-cuda``,
below). ``--smoke`` runs the sweep's code on tiny shapes on any device, the CPU included (timed by
the host clock there), and writes to ``--out`` (default: a new temporary folder), never results/.

CPU step. Shapes: batch 32, 8 query / 4 KV heads, head dim 64, one new token per request,
context 256 ("uniform") or uniform random in [128, 384] ("ragged", mean ~256, seeded). Every
request's pages are random page ids, as a pool hands them out after churn.

Cases, all interleaved so drift hits them alike:
- ``dense``: ``scaled_dot_product_attention`` over K/V already gathered into contiguous
  ``[B, Hkv, S, D]`` tensors, query folded to ``[B, Hkv, G, D]`` (ragged: padded to the longest
  context under a key mask built beforehand). The floor: attention with no paging at all.
- every backend the registry says can run here, through ``backend.attend`` (attention alone,
  metadata built once outside the timed region as the engine builds it once per step) and
  ``backend.forward`` (plus the cache write of the step's new K/V).
Each backend's output is checked against dense before anything is timed, so a fast but wrong
backend cannot be reported.

One timed call is a whole decode step's attention: ``--layers`` layers (default 8, the small
model's depth) one after another, each with its own K/V, reported per layer (step time divided
by layers). This is how the engine runs it, and it keeps the timing honest on CPU: with a single
layer, 16 MiB of K/V sits in a 32 MiB L3 between calls and a case's speed depended on which case
ran before it (measured: up to 10%, enough to put ``forward`` ahead of the ``attend`` inside it);
across layers every layer's K/V comes cold from memory, for dense and paged alike, while a
backend's gather workspace stays warm from layer to layer as in the engine.

Targets: the torch backend within 1.5x of dense on the uniform workload (paging overhead <= 50%);
the ``cpu_paged`` kernel, which reads pages in place, within 1.1x of dense on both workloads; the
padded backend is reported relative to torch.

CUDA sweep. Heads as Llama-3.2-1B's (32 query, 8 KV, head dim 64), pages of ``--page-size`` (16,
the engine's default; flash_attn gets its 256) shuffled as above, bfloat16 (or ``--dtype
float16``), K/V drawn on the device. Shapes, every request of a kind alike:
- decode: batch 1, 32, 128 x context 512, 2048, 8192, one new token per request;
- mixed: one step of 2 prompts of 1024 new tokens (no earlier context) and 62 decode rows at
  context 2048, 64 requests and 2110 query tokens in all.
Per shape, the dense floor (SDPA on contiguous K/V: decode rows with query heads folded, prompts
causal with GQA) and every backend the registry says runs here, through ``backend.attend`` with
the metadata built once. Each is checked on every layer against dense first: a wrong one is
recorded as wrong and not timed; one that raises or runs out of memory is recorded with its error,
one whose worst-case workspace exceeds ``--memory-cap-gib`` (40) as skipped, and the run goes on.
Timing: CUDA events around a whole step of ``--layers`` (2) layers, L2 flushed and the device idle
before each, median of ``--repeats`` (20) after warm-up, in us per layer. Beside each shape its
HBM-read bound: the bytes the step must move (every request's K and V once, query and output) over
the bandwidth a 1 GiB device-to-device copy reaches in this run (and over the datasheet's, 4.8e12
B/s on an H200); each time is also given as a multiple of that bound (the mixed step's prompts
are compute-bound, so its multiple reads high). Sized to take well under a minute on an H200; no
case starts after ``--time-limit`` (40) seconds from start, it is recorded as skipped.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import harness
import numpy as np
import torch
import torch.nn.functional as F
from harness import environment, interleaved, synchronizer

from baton_paged.allocator import KVCache, KVCacheSpec, pages_needed, slot_mapping
from baton_paged.attention import (
    AttentionBackend,
    AttentionMetadata,
    AttentionRequirements,
    create_backend,
)
from baton_paged.attention.registry import backend_class, unsupported_reasons

BATCH = 32
CONTEXT = 256
RAGGED = (128, 384)
QUERY_HEADS = 8
KV_HEADS = 4
HEAD_DIM = 64
TARGET = 1.5
PAGED_TARGET = 1.1
"""Target: the in-place paged kernel (``cpu_paged``) within 1.1x of dense SDPA."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}
LayerCase = Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class Heads:
    """Attention heads: query heads, KV heads (GQA when fewer) and head dim."""

    query: int
    kv: int
    dim: int


CPU_HEADS = Heads(QUERY_HEADS, KV_HEADS, HEAD_DIM)


@dataclass
class Workload:
    """One decode batch as dense tensors: the source every paged cache is filled from."""

    name: str
    contexts: list[int]
    keys: torch.Tensor
    """``[layers, B, Hkv, S_max, D]`` contiguous; positions past a context are padding."""
    values: torch.Tensor
    query: torch.Tensor
    """``[B, Hq, D]``: the step's one new token per request, packed."""
    mask: torch.Tensor | None
    """``[B, 1, 1, S_max]`` key mask for ragged contexts; None when every context is S_max."""


@dataclass
class PagedBatch:
    """The same batch held in a paged cache, with the step's metadata built once."""

    cache: KVCache
    meta: AttentionMetadata
    new_keys: torch.Tensor
    """``[layers, B, Hkv, D]``: each request's K at its last position, so ``forward``'s write is
    a no-op on the cache contents and its output still matches dense."""
    new_values: torch.Tensor


def make_workload(
    name: str, contexts: list[int], layers: int, device: torch.device, dtype: torch.dtype, seed: int
) -> Workload:
    """Random K/V/query drawn on the CPU from ``seed``, so every device sees the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    span = max(contexts)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device, dtype)

    keys = randn(layers, BATCH, KV_HEADS, span, HEAD_DIM)
    values = randn(layers, BATCH, KV_HEADS, span, HEAD_DIM)
    mask = None
    if min(contexts) != span:
        valid = torch.tensor(contexts, device=device)
        mask = (torch.arange(span, device=device) < valid[:, None])[:, None, None, :]
    return Workload(name, contexts, keys, values, randn(BATCH, QUERY_HEADS, HEAD_DIM), mask)


def dense_attention(w: Workload, layer: int, scale: float) -> torch.Tensor:
    """The no-paging floor: SDPA straight on contiguous K/V, query heads folded per KV head."""
    folded = w.query.view(BATCH, KV_HEADS, QUERY_HEADS // KV_HEADS, HEAD_DIM)
    keys, values = w.keys[layer], w.values[layer]
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=w.mask, scale=scale)
    return out.view(BATCH, QUERY_HEADS, HEAD_DIM)


def fill_cache(
    backend: AttentionBackend, cache: KVCache, layer: int, w: Workload, table: np.ndarray
) -> None:
    """Write every request's K/V into its pages through the backend's own slot-mapping write (in
    the layout its ``attend`` reads: ``cpu_paged``'s bfloat16 keys lie in pairs of dims)."""
    contexts = np.array(w.contexts)
    slots = slot_mapping(table, np.zeros_like(contexts), contexts, cache.spec.page_size)
    keys = [w.keys[layer, row, :, :n].transpose(0, 1) for row, n in enumerate(w.contexts)]
    values = [w.values[layer, row, :, :n].transpose(0, 1) for row, n in enumerate(w.contexts)]
    mapping = torch.from_numpy(slots).to(cache.device)
    backend.write_slots(cache, layer, mapping, torch.cat(keys), torch.cat(values))


def shuffled_cache(
    spec: KVCacheSpec, contexts: list[int], seed: int, device: torch.device
) -> tuple[KVCache, np.ndarray]:
    """A cache twice the batch's size, all of it random (so a backend reading a wrong page shows
    up in the check), and the block table of each request's pages, shuffled as a pool hands them
    out after churn."""
    per_request = [pages_needed(c, spec.page_size) for c in contexts]
    cache = KVCache(spec, 2 * sum(per_request), device)
    cache.storage.normal_(generator=torch.Generator(device).manual_seed(seed))
    ids = np.random.default_rng(seed).permutation(cache.num_pages)
    table = harness.block_table(np.split(ids[: sum(per_request)], np.cumsum(per_request)[:-1]))
    return cache, table


def paged_batch(
    w: Workload, backend: AttentionBackend, page_size: int, seed: int, device: torch.device
) -> PagedBatch:
    """The batch written by ``backend`` at shuffled pages of a random cache (``shuffled_cache``)."""
    dtype = w.keys.dtype
    spec = KVCacheSpec(len(w.keys), KV_HEADS, HEAD_DIM, page_size=page_size, dtype=dtype)
    cache, table = shuffled_cache(spec, w.contexts, seed, device)
    for layer in range(spec.num_layers):
        fill_cache(backend, cache, layer, w, table)
    meta = AttentionMetadata.build([1] * BATCH, w.contexts, table, page_size, device)
    last = torch.tensor(w.contexts, device=device) - 1
    rows = torch.arange(BATCH, device=device)
    new_keys = w.keys[:, rows, :, last].transpose(0, 1)  # advanced indices go first
    return PagedBatch(cache, meta, new_keys, w.values[:, rows, :, last].transpose(0, 1))


def requirements(
    device: torch.device, dtype: torch.dtype, page_size: int, heads: Heads = CPU_HEADS
) -> AttentionRequirements:
    return AttentionRequirements(device, dtype, page_size, heads.dim, heads.query, heads.kv)


def backend_page_sizes(
    device: torch.device, dtype: torch.dtype, page_size: int, heads: Heads = CPU_HEADS
) -> tuple[dict[str, int], dict[str, str]]:
    """Each runnable backend's page size (the configured one, else its preferred one, as flash
    needs 256-token pages) and why each other backend was skipped."""
    sizes, skipped = {}, {}
    for name, reason in unsupported_reasons(requirements(device, dtype, page_size, heads)).items():
        preferred = backend_class(name).preferred_page_size
        at_preferred = requirements(device, dtype, preferred, heads)
        if reason is None:
            sizes[name] = page_size
        elif backend_class(name).unsupported_reason(at_preferred) is None:
            sizes[name] = preferred
        else:
            skipped[name] = reason
    return sizes, skipped


def backend_cases(
    w: Workload, sizes: dict[str, int], seed: int, scale: float
) -> dict[str, tuple[LayerCase, LayerCase]]:
    """name -> (attend, forward) of one layer, each checked on every layer against dense."""
    tol = TOLERANCE[w.keys.dtype]
    cases = {}
    for name, page_size in sizes.items():
        backend = create_backend(name, requirements(w.query.device, w.keys.dtype, page_size))
        b = paged_batch(w, backend, page_size, seed, w.query.device)

        def attend(layer: int, backend=backend, b=b) -> torch.Tensor:
            k, v = b.cache.key(layer), b.cache.value(layer)
            return backend.attend(w.query, k, v, b.meta, scale)

        def forward(layer: int, backend=backend, b=b) -> torch.Tensor:
            k, v = b.new_keys[layer], b.new_values[layer]
            return backend.forward(w.query, k, v, b.cache, layer, b.meta, scale)

        for layer in range(len(w.keys)):
            expected = dense_attention(w, layer, scale)
            for label, fn in (("attend", attend), ("forward", forward)):
                msg = f"{name} {label}, {w.name} layer {layer}"
                torch.testing.assert_close(fn(layer), expected, atol=tol, rtol=tol, msg=msg)
        cases[name] = (attend, forward)
    return cases


def run_workload(w: Workload, sizes: dict[str, int], args, scale: float, sync) -> dict:
    """Median seconds per layer of dense and of every backend's attend and forward, the cases
    interleaved step by step."""
    paged = backend_cases(w, sizes, args.seed, scale)
    layer_cases = {"dense": lambda layer: dense_attention(w, layer, scale)}
    for name, (attend, forward) in paged.items():
        layer_cases |= {name: attend, f"{name} forward": forward}

    def whole_step(fn: LayerCase) -> Callable[[], list]:  # every layer in turn, as the engine
        return lambda: [fn(layer) for layer in range(args.layers)]

    timed = {name: whole_step(fn) for name, fn in layer_cases.items()}
    steps = interleaved(timed, args.repeats, sync, warmup=2)
    seconds = {name: step / args.layers for name, step in steps.items()}
    dense = seconds["dense"]
    cases = {"dense": {"attend_s": dense, "attend_vs_dense": 1.0}}
    for name in paged:
        attend, forward = seconds[name], seconds[f"{name} forward"]
        cases[name] = {"page_size": sizes[name], "attend_s": attend}
        cases[name] |= {"attend_vs_dense": round(attend / dense, 3), "forward_s": forward}
        cases[name]["forward_vs_dense"] = round(forward / dense, 3)
    mean = round(statistics.mean(w.contexts), 1)
    result = {"contexts": {"min": min(w.contexts), "max": max(w.contexts), "mean": mean}}
    result["cases"] = cases
    if "torch" in cases and "padded" in cases:
        result["padded_vs_torch"] = harness.ratio(seconds["padded"], seconds["torch"], 3)
    return result


# CUDA sweep ------------------------------------------------------------------------------------

LLAMA_1B = Heads(32, 8, 64)
"""Llama-3.2-1B's attention heads: the sweep's."""
SWEEP_BATCHES, SWEEP_CONTEXTS = [1, 32, 128], [512, 2048, 8192]
MIXED = ((2, 1024, 1024), (62, 1, 2048))
"""The mixed step as (requests, new tokens each, context): 2 fresh prompts, 62 decode rows."""
SMOKE_BATCHES, SMOKE_CONTEXTS = [1, 3], [16, 40]
SMOKE_MIXED = ((2, 24, 24), (3, 1, 40))
DATASHEET_BANDWIDTH = {"H200": 4.8e12}
"""HBM bytes/s on the datasheet, by a part of the device's name."""
COPY_BYTES = {"cuda": 1 << 30}
"""Bytes of the copy the bandwidth is measured with: far past any cache (64 MiB elsewhere)."""
FLUSH_BYTES = 256 << 20
IN_PLACE = {"cpu_paged", "triton", "flash_attn"}
"""Backends that read K/V from the pages where they lie: no workspace beside their output."""
SWEEP_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
"""The largest error allowed, as a share of the largest dense output (see ``mismatch``)."""


@dataclass(frozen=True)
class Group:
    """``count`` requests alike within a step: ``query_len`` new tokens ending ``context``."""

    count: int
    query_len: int
    context: int

    @property
    def label(self) -> str:
        kind = "prefill" if self.query_len == self.context else "decode"
        kind = kind if self.query_len in (1, self.context) else f"chunk {self.query_len}"
        return f"{self.count} {kind}@{self.context}"


@dataclass(frozen=True)
class Shape:
    """One step of the sweep: its requests, group after group."""

    name: str
    groups: tuple[Group, ...]

    @property
    def query_lens(self) -> list[int]:
        return [g.query_len for g in self.groups for _ in range(g.count)]

    @property
    def contexts(self) -> list[int]:
        return [g.context for g in self.groups for _ in range(g.count)]


def sweep_shapes(batches: list[int], contexts: list[int], mixed: tuple) -> list[Shape]:
    """Every decode batch x context, then the mixed step."""
    decode = [Shape(f"decode B={b} ctx={c}", (Group(b, 1, c),)) for b in batches for c in contexts]
    groups = tuple(Group(*group) for group in mixed)
    return [*decode, Shape("mixed " + " + ".join(g.label for g in groups), groups)]


@dataclass
class Step:
    """A shape's tensors on the device: each group's contiguous K/V ``[layers, count, Hkv, S, D]``
    (the dense floor's input and what the caches are filled from) and the packed query."""

    shape: Shape
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    query: torch.Tensor
    """``[T, Hq, D]``: the step's new tokens, request after request."""

    def group_queries(self) -> tuple[torch.Tensor, ...]:
        return self.query.split([g.count * g.query_len for g in self.shape.groups])


@dataclass
class Sweep:
    """What every case of the sweep shares."""

    heads: Heads
    device: torch.device
    dtype: torch.dtype
    layers: int
    repeats: int
    seed: int
    bandwidth: float
    """Bytes/s measured in this run: the bound every time is set against."""
    datasheet: float | None
    memory_cap: float
    deadline: float
    """``time.perf_counter()`` past which no case starts."""
    flush: Callable[[], object]

    @property
    def scale(self) -> float:
        return 1 / math.sqrt(self.heads.dim)


def make_step(shape: Shape, sweep: Sweep, seed: int) -> Step:
    """Random K/V and query drawn on the device itself, from ``seed``: drawing gigabytes on the
    CPU and copying them over would take longer than timing them."""
    gen = torch.Generator(sweep.device).manual_seed(seed)
    heads, layers = sweep.heads, sweep.layers

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen, device=sweep.device, dtype=sweep.dtype)

    keys = [randn(layers, g.count, heads.kv, g.context, heads.dim) for g in shape.groups]
    values = [randn(layers, g.count, heads.kv, g.context, heads.dim) for g in shape.groups]
    return Step(shape, keys, values, randn(sum(shape.query_lens), heads.query, heads.dim))


def dense_step(step: Step, layer: int, scale: float) -> torch.Tensor:
    """The floor, attention with no paging: SDPA per group straight on its contiguous K/V."""
    parts = zip(step.shape.groups, step.group_queries(), step.keys, step.values, strict=True)
    outs = [dense_group(g, q, k[layer], v[layer], scale) for g, q, k, v in parts]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def dense_group(
    group: Group, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """Decode rows fold the query heads sharing a KV head into the query axis, as
    ``dense_attention`` does, so K/V is never expanded; new tokens attend with GQA under a
    bottom-right causal mask (SDPA's own causal when they are the whole context)."""
    count, kv_heads, _, head_dim = keys.shape
    num_heads, q_len, k_len = query.shape[1], group.query_len, group.context
    if q_len == 1:
        folded = query.view(count, kv_heads, num_heads // kv_heads, head_dim)
        out = F.scaled_dot_product_attention(folded, keys, values, scale=scale)
        return out.reshape(count, num_heads, head_dim)
    mask = None
    if q_len != k_len:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    out = F.scaled_dot_product_attention(
        query.view(count, q_len, num_heads, head_dim).transpose(1, 2),
        keys,
        values,
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=kv_heads != num_heads,
    )
    return out.transpose(1, 2).reshape(count * q_len, num_heads, head_dim)


def packed(groups: list[torch.Tensor], layer: int) -> torch.Tensor:
    """One layer's K (or V) of every request, positions in order: ``[sum of contexts, Hkv, D]``."""
    return torch.cat([g[layer].transpose(1, 2).flatten(0, 1) for g in groups])


def paged_step(step: Step, page_size: int, seed: int) -> tuple[KVCache, AttentionMetadata]:
    """The step's K/V written through the cache's own slot-mapping write at shuffled pages of a
    random cache (``shuffled_cache``), and its metadata, built once as the engine builds it once
    per step."""
    shape, keys = step.shape, step.keys[0]
    layers, _, kv_heads, _, head_dim = keys.shape
    spec = KVCacheSpec(layers, kv_heads, head_dim, page_size=page_size, dtype=keys.dtype)
    cache, table = shuffled_cache(spec, shape.contexts, seed, keys.device)
    contexts = np.array(shape.contexts)
    slots = slot_mapping(table, np.zeros_like(contexts), contexts, page_size)
    mapping = torch.from_numpy(slots).to(keys.device)
    for layer in range(layers):
        cache.write(layer, mapping, packed(step.keys, layer), packed(step.values, layer))
    meta = AttentionMetadata.build(shape.query_lens, shape.contexts, table, page_size, keys.device)
    return cache, meta


def read_bytes(shape: Shape, heads: Heads, element_size: int) -> int:
    """The least a step's attention must move through memory: every request's K and V once, the
    query read and the output written."""
    kv = sum(shape.contexts) * heads.kv * heads.dim * 2 * element_size
    return kv + 2 * sum(shape.query_lens) * heads.query * heads.dim * element_size


def workspace_bytes(name: str, shape: Shape, heads: Heads, page_size: int, element_size) -> int:
    """A backend's memory beside the cache for one layer, at worst: none for those that read the
    pages in place; for those that gather, K and V copied out for every request at the longest
    context; for padded, also what SDPA's math path may take for GQA under a mask: K/V in float32
    repeated per query head, and float32 scores and their softmax for every padded query row."""
    if name in IN_PLACE:
        return 0
    batch, span = len(shape.contexts), pages_needed(max(shape.contexts), page_size) * page_size
    gathered = 2 * batch * span * heads.kv * heads.dim * element_size
    if name != "padded":
        return gathered
    expanded = 2 * batch * span * heads.query * heads.dim * 4
    return gathered + expanded + 2 * batch * heads.query * max(shape.query_lens) * span * 4


def mismatch(out: torch.Tensor, expected: torch.Tensor, tolerance: float) -> str | None:
    """Why ``out`` is not ``expected``, or None. The error is taken against the largest expected
    value, not elementwise as ``assert_close`` takes it: attention outputs are softmax means of
    values and shrink as the context grows, so an absolute tolerance loose enough for bfloat16 at
    512 tokens would pass a wrong result at 8192."""
    if out.shape != expected.shape:
        return f"shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    error = (out.float() - expected.float()).abs().max().item()
    largest = expected.float().abs().max().item()
    if error <= tolerance * largest:  # False for NaN too
        return None
    return f"max error {error:.3g} > {tolerance} x the largest output {largest:.3g}"


def mark(device: torch.device) -> float | torch.cuda.Event:
    """A point on the device's timeline: a recorded CUDA event, else the host clock."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def seconds_between(start, end) -> float:
    return end - start if isinstance(start, float) else start.elapsed_time(end) / 1e3


def median_seconds(
    fn: Callable[[], object],
    repeats: int,
    device: torch.device,
    before: Callable[[], object] = lambda: None,
    warmup: int = 2,
) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup``. ``before`` each run (not
    timed) the device drains, so nothing queued earlier overlaps a run and its own launches and
    Python count, as a step's do."""
    for _ in range(warmup):
        fn()
    sync = synchronizer(device)
    spans = []
    for _ in range(repeats):
        before()
        sync()
        start = mark(device)
        fn()
        spans.append((start, mark(device)))
    sync()
    return statistics.median(seconds_between(*span) for span in spans)


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """Bytes/s read plus written by a large copy within the device's memory: what a kernel that
    streams K/V can reach on this device, unlike the datasheet figure."""
    nbytes = COPY_BYTES.get(device.type, 64 << 20)
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * nbytes / median_seconds(lambda: target.copy_(source), repeats, device)


def cache_flush(device: torch.device) -> Callable[[], object]:
    """Run before each timed step: on a GPU, writing 256 MiB evicts from L2 (50 MiB on an H200)
    what the last run left there, a B=1 step's whole K/V, so every step reads K/V cold from HBM,
    as in the engine, where a layer's weights pass between one step's attention and the next's.
    Nothing elsewhere: the CPU step relies on its layers, and a smoke run's times mean nothing."""
    if device.type != "cuda":
        return lambda: None
    scratch = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    return scratch.zero_


def describe(error: Exception) -> str:
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


def run_case(sweep: Sweep, build: Callable[[], LayerCase], reference: list, bound: float) -> dict:
    """Build a case's layer function, check it on every layer against the dense outputs, then
    time whole steps; a wrong output, an error or running out of memory is recorded instead."""
    try:
        layer_case = build()
        for layer, expected in enumerate(reference):
            if problem := mismatch(layer_case(layer), expected, SWEEP_TOLERANCE[sweep.dtype]):
                return {"wrong": f"layer {layer}: {problem}"}

        def whole_step() -> list:  # every layer in turn, as the engine runs them
            return [layer_case(layer) for layer in range(sweep.layers)]

        step = median_seconds(whole_step, sweep.repeats, sweep.device, sweep.flush)
    except torch.cuda.OutOfMemoryError as error:  # the caller frees what the case held
        return {"error": describe(error), "out_of_memory": True}
    except Exception as error:  # an unsupported shape, a kernel that does not build...
        return {"error": describe(error)}
    seconds = step / sweep.layers
    return {"us": significant(seconds * 1e6), "x_bound": significant(seconds / bound)}


def significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def backend_case(
    name: str, page_size: int, step: Step, paged: Callable, sweep: Sweep
) -> Callable[[], LayerCase]:
    """What builds one layer of ``name``'s attend, on the cache for its page size (shared by the
    backends that use that size) and the step's metadata, both built outside the timing."""

    def build() -> LayerCase:
        cache, meta = paged(page_size)
        req = requirements(sweep.device, sweep.dtype, page_size, sweep.heads)
        backend = create_backend(name, req)
        query, scale = step.query, sweep.scale
        return lambda layer: backend.attend(
            query, cache.key(layer), cache.value(layer), meta, scale
        )

    return build


def skip_reason(name: str, page_size: int, shape: Shape, sweep: Sweep) -> str | None:
    """Why a (backend, shape) case is not run: past the time limit, or over the memory cap."""
    if time.perf_counter() > sweep.deadline:
        return "time limit reached"
    element_size = torch.empty((), dtype=sweep.dtype).element_size()
    need = workspace_bytes(name, shape, sweep.heads, page_size, element_size)
    if need > sweep.memory_cap:
        cap = sweep.memory_cap / 2**30
        return f"workspace up to {need / 2**30:.1f} GiB, over the {cap:g} GiB cap"
    return None


def shape_row(shape: Shape, sweep: Sweep) -> tuple[dict, float]:
    """A shape's row before any case: its size, bytes to read and bound; and the bound in s."""
    element_size = torch.empty((), dtype=sweep.dtype).element_size()
    nbytes = read_bytes(shape, sweep.heads, element_size)
    bound = nbytes / sweep.bandwidth
    row = {"shape": shape.name, "batch": len(shape.contexts), "tokens": sum(shape.query_lens)}
    row |= {"read_bytes": nbytes, "bound_us": significant(bound * 1e6)}
    datasheet = None if sweep.datasheet is None else significant(nbytes / sweep.datasheet * 1e6)
    return row | {"datasheet_bound_us": datasheet}, bound


def sweep_shape(shape: Shape, sizes: dict[str, int], sweep: Sweep, seed: int) -> dict:
    """One shape's row: dense and every backend checked then timed, or why not."""
    row, bound = shape_row(shape, sweep)
    if time.perf_counter() > sweep.deadline:
        return row | {"skipped": "time limit reached"}
    try:
        step = make_step(shape, sweep, seed)
        reference = [dense_step(step, layer, sweep.scale) for layer in range(sweep.layers)]
    except Exception as error:  # out of memory for the dense K/V itself, say
        return row | {"error": describe(error)}
    paged = functools.cache(lambda page_size: paged_step(step, page_size, seed))
    dense = run_case(
        sweep, lambda: lambda layer: dense_step(step, layer, sweep.scale), reference, bound
    )
    cases = {"dense": dense}
    for name, page_size in sizes.items():
        reason = skip_reason(name, page_size, shape, sweep)
        build = backend_case(name, page_size, step, paged, sweep)
        outcome = {"skipped": reason} if reason else run_case(sweep, build, reference, bound)
        cases[name] = {"page_size": page_size} | outcome
        release(sweep.device, collect=False)  # the backend and its workspace are gone already
    return row | {"cases": cases} | peak_memory(sweep.device)


def release(device: torch.device, collect: bool = True) -> None:
    """Give back what the last case or shape held, so the next starts with the memory free (a
    collection takes ~0.1 s with torch loaded: once per shape)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory(device: torch.device) -> dict:
    """The most the shape had allocated at once, to size the next run by (CUDA only)."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {"peak_memory_gib": round(peak, 2)}


def outcome_word(case: dict) -> str | None:
    """Why a case or shape has no time, as a table cell: wrong, error or skipped."""
    return next((word for word in ("wrong", "error", "skipped") if word in case), None)


def sweep_report(payload: dict) -> list[str]:
    """Markdown: the device and bandwidths, one row per shape (its bound, then each case's us per
    layer and multiple of the bound), and why each case without a time has none."""
    shapes = payload["shapes"]
    names = list(dict.fromkeys(name for row in shapes for name in row.get("cases", {})))
    rows, notes = [], []
    for row in shapes:
        cells = {"shape": row["shape"], "bound us": row["bound_us"]}
        cells["datasheet bound us"] = row["datasheet_bound_us"]
        if word := outcome_word(row):
            notes.append(f"- {row['shape']}: {word}: {row[word]}")
        for name in names:
            case = row.get("cases", {}).get(name, {})
            cells[f"{name} us"] = case.get("us", outcome_word(case))
            cells[f"{name} x"] = case.get("x_bound")
            if word := outcome_word(case):
                notes.append(f"- {row['shape']}, {name}: {word}: {case[word]}")
        rows.append(cells)
    bw, config, absent = payload["bandwidth"], payload["config"], payload["not_runnable"]
    datasheet = "none known" if bw["datasheet_Bps"] is None else f"{bw['datasheet_Bps']:.3g} B/s"
    head = [
        f"# Paged attention on {payload['device_name']} ({config['dtype']}, "
        f"page size {config['page_size']}, heads {config['heads']})",
        "",
        f"Bandwidth: {bw['measured_Bps']:.3g} B/s measured ({bw['how']}); datasheet {datasheet}.",
        f"Times: {config['timing']}; x = time / bound (measured bandwidth).",
        "Not runnable here: " + ("; ".join(f"{n} ({r})" for n, r in absent.items()) or "none"),
        "",
    ]
    return head + harness.markdown(rows) + ([""] + notes if notes else [])


def write_sweep(out: Path, stem: str, payload: dict) -> tuple[Path, str]:
    """``<out>/<stem>.json`` (the Markdown in it as ``table_markdown``) and ``<out>/<stem>.md``."""
    text = "\n".join(sweep_report(payload)) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(payload | {"table_markdown": text}, indent=2) + "\n")
    return path, text


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def datasheet_bandwidth(name: str) -> float | None:
    return next((bw for part, bw in DATASHEET_BANDWIDTH.items() if part in name), None)


def progress(row: dict) -> str:
    """One console line per shape, so a log cut short by a time limit still says something."""
    parts = [
        f"{name} {case['us']} us ({case['x_bound']}x)"
        if "us" in case
        else f"{name} {outcome_word(case)}"
        for name, case in row.get("cases", {}).items()
    ]
    elapsed = time.perf_counter() - harness.STARTED
    status = outcome_word(row) or f"bound {row['bound_us']} us"
    return f"[{elapsed:5.1f} s] {row['shape']}: {status}; " + ", ".join(parts)


def make_sweep(args, device: torch.device, dtype: torch.dtype) -> Sweep:
    """The shared settings, the bandwidth measured once here, before any shape's memory is taken."""
    bandwidth = copy_bandwidth(device, args.repeats)
    datasheet = datasheet_bandwidth(device_name(device))
    settings = {"layers": args.layers, "repeats": args.repeats, "seed": args.seed}
    return Sweep(
        heads=LLAMA_1B,
        device=device,
        dtype=dtype,
        **settings,
        bandwidth=bandwidth,
        datasheet=datasheet,
        memory_cap=args.memory_cap_gib * 2**30,
        deadline=time.perf_counter() + args.time_limit,  # from the sweep's start, not import
        flush=cache_flush(device),
    )


def sweep_config(args, sweep: Sweep) -> dict:
    """How the figures were taken, for the results."""
    heads, cuda = sweep.heads, sweep.device.type == "cuda"
    clock = "CUDA events, L2 flushed and device idle" if cuda else "host clock, device idle"
    timing = f"us per layer: median of {args.repeats} steps of {args.layers} layers after warm-up"
    config = {"heads": f"{heads.query}/{heads.kv}x{heads.dim}", "page_size": args.page_size}
    config |= {"dtype": str(sweep.dtype).removeprefix("torch."), "layers": args.layers}
    config |= {"repeats": args.repeats, "timing": f"{timing} ({clock} before each)"}
    config |= {"seed": args.seed, "memory_cap_gib": args.memory_cap_gib}
    config["time_limit_s"] = args.time_limit
    config["checked_against_dense"] = {"max_error_vs_largest_output": SWEEP_TOLERANCE[sweep.dtype]}
    return config


def run_sweep(args, device: torch.device, dtype: torch.dtype) -> None:
    """Every shape in turn, memory freed between them; then the results written and printed."""
    sizes, not_runnable = backend_page_sizes(device, dtype, args.page_size, LLAMA_1B)
    sweep = make_sweep(args, device, dtype)
    batches = args.batches or (SMOKE_BATCHES if args.smoke else SWEEP_BATCHES)
    contexts = args.contexts or (SMOKE_CONTEXTS if args.smoke else SWEEP_CONTEXTS)
    rows = []
    with torch.inference_mode():
        shapes = sweep_shapes(batches, contexts, SMOKE_MIXED if args.smoke else MIXED)
        for k, shape in enumerate(shapes):
            rows.append(sweep_shape(shape, sizes, sweep, args.seed + k))
            release(device)
            print(progress(rows[-1]), flush=True)
    copied = COPY_BYTES.get(device.type, 64 << 20) >> 20
    bandwidth = {"measured_Bps": significant(sweep.bandwidth), "datasheet_Bps": sweep.datasheet}
    bandwidth["how"] = f"a {copied} MiB copy on the device: bytes read + written / time"
    payload = {"environment": environment(torch.get_num_threads(), device)}
    payload |= {"device_name": device_name(device), "config": sweep_config(args, sweep)}
    payload |= {"bandwidth": bandwidth, "not_runnable": not_runnable, "shapes": rows}
    payload["total_seconds"] = round(time.perf_counter() - harness.STARTED, 1)
    stem = f"attention-{device.type}" + ("-smoke" if args.smoke else "")
    path, text = write_sweep(results_folder(args), stem, payload)
    print(text, f"wrote {path} (+ .md) in {payload['total_seconds']} s", sep="\n")


def results_folder(args) -> Path:
    """``--out``, else results/ for a real run and a new temporary folder for a smoke run."""
    if args.out:
        return args.out
    return Path(tempfile.mkdtemp(prefix="bench-attention-")) if args.smoke else harness.RESULTS


@dataclass(frozen=True)
class ByMode:
    """An option's default that depends on the mode, all three shown in ``--help``."""

    step: int
    sweep: int
    smoke: int

    def __str__(self) -> str:
        return f"{self.step} (sweep {self.sweep}, smoke {self.smoke})"

    def pick(self, args) -> int:
        if args.smoke:
            return self.smoke
        return self.sweep if torch.device(args.device).type == "cuda" else self.step


def parse_args():
    parser = harness.options(__doc__, threads=1, repeats=ByMode(200, 20, 3))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--layers", type=int, default=ByMode(8, 2, 2), help="%(default)s")
    parser.add_argument("--smoke", action="store_true", help="the sweep, tiny shapes, any device")
    parser.add_argument("--batches", type=harness.comma_list(int), help="sweep: decode batches")
    parser.add_argument("--contexts", type=harness.comma_list(int), help="sweep: decode contexts")
    parser.add_argument("--memory-cap-gib", type=float, default=40.0, help="sweep: per case")
    parser.add_argument("--time-limit", type=float, default=40.0, help="sweep: s, from its start")
    parser.add_argument("--out", type=Path, help="sweep: results folder (smoke: a temporary one)")
    args = harness.start(parser)
    for key in ("repeats", "layers"):
        if isinstance(value := getattr(args, key), ByMode):
            setattr(args, key, value.pick(args))
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if args.smoke or device.type == "cuda":
        run_sweep(args, device, dtype)
    else:
        run_step(args, device, dtype)


def run_step(args, device: torch.device, dtype: torch.dtype) -> None:
    """The CPU step: uniform and ragged contexts, each backend's attend and forward vs dense."""
    threads = torch.get_num_threads()
    sync = synchronizer(device)
    scale = 1 / math.sqrt(HEAD_DIM)
    sizes, skipped = backend_page_sizes(device, dtype, args.page_size)

    ragged = np.random.default_rng(args.seed).integers(RAGGED[0], RAGGED[1] + 1, BATCH).tolist()
    contexts = {"uniform": [CONTEXT] * BATCH, "ragged": ragged}  # ragged: about the same mean
    results = {}
    with torch.inference_mode():
        for k, (name, lengths) in enumerate(contexts.items()):
            w = make_workload(name, lengths, args.layers, device, dtype, args.seed + k)
            results[name] = run_workload(w, sizes, args, scale, sync)
    shape = {"batch": BATCH, "context": CONTEXT, "ragged_range": list(RAGGED)}
    shape |= {"query_heads": QUERY_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM}
    timing = "median of repeats steps over all layers, divided by layers (s per layer)"
    run = {"page_size": args.page_size, "dtype": str(dtype).removeprefix("torch.")}
    run |= {"layers": args.layers, "repeats": args.repeats, "timing": timing, "seed": args.seed}
    run["checked_against_dense"] = {"atol": TOLERANCE[dtype], "rtol": TOLERANCE[dtype]}
    torch_ratio = results["uniform"]["cases"].get("torch", {}).get("attend_vs_dense")
    targets = {"torch_vs_dense_max": TARGET, "torch_vs_dense": torch_ratio}
    targets["met"] = None if torch_ratio is None else torch_ratio <= TARGET
    targets["padded_vs_torch"] = {name: r.get("padded_vs_torch") for name, r in results.items()}
    paged = {w: r["cases"].get("cpu_paged", {}).get("attend_vs_dense") for w, r in results.items()}
    targets["cpu_paged_vs_dense"] = paged
    targets["cpu_paged_vs_dense_max"] = PAGED_TARGET
    measured = [r for r in paged.values() if r is not None]
    targets["cpu_paged_met"] = max(measured) <= PAGED_TARGET if measured else None
    result = {"environment": environment(threads, device), "config": shape | run}
    result |= {"skipped": skipped, "workloads": results, "targets": targets}
    path = harness.write_json(f"attention-{device.type}", result)
    rows = [{"workload": w, "case": n} | c for w in results for n, c in results[w]["cases"].items()]
    print(*harness.markdown(rows), f"skipped: {skipped}", f"targets: {targets}", sep="\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
