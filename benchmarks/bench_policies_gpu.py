"""BATON's headline experiment on a GPU: useful output tokens/s of the batching policies on a
Llama-3.2-1B-shaped model in bfloat16, requests arriving over time.

    python benchmarks/bench_policies_gpu.py [--num-requests 512] [--rate 64] [--max-batch 64]
        [--time-cap 20] [--deadline 100] [--policies baton,orca,static,chunked]
    python benchmarks/bench_policies_gpu.py --device cpu --dtype float32 --size tiny \\
        --num-requests 8            # the CPU smoke run (tests/test_bench_policies_gpu.py)

Run by ``benchmarks/gpu_check.sh`` (its ``policies`` part) on a lent H200 with no network, where
the whole run, the checkpoint build included, must end within 120 s. The defaults are that run:

* Model: the builder's random-weight ``llama1b`` (Llama-3.2-1B's shape, 1.24B parameters, tied
  128256-token vocabulary; built into ``$BATON_PAGED_CACHE`` on first use, a few seconds), loaded
  once in ``--dtype`` on ``--device`` and lent to one ``Engine`` per policy (attention backend
  ``auto``, decode replayed from CUDA graphs where the backend allows), so the 2.5 GB of weights
  load once. Each engine's construction (KV pool, graph capture) and warm-up (nine short requests
  joining over five iterations, ``WARMUP``; the process's first engine also meets the run's
  shapes once, ``SWEEP_BUDGET``) are timed apart from its run, so graph capture and Triton
  compilation stay out of the figures (CUDA graphs are captured once per engine, which is the
  price of building one engine per policy: ``engine_build_s``).
* Workload: ``bench_policies``' seeded requests (prompts 16-256 tokens, lognormal output budgets
  of mean ~92 clipped to [4, 512], every request producing exactly its budget: greedy,
  ``ignore_eos``), arriving as a Poisson process at ``--rate`` requests/s. Why 64/s: the batch
  of 64 stays full only while requests come at least as fast as the engine serves them (Little's
  law: 64 busy slots x (mean budget / tokens/s) seconds each), i.e. rate x mean budget >= its
  tokens/s. 64/s offers ~5.9k tokens/s, ~1.5x the 2-4k tokens/s a 1B model in bf16 was expected
  to reach at B=64, so every policy is saturated while requests arrive (~8 s for 512) and its
  tokens/s is its own service rate, not the arrival rate; after that the queue drains. 512
  requests carry ~47k tokens: ~16 s at 3k tokens/s. A policy whose tokens/s comes out near the
  offered load was keeping up rather than saturated; its mean batch size says which.
* Per policy: useful output tokens/s (tokens produced / wall time from the first arrival to the
  last token), slot efficiency (``EngineStats``: tokens generated / batch slots offered over the
  run), mean batch size, TTFT p50 and p99 from each request's arrival time (as scheduled, not
  when the loop got to submit it) to its first token, and baton / orca beside the paper's
  1.29-1.75x (arXiv 2410.18701; its Orca baseline, model and GPU differ from ours).
* Caps: a policy's run stops at ``--time-cap`` seconds, or earlier when the policies still to
  run (each assumed to take as long to build and warm its engine as the first did, its sweep
  aside) would otherwise end past ``--deadline`` seconds after ``main`` started (imports, ~5 s,
  come before); the first run's cap is every run's unless time runs shorter than foreseen.
  A capped row reports the tokens produced up to the cap over the time to the cap and is marked
  ``capped``: its requests did not all finish, and its TTFT covers only those that got a first
  token.

Results: ``results/policies-gpu.json`` and ``.md`` (``--name``, ``--out-dir``), the table printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import harness
import numpy as np
import torch
import transformers
import workload
from harness import comma_list, markdown, percentile, ratio
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton_paged.engine import Engine
from baton_paged.model.builder import cached_model
from baton_paged.sampling_params import SamplingParams
from baton_paged.sched.policies import POLICIES

POLICY_NAMES = ("baton", "orca", "static", "chunked")
PAPER_BATON_OVER_ORCA = (1.29, 1.75)
KV_HEADROOM = 1.25
"""The KV pool holds every slot's longest request (prompt + budget) with this much to spare for
page rounding, so no policy is slowed by preemption: llama1b in bf16 at B=64, 64 x 768 tokens x
32 KiB x 1.25 = 1.9 GiB."""
WARMUP = ((0, 16), (1, 17), (1, 100), (2, 256), (2, 32), (3, 129), (3, 255), (3, 64), (4, 200))
"""(iteration it joins at, prompt length) of each warm-up request: they join over five
iterations, so orca and chunked run mixed prefill + decode forwards too, and the prefills'
lengths and block-table widths come out 1, a multiple of 16 and neither (Triton compiles a kernel
per such kind of each integer argument)."""
WARMUP_BUDGET = 8
SWEEP_BUDGET = 4
"""Budget of the first engine's extra warm-up wave: ``--max-batch`` requests at once, prompts
across the workload's range, so the process meets the run's shapes once before any run (packed
prefills of up to ``max_prefill_tokens``, decode at the full batch: allocator growth, GEMM
heuristics, kernel variants); without it the first policy's run ran ~20% slower on the CPU."""
RESERVE_S = 3.0
"""Kept free of runs under ``--deadline``: the last engine's teardown and the results."""
MIN_CAP_S = 2.0
COLUMNS = ("policy", "tokens_per_s", "x_orca", "slot_efficiency", "mean_batch_size",
           "ttft_p50_s", "ttft_p99_s", "finished", "exact_budgets", "capped", "wall_s", "cap_s",
           "engine_build_s", "warmup_s", "attention_backend")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    add = parser.add_argument
    add("--device", default="cuda", help="torch device (%(default)s)")
    add("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    add("--size", default="llama1b", help="builder size of the random Llama (%(default)s)")
    add("--model-dir", default=None, help="a checkpoint to use instead of building --size")
    add("--policies", type=comma_list(str, POLICIES), default=list(POLICY_NAMES))
    add("--num-requests", type=int, default=512, help="%(default)s")
    add("--rate", type=float, default=64.0, help="Poisson arrivals per second (%(default)s)")
    add("--max-batch", type=int, default=64, help="max batch size, all policies (%(default)s)")
    add("--max-budget", type=int, default=workload.BUDGET_CLIP[1], help="%(default)s")
    add("--kv-memory", default=None, help="KV pool per engine (default: KV_HEADROOM's)")
    add("--attention-backend", default="auto")
    add("--time-cap", type=float, default=20.0, help="seconds per policy's run (%(default)s)")
    add("--deadline", type=float, default=100.0, help="seconds for all of main (%(default)s)")
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=None, help="torch CPU threads (default: as torch has)")
    add("--name", default="policies-gpu", help="results file stem (%(default)s)")
    add("--out-dir", type=Path, default=harness.RESULTS, help="results folder")
    return parser.parse_args(argv)


