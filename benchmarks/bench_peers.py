"""Peers benchmark: baton-paged against vLLM CPU and llama.cpp on the same checkpoint, workload
and threads.

    python benchmarks/bench_peers.py [--quick] [--models small,smollm2] [--repeats 2]
        [--num-requests 128] [--batch-size 32] [--threads 2] [--dtype float32|bfloat16]
        [--no-llama-cpp]

What a user of each runs: a fresh engine, a 4-prompt warm-up, then one ``generate`` over the
workload. Every repeat builds every system afresh (order rotated) and times that first
``generate`` (the headline), a second one on the same engine (warm), then one request alone (the
single stream: the longest prompt cut to 64 tokens, 256 greedy tokens), and the seconds one
request of 2000 tokens (the workload's prompts joined) takes to its first token (the long prompt).
Systems: baton-paged
through its ``LLM`` API (the fast path: native Llama executor on the CPU kernels, ``cpu_paged``
attention), the same engine on its general path (``model_impl=transformers``,
``attention_backend=torch``), and vLLM CPU 0.32 (``vllm_peer.py`` in ``.venv-vllm``, which
``.ci/vllm-tests`` builds) at its default, compiled (``vllm``), and with ``enforce_eager``
(``vllm-eager``): ``max_num_seqs`` = batch size, the same dtype, its OpenMP threads bound to as
many cores as ours use; and llama.cpp's ``llama-server`` on a GGUF of the checkpoint at the same
dtype (``llama_cpp_peer.py``; built from source once by ``build_llama_cpp.sh``). Models:
random-weight Llamas from ``make-model``, ``small`` (8 layers, hidden 512, 27.8M) and ``smollm2``
(SmolLM2-135M-Instruct's shape: 30 layers, hidden 576, 9/3 heads, vocab 49152 tied). Workload:
``bench_policies``'s (128 requests at t=0, prompts 16-256 tokens, lognormal budgets clipped to
[4, 512], every request producing exactly its budget), token ids drawn from the tokenizer's
vocabulary.

Reported per system: tokens/s of the first and the warm ``generate`` and of the single stream, and
their ratios to vLLM at its default and to llama.cpp in the same repeat (median over repeats),
and to vLLM eager; the long prompt's seconds and their ratio to vLLM's. Also measured: time
from process start to the first token of a one-request generate (baton with a cold kernel
cache, so the one-time kernel build is included; warm; the general path; the peers' build
times), and on ``small`` the decode step at B=32 against the same step's weight matmuls alone
(the floor any engine pays). Targets: baton's first ``generate``
>= 1.3x vLLM's default (milestone 1.0x) and >= 1.5x llama.cpp's, its single stream >= 1.0x
llama.cpp's, start to first token <= 0.5x vLLM's, decode step <= 1.3x its matmuls. Results:
``results/peers-cpu.{json,md,png}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import harness
import torch
from harness import Clock, Default, check, markdown, median, ratio
from llama_cpp_peer import LlamaCppPeer, gguf_of
from transformers import AutoConfig, AutoTokenizer
from workload import MAX_BUDGET, make_workload

from baton_paged import LLM, SamplingParams
from baton_paged.model.builder import cached_model
from baton_paged.model.packed_linear import PackedLinear

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SYSTEMS = {
    "baton": {"model_impl": "auto", "attention_backend": "auto"},
    "baton-general": {"model_impl": "transformers", "attention_backend": "torch"},
}
PEERS = {"vllm": "default", "vllm-eager": "eager"}
"""vLLM's systems: its default (compiled graphs) and ``enforce_eager``."""
LLAMA_CPP = "llama.cpp"
MAX_MODEL_LEN = 2048
SINGLE_PROMPT, SINGLE_BUDGET = 64, 256
"""The single stream: one request alone, the workload's longest prompt cut to 64 tokens, 256
greedy tokens (a chat turn as one CPU user sees it)."""
LONG_PROMPT = 2000
"""The long prompt: one request alone, the workload's prompts joined (repeated if short) and cut
to 2000 tokens, timed to its first token (a document or a long conversation sent at once)."""
TARGET, MILESTONE, STEP_TARGET = 1.3, 1.0, 1.3
LLAMA_CPP_SINGLE, LLAMA_CPP_BATCH, STARTUP_SHARE = 1.0, 1.5, 0.5


