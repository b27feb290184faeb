"""Quantized weights benchmark: the default model in float32, bfloat16, int8 and int4, and GGUF
files at their own width, each against llama.cpp's server on the same file.

    python benchmarks/bench_quantized.py [--quick] [--repeats 2] [--threads 2] [--no-llama-cpp]
        [--files Q4_1,Q4_K_M,Q8_0]

The default model (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF, which the engine dequantizes to a
float32 checkpoint on first use. Our systems on that checkpoint: float32, bfloat16, and
``quantization="int4"`` (32 inputs a group, asymmetric: the Q4_1 layout, so its blocks come back as
they were in the file) and ``int8`` (one scale per output channel), the LM head int8 in both, with
bfloat16 activations, and int8 with float32 ones (``int8 float32``). Then ``gguf <file>``: a GGUF
file at its own width (``gguf_weights.py``) in bfloat16, as ``quantization=None`` runs it; ``gguf
Q4_1`` is the default model as served (no model named). The other files are made from the default
model by llama.cpp's converter (float32) and ``llama-quantize`` (``build_llama_cpp.sh quantize``):
Q4_K_M (on this model's 576-wide rows mostly Q5_0 and Q8_0 fallbacks, Q4_K and Q6_K where rows are
1536 wide) and Q8_0, whose formats we re-quantize to int8. Each repeat builds every system afresh
(order rotated): a 4-prompt warm-up, one request alone (the single stream: the perplexity text's
first 64 tokens, 256 greedy tokens), then ``bench_policies``' workload (64 requests, 32 slots,
budgets <= 512). llama.cpp: ``llama-server`` (``build_llama_cpp.sh``) on each file, with
``bench_peers``' settings. Reported: tokens/s and ratios within each repeat (median over repeats;
"x llama.cpp" is against llama.cpp on the system's own file, Q4_1 for the systems on the
checkpoint), and the share of the single stream's 256 tokens each system keeps equal to float32
before the first difference. Targets (issue 35): the default model at its width (gguf Q4_1) and
int4 single >= 1.0x llama.cpp, int8 single >= 1.6x float32, batch >= 1.5x llama.cpp; perplexity on
``tests/data/perplexity.txt`` (``baton_paged/bench/perplexity.py``, llama-perplexity's measure in
512-token windows): int8 within 1% of float32, int4 and every GGUF file within 1% of
``llama-perplexity`` on the same file.
Results: ``results/quantized-cpu.{json,md,png}``.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import harness
import torch
from harness import Default, check, markdown, median
from llama_cpp_peer import BUILD_SCRIPT, GGUF_DIR, LlamaCppPeer, gguf_of, server_binary
from transformers import AutoTokenizer
from workload import MAX_BUDGET, make_workload

from baton_paged import LLM, SamplingParams
from baton_paged.bench.perplexity import perplexity
from baton_paged.model.builder import default_model, default_model_gguf
from baton_paged.model.builder.smollm2 import GGUF_MEMBER


@dataclass(frozen=True)
class System:
    dtype: str
    quantization: str | None = None
    file: str | None = None
    """A GGUF file's type (``FILES``), run at its own width; None: the default checkpoint."""


SYSTEMS = {
    "float32": System("float32"),
    "bfloat16": System("bfloat16"),
    "int8": System("bfloat16", "int8"),
    "int8 float32": System("float32", "int8"),
    "int4": System("bfloat16", "int4"),
}
"""Our systems on the default checkpoint. Quantized weights run with bfloat16 activations,
where every quantized CPU kernel is fast (``quantized_linear.py``), and int8 with float32 ones
too: on AVX-512 its column-block kernel reads the codes alone at every row count."""
FILES = ("Q4_1", "Q4_K_M", "Q8_0")
"""GGUF files of the default model: its own (Q4_1), and llama-quantize's of its float32 GGUF."""
MAX_MODEL_LEN = 2048
SINGLE_PROMPT, SINGLE_BUDGET = 64, 256
INT4_SINGLE, INT8_SINGLE, INT4_BATCH = 1.0, 1.6, 1.5
"""Targets, also for the default model at its width (gguf Q4_1): single and batch against
llama.cpp on the same file."""
PERPLEXITY_TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "perplexity.txt"
PERPLEXITY_CONTEXT = 512
INT8_PERPLEXITY, INT4_PERPLEXITY = 0.01, 0.01
"""Targets: int8 within 1% of float32's perplexity, int4 and the GGUF files within 1% of
llama.cpp's on the same file."""


def gguf_system(kind: str) -> str:
    return f"gguf {kind}"


def llama_cpp_system(kind: str) -> str:
    return f"llama.cpp {kind}"


def our_systems(files: tuple[str, ...]) -> dict[str, System]:
    at_width = {gguf_system(k): System("bfloat16", None, k) for k in files}
    return {**SYSTEMS, **at_width}


def peer_of(system: str) -> str:
    """The llama.cpp system on ``system``'s file (Q4_1 for those on the default checkpoint)."""
    return llama_cpp_system(system.removeprefix("gguf ") if system.startswith("gguf ") else "Q4_1")


def our_llm(system: System, **options) -> LLM:
    """The engine a user gets for ``system``: a GGUF file at its width with no quantization
    named (the default model's own file: no model named at all)."""
    if system.file is None:
        model = str(default_model())
    else:
        model = None if system.file == "Q4_1" else str(gguf_file(system.file))
    llm = LLM(model, dtype=system.dtype, quantization=system.quantization,
              max_model_len=MAX_MODEL_LEN, **options)  # fmt: skip
    if system.file is not None and llm.engine.config.quantization != "gguf":
        raise RuntimeError(f"{system.file} did not run at its own width")
    return llm


