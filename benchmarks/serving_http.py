"""The HTTP side of ``bench_serving`` (its docstring says how it runs and defines the metrics):
``baton-paged serve`` in a subprocess as a user starts it, and an asyncio ``httpx`` client that
streams completions from it and measures them as vLLM's ``benchmark_serving`` does.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from harness import ratio
from prometheus_client.parser import text_string_to_metric_families

from baton_paged.bench.client import RequestRecord, poisson_offsets, send_all, stats

SERVED_NAME = "bench"
"""The model name the server is started with and every request asks for."""
STARTUP_TIMEOUT_S = 180.0
LAUNCHER = (
    "import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
    "print(f'torch threads {torch.get_num_threads()}', flush=True); "
    "from baton_paged.entrypoints.cli import main; main(sys.argv[2:], prog_name='baton-paged')"
)
"""Pins torch's intra-op threads in the server process, then runs the real CLI."""
COUNTERS = {"iterations": "baton", "generation_tokens": "vllm", "idle_slot_iterations": "baton"}
"""The engine counters of /metrics (``<prefix>:<name>_total``) a run's deltas are taken of."""
DISTURBED_CPU = 0.25
"""A run during which other processes used more than this many cores is flagged disturbed: on 2
cores one other busy process (which reads about 1) slows OpenMP forwards far more than 2x."""


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy (every process, plus time the hypervisor
    stole); its change over a run less our processes' CPU time is what others took. It is sampled
    at clock ticks and ours is exact, so bursty runs read a little below zero."""
    t = psutil.cpu_times()
    fields = ("user", "nice", "system", "irq", "softirq", "steal")
    return sum(getattr(t, name, 0.0) for name in fields)


class Server:
    """``baton-paged serve ARGS`` on 127.0.0.1 in a subprocess, behind ``LAUNCHER``, serving the
    model as ``SERVED_NAME``, its log in a temporary file; ready once /health answers 200."""

    def __init__(self, serve_args: list[str], threads: int, log_prefix: str):
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{log_prefix}-", suffix=".log")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        command = [sys.executable, "-c", LAUNCHER, str(threads), "serve", *serve_args]
        command += ["--served-model-name", SERVED_NAME, "--port", str(port)]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
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
        """The engine's counters of /metrics (``baton:iterations_total``...)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
        return {
            s.name: s.value
            for s in samples
            if set(s.labels) <= {"model_name"} and s.name.endswith("_total")
        }

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

    def send(self, prompts: list, budgets: list[int], offsets: list[float], timeout_s: float):
        """Each request at its offset from now: (records, first send -> last completion)."""
        bodies = [request_body(p, b) for p, b in zip(prompts, budgets, strict=True)]
        return asyncio.run(send_all(f"{self.url}/v1/completions", bodies, offsets, timeout_s))

    def load(self, run: ServingRun, requests, offsets: list[float], timeout_s: float) -> None:
        """One rate: fills ``run`` from the client's records, the CPU time of client, server and
        everything else, and what the server's engine did (its /metrics counters)."""
        before, load_before = self.counters(), os.getloadavg()[0]
        client_cpu, server_cpu = sum(os.times()[:2]), self.cpu_seconds()
        busy, wall = busy_cpu_seconds(), time.perf_counter()
        records, duration = self.send(requests.prompts, requests.budgets, offsets, timeout_s)
        wall = time.perf_counter() - wall
        run.client_cpu_per_wall = round((sum(os.times()[:2]) - client_cpu) / wall, 3)
        run.server_cpu_per_wall = round((self.cpu_seconds() - server_cpu) / wall, 3)
        ours = run.client_cpu_per_wall + run.server_cpu_per_wall
        other = (busy_cpu_seconds() - busy) / wall - ours
        run.other_cpu_per_wall, run.disturbed = round(other, 3), other > DISTURBED_CPU
        run.loadavg_1m = (round(load_before, 2), round(os.getloadavg()[0], 2))
        after = self.counters()
        names = {k: f"{prefix}:{k}_total" for k, prefix in COUNTERS.items()}
        run.server_stats = {k: after.get(n, 0) - before.get(n, 0) for k, n in names.items()}
        if run.server_stats["iterations"]:  # the mean decode batch
            tokens = run.server_stats["generation_tokens"] / run.server_stats["iterations"]
            run.server_stats["tokens_per_iteration"] = round(tokens, 2)
        run.fill(records, requests.budgets, duration)


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

    def fill(self, records: list[RequestRecord], budgets: list[int], duration: float) -> None:
        """vLLM's benchmark_serving metrics over the requests that completed."""
        ok = [(r, b) for r, b in zip(records, budgets, strict=True) if r.error is None]
        self.completed, self.failed = len(ok), len(records) - len(ok)
        self.errors = sorted({r.error for r in records if r.error})[:5]
        self.duration_s = round(duration, 3)
        self.exact = sum(r.output_tokens == b for r, b in ok)
        self.output_tokens = sum(r.output_tokens for r, _ in ok)
        self.output_tokens_per_s = round(self.output_tokens / duration, 2)
        self.request_throughput = round(self.completed / duration, 4)
        self.ttft_s = stats([r.ttft for r, _ in ok])
        self.tpot_s = stats([r.tpot for r, _ in ok if r.tpot is not None])
        self.itl_s = stats([gap for r, _ in ok for gap in np.diff(r.times).tolist()])
        self.e2e_s = stats([r.latency for r, _ in ok])
        self.longest_silence_s = longest_silence([r for r, _ in ok])
        chunks = sum(len(r.times) for r, _ in ok)
        self.chunks_per_token = ratio(chunks, self.output_tokens, 4)

    def describe(self) -> str:
        """The run's console line."""
        shown = ("output_tokens_per_s", "duration_s", "completed", "exact", "ttft_s", "tpot_s")
        shown += ("longest_silence_s", "client_cpu_per_wall", "server_cpu_per_wall")
        shown += ("other_cpu_per_wall", "disturbed", "loadavg_1m", "server_stats")
        return self.error or " ".join(f"{key} {getattr(self, key)}" for key in shown)


def make_arrivals(n: int, base_rate: float, factors: list[str], seed: int) -> dict:
    """label -> (requests/s or None, send times from t=0): Poisson arrivals (a seed per rate,
    shared by all policies) at ``factor`` x ``base_rate``, or all at 0 ("inf")."""
    arrivals = {}
    for k, factor in enumerate(factors):
        rate = None if factor == "inf" else float(factor) * base_rate
        arrivals[factor] = (rate, poisson_offsets(n, rate, seed + 100 + k))
    return arrivals


def request_body(prompt: list[int], budget: int) -> dict:
    """Exactly ``budget`` tokens (EOS ignored), greedy, streamed with a final usage chunk."""
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": budget, "temperature": 0}
    return body | {"ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


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