class VllmPeer:
    """The vLLM engine in its own environment, kept alive across repeats (``vllm_peer.py``)."""

    def __init__(
        self, workload_file: Path, model_dir: Path, batch_size: int, threads: int,
        dtype: str = "float32", mode: str = "eager",
    ):  # fmt: skip
        env = os.environ | {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
        }
        command = [VLLM_PYTHON, Path(__file__).with_name("vllm_peer.py"), workload_file, model_dir]
        start = time.perf_counter()
        self.process = subprocess.Popen(
            [*map(str, command), str(batch_size), dtype, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.ready = self._read()
        self.startup_s = time.perf_counter() - start

    def run(self) -> tuple[float, list[list[int]]]:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        reply = self._read()
        return reply["wall_s"], reply["tokens"]

    def run_rounds(self) -> list[float]:
        """The workload run once: each round's wall time (the workload file's ``rounds``)."""
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._read()["round_s"]

    def warm_up(self, count: int, budget: int) -> None:
        self.process.stdin.write(f"warmup {count} {budget}\n")
        self.process.stdin.flush()
        self._read()

    def single(self, prompt: list[int], budget: int) -> float:
        self.process.stdin.write(f"single {json.dumps(prompt, separators=(',', ':'))} {budget}\n")
        self.process.stdin.flush()
        return self._read()["wall_s"]

    def close(self) -> None:
        self.process.communicate("quit\n", timeout=120)

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"vllm_peer.py exited with {self.process.wait()}; see its stderr")
        return json.loads(line)


def baton_llm(model_dir: Path, batch_size: int, system: str, dtype: str) -> LLM:
    return LLM(
        str(model_dir),
        dtype=dtype,
        max_batch_size=batch_size,
        kv_memory="2GiB",
        max_model_len=MAX_MODEL_LEN,
        **SYSTEMS[system],
    )


class BatonSystem:
    """Our engine through its ``LLM`` API, with the peers' interface."""

    def __init__(self, llm: LLM, work):
        self.llm, self.work = llm, work

    def run(self) -> tuple[float, list[list[int]]]:
        return baton_run(self.llm, self.work)

    def warm_up(self, count: int, budget: int) -> None:
        baton_run(self.llm, self.work.head(count, budget))

    def single(self, prompt: list[int], budget: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=budget, ignore_eos=True)
        self.llm.reset_prefix_cache()  # the prompt was in the runs before it
        start = time.perf_counter()
        self.llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        return time.perf_counter() - start

    def close(self) -> None:
        self.llm.close()


def baton_run(llm: LLM, work) -> tuple[float, list[list[int]]]:
    """The workload's wall time and tokens, from a reset prefix cache (as ``vllm_peer.py`` runs
    vLLM): a repeat must not find its prompts cached by the run before it."""
    prompts = [{"prompt_token_ids": p} for p in work.prompts]
    params = [SamplingParams(temperature=0, max_tokens=b, ignore_eos=True) for b in work.budgets]
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outs]


def startup_seconds(
    model_dir: Path, system: str, threads: int, cache: str | None, dtype: str
) -> float:
    """Wall seconds from launching a fresh interpreter to the first token of one request; with
    ``cache`` the kernels are built into an empty cache first (a user's very first start)."""
    code = (
        f"import torch; torch.set_num_threads({threads})\n"
        "from baton_paged import LLM, SamplingParams\n"
        f"llm = LLM({str(model_dir)!r}, dtype={dtype!r}, kv_memory='256MiB', "
        f"max_model_len={MAX_MODEL_LEN}, **{SYSTEMS[system]!r})\n"
        "llm.generate([{'prompt_token_ids': [1, 2, 3]}], SamplingParams(max_tokens=1),\n"
        "             use_tqdm=False)\n"
    )
    env = os.environ | ({"BATON_PAGED_CACHE": cache} if cache else {})
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def decode_step_vs_matmuls(llm: LLM, model_dir: Path, batch: int, repeats: int) -> dict:
    """A B-request decode step next to its weight matmuls alone, interleaved; the step includes
    scheduling, metadata, attention and sampling."""
    engine = llm.engine
    if engine.snapshot.model_impl != "native":
        return {"batch": batch, "error": "no native executor here (see the engine's log)"}
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for i in range(batch):
        engine.add_request({"prompt_token_ids": list(range(1, 129))}, params, request_id=f"d{i}")
    while engine.snapshot.num_running < batch or engine.snapshot.num_waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    matmuls = weight_matmuls(model_dir, batch, engine.config.torch_dtype)
    times = harness.interleaved({"step": engine.step, "matmuls": matmuls}, repeats, lambda: None)
    for i in range(batch):
        engine.abort_request(f"d{i}")
    return {"batch": batch, "step_s": times["step"], "matmul_s": times["matmuls"]}


