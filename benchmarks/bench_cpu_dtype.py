"""CPU dtype benchmark: our engine in bfloat16 against float32 on the same CPU.

    python benchmarks/bench_cpu_dtype.py [--quick] [--models small,smollm2] [--repeats 2]

What ``dtype="auto"`` decides on a CPU with native bfloat16 (AVX512-BF16 or AMX): each repeat
builds a fresh engine per dtype (order rotated) and reports its first ``generate`` over
``bench_policies``' workload (a 4-prompt warm-up first, as ``bench_peers``), batch size 32, and a
single stream (one request, 128 tokens) on the same engine. Models: ``small`` and ``smollm2``
(SmolLM2-135M-Instruct's shape), random weights. Also: greedy agreement, the tokens of the first
8 requests equal before the first difference (bfloat16 rounds differently; no target).
Results: ``results/cpu-dtype.{json,md,png}``.
"""

from __future__ import annotations

import time

import harness
import torch
from harness import Default, check, markdown, median, ratio
from workload import MAX_BUDGET, make_workload

from baton_paged import LLM, SamplingParams
from baton_paged.config import cpu_computes_bfloat16
from baton_paged.model.builder import cached_model

DTYPES = ("float32", "bfloat16")
SINGLE_TOKENS = 128


def run_once(size: str, dtype: str, args) -> dict:
    start = time.perf_counter()
    llm = LLM(str(cached_model("llama", size)), dtype=dtype, max_batch_size=args.batch_size,
              kv_memory="1GiB", max_model_len=2048)  # fmt: skip
    built = time.perf_counter() - start
    work = make_workload(args.num_requests, len(llm.get_tokenizer()), args.max_budget, args.seed)
    prompts = [{"prompt_token_ids": p} for p in work.prompts]
    params = [SamplingParams(temperature=0, max_tokens=b, ignore_eos=True) for b in work.budgets]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    batch = sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)
    single = SamplingParams(temperature=0, max_tokens=SINGLE_TOKENS, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts[:1], single, use_tqdm=False)
    stream = SINGLE_TOKENS / (time.perf_counter() - start)
    tokens = [list(o.outputs[0].token_ids) for o in outputs[:8]]
    llm.close()
    return {"built_s": built, "batch_tok_s": batch, "single_tok_s": stream, "tokens": tokens}


def agreement(a: list[list[int]], b: list[list[int]]) -> list[int]:
    """Per request: tokens equal before the first difference."""
    return [next((i for i, (x, y) in enumerate(zip(s, t, strict=False)) if x != y), len(s))
            for s, t in zip(a, b, strict=True)]  # fmt: skip


def measure(size: str, args) -> dict:
    runs = {dtype: [] for dtype in DTYPES}
    for _, dtype in harness.rotations(DTYPES, args.repeats):
        run = run_once(size, dtype, args)
        runs[dtype].append(run)
        print(
            f"{size} {dtype}: batch {run['batch_tok_s']:.1f} tok/s, single "
            f"{run['single_tok_s']:.1f} tok/s, built in {run['built_s']:.2f} s",
            flush=True,
        )
    summary = {
        dtype: {
            key: median(r[key] for r in done) for key in ("built_s", "batch_tok_s", "single_tok_s")
        }
        for dtype, done in runs.items()
    }
    first = runs["float32"][0]["tokens"], runs["bfloat16"][0]["tokens"]
    return {"runs": runs, "summary": summary, "agreement": agreement(*first)}


def report(payload: dict):
    rows = []
    for size, model in payload["models"].items():
        fp32, bf16 = model["summary"]["float32"], model["summary"]["bfloat16"]
        rows.append({
            "model": size,
            "fp32 batch tok/s": round(fp32["batch_tok_s"], 1),
            "bf16 batch tok/s": round(bf16["batch_tok_s"], 1),
            "bf16 / fp32 batch": ratio(bf16["batch_tok_s"], fp32["batch_tok_s"], 2),
            "fp32 single tok/s": round(fp32["single_tok_s"], 1),
            "bf16 single tok/s": round(bf16["single_tok_s"], 1),
            "bf16 / fp32 single": ratio(bf16["single_tok_s"], fp32["single_tok_s"], 2),
            "greedy tokens equal before a difference": model["agreement"],
        })  # fmt: skip
    lines = [f"CPU bfloat16 native: {payload['bf16_native']}", "", *markdown(rows)]
    panels = {"bf16 / fp32": harness.series(rows, "model", "model", "bf16 / fp32 batch",
                                            "bf16 / fp32 single")}  # fmt: skip
    return lines, "bfloat16 against float32 on the CPU", panels


def main() -> None:
    parser = harness.options(__doc__, threads=2, repeats=Default(2, 1),
                             quick="16 requests of budget <= 32", results="cpu-dtype")  # fmt: skip
    parser.add_argument("--models", type=harness.comma_list(str, ("small", "smollm2")),
                        default=["small", "smollm2"])  # fmt: skip
    parser.add_argument("--num-requests", type=int, default=Default(128, 16))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.set_defaults(max_budget=Default(MAX_BUDGET.full, 32))
    args = harness.start(parser)
    models = {size: measure(size, args) for size in args.models}
    checks = [
        check(f"{size}: bf16 / fp32 {kind}", ratio(m["summary"]["bfloat16"][key],
                                                  m["summary"]["float32"][key], 3), None)
        for size, m in models.items()
        for kind, key in (("batch", "batch_tok_s"), ("single stream", "single_tok_s"))
    ]  # fmt: skip
    payload = {
        "environment": harness.environment(args.threads, torch.device("cpu")),
        "args": vars(args),
        "bf16_native": cpu_computes_bfloat16(),
        "models": models,
        "checks": checks,
    }
    harness.publish(args.name, payload, report, [])


if __name__ == "__main__":
    main()