# The workload ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrivals:
    """The requests and when each arrives: seconds after the run starts, ascending, first 0."""

    work: workload.Workload
    offsets: tuple[float, ...]

    def describe(self, rate: float, max_budget: int) -> dict:
        info = self.work.describe(max_budget)
        span = self.offsets[-1] if self.offsets else 0.0
        offered = info["budget"]["mean"] * rate
        return info | {"rate_per_s": rate, "arrival_span_s": round(span, 2),
                       "offered_tokens_per_s": round(offered, 1)}  # fmt: skip


def poisson_arrivals(work: workload.Workload, rate: float, seed: int) -> Arrivals:
    """Exponential gaps at ``rate``, seeded apart from the prompts; the first request at t=0."""
    gaps = np.random.default_rng(seed + 1).exponential(1.0 / rate, len(work.prompts))
    offsets = np.cumsum(gaps) - gaps[0]
    return Arrivals(work, tuple(float(t) for t in offsets))


def warmup_arrivals(vocab: int, seed: int) -> list[workload.Arrival]:
    """``WARMUP``'s requests, ``WARMUP_BUDGET`` tokens each; ids never clash with the run's."""
    rng = np.random.default_rng(seed + 2)
    return [
        workload.Arrival(step, f"warmup{i}", rng.integers(1, vocab, n).tolist(), WARMUP_BUDGET)
        for i, (step, n) in enumerate(WARMUP)
    ]