def weight_matmuls(model_dir: Path, batch: int, dtype: torch.dtype) -> Callable[[], None]:
    """One decode step's weight matmuls on ``batch`` rows as the native executor runs them: per
    layer fused QKV, output, fused gate-up and down projections, then the LM head, each a
    ``PackedLinear`` of the checkpoint's shape in the engine's dtype (the values do not change the
    time, and these Llamas have no biases)."""
    config = AutoConfig.from_pretrained(model_dir)
    hidden, mlp = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layer = [(q + 2 * kv, hidden), (hidden, q), (2 * mlp, hidden), (hidden, mlp)]
    shapes = layer * config.num_hidden_layers + [(config.vocab_size, hidden)]
    linears = [PackedLinear(torch.randn(shape, dtype=dtype)) for shape in shapes]
    inputs = {n: torch.randn(batch, n, dtype=dtype) for n in {lin.in_features for lin in linears}}

    def matmuls() -> None:
        for linear in linears:
            linear(inputs[linear.in_features])

    return matmuls


def build_system(system: str, args, model_dir: Path, work, workload_file: Path):
    if system in PEERS:
        return VllmPeer(workload_file, model_dir, args.batch_size, args.threads, args.dtype,
                        PEERS[system])  # fmt: skip
    if system == LLAMA_CPP:
        return LlamaCppPeer(work, gguf_of(model_dir, args.dtype), args.batch_size, args.threads,
                            MAX_MODEL_LEN)  # fmt: skip
    return BatonSystem(baton_llm(model_dir, args.batch_size, system, args.dtype), work)


def fresh_run(system: str, args, model_dir: Path, work, workload_file: Path) -> dict:
    """One system built afresh: its build time, a 4-prompt warm-up, the workload twice, then one
    request alone (the single stream)."""
    start = time.perf_counter()
    engine = build_system(system, args, model_dir, work, workload_file)
    built = getattr(engine, "startup_s", time.perf_counter() - start)  # a peer's own process
    try:
        engine.warm_up(4, 4)
        (first, tokens), (warm, warm_tokens) = engine.run(), engine.run()
        single = engine.single(single_prompt(work), SINGLE_BUDGET)
        long = engine.single(long_prompt(work), 1)
    finally:
        engine.close()
    per_s = work.total_budget
    return {
        "built_s": built,
        "first_tok_s": per_s / first,
        "warm_tok_s": per_s / warm,
        "single_tok_s": SINGLE_BUDGET / single,
        "long_prompt_s": long,
        "unparsed": sum(t is None for t in (*tokens, *warm_tokens)),
        "tokens": tokens,
    }


def single_prompt(work) -> list[int]:
    return max(work.prompts, key=len)[:SINGLE_PROMPT]


