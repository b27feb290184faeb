"""Serving benchmark: the OpenAI-compatible HTTP server under Poisson arrivals, per policy, against
the offline engine on the same workload.

    python benchmarks/bench_serving.py [--quick] [--repeats 1]
        [--policies baton,orca,chunked,static] [--rates 0.5,1,2,inf] [--batch-size 16]
        [--num-requests 56] [--threads 2]

Server: ``baton-paged serve`` (the real CLI, uvicorn, ``AsyncEngine``) in a subprocess on
127.0.0.1, one per policy, started by a two-line launcher that pins torch's threads (and sets
``OMP_NUM_THREADS``) to ``--threads`` before the CLI runs; small random-weight Llama, float32,
the max batch, KV budget and prefill budget of ``bench_policies``. Client: this process, an
asyncio ``httpx`` load generator, so the server's event loop (a background thread) and engine
step loop (its main thread) do not share a GIL with it; on a 2-core machine client and server
still share the cores, which is part of what is measured (each run records both processes'
CPU time / wall).

Workload: ``bench_policies``'s generator (seeded prompts of random token ids, 16-256 tokens;
lognormal output budgets of mean 100, clipped to [4, 512]), sent as ``prompt: [ids]`` with
``max_tokens = budget``, ``ignore_eos``, greedy, ``stream`` and ``stream_options.include_usage``.
Arrivals are Poisson (seeded exponential gaps, the first request at t=0, the same arrival times
for every policy) at multiples of the offline engine's sustainable rate (requests / wall time of
the baton policy's offline run of the whole workload at t=0, measured first), plus ``inf``: every
request at t=0, i.e. saturation.

Metrics follow vLLM's ``benchmark_serving``: TTFT = request sent -> first chunk with choices;
ITL = gaps between successive such chunks (all requests pooled); TPOT = (e2e - TTFT) / (output
tokens - 1), e2e = sent -> last such chunk; output tokens from ``usage.completion_tokens``; output
tokens/s = all output tokens / (first send -> last completion). p50 and p99 of each (and means in
the JSON). The server sends a chunk only when the decoded text grows (or at the finish), so a
token that decodes to nothing (a partial UTF-8 byte) merges into the next chunk: ITL then spans
two iterations, exactly as vLLM's client would measure it (chunks per token is recorded).

Offline reference: ``Engine`` in this process with the same ``EngineConfig`` and thread count,
every request at t=0 (``workload.run_engine``), run for each policy right before its server
starts, while no server runs. Target: at rate inf, HTTP streaming output tokens/s >= 0.9x the
offline engine's for the baton policy (other policies' ratios reported). Runs interleave (each
repeat runs every policy, order rotated), record wall time, CPU time / wall and the 1-minute load
average; errors are recorded, never replaced by numbers. Results go to
``results/serving-cpu.{json,md,png}`` (``--quick``: ``serving-cpu-quick.*``).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from functools import partial

import harness
import httpx
import workload
from harness import Default, check, markdown, median, medians, ratio
from serving_http import DISTURBED_CPU, Server, ServingRun, busy_cpu_seconds, make_arrivals

from baton_paged.sched.policies import POLICIES

TARGET_POLICY = "baton"
TARGET_RATIO = 0.9


def run_offline(ours: workload.OurModel, policy: str, batch: int, requests) -> workload.RunResult:
    """The offline engine on the whole workload at t=0 (after a 2-request warm-up on another
    engine), and how much of the cores other processes took meanwhile."""
    result = workload.RunResult(system=policy, batch_size=batch, repeat=-1)

    def run() -> None:
        warm = workload.RunResult(system=policy, batch_size=batch, repeat=-1)
        workload.run_engine(ours.engine(policy, batch), requests.head(2, budget=2), warm)
        engine, busy = ours.engine(policy, batch), busy_cpu_seconds()
        workload.run_engine(engine, requests, result)
        other = (busy_cpu_seconds() - busy) / result.wall_s - result.cpu_per_wall
        result.extra |= {"other_cpu_per_wall": round(other, 3), "disturbed": other > DISTURBED_CPU}

    return harness.recorded(result, run)


def serve_policy(ours, policy: str, repeat: int, args, requests, arrivals) -> dict:
    """Start the policy's server, warm it, run every rate (inf first: the offline run it is
    compared with has just ended), stop it. Returns the runs and the server's setup."""
    order = sorted(arrivals, key=lambda label: label != "inf")  # next to the offline run first
    runs = [ServingRun(policy, label, arrivals[label][0], repeat) for label in order]
    serve = ["--model", str(ours.path), "--policy", policy, "--dtype", "float32"]
    serve += ["--max-batch-size", str(args.batch_size), "--kv-memory", workload.KV_MEMORY]
    serve += ["--max-prefill-tokens", str(workload.MAX_PREFILL_TOKENS)]
    server = Server(serve, args.threads, log_prefix=f"serve-{policy}")
    info: dict = {}
    try:
        info["startup_s"] = round(server.wait_ready(), 2)
        info["torch_threads"] = server.torch_threads()
        records, _ = server.send(requests.prompts[:2], [2, 2], [0, 0], args.request_timeout)
        info["warmup_errors"] = [r.error for r in records if r.error]
        for run in runs:
            server.load(run, requests, arrivals[run.rate][1], args.request_timeout)
            print(f"[rep {repeat}] {policy:>8} rate {run.rate:>4} {run.describe()}", flush=True)
    except Exception as error:  # the run and those after it record why, never a number
        message = f"{type(error).__name__}: {error}"
        for run in runs:
            if math.isnan(run.duration_s):
                run.error = message
        print(f"[rep {repeat}] {policy:>8} server failed: {message}", flush=True)
    finally:
        server.stop()
    return {"runs": runs, "server": info}


