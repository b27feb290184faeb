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
every request at t=0 (``bench_policies.run_engine``), run for each policy right before its server
starts, while no server runs. Target: at rate inf, HTTP streaming output tokens/s >= 0.9x the
offline engine's for the baton policy (other policies' ratios reported). Runs interleave (each
repeat runs every policy, order rotated), record wall time, CPU time / wall and the 1-minute load
average; errors are recorded, never replaced by numbers. Results go to
``results/serving-cpu.{json,md,png}`` (``--quick``: ``serving-cpu-quick.*``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch
import transformers
from bench_policies import (
    BUDGET_CLIP,
    KV_MEMORY,
    MAX_PREFILL_TOKENS,
    RunResult,
    Workload,
    check,
    load_hf,
    make_engine,
    make_workload,
    run_engine,
)
from common import RESULTS, busy_cpu_seconds, environment, setup_threads, write_json
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from baton_paged.config import POLICIES
from baton_paged.model_builder import cached_model

DEFAULT_POLICIES = ("baton", "orca", "chunked", "static")
RATE_FACTORS = ("0.5", "1", "2", "inf")
SERVED_NAME = "bench"
TARGET_POLICY = "baton"
TARGET_RATIO = 0.9
QUICK_POLICIES, QUICK_RATES = ("baton", "orca"), ("0.5", "2", "inf")
DISTURBED_CPU = 0.25
"""A run during which other processes used more than this many cores is flagged disturbed. The
machine-wide figure is sampled at clock ticks and our processes' CPU time is exact, so bursty
runs read a little below zero; one other busy process reads about 1."""
STARTUP_TIMEOUT_S = 180.0
LAUNCHER = (
    "import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
    "print(f'torch threads {torch.get_num_threads()}', flush=True); "
    "from baton_paged.cli import main; main(sys.argv[2:], prog_name='baton-paged')"
)
"""Pins torch's intra-op threads in the server process, then runs the real CLI."""


@dataclass
class RequestRecord:
    """One streamed request as the client saw it (``time.perf_counter`` seconds)."""

    sent: float = 0.0
    times: list[float] = field(default_factory=list)
    """Arrival of every chunk with choices (vLLM's token events)."""
    output_tokens: int | None = None
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent

    @property
    def latency(self) -> float:
        return self.times[-1] - self.sent

    @property
    def itl(self) -> list[float]:
        return np.diff(self.times).tolist()


@dataclass
class ServingRun:
    policy: str
    rate: str
    """The rate factor: a multiple of the sustainable rate, or "inf"."""
    request_rate: float | None
    """Requests/s of the Poisson arrivals; None = all at t=0."""
    repeat: int
    duration_s: float = float("nan")
    completed: int = 0
    failed: int = 0
    exact: int = 0
    """Requests whose usage.completion_tokens equals their budget."""
    output_tokens: int = 0
    output_tokens_per_s: float = float("nan")
    request_throughput: float = float("nan")
    ttft_s: dict = field(default_factory=dict)
    tpot_s: dict = field(default_factory=dict)
    itl_s: dict = field(default_factory=dict)
    e2e_s: dict = field(default_factory=dict)
    chunks_per_token: float | None = None
    longest_silence_s: float | None = None
    """Longest time no chunk reached any client while some request was in flight: one engine
    iteration (a prefill one at most) is the floor; more means the server's event loop stalled."""
    client_cpu_per_wall: float = float("nan")
    server_cpu_per_wall: float = float("nan")
    other_cpu_per_wall: float = float("nan")
    """Cores other processes (not this client, not the server) kept busy during the run."""
    disturbed: bool = False
    loadavg_1m: tuple[float, float] = (float("nan"), float("nan"))
    server_stats: dict = field(default_factory=dict)
    """Deltas of the server's /metrics counters over the run."""
    errors: list[str] = field(default_factory=list)
    """Distinct per-request errors (at most 5)."""
    error: str | None = None
    """The run itself failed (server down, timeout): no figures."""


# Arrivals and requests -------------------------------------------------------------------------


def arrival_offsets(n: int, rate: float | None, seed: int) -> list[float]:
    """Send times from t=0: Poisson arrivals (exponential gaps, the first at 0), or all at 0."""
    if rate is None:
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def request_body(prompt: list[int], budget: int) -> dict:
    """Exactly ``budget`` tokens (EOS ignored), greedy, streamed with a final usage chunk."""
    return {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": budget,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> RequestRecord:
    """Send one streaming completion and time its chunks as vLLM's client does: every chunk
    with choices is a token event; the usage chunk gives the token count."""
    record = RequestRecord(sent=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                record.error = f"HTTP {response.status_code}: {text}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    record.error = f"in stream: {data['error'].get('message')}"
                elif data.get("choices"):
                    record.times.append(time.perf_counter())
                elif data.get("usage"):
                    record.output_tokens = data["usage"]["completion_tokens"]
    except Exception as error:  # recorded per request, the run goes on
        record.error = f"{type(error).__name__}: {error}"
    if record.error is None and (not record.times or record.output_tokens is None):
        record.error = "stream ended without tokens or usage"
    return record


async def send_all(
    url: str, bodies: list[dict], offsets: list[float], timeout_s: float
) -> tuple[list[RequestRecord], float]:
    """Send each body at its offset from the start; (records, first send -> last completion)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for body, offset in zip(bodies, offsets, strict=True):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(stream_one(client, url, body)))
        records = await asyncio.gather(*tasks)
        return records, time.perf_counter() - start


# The server process ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``baton-paged serve`` in a subprocess, its log in a temporary file; ready once /health
    answers 200."""

    def __init__(self, model: Path, policy: str, batch_size: int, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-{policy}-", suffix=".log")
        args = ["--model", str(model), "--policy", policy, "--dtype", "float32"]
        args += ["--max-batch-size", str(batch_size), "--kv-memory", KV_MEMORY]
        args += ["--max-prefill-tokens", str(MAX_PREFILL_TOKENS), "--port", str(self.port)]
        args += ["--served-model-name", SERVED_NAME]
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.command = [sys.executable, "-c", LAUNCHER, str(threads), "serve", *args]
        self.proc = subprocess.Popen(
            self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self) -> float:
        """Seconds until /health said 200; RuntimeError with the log's tail if it never did."""
        start = time.perf_counter()
        while time.perf_counter() - start < STARTUP_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"no /health 200 within {STARTUP_TIMEOUT_S}s: {self.tail()}")

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system + times.children_user + times.children_system

    def counters(self) -> dict[str, float]:
        """The engine counters of /metrics (generated tokens, iterations, idle slots...)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.labels and sample.name.endswith("_total"):
                    values[sample.name.removesuffix("_total")] = sample.value
        return values

    def tail(self, chars: int = 1500) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-chars:]

    def torch_threads(self) -> int | None:
        for line in Path(self.log.name).read_text().splitlines():
            if line.startswith("torch threads "):
                return int(line.split()[-1])
        return None

    def stop(self) -> None:
        """SIGINT (uvicorn's graceful shutdown, then the engine thread's), kill if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# Runs ------------------------------------------------------------------------------------------


def run_offline(path: Path, model, tokenizer, policy: str, args, workload: Workload) -> RunResult:
    """The offline engine on the whole workload at t=0 (after a 2-request warm-up)."""
    result = RunResult(policy, args.batch_size, -1)
    try:
        engine = make_engine(path, policy, args.batch_size, model, tokenizer)
        run_engine(engine, Workload(workload.prompts[:2], [2, 2]), RunResult(policy, 0, 0))
        engine = make_engine(path, policy, args.batch_size, model, tokenizer)
        busy = busy_cpu_seconds()
        run_engine(engine, workload, result)
        other = (busy_cpu_seconds() - busy) / result.wall_s - result.cpu_per_wall
        result.extra["other_cpu_per_wall"] = round(other, 3)
        result.extra["disturbed"] = other > DISTURBED_CPU
        del engine
    except Exception as error:  # recorded, never replaced by a made-up number
        result.error = f"{type(error).__name__}: {error}"
    gc.collect()
    return result


def run_load(server: Server, run: ServingRun, workload: Workload, offsets, args) -> None:
    """One rate against a ready server; fills ``run`` from the client's records."""
    bodies = [request_body(p, b) for p, b in zip(workload.prompts, workload.budgets, strict=True)]
    before = server.counters()
    load_before = os.getloadavg()[0]
    client_cpu, server_cpu = sum(os.times()[:2]), server.cpu_seconds()
    busy, wall = busy_cpu_seconds(), time.perf_counter()
    records, duration = asyncio.run(
        send_all(f"{server.url}/v1/completions", bodies, offsets, args.request_timeout)
    )
    wall = time.perf_counter() - wall
    run.client_cpu_per_wall = round((sum(os.times()[:2]) - client_cpu) / wall, 3)
    run.server_cpu_per_wall = round((server.cpu_seconds() - server_cpu) / wall, 3)
    other = (busy_cpu_seconds() - busy) / wall - run.client_cpu_per_wall - run.server_cpu_per_wall
    run.other_cpu_per_wall = round(other, 3)
    run.disturbed = other > DISTURBED_CPU
    run.loadavg_1m = (round(load_before, 2), round(os.getloadavg()[0], 2))
    after = server.counters()
    run.server_stats = server_deltas(before, after)
    fill_metrics(run, records, workload.budgets, duration)


def server_deltas(before: dict, after: dict) -> dict:
    """What the server's engine did during the run: iterations and generated tokens, and so
    its mean decode batch (tokens per iteration)."""
    keys = ("baton:iterations", "baton:generation_tokens", "baton:idle_slot_iterations")
    deltas = {k.removeprefix("baton:"): after.get(k, 0) - before.get(k, 0) for k in keys}
    if deltas["iterations"]:
        deltas["tokens_per_iteration"] = round(
            deltas["generation_tokens"] / deltas["iterations"], 2
        )
    return deltas


def fill_metrics(
    run: ServingRun, records: list[RequestRecord], budgets: list[int], duration: float
) -> None:
    """vLLM's benchmark_serving metrics over the requests that completed."""
    ok = [(r, b) for r, b in zip(records, budgets, strict=True) if r.error is None]
    run.completed, run.failed = len(ok), len(records) - len(ok)
    run.errors = sorted({r.error for r in records if r.error})[:5]
    run.duration_s = round(duration, 3)
    run.exact = sum(r.output_tokens == b for r, b in ok)
    run.output_tokens = sum(r.output_tokens for r, _ in ok)
    run.output_tokens_per_s = round(run.output_tokens / duration, 2)
    run.request_throughput = round(run.completed / duration, 4)
    run.ttft_s = stats([r.ttft for r, _ in ok])
    run.tpot_s = stats(
        [(r.latency - r.ttft) / (r.output_tokens - 1) for r, _ in ok if r.output_tokens > 1]
    )
    run.itl_s = stats([gap for r, _ in ok for gap in r.itl])
    run.e2e_s = stats([r.latency for r, _ in ok])
    chunks = sum(len(r.times) for r, _ in ok)
    run.longest_silence_s = longest_silence([r for r, _ in ok])
    run.chunks_per_token = round(chunks / run.output_tokens, 4) if run.output_tokens else None


def longest_silence(records: list[RequestRecord]) -> float | None:
    """The longest gap between successive chunks (of any request) that some request spanned,
    sent before the gap began and finished after it ended."""
    times = np.sort(np.concatenate([r.times for r in records])) if records else np.array([])
    if len(times) < 2:
        return None
    sent = np.array([r.sent for r in records])[:, None]
    last = np.array([r.times[-1] for r in records])[:, None]
    starts, ends = times[:-1], times[1:]
    spanned = ((sent <= starts) & (last >= ends)).any(axis=0)
    gaps = (ends - starts)[spanned]
    return round(float(gaps.max()), 4) if len(gaps) else None


def stats(values: list[float]) -> dict:
    if not values:
        return {}
    p50, p99 = np.percentile(values, [50, 99])
    return {
        "n": len(values),
        "mean": round(statistics.fmean(values), 5),
        "p50": round(float(p50), 5),
        "p99": round(float(p99), 5),
    }


def serve_policy(policy: str, repeat: int, args, path: Path, workload, arrivals) -> dict:
    """Start the policy's server, warm it, run every rate (inf first: the offline run it is
    compared with has just ended), stop it. Returns the runs and the server's setup."""
    order = sorted(arrivals, key=lambda label: label != "inf")  # next to the offline run first
    runs = [ServingRun(policy, label, arrivals[label][0], repeat) for label in order]
    info: dict = {}
    server = Server(path, policy, args.batch_size, args.threads)
    try:
        info["startup_s"] = round(server.wait_ready(), 2)
        info["torch_threads"] = server.torch_threads()
        info["warmup_errors"] = warm_up(server, workload, args.request_timeout)
        for run in runs:
            run_load(server, run, workload, arrivals[run.rate][1], args)
            print(f"[rep {repeat}] {policy:>8} rate {run.rate:>4} {describe(run)}", flush=True)
    except Exception as error:  # the run and those after it record why, never a number
        message = f"{type(error).__name__}: {error}"
        for run in runs:
            if math.isnan(run.duration_s):
                run.error = message
        print(f"[rep {repeat}] {policy:>8} server failed: {message}", flush=True)
    finally:
        server.stop()
    return {"runs": runs, "server": info}


def warm_up(server: Server, workload: Workload, timeout_s: float) -> list[str]:
    """Two short requests first, so first-call costs (allocator, kernels) stay out of the runs."""
    bodies = [request_body(p, 2) for p in workload.prompts[:2]]
    records, _ = asyncio.run(send_all(f"{server.url}/v1/completions", bodies, [0, 0], timeout_s))
    return [r.error for r in records if r.error]


def ms(d: dict) -> str:
    """'p50/p99' of a stats dict, in milliseconds."""
    return f"{d.get('p50', math.nan) * 1e3:.0f}/{d.get('p99', math.nan) * 1e3:.0f}"


def describe(run: ServingRun) -> str:
    if run.error:
        return run.error
    return (
        f"{run.output_tokens_per_s:7.1f} tok/s {run.duration_s:6.2f} s done {run.completed} "
        f"exact {run.exact} TTFT {ms(run.ttft_s)} ms TPOT {ms(run.tpot_s)} ms "
        f"silence {run.longest_silence_s} s "
        f"ITL {ms(run.itl_s)} ms cpu client/server {run.client_cpu_per_wall}/"
        f"{run.server_cpu_per_wall} other {run.other_cpu_per_wall}"
        f"{' DISTURBED' if run.disturbed else ''} load {run.loadavg_1m} {run.server_stats}"
    )


# Orchestration ---------------------------------------------------------------------------------


def make_arrivals(n: int, base_rate: float, factors: list[str], seed: int) -> dict:
    """label -> (requests/s or None, send offsets); one seed per rate, shared by all policies."""
    arrivals = {}
    for k, factor in enumerate(factors):
        rate = None if factor == "inf" else float(factor) * base_rate
        arrivals[factor] = (rate, arrival_offsets(n, rate, seed + 100 + k))
    return arrivals


def schedule(policies: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, policy), the policy order rotated one place per repeat."""
    order = []
    for repeat in range(repeats):
        shift = repeat % len(policies)
        order += [(repeat, p) for p in policies[shift:] + policies[:shift]]
    return order


def summarize(runs: list[ServingRun], offline: list[RunResult], policies, factors) -> dict:
    """Per policy: the offline tokens/s, and per rate the medians over repeats of each metric;
    the saturation (inf) ratio HTTP / offline."""
    out: dict = {}
    for policy in policies:
        ok_off = [r for r in offline if r.system == policy and r.error is None]
        row: dict = {
            "offline_tokens_per_s": median([r.tokens_per_s for r in ok_off]),
            "offline_wall_s": median([r.wall_s for r in ok_off]),
            "offline_errors": [r.error for r in offline if r.system == policy and r.error],
            "offline_disturbed": sum(r.extra.get("disturbed", False) for r in ok_off),
            "rates": {},
        }
        for factor in factors:
            group = [r for r in runs if r.policy == policy and r.rate == factor]
            row["rates"][factor] = summarize_rate(group)
        http = row["rates"].get("inf", {}).get("output_tokens_per_s")
        off = row["offline_tokens_per_s"]
        row["saturation_ratio"] = round(http / off, 4) if http and off else None
        out[policy] = row
    return out


def summarize_rate(group: list[ServingRun]) -> dict:
    ok = [r for r in group if r.error is None and r.completed]
    row: dict = {"runs": len(group), "errors": [r.error for r in group if r.error]}
    if not ok:
        return row
    row["request_rate"] = ok[0].request_rate
    row["output_tokens_per_s"] = median([r.output_tokens_per_s for r in ok])
    row["duration_s"] = median([r.duration_s for r in ok])
    row["failed"] = sum(r.failed for r in ok)
    row["disturbed"] = sum(r.disturbed for r in ok)
    row["inexact"] = sum(r.completed - r.exact for r in ok)
    for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        row[metric] = {
            q: median([getattr(r, metric).get(q) for r in ok]) for q in ("mean", "p50", "p99")
        }
    row["chunks_per_token"] = median([r.chunks_per_token for r in ok])
    silences = [r.longest_silence_s for r in ok if r.longest_silence_s is not None]
    row["longest_silence_s"] = max(silences, default=None)
    row["tokens_per_iteration"] = median([r.server_stats.get("tokens_per_iteration") for r in ok])
    return row


def median(values: list) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return round(statistics.median(values), 5) if values else None


def checks(summary: dict, runs: list[ServingRun], num_requests: int) -> list[dict]:
    """The issue's target (baton at saturation >= 0.9x offline), the other policies' ratios,
    and whether every request streamed exactly its budget."""
    found = [
        check(
            f"{TARGET_POLICY} HTTP / offline output tokens/s at rate inf",
            summary.get(TARGET_POLICY, {}).get("saturation_ratio"),
            TARGET_RATIO,
        )
    ]
    for policy, row in summary.items():
        if policy != TARGET_POLICY:
            found.append(
                check(
                    f"{policy} HTTP / offline tokens/s at rate inf", row["saturation_ratio"], None
                )
            )
    bad = sum(r.failed + r.completed - r.exact for r in runs if r.error is None)
    bad += num_requests * sum(r.error is not None for r in runs)
    found.append(
        {
            "check": "requests that failed or did not stream exactly their budget (a failed "
            "run counts all its requests)",
            "value": bad,
            "target": 0,
            "op": "==",
            "status": "met" if bad == 0 else "NOT met",
        }
    )
    disturbed = [f"{r.policy}@{r.rate}" for r in runs if r.disturbed]
    found.append(check("disturbed HTTP runs (policy@rate)", ", ".join(disturbed) or "none", None))
    return found


# Output ----------------------------------------------------------------------------------------


def fmt(value, scale: float = 1.0, spec: str = ".2f") -> str:
    return "-" if value is None else f"{value * scale:{spec}}"


def markdown(payload: dict) -> str:
    """The rate table (policy x rate), then the saturation table against the offline engine."""
    summary, factors = payload["summary"], payload["args"]["rates"]
    mean_budget = payload["workload"]["budget"]["mean"]
    lines = [
        f"Rates are multiples of the offline baton engine's sustainable rate "
        f"({payload['sustainable_rate']:.3f} req/s); inf = all requests at t=0; offered = rate x "
        "mean budget; tok/iter = the server's generated tokens per engine iteration; silence = "
        "the longest time no chunk reached any client while a request was in flight (max over "
        "repeats; an engine iteration is the floor). Medians over repeats.",
        "",
        "| policy | rate | req/s | offered tok/s | out tok/s | TTFT p50 / p99 s "
        "| TPOT p50 / p99 ms | ITL p50 / p99 ms | e2e p50 / p99 s | tok/iter | silence s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for policy, row in summary.items():
        lines += [rate_line(policy, f, row["rates"].get(f, {}), mean_budget) for f in factors]
    lines += [
        "",
        "| policy | offline tok/s | HTTP tok/s at inf | HTTP / offline |",
        "|---|---|---|---|",
    ]
    for policy, row in summary.items():
        inf = row["rates"].get("inf", {})
        lines.append(
            f"| {policy} | {fmt(row['offline_tokens_per_s'], spec='.0f')}"
            f"{' *' if row['offline_disturbed'] else ''} | "
            f"{fmt(inf.get('output_tokens_per_s'), spec='.0f')}{mark(inf)} | "
            f"{fmt(row['saturation_ratio'], spec='.3f')} |"
        )
    lines += [
        "",
        f"\\* disturbed: other processes kept more than {DISTURBED_CPU} of a core busy during "
        "the run (see other_cpu_per_wall in the JSON).",
    ]
    return "\n".join(lines) + "\n"


def rate_line(policy: str, factor: str, r: dict, mean_budget: float) -> str:
    rate = "inf" if factor == "inf" else f"{factor}x"
    if "output_tokens_per_s" not in r:
        return f"| {policy} | {rate} | - | - | error | | | | | | |"
    req_s = r["request_rate"]
    cells = [
        policy,
        rate,
        fmt(req_s, spec=".3f") if req_s else "inf",
        fmt(req_s * mean_budget, spec=".0f") if req_s else "-",
        f"{r['output_tokens_per_s']:.0f}{mark(r)}",
        pair(r["ttft_s"], 1, ".2f"),
        pair(r["tpot_s"], 1e3, ".1f"),
        pair(r["itl_s"], 1e3, ".1f"),
        pair(r["e2e_s"], 1, ".2f"),
        fmt(r["tokens_per_iteration"], spec=".1f"),
        fmt(r["longest_silence_s"]),
    ]
    return "| " + " | ".join(cells) + " |"


def pair(d: dict, scale: float, spec: str) -> str:
    """'p50 / p99' of a stats dict."""
    return f"{fmt(d.get('p50'), scale, spec)} / {fmt(d.get('p99'), scale, spec)}"


def mark(rate_row: dict) -> str:
    return " *" if rate_row.get("disturbed") else ""


def plot(payload: dict, path: Path) -> None:
    """Throughput, TTFT and TPOT against the request rate, per policy; inf drawn at the right
    edge, the offline engine's throughput as an x there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, factors = payload["summary"], payload["args"]["rates"]
    finite = [float(f) * payload["sustainable_rate"] for f in factors if f != "inf"]
    inf_x = 2 * max(finite) if finite else 1.0
    xs = {f: (inf_x if f == "inf" else float(f) * payload["sustainable_rate"]) for f in factors}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for k, (policy, row) in enumerate(summary.items()):
        color = f"C{k}"
        ok = [f for f in factors if "output_tokens_per_s" in row["rates"].get(f, {})]
        x = [xs[f] for f in ok]
        rates = [row["rates"][f] for f in ok]
        axes[0].plot(x, [r["output_tokens_per_s"] for r in rates], "o-", color=color, label=policy)
        if row["offline_tokens_per_s"] and "inf" in xs:
            axes[0].plot([xs["inf"]], [row["offline_tokens_per_s"]], "x", color=color, ms=10)
        latency_lines(axes[1], x, rates, "ttft_s", 1.0, color)
        latency_lines(axes[2], x, rates, "tpot_s", 1e3, color)
    mean_budget = payload["workload"]["budget"]["mean"]
    axes[0].plot(finite, [r * mean_budget for r in finite], "k:", label="offered load")
    axes[0].plot([], [], "kx", label="offline engine (all at t=0)")
    titles = (
        "output tokens/s (x: offline engine)",
        "TTFT s (solid p50, dashed p99)",
        "TPOT ms (solid p50, dashed p99)",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(
            list(xs.values()), [f"{x:.2f}" if f != "inf" else "inf" for f, x in xs.items()]
        )
        ax.set_xlabel("request rate (req/s), log scale")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    args = payload["args"]
    fig.suptitle(
        f"baton-paged serve, small Llama float32, CPU {args['threads']} threads, max batch "
        f"{args['batch_size']}: {args['num_requests']} streamed requests, Poisson arrivals",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latency_lines(ax, x: list, rates: list[dict], metric: str, scale: float, color: str) -> None:
    """p50 solid, p99 dashed, skipping rates where the metric is missing."""
    for q, style, alpha in (("p50", "o-", 1.0), ("p99", "s--", 0.6)):
        points = [(xi, r[metric].get(q)) for xi, r in zip(x, rates, strict=True)]
        points = [(xi, v * scale) for xi, v in points if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, color=color, alpha=alpha)


def print_report(payload: dict) -> None:
    print()
    print(payload["table_markdown"])
    print("checks:")
    for c in payload["checks"]:
        op = c.get("op", ">=")
        target = f" (target {op} {c['target']})" if c["target"] is not None else ""
        print(f"  [{c['status']}] {c['check']}: {c['value']}{target}")
    for r in payload["runs"]:
        if r["error"] or r["errors"]:
            print(f"  problem: {r['policy']} rate {r['rate']}: {r['error'] or r['errors']}")


# Main ------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="16 requests, B 8, budgets <= 64, baton and orca"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--policies", default=None, help="default baton,orca,chunked,static")
    parser.add_argument("--rates", default=None, help="x sustainable or inf; 0.5,1,2,inf")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (quick: 8)")
    parser.add_argument("--num-requests", type=int, default=None, help="default 56 (quick: 16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--name", default=None, help="results file stem (default serving-cpu)")
    args = parser.parse_args()
    policies = QUICK_POLICIES if args.quick else DEFAULT_POLICIES
    args.policies = (args.policies or ",".join(policies)).split(",")
    if set(args.policies) - set(POLICIES) or TARGET_POLICY not in args.policies:
        parser.error(f"policies from {', '.join(POLICIES)}, {TARGET_POLICY} included")
    args.rates = (args.rates or ",".join(QUICK_RATES if args.quick else RATE_FACTORS)).split(",")
    args.batch_size = args.batch_size or (8 if args.quick else 16)
    args.num_requests = args.num_requests or (16 if args.quick else 56)
    args.max_budget = 64 if args.quick else BUDGET_CLIP[1]
    args.name = args.name or ("serving-cpu-quick" if args.quick else "serving-cpu")
    return args


def main() -> None:
    args = parse_args()
    threads = setup_threads(args.threads)
    transformers.logging.set_verbosity_error()
    path = cached_model("llama", "small")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_hf(path)
    workload = make_workload(args.num_requests, model.config.vocab_size, args.max_budget, args.seed)
    print(f"workload: {workload.describe(args.max_budget)}", flush=True)

    calibration = run_offline(path, model, tokenizer, TARGET_POLICY, args, workload)
    if calibration.error:
        raise SystemExit(f"offline calibration failed: {calibration.error}")
    base_rate = len(workload.prompts) / calibration.wall_s
    print(
        f"sustainable rate (offline {TARGET_POLICY}): {base_rate:.3f} req/s, "
        f"{calibration.tokens_per_s:.1f} tok/s",
        flush=True,
    )
    arrivals = make_arrivals(len(workload.prompts), base_rate, args.rates, args.seed)

    offline, runs, servers = [], [], []
    for repeat, policy in schedule(args.policies, args.repeats):
        result = run_offline(path, model, tokenizer, policy, args, workload)
        result.repeat = repeat
        offline.append(result)
        note = result.error or (
            f"{result.tokens_per_s:7.1f} tok/s {result.wall_s:6.2f} s cpu/wall "
            f"{result.cpu_per_wall:.2f} load {result.loadavg_1m} {result.extra}"
        )
        print(f"[rep {repeat}] {policy:>8} offline {note}", flush=True)
        served = serve_policy(policy, repeat, args, path, workload, arrivals)
        runs += served["runs"]
        servers.append({"policy": policy, "repeat": repeat} | served["server"])

    summary = summarize(runs, offline, args.policies, args.rates)
    payload = {
        "environment": environment(threads, torch.device("cpu"))
        | {
            "transformers": transformers.__version__,
            "httpx": httpx.__version__,
            "model": str(path),
        },
        "args": vars(args),
        "workload": workload.describe(args.max_budget),
        "setup": {
            "kv_memory": KV_MEMORY,
            "max_prefill_tokens": MAX_PREFILL_TOKENS,
            "dtype": "float32",
            "server_command": "python -c LAUNCHER THREADS serve --model ... (see source)",
            "servers": servers,
        },
        "calibration": asdict(calibration),
        "sustainable_rate": round(base_rate, 5),
        "arrivals": {
            f: {"request_rate": r, "last_send_s": round(o[-1], 3)} for f, (r, o) in arrivals.items()
        },
        "total_seconds": round(time.perf_counter() - started, 1),
        "summary": summary,
        "checks": checks(summary, runs, len(workload.prompts)),
        "offline": [asdict(r) for r in offline],
        "runs": [asdict(r) for r in runs],
    }
    payload["table_markdown"] = markdown(payload)
    path_json = write_json(args.name, payload)
    (RESULTS / f"{args.name}.md").write_text(payload["table_markdown"])
    plot(payload, RESULTS / f"{args.name}.png")
    print_report(payload)
    print(f"\nwrote {path_json} (+ .md, .png) in {payload['total_seconds']} s")


if __name__ == "__main__":
    main()
