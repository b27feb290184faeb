"""Attention benchmark: one decode step of attention over the paged cache vs dense SDPA.

    python benchmarks/bench_attention.py [--threads 1] [--repeats 200] [--device cpu|cuda]

Shapes: batch 32, 8 query / 4 KV heads, head dim 64, one new token per request,
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
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import harness
import numpy as np
import torch
import torch.nn.functional as F
from harness import environment, interleaved, synchronizer

from baton_paged.allocator import KVCache, KVCacheSpec, pages_needed, slot_mapping
from baton_paged.attention import AttentionMetadata, AttentionRequirements, create_backend
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


def fill_cache(cache: KVCache, layer: int, w: Workload, table: np.ndarray) -> None:
    """Write every request's K/V into its pages through the cache's own slot-mapping write."""
    contexts = np.array(w.contexts)
    slots = slot_mapping(table, np.zeros_like(contexts), contexts, cache.spec.page_size)
    keys = [w.keys[layer, row, :, :n].transpose(0, 1) for row, n in enumerate(w.contexts)]
    values = [w.values[layer, row, :, :n].transpose(0, 1) for row, n in enumerate(w.contexts)]
    mapping = torch.from_numpy(slots).to(cache.device)
    cache.write(layer, mapping, torch.cat(keys), torch.cat(values))


def paged_batch(w: Workload, page_size: int, seed: int, device: torch.device) -> PagedBatch:
    """A cache twice the batch's size, all of it random (so a backend reading a wrong page shows
    up in the check), with the batch written at shuffled pages."""
    dtype = w.keys.dtype
    spec = KVCacheSpec(len(w.keys), KV_HEADS, HEAD_DIM, page_size=page_size, dtype=dtype)
    per_request = [pages_needed(c, page_size) for c in w.contexts]
    cache = KVCache(spec, 2 * sum(per_request), device)
    cache.storage.normal_(generator=torch.Generator(device).manual_seed(seed))
    ids = np.random.default_rng(seed).permutation(cache.num_pages)  # a pool after churn
    table = harness.block_table(np.split(ids[: sum(per_request)], np.cumsum(per_request)[:-1]))
    for layer in range(spec.num_layers):
        fill_cache(cache, layer, w, table)
    meta = AttentionMetadata.build([1] * BATCH, w.contexts, table, page_size, device)
    last = torch.tensor(w.contexts, device=device) - 1
    rows = torch.arange(BATCH, device=device)
    new_keys = w.keys[:, rows, :, last].transpose(0, 1)  # advanced indices go first
    return PagedBatch(cache, meta, new_keys, w.values[:, rows, :, last].transpose(0, 1))


def requirements(device: torch.device, dtype: torch.dtype, page_size: int):
    return AttentionRequirements(device, dtype, page_size, HEAD_DIM, QUERY_HEADS, KV_HEADS)


def backend_page_sizes(
    device: torch.device, dtype: torch.dtype, page_size: int
) -> tuple[dict[str, int], dict[str, str]]:
    """Each runnable backend's page size (the configured one, else its preferred one, as flash
    needs 256-token pages) and why each other backend was skipped."""
    sizes, skipped = {}, {}
    for name, reason in unsupported_reasons(requirements(device, dtype, page_size)).items():
        preferred = backend_class(name).preferred_page_size
        if reason is None:
            sizes[name] = page_size
        elif backend_class(name).unsupported_reason(requirements(device, dtype, preferred)) is None:
            sizes[name] = preferred
        else:
            skipped[name] = reason
    return sizes, skipped


def backend_cases(
    w: Workload, batches: dict[int, PagedBatch], sizes: dict[str, int], scale: float
) -> dict[str, tuple[LayerCase, LayerCase]]:
    """name -> (attend, forward) of one layer, each checked on every layer against dense."""
    tol = TOLERANCE[w.keys.dtype]
    cases = {}
    for name, page_size in sizes.items():
        b = batches[page_size]
        backend = create_backend(name, requirements(w.query.device, w.keys.dtype, page_size))

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
    device = w.query.device
    batches = {ps: paged_batch(w, ps, args.seed, device) for ps in set(sizes.values())}
    paged = backend_cases(w, batches, sizes, scale)
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


def parse_args():
    parser = harness.options(__doc__, threads=1, repeats=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--layers", type=int, default=8, help="layers per timed step")
    return harness.start(parser)


def main() -> None:
    args = parse_args()
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
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