def summarize(runs: list[ServingRun], offline: list[workload.RunResult], policies, factors) -> dict:
    """Per policy: the offline tokens/s, and per rate the medians over repeats of each metric;
    the saturation (inf) ratio HTTP / offline."""
    out: dict = {}
    for policy in policies:
        ok_off = [r for r in offline if r.system == policy and r.error is None]
        row: dict = {"offline_tokens_per_s": median((r.tokens_per_s for r in ok_off), 5)}
        row["offline_wall_s"] = median((r.wall_s for r in ok_off), 5)
        row["offline_errors"] = [r.error for r in offline if r.system == policy and r.error]
        row["offline_disturbed"] = sum(r.extra.get("disturbed", False) for r in ok_off)
        served = [r for r in runs if r.policy == policy]
        row["rates"] = {f: summarize_rate([r for r in served if r.rate == f]) for f in factors}
        http = row["rates"].get("inf", {}).get("output_tokens_per_s")
        row["saturation_ratio"] = ratio(http, row["offline_tokens_per_s"], 4)
        out[policy] = row
    return out


def summarize_rate(group: list[ServingRun]) -> dict:
    row, ok = harness.outcome(group)
    ok = [r for r in ok if r.completed]
    if not ok:
        return row
    runs = [vars(r) | r.server_stats for r in ok]
    row["request_rate"] = ok[0].request_rate
    row |= medians(runs, 5, ("output_tokens_per_s", "duration_s"))
    row["failed"] = sum(r.failed for r in ok)
    row["disturbed"] = sum(r.disturbed for r in ok)
    row["inexact"] = sum(r.completed - r.exact for r in ok)
    for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        row[metric] = medians([r[metric] for r in runs], 5, ("mean", "p50", "p99"))
    silences = [r.longest_silence_s for r in ok if r.longest_silence_s is not None]
    row["longest_silence_s"] = max(silences, default=None)
    return row | medians(runs, 5, ("chunks_per_token", "tokens_per_iteration"))


def checks(summary: dict, runs: list[ServingRun], num_requests: int) -> list[dict]:
    """The target (baton at saturation >= 0.9x offline), the other policies' ratios,
    and whether every request streamed exactly its budget."""
    ratio_inf = summary.get(TARGET_POLICY, {}).get("saturation_ratio")
    name = f"{TARGET_POLICY} HTTP / offline output tokens/s at rate inf"
    found = [check(name, ratio_inf, TARGET_RATIO)]
    for policy, row in summary.items():
        if policy != TARGET_POLICY:
            name = f"{policy} HTTP / offline tokens/s at rate inf"
            found.append(check(name, row["saturation_ratio"], None))
    bad = sum(r.failed + r.completed - r.exact for r in runs if r.error is None)
    bad += num_requests * sum(r.error is not None for r in runs)
    name = "requests that failed or did not stream exactly their budget (a failed run counts "
    found.append(check(name + "all its requests)", bad, 0, "=="))
    disturbed = ", ".join(f"{r.policy}@{r.rate}" for r in runs if r.disturbed) or "none"
    found.append(check("disturbed HTTP runs (policy@rate)", disturbed, None))
    return found


