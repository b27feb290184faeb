"""The ``cpu_paged`` kernel's prompt tiles against its path without them, on prompts' shapes.

    python benchmarks/bench_prompt_tiles.py [--repeats 15] [--threads 2] [--quick]

One request's new tokens over its paged context, one layer's attention per call, 8 layers each
with its own K/V (pages shuffled, as a pool hands them out after churn), reported in us per layer:
whole prompts of 64-2048 tokens and chunks of 16-256 new tokens after 160-1024 cached. float32 on
the small Llama's heads (8 query / 4 KV of 64), on SmolLM2's (9 / 3 of 64) and on 8 / 8 (no
grouping: one query head a KV head, as in MHA models), bfloat16 on SmolLM2's where the CPU has
AMX. Cases, interleaved: ``tiles`` (the kernel as the engine runs it: float32 prompt tiles on
AVX-512 registers, ``attention/csrc/float_tiles.h``; bfloat16 ones on AMX tiles,
``amx_attention.h``), ``vectors`` (the tiles switched off: the 16-lane per-row maths, or torch's
attention on the gathered context for the requests the kernel hands it), and ``dense``
(``scaled_dot_product_attention`` on contiguous K/V, no pages: a floor from outside). Both kernel
cases are checked against dense first. Checked: float32's tiles within 1.05x of the time without
them on every shape (bfloat16's whole prompts from 2^20 pairs on take torch's attention on
either path, so their rows are the same call twice; without tiles, every request from 4096).
Results: ``results/prompt-tiles-cpu.*``.
"""

from __future__ import annotations

import harness
import torch
import torch.nn.functional as F
from harness import Default, interleaved

from baton_paged.attention.cpu_extension import cpu_kernels

LAYERS = 8
PAGE = 16
HEAD_DIM = 64
SMALL_HEADS, SMOLLM2_HEADS, MHA_HEADS = (8, 4), (9, 3), (8, 8)
"""(query heads, KV heads) of the small Llama, of SmolLM2-135M, and of a model without grouping."""
SHAPES = [(64, 64), (256, 256), (512, 512), (1024, 1024), (2048, 2048)]
SHAPES += [(16, 176), (64, 512), (256, 1280)]
"""(new tokens, context including them): whole prompts, then chunks after cached tokens."""
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