def sweep_arrivals(vocab: int, seed: int, count: int) -> list[workload.Arrival]:
    """``count`` requests at once, prompt lengths across the workload's range, ``SWEEP_BUDGET``
    tokens each (why: ``SWEEP_BUDGET``)."""
    rng = np.random.default_rng(seed + 3)
    lens = rng.integers(workload.PROMPT_LENS[0], workload.PROMPT_LENS[1] + 1, count)
    return [
        workload.Arrival(0, f"sweep{i}", rng.integers(1, vocab, n).tolist(), SWEEP_BUDGET)
        for i, n in enumerate(lens)
    ]


# One policy's engine and run -------------------------------------------------------------------


@dataclass
class TimedRun:
    """What one engine did with the arrivals before all finished or the cap came."""

    wall_s: float
    capped: bool
    submitted: int
    produced: dict[str, int] = field(default_factory=dict)
    """Tokens each request had at the end (its last output)."""
    finish: dict[str, str] = field(default_factory=dict)
    """Finish reason of each finished request."""
    ttft_s: dict[str, float] = field(default_factory=dict)
    """From each request's scheduled arrival to its first token."""
    counters: dict = field(default_factory=dict)
    """The engine's stats over this run alone (the warm-up subtracted)."""


STAT_DELTAS = ("generated_tokens", "offered_slots", "iterations", "batch_rows", "preemptions",
               "forwards", "prompt_tokens")  # fmt: skip


def drive_timed(engine: Engine, arrivals: Arrivals, cap_s: float, sync) -> TimedRun:
    """Submit each request once its arrival time has passed (between iterations), step until all
    have finished or ``cap_s`` seconds have gone, idle (sleeping) while nothing is in flight."""
    pending = deque(enumerate(arrivals.offsets))
    before = engine.snapshot.stats
    first: dict[str, float] = {}
    run = TimedRun(wall_s=0.0, capped=False, submitted=0)
    sync()
    base = time.monotonic()  # the clock of RequestMetrics
    while pending or engine.has_unfinished_requests():
        now = time.monotonic() - base
        if now >= cap_s:
            run.capped = True
            break
        while pending and pending[0][1] <= now:
            submit(engine, arrivals.work, pending.popleft()[0])
            run.submitted += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(pending[0][1], cap_s) - now))
            continue
        for out in engine.step():
            run.produced[out.request_id] = len(out.outputs[0].token_ids)
            if out.request_id not in first and out.metrics.first_token_time is not None:
                first[out.request_id] = out.metrics.first_token_time
            if out.finished:
                run.finish[out.request_id] = out.outputs[0].finish_reason
    sync()
    run.wall_s = time.monotonic() - base
    run.ttft_s = {rid: t - base - arrivals.offsets[int(rid)] for rid, t in first.items()}
    after = engine.snapshot.stats
    run.counters = {k: getattr(after, k) - getattr(before, k) for k in STAT_DELTAS}
    return run


def submit(engine: Engine, work: workload.Workload, i: int) -> None:
    params = SamplingParams(temperature=0, max_tokens=work.budgets[i], ignore_eos=True)
    engine.add_request({"prompt_token_ids": work.prompts[i]}, params, request_id=str(i))


def summary_row(policy: str, run: TimedRun, arrivals: Arrivals, cap_s: float) -> dict:
    """Useful tokens (each request's tokens, never beyond its budget) over the run's wall time;
    the engine's slot efficiency and batch occupancy; TTFT percentiles; budgets honoured."""
    budgets = arrivals.work.budgets
    useful = sum(min(n, budgets[int(rid)]) for rid, n in run.produced.items())
    exact = all(
        reason == "length" and run.produced[rid] == budgets[int(rid)]
        for rid, reason in run.finish.items()
    )
    c = run.counters
    ttft = sorted(run.ttft_s.values())
    return {
        "policy": policy,
        "tokens_per_s": round(useful / run.wall_s, 1) if run.wall_s > 0 else None,
        "useful_tokens": useful,
        "total_budget": arrivals.work.total_budget,
        "slot_efficiency": ratio(c["generated_tokens"], c["offered_slots"], 4),
        "mean_batch_size": ratio(c["batch_rows"], c["iterations"], 2),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_n": len(ttft),
        "finished": len(run.finish),
        "submitted": run.submitted,
        "num_requests": len(budgets),
        "all_finished": len(run.finish) == len(budgets),
        "exact_budgets": exact,
        "capped": run.capped,
        "wall_s": round(run.wall_s, 3),
        "cap_s": round(cap_s, 1),
    } | c


