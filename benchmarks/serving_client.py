"""The serving benchmark's client: an asyncio ``httpx`` load generator that streams completions
from an OpenAI-compatible server and measures them as vLLM's ``benchmark_serving`` does (the
metrics are defined in ``bench_serving``'s docstring).
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from harness import percentile, ratio

SERVED_NAME = "bench"
"""The model name the server is started with and every request asks for."""


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
        tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r, _ in ok if r.output_tokens > 1]
        self.tpot_s = stats(tpots)
        self.itl_s = stats([gap for r, _ in ok for gap in r.itl])
        self.e2e_s = stats([r.latency for r, _ in ok])
        self.longest_silence_s = longest_silence([r for r, _ in ok])
        chunks = sum(len(r.times) for r, _ in ok)
        self.chunks_per_token = ratio(chunks, self.output_tokens, 4)

    def describe(self) -> str:
        """The run's console line."""
        if self.error:
            return self.error
        return (
            f"{self.output_tokens_per_s:7.1f} tok/s {self.duration_s:6.2f} s done "
            f"{self.completed} exact {self.exact} TTFT {ms(self.ttft_s)} ms TPOT "
            f"{ms(self.tpot_s)} ms silence {self.longest_silence_s} s ITL {ms(self.itl_s)} ms "
            f"cpu client/server {self.client_cpu_per_wall}/{self.server_cpu_per_wall} other "
            f"{self.other_cpu_per_wall}{' DISTURBED' if self.disturbed else ''} "
            f"load {self.loadavg_1m} {self.server_stats}"
        )


def arrival_offsets(n: int, rate: float | None, seed: int) -> list[float]:
    """Send times from t=0: Poisson arrivals (exponential gaps, the first at 0), or all at 0."""
    if rate is None:
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def make_arrivals(n: int, base_rate: float, factors: list[str], seed: int) -> dict:
    """label -> (requests/s or None, send offsets); one seed per rate, shared by all policies."""
    arrivals = {}
    for k, factor in enumerate(factors):
        rate = None if factor == "inf" else float(factor) * base_rate
        arrivals[factor] = (rate, arrival_offsets(n, rate, seed + 100 + k))
    return arrivals


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
    p50, p99 = (percentile(values, q, 5) for q in (50, 99))
    return {"n": len(values), "mean": round(statistics.fmean(values), 5), "p50": p50, "p99": p99}


def ms(d: dict) -> str:
    """'p50/p99' of a stats dict, in milliseconds."""
    return f"{d.get('p50', math.nan) * 1e3:.0f}/{d.get('p99', math.nan) * 1e3:.0f}"