class Baton:
    def __init__(self, system: System, args, work):
        self.llm = our_llm(system, max_batch_size=args.batch_size, kv_memory="2GiB")
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
    """``LlamaCppPeer`` on a GGUF file, with ``Baton``'s interface."""

    def __init__(self, kind: str, args, work):
        path = gguf_file(kind)
        self.peer = LlamaCppPeer(work, path, args.batch_size, args.threads, MAX_MODEL_LEN)

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


def gguf_file(kind: str) -> Path:
    """The default model as a ``kind`` GGUF: its own file (Q4_1, the one the engine dequantized),
    else llama-quantize's of the float32 GGUF llama.cpp's converter writes of it; made once."""
    if kind == "Q4_1":
        return default_model_gguf()
    target = GGUF_DIR / f"{Path(GGUF_MEMBER).name.removesuffix('.Q4_1.gguf')}.{kind}.gguf"
    if not target.exists():
        source = gguf_of(default_model(), "float32")
        command = [BUILD_SCRIPT, "quantize", source, target, kind]
        subprocess.run(list(map(str, command)), check=True, stdout=subprocess.DEVNULL)
    return target


def fresh_run(system: str, args, work) -> dict:
    ours = our_systems(args.files)
    if system in ours:
        engine = Baton(ours[system], args, work)
    else:
        engine = LlamaCpp(system.removeprefix("llama.cpp "), args, work)
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
    peers = [llama_cpp_system(kind) for kind in args.files] if args.llama_cpp else []
    systems = [*our_systems(args.files), *peers]
    runs = []
    for repeat, system in harness.rotations(systems, args.repeats):
        run = fresh_run(system, args, work)
        runs.append({"system": system, "repeat": repeat} | run)
        print(f"{system} repeat {repeat}: single {run['single_tok_s']:.1f} tok/s, batch "
              f"{run['batch_tok_s']:.1f}", flush=True)  # fmt: skip
    scores = {name: our_perplexity(system) for name, system in our_systems(args.files).items()}
    for kind in args.files if args.llama_cpp else ():
        scores[llama_cpp_system(kind)] = llama_cpp_perplexity(kind, args.threads)
    return {"runs": runs, "perplexity": scores, "workload": work.describe(args.max_budget)}


def our_perplexity(system: System) -> float:
    llm = our_llm(system, kv_memory="256MiB")
    try:
        tokens = llm.get_tokenizer()(PERPLEXITY_TEXT.read_text(), add_special_tokens=False)
        return round(perplexity(llm, tokens.input_ids, PERPLEXITY_CONTEXT), 4)
    finally:
        llm.close()


def llama_cpp_perplexity(kind: str, threads: int) -> float:
    """``llama-perplexity`` (built beside ``llama-server``) on the file and the same text."""
    binary = server_binary().with_name("llama-perplexity")
    command = [binary, "-m", gguf_file(kind), "-f", PERPLEXITY_TEXT, "-c", PERPLEXITY_CONTEXT,
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
            "single x llama.cpp": _over(mine, by, peer_of(system), "single_tok_s"),
            "batch tok/s": median((r["batch_tok_s"] for r in mine), 1),
            "batch x float32": _over(mine, by, "float32", "batch_tok_s"),
            "batch x llama.cpp": _over(mine, by, peer_of(system), "batch_tok_s"),
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
        "# The default model quantized: baton-paged float32 / bfloat16 / int8 / int4, GGUF files at"
        " their own width (gguf), and llama.cpp on the same files; x llama.cpp is against"
        " llama.cpp on the system's file, Q4_1 for those on the checkpoint (single stream: a"
        f" {SINGLE_PROMPT}-token prompt, {SINGLE_BUDGET}"
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
    parser.add_argument("--files", type=lambda text: tuple(text.split(",")), default=FILES,
                        help="GGUF types of the default model to run at their width (Q4_1 first:"
                             " the default as served)")  # fmt: skip
    parser.set_defaults(max_budget=Default(MAX_BUDGET.full, 32))
    args = harness.start(parser)
    saved = measure(args)
    rows = {row["system"]: row for row in summarise(saved)}
    scores, q4_1 = saved["perplexity"], gguf_system("Q4_1")
    checks = [
        check("gguf Q4_1 (the default as served) / llama.cpp Q4_1, single stream",
              rows.get(q4_1, {}).get("single x llama.cpp"), INT4_SINGLE),
        check("int4 / llama.cpp Q4_1, single stream", rows["int4"]["single x llama.cpp"],
              INT4_SINGLE),
        check("int8 / float32, single stream", rows["int8"]["single x float32"], INT8_SINGLE),
        check("int8 / bfloat16, single stream", rows["int8"]["single x bfloat16"], None),
        check("gguf Q4_1 / llama.cpp Q4_1, batch", rows.get(q4_1, {}).get("batch x llama.cpp"),
              INT4_BATCH),
        check("int4 / llama.cpp Q4_1, batch", rows["int4"]["batch x llama.cpp"], INT4_BATCH),
        check("int8 perplexity / float32's - 1", _excess(scores, "int8", "float32"),
              INT8_PERPLEXITY, "<="),
        check("int4 perplexity / llama.cpp Q4_1's - 1", _excess(scores, "int4", peer_of("int4")),
              INT4_PERPLEXITY, "<="),
        *(check(f"gguf {kind} perplexity / llama.cpp {kind}'s - 1",
                _excess(scores, gguf_system(kind), llama_cpp_system(kind)), INT4_PERPLEXITY, "<=")
          for kind in args.files),
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