def long_prompt(work) -> list[int]:
    """The workload's prompts joined (over again where they are fewer tokens, as with --quick)."""
    joined = [token for prompt in work.prompts for token in prompt]
    return (joined * -(-LONG_PROMPT // len(joined)))[:LONG_PROMPT]


def measure_model(args, size: str) -> dict:
    model_dir = cached_model("llama", size)
    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    work = make_workload(args.num_requests, vocab, args.max_budget, args.seed)
    runs, tokens = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        workload_file = Path(scratch) / "workload.json"
        payload = {"prompts": work.prompts, "budgets": work.budgets, "max_model_len": MAX_MODEL_LEN}
        workload_file.write_text(json.dumps(payload))
        for repeat, system in harness.rotations(systems(args), args.repeats):
            with Clock() as clock:
                run = fresh_run(system, args, model_dir, work, workload_file)
            tokens[system] = run.pop("tokens")
            cpu = round(clock.cpu / clock.wall, 2)
            runs.append({"model": size, "system": system, "repeat": repeat} | run | {"cpu": cpu})
            print(f"{size} {system} repeat {repeat}: first {run['first_tok_s']:.1f} tok/s, warm "
                  f"{run['warm_tok_s']:.1f}, single {run['single_tok_s']:.1f}, built "
                  f"{run['built_s']:.1f} s, unparsed {run['unparsed']}", flush=True)  # fmt: skip
        llm = baton_llm(model_dir, args.batch_size, "baton", args.dtype)
        step = decode_step_vs_matmuls(llm, model_dir, args.batch_size, args.repeats * 5)
        llm.close()
        startup = {"baton (cold kernel cache)": startup_seconds(
            model_dir, "baton", args.threads, scratch, args.dtype)}  # fmt: skip
        startup["baton"] = startup_seconds(model_dir, "baton", args.threads, None, args.dtype)
        startup["baton-general"] = startup_seconds(
            model_dir, "baton-general", args.threads, None, args.dtype
        )
        for peer in set(systems(args)) - set(SYSTEMS):
            startup[peer] = median(r["built_s"] for r in runs if r["system"] == peer)
    pairs = [("baton", "vllm"), ("baton", "baton-general"), ("vllm", "vllm-eager")]
    pairs += [("baton", LLAMA_CPP)] if LLAMA_CPP in tokens else []
    agree = {f"{a} = {b}": same_share(tokens[a], tokens[b]) for a, b in pairs}
    return {
        "runs": runs,
        "decode_step": step,
        "startup_s": startup,
        "same_tokens": agree,
        "workload": work.describe(args.max_budget) | {"vocab": vocab},
    }


def systems(args) -> list[str]:
    return [*SYSTEMS, *PEERS, *([LLAMA_CPP] if args.llama_cpp else [])]


def same_share(ours: list, theirs: list) -> float:
    """The share of requests with equal greedy tokens, among those both returned."""
    both = [(x, y) for x, y in zip(ours, theirs, strict=True) if x is not None and y is not None]
    return round(sum(x == y for x, y in both) / len(both), 3) if both else None


def summarise(model: dict, size: str) -> list[dict]:
    """One row per system: its medians over repeats, and its ratios to vLLM's default (and eager)
    and to llama.cpp, each taken within a repeat."""
    rows = []
    runs = model["runs"]
    base = {(r["repeat"], k): r[k] for r in runs if r["system"] == "vllm"
            for k in ("first_tok_s", "warm_tok_s", "long_prompt_s")}  # fmt: skip
    eager = {r["repeat"]: r["first_tok_s"] for r in runs if r["system"] == "vllm-eager"}
    llama = {(r["repeat"], k): r[k] for r in runs if r["system"] == LLAMA_CPP
             for k in ("first_tok_s", "single_tok_s")}  # fmt: skip
    for system in [s for s in (*SYSTEMS, *PEERS, LLAMA_CPP) if any(r["system"] == s for r in runs)]:
        mine = [r for r in runs if r["system"] == system]
        first = [r["first_tok_s"] / base[r["repeat"], "first_tok_s"] for r in mine]
        to_llama = {
            f"{k.split('_')[0]} x llama.cpp": median(
                (r[k] / llama[r["repeat"], k] for r in mine), 3
            )
            for k in ("first_tok_s", "single_tok_s")
            if llama
        }
        rows.append(
            {
                "model": size,
                "system": system,
                "first tok/s": median((r["first_tok_s"] for r in mine), 1),
                "first x vLLM": median(first, 3),
                "first x vLLM min-max": [round(min(first), 3), round(max(first), 3)],
                "first x vLLM eager": median(
                    (r["first_tok_s"] / eager[r["repeat"]] for r in mine), 3
                ),
                "warm tok/s": median((r["warm_tok_s"] for r in mine), 1),
                "warm x vLLM": median(
                    (r["warm_tok_s"] / base[r["repeat"], "warm_tok_s"] for r in mine), 3
                ),
                "single tok/s": median((r["single_tok_s"] for r in mine), 1),
                "long prompt s": median((r["long_prompt_s"] for r in mine), 3),
                "long prompt x vLLM time": median(
                    (r["long_prompt_s"] / base[r["repeat"], "long_prompt_s"] for r in mine), 3
                ),
                **to_llama,
                "unparsed": sum(r["unparsed"] for r in mine),
                "startup_s": round(model["startup_s"].get(system), 1),
            }
        )
    return rows


def report(saved: dict) -> tuple[list[str], str, harness.Panels]:
    rows = [row for size, model in saved["models"].items() for row in summarise(model, size)]
    lines = [
        "# baton-paged vs vLLM CPU and llama.cpp (useful output tokens/s, same workload, fresh"
        " engines: the first generate, then a warm one; then one request alone, the single"
        f" stream: a {SINGLE_PROMPT}-token prompt, {SINGLE_BUDGET} tokens; then the long prompt:"
        f" seconds to the first token of {LONG_PROMPT} tokens sent alone)",
        "",
        *markdown(rows),
        "",
        "Start to first token (s):",
        "",
    ]
    lines += markdown([{"model": size} | m["startup_s"] for size, m in saved["models"].items()])
    lines += ["", "Same greedy tokens (share of requests):", ""]
    lines += markdown([{"model": size} | m["same_tokens"] for size, m in saved["models"].items()])
    steps = [{"model": size} | m["decode_step"] for size, m in saved["models"].items()]
    lines += ["", "Decode step vs its weight matmuls:", "", *markdown(steps)]
    panels = {"tokens/s": harness.series(rows, "model", "system", "first tok/s")}
    return lines, "baton-paged vs vLLM CPU and llama.cpp", panels


def main() -> None:
    parser = harness.options(
        __doc__,
        threads=2,
        repeats=Default(2, 1),
        quick="16 requests of budget <= 32",
        results="peers-cpu",
    )
    parser.add_argument(
        "--models", type=harness.comma_list(str, ("small", "smollm2")), default=["small", "smollm2"]
    )
    parser.add_argument("--num-requests", type=int, default=Default(128, 16))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="every engine's dtype (%(default)s)")  # fmt: skip
    parser.add_argument(
        "--no-llama-cpp", dest="llama_cpp", action="store_false",
        help="leave llama.cpp out (else built and cached by build_llama_cpp.sh)",
    )  # fmt: skip
    parser.set_defaults(max_budget=Default(MAX_BUDGET.full, 32))
    args = harness.start(parser)
    if not VLLM_PYTHON.exists():
        sys.exit(f"{VLLM_PYTHON} is missing: run .ci/vllm-tests once to build the vLLM venv")
    models = {size: measure_model(args, size) for size in args.models}
    checks = []
    for size, model in models.items():
        baton = summarise(model, size)[0]
        first = baton["first x vLLM"]
        checks += [
            check(f"{size}: baton / vLLM default, first generate (milestone)", first, MILESTONE),
            check(f"{size}: baton / vLLM default, first generate", first, TARGET),
            check(f"{size}: baton / llama.cpp, single stream", baton.get("single x llama.cpp"),
                  LLAMA_CPP_SINGLE),
            check(f"{size}: baton / llama.cpp, first generate", baton.get("first x llama.cpp"),
                  LLAMA_CPP_BATCH),
            check(f"{size}: baton / vLLM default, start to first token",
                  ratio(model["startup_s"]["baton"], model["startup_s"]["vllm"], 3),
                  STARTUP_SHARE, "<="),
        ]  # fmt: skip
        step = model["decode_step"]
        checks.append(
            check(
                f"{size}: decode step / its matmuls",
                ratio(step.get("step_s"), step.get("matmul_s"), 3),
                STEP_TARGET if size == "small" else None,
                "<=",
            )
        )
    payload = {
        "environment": harness.environment(args.threads, torch.device("cpu")),
        "args": vars(args),
        "models": models,
        "checks": checks,
    }
    harness.publish(args.name, payload, report, [])


if __name__ == "__main__":
    main()