class Layers:
    """One request's query and ``LAYERS`` layers of K/V, paged and dense."""

    def __init__(self, new: int, context: int, dtype: torch.dtype, heads: tuple, seed: int):
        generator = torch.Generator().manual_seed(seed)
        heads, kv_heads = heads
        pages = -(-context // PAGE)
        self.table = torch.randperm(2 * pages, generator=generator)[:pages].to(torch.int32)[None]
        self.query = torch.randn(new, heads, HEAD_DIM, generator=generator).to(dtype)
        self.cu_seqlens = torch.tensor([0, new], dtype=torch.int32)
        self.context = torch.tensor([context], dtype=torch.int32)
        self.scale = HEAD_DIM**-0.5
        self.paged, self.dense = [], []
        slots = (self.table[0].long()[:, None] * PAGE + torch.arange(PAGE)).flatten()[:context]
        kernels = cpu_kernels()
        for _ in range(LAYERS):
            key, value = (torch.randn(context, kv_heads, HEAD_DIM, generator=generator).to(dtype)
                          for _ in range(2))  # fmt: skip
            caches = [torch.zeros(2 * pages, PAGE, kv_heads, HEAD_DIM, dtype=dtype) for _ in "kv"]
            kernels.write_kv(*caches, slots, key, value)  # in the kernel's own page layout
            self.paged.append(caches)
            self.dense.append((key, value))

    def attend(self) -> list[torch.Tensor]:
        kernels, outs = cpu_kernels(), []
        for key_pages, value_pages in self.paged:
            out = torch.empty_like(self.query)
            kernels.paged_attention(out, self.query, key_pages, value_pages, self.table,
                                    self.cu_seqlens, self.context, self.scale)  # fmt: skip
            outs.append(out)
        return outs

    def attend_dense(self) -> list[torch.Tensor]:
        new, context = self.query.shape[0], int(self.context)
        seen = torch.ones(new, context, dtype=torch.bool).tril(context - new)
        outs = []
        for key, value in self.dense:
            out = F.scaled_dot_product_attention(
                *(t[None].transpose(1, 2) for t in (self.query, key, value)),
                attn_mask=None if new == context else seen, is_causal=new == context,
                scale=self.scale, enable_gqa=True,
            )  # fmt: skip
            outs.append(out[0].transpose(0, 1))
        return outs


def switched(tiles: bool, run):
    """``run`` with the kernel's prompt tiles on or off, the setting restored after it."""

    def call():
        previous = cpu_kernels().use_prompt_tiles(tiles)
        try:
            return run()
        finally:
            cpu_kernels().use_prompt_tiles(previous)

    return call


def measure(new: int, context: int, dtype: torch.dtype, heads: tuple, repeats: int, seed: int):
    layers = Layers(new, context, dtype, heads, seed)
    cases = {
        "tiles": switched(True, layers.attend),
        "vectors": switched(False, layers.attend),
        "dense": layers.attend_dense,
    }
    expected = layers.attend_dense()
    for name in ("tiles", "vectors"):
        for out, reference in zip(cases[name](), expected, strict=True):
            tolerance = TOLERANCE[dtype]
            torch.testing.assert_close(
                out.float(), reference.float(), atol=tolerance, rtol=tolerance,
                msg=lambda m, name=name: f"{name}, {new}/{context}: {m}",
            )  # fmt: skip
    times = interleaved(cases, repeats, lambda: None, warmup=1)
    us = {name: round(seconds / LAYERS * 1e6, 1) for name, seconds in times.items()}
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "heads": "{}/{}".format(*heads),
        "new": new,
        "context": context,
        "tiles_us": us["tiles"],
        "vectors_us": us["vectors"],
        "dense_us": us["dense"],
        "tiles_x_vectors": round(us["tiles"] / us["vectors"], 3),
        "tiles_x_dense": round(us["tiles"] / us["dense"], 3),
    }


def report(saved: dict) -> tuple[list[str], str, harness.Panels]:
    rows = saved["rows"]
    lines = ["# Prompt tiles: us per layer, the kernel with and without them", ""]
    lines += harness.markdown(rows)
    cased = [row | {"case": f"{row['dtype']} {row['heads']}"} for row in rows]
    panel = harness.series(cased, "context", "case", "tiles_x_vectors")
    return lines, "cpu_paged prompt tiles / without them", {"time ratio by context": panel}


def main() -> None:
    parser = harness.options(
        __doc__, threads=2, repeats=Default(15, 3), quick="fewer repeats",
        results="prompt-tiles-cpu",
    )  # fmt: skip
    args = harness.start(parser)
    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("the attention kernels cannot be built here")
    if not kernels.float_tiles_available():
        raise SystemExit("no AVX-512 build here: float32 has no prompt tiles to compare")
    cases = [(torch.float32, heads) for heads in (SMALL_HEADS, SMOLLM2_HEADS, MHA_HEADS)]
    if kernels.amx_attention_available():
        cases.append((torch.bfloat16, SMOLLM2_HEADS))
    rows = []
    with torch.inference_mode():
        for dtype, heads in cases:
            for new, context in SHAPES:
                rows.append(measure(new, context, dtype, heads, args.repeats, args.seed))
                print(rows[-1], flush=True)
    checks = [  # float32's: bfloat16's larger requests take torch's attention either way
        harness.check(
            f"{r['dtype']} {r['heads']} heads, {r['new']}/{r['context']}: tiles / vectors",
            r["tiles_x_vectors"],
            1.05,
            "<=",
        )  # fmt: skip
        for r in rows
        if r["dtype"] == "float32"
    ]
    payload = {
        "environment": harness.environment(args.threads, torch.device("cpu")),
        "rows": rows,
        "checks": checks,
    }
    harness.publish(args.name, payload, report, [])


if __name__ == "__main__":
    main()