def report(saved: dict) -> tuple[list[str], str, harness.Panels]:
    """Every (policy, rate)'s medians (offered tokens/s: request rate x mean budget), then each
    policy's offline tokens/s against its HTTP tokens/s at rate inf; the figure: throughput, TTFT
    and TPOT against the rate."""
    summary, args, budget = saved["summary"], saved["args"], saved["workload"]["budget"]["mean"]
    rows, saturation = [], []
    for policy, row in summary.items():
        for rate, r in row["rates"].items():
            offered = r.get("request_rate") and r["request_rate"] * budget
            cells = {"policy": policy, "rate": rate, "offered_tokens_per_s": offered}
            for key, value in r.items():  # p50 and p99 of each latency (the JSON has means)
                nested = isinstance(value, dict)
                cells |= (
                    {f"{key} {q}": value.get(q) for q in ("p50", "p99")} if nested else {key: value}
                )
            rows.append(cells)
        http = row["rates"].get("inf", {}).get("output_tokens_per_s")
        offline = {k: v for k, v in row.items() if k != "rates"}
        saturation.append({"policy": policy, "http_tokens_per_s_at_inf": http} | offline)
    rate = saved["sustainable_rate"]
    lines = [f"rate: x the offline baton engine's sustainable rate, {rate} req/s; inf: all at t=0"]
    lines += ["", *markdown(rows), "", *markdown(saturation)]
    title = (
        f"baton-paged serve, small Llama float32, CPU {args['threads']} threads, max batch "
        f"{args['batch_size']}: {args['num_requests']} streamed requests, Poisson arrivals"
    )
    by_policy = partial(harness.series, rows, "rate", "policy")
    panels = {"output tokens/s against the rate": by_policy("output_tokens_per_s")}
    panels["TTFT s, p50 and p99"] = by_policy("ttft_s p50", "ttft_s p99")
    panels["TPOT s, p50 and p99"] = by_policy("tpot_s p50", "tpot_s p99")
    return lines, title, panels


def parse_args():
    quick = "16 requests, B 8, budgets <= 64, baton and orca"
    parser = harness.options(__doc__, threads=2, repeats=1, quick=quick, results="serving-cpu")
    policies = Default(["baton", "orca", "chunked", "static"], ["baton", "orca"])
    choose = harness.comma_list(str, POLICIES)
    parser.add_argument("--policies", type=choose, default=policies, help="%(default)s")
    rates = Default(["0.5", "1", "2", "inf"], ["0.5", "2", "inf"])
    help_rates = "x the sustainable rate, or inf; %(default)s"
    parser.add_argument("--rates", type=harness.comma_list(str), default=rates, help=help_rates)
    parser.add_argument("--batch-size", type=int, default=Default(16, 8), help="%(default)s")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    workload.add_options(parser, num_requests=Default(56, 16))
    return harness.start(parser, must_include={"policies": TARGET_POLICY})


def main() -> None:
    args, ours = parse_args(), workload.OurModel()
    requests = ours.workload(args)
    print(f"workload: {requests.describe(args.max_budget)}", flush=True)

    calibration = run_offline(ours, TARGET_POLICY, args.batch_size, requests)
    if calibration.error:
        raise SystemExit(f"offline calibration failed: {calibration.error}")
    base_rate = len(requests.prompts) / calibration.wall_s
    rate = f"{base_rate:.3f} req/s, {calibration.tokens_per_s:.1f} tok/s"
    print(f"sustainable rate (offline {TARGET_POLICY}): {rate}", flush=True)
    arrivals = make_arrivals(len(requests.prompts), base_rate, args.rates, args.seed)

    offline, runs, servers = [], [], []
    for repeat, policy in harness.rotations(args.policies, args.repeats):
        result = run_offline(ours, policy, args.batch_size, requests)
        result.repeat = repeat
        offline.append(result)
        harness.announce(f"[rep {repeat}] {policy:>8} offline", result, result.extra)
        served = serve_policy(ours, policy, repeat, args, requests, arrivals)
        runs += served["runs"]
        servers.append({"policy": policy, "repeat": repeat} | served["server"])

    summary = summarize(runs, offline, args.policies, args.rates)
    setup = {"kv_memory": workload.KV_MEMORY, "max_prefill_tokens": workload.MAX_PREFILL_TOKENS}
    setup["dtype"] = "float32"
    setup["server_command"] = "python -c LAUNCHER THREADS serve --model ... (see source)"
    payload = {
        "environment": ours.environment() | {"httpx": httpx.__version__},
        "args": vars(args),
        "workload": requests.describe(args.max_budget),
        "setup": setup | {"servers": servers},
        "targets": {"disturbed_cpu": DISTURBED_CPU},
        "calibration": asdict(calibration),
        "sustainable_rate": round(base_rate, 5),
        "arrivals": {
            f: {"request_rate": r, "last_send_s": round(o[-1], 3)} for f, (r, o) in arrivals.items()
        },
        "summary": summary,
        "checks": checks(summary, runs, len(requests.prompts)),
        "offline": [asdict(r) for r in offline],
        "runs": [asdict(r) for r in runs],
    }
    failed = [r for r in runs if r.error or r.errors]
    problems = [f"problem: {r.policy} rate {r.rate}: {r.error or r.errors}" for r in failed]
    harness.publish(args.name, payload, report, problems)


if __name__ == "__main__":
    main()