def max_model_len(args) -> int:
    """The longest prompt plus the longest budget: the graphs' block tables need no more."""
    return workload.PROMPT_LENS[1] + args.max_budget


def kv_memory(model, args) -> str:
    """``--kv-memory``, else room for ``--max-batch`` requests of ``max_model_len`` tokens."""
    if args.kv_memory:
        return args.kv_memory
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * model.dtype.itemsize
    need = KV_HEADROOM * args.max_batch * max_model_len(args) * per_token
    return str(int(need))  # bytes


def build_engine(model, tokenizer, policy: str, args) -> Engine:
    """An engine around the already-loaded model (its dtype and device), under ``policy``."""
    return Engine.build(
        hf_model=model,
        tokenizer=tokenizer,
        policy=policy,
        max_batch_size=args.max_batch,
        kv_memory=kv_memory(model, args),
        max_model_len=max_model_len(args),
        attention_backend=args.attention_backend,
    )


def free_memory() -> None:
    """Hand a dropped engine's KV pool and graph memory back before the next engine allocates
    its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Budget:
    """How long each policy's run may take, so that all of them end by the deadline. The first
    run's cap is every run's (capped runs then cover the same window of the arrivals, ramp-up
    included); a later run gets less only if time ran shorter than foreseen."""

    time_cap: float
    deadline: float
    started: float
    settled: float | None = None

    def cap(self, left: int, engine_overhead_s: float) -> float:
        """The cap of the next run, ``left`` runs (this one included) to go, each later one
        first paying ``engine_overhead_s`` to build and warm its engine."""
        remaining = self.deadline - (time.perf_counter() - self.started) - RESERVE_S
        share = max(MIN_CAP_S, (remaining - (left - 1) * engine_overhead_s) / left)
        if self.settled is None:
            self.settled = min(self.time_cap, share)
        return min(self.settled, share)


def run_policy(model, tokenizer, policy, arrivals, args, budget: Budget, left: int, vocab):
    """Build, warm and run one policy's engine (the process's first also runs the sweep); its
    summary row, with the build and warm-up times."""
    sync = harness.synchronizer(torch.device(args.device))
    start = time.perf_counter()
    engine = build_engine(model, tokenizer, policy, args)
    sync()
    built = time.perf_counter()
    if left == len(args.policies):
        workload.drive(engine, sweep_arrivals(vocab, args.seed, args.max_batch))
    swept = time.perf_counter()
    workload.drive(engine, warmup_arrivals(vocab, args.seed))
    engine.reset_prefix_cache()  # nothing the warm-up computed is reused
    sync()
    warmed = time.perf_counter()
    cap = budget.cap(left, (built - start) + (warmed - swept))  # what a later engine will take
    run = drive_timed(engine, arrivals, cap, sync)
    row = summary_row(policy, run, arrivals, cap)
    snapshot = engine.snapshot
    row |= {"engine_build_s": round(built - start, 2), "warmup_s": round(warmed - built, 2)}
    row |= {"attention_backend": snapshot.attention_backend, "model_impl": snapshot.model_impl}
    row["cuda_graphs"] = engine.runner.graphs is not None
    engine.close()  # aborts what a cap left, gives the model its own attention back
    del engine
    free_memory()
    return row


# The whole run ---------------------------------------------------------------------------------


def load(args) -> tuple[Path, object, object, dict]:
    """The checkpoint (built unless given or cached), its tokenizer and its model on the device,
    with the seconds each took."""
    start = time.perf_counter()
    path = Path(args.model_dir) if args.model_dir else cached_model("llama", args.size)
    built = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    harness.synchronizer(torch.device(args.device))()
    loaded = time.perf_counter()
    times = {"checkpoint_s": round(built - start, 2), "load_s": round(loaded - built, 2)}
    return path, model, tokenizer, times


def baton_over_orca(rows: list[dict]) -> dict:
    """baton's tokens/s over orca's, where the paper's range puts it, and whether a capped run
    (partial figures) went into it."""
    by = {row["policy"]: row for row in rows}
    if "baton" not in by or "orca" not in by:
        return {"value": None, "paper": list(PAPER_BATON_OVER_ORCA)}
    value = ratio(by["baton"]["tokens_per_s"], by["orca"]["tokens_per_s"], 3)
    low, high = PAPER_BATON_OVER_ORCA
    where = None
    if value is not None:
        where = "below" if value < low else "above" if value > high else "within"
    capped = by["baton"]["capped"] or by["orca"]["capped"]
    return {"value": value, "paper": [low, high], "vs_paper": where, "from_capped_runs": capped}


def report(payload: dict) -> str:
    """The Markdown: the setup in a few lines, the table, baton / orca beside the paper."""
    args, work, setup = payload["args"], payload["workload"], payload["setup"]
    found, env = payload["baton_over_orca"], payload["environment"]
    capped = ", from a capped run" if found.get("from_capped_runs") else ""
    model = Path(args["model_dir"]).name if args["model_dir"] else f"{args['size']} random Llama"
    lines = [
        f"# Batching policies on {env.get('gpu', env['device'])}: {model}, "
        f"{args['dtype']}, max batch {args['max_batch']}",
        "",
        f"{work['num_requests']} requests, Poisson arrivals at {args['rate']:g}/s over "
        f"{work['arrival_span_s']} s (offered {work['offered_tokens_per_s']} tokens/s), prompts "
        f"{work['prompt_len']['min']}-{work['prompt_len']['max']} tokens, budgets mean "
        f"{work['budget']['mean']:.1f} (max {work['budget']['max']}, {work['budget']['total']} "
        f"in all), greedy, EOS ignored. Checkpoint {setup['checkpoint_s']} s, load "
        f"{setup['load_s']} s; whole run {payload['total_seconds']} s.",
        "",
        *markdown(payload["rows"], COLUMNS),
        "",
        f"baton / orca useful tokens/s: {found['value']} (paper: {found['paper'][0]}-"
        f"{found['paper'][1]}x; here {found.get('vs_paper')} that range{capped}).",
    ]
    return "\n".join(lines) + "\n"


def write(payload: dict, out_dir: Path, name: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = report(payload)
    (out_dir / f"{name}.md").write_text(text)
    (out_dir / f"{name}.json").write_text(json.dumps(payload | {"table_markdown": text}, indent=2))
    return text


def main(argv: list[str] | None = None) -> dict:
    """Run every policy once; write and print the results; return what was written."""
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    path, model, tokenizer, setup = load(args)
    vocab = len(tokenizer)  # prompt ids the tokenizer knows; the model's vocabulary may be larger
    work = workload.make_workload(args.num_requests, vocab, args.max_budget, args.seed)
    arrivals = poisson_arrivals(work, args.rate, args.seed)
    info = arrivals.describe(args.rate, args.max_budget)
    print(f"workload: {info}\nsetup: {setup}", flush=True)
    budget = Budget(args.time_cap, args.deadline, started)
    rows = []
    for i, policy in enumerate(args.policies):
        left = len(args.policies) - i
        rows.append(run_policy(model, tokenizer, policy, arrivals, args, budget, left, vocab))
        row = rows[-1]
        print({k: row.get(k) for k in COLUMNS if k != "x_orca"}, flush=True)
    orca = next((r["tokens_per_s"] for r in rows if r["policy"] == "orca"), None)
    for row in rows:
        row["x_orca"] = ratio(row["tokens_per_s"], orca, 3)
    device = torch.device(args.device)
    env = harness.environment(torch.get_num_threads(), device)
    env |= {"transformers": transformers.__version__, "model": str(path)}
    payload = {
        "environment": env,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "workload": info,
        "setup": setup
        | {"max_model_len": max_model_len(args), "kv_memory": kv_memory(model, args)},
        "rows": rows,
        "baton_over_orca": baton_over_orca(rows),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    text = write(payload, args.out_dir, args.name)
    print(f"\n{text}\nwrote {args.out_dir / args.name}.json (+ .md) in "
          f"{payload['total_seconds']} s", flush=True)  # fmt: skip
    return payload


if __name__ == "__main__":
    main()
