"""A streaming OpenAI client that times each request as vLLM's ``benchmark_serving`` does:
every chunk with choices is a token event, the usage chunk gives the token count."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


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
    def tpot(self) -> float | None:
        """Time per output token after the first."""
        if not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> RequestRecord:
    """Send one streaming completion (``body`` with ``"stream": true`` and the usage chunk
    asked for) and time its chunks."""
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
    url: str,
    bodies: list[dict],
    offsets: list[float],
    timeout_s: float,
    max_concurrency: int | None = None,
    headers: dict | None = None,
) -> tuple[list[RequestRecord], float]:
    """Send each body at its offset from the start, at most ``max_concurrency`` in flight;
    (records, first send -> last completion)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(client, body):
        if gate is None:
            return await stream_one(client, url, body)
        async with gate:
            return await stream_one(client, url, body)

    timeout = httpx.Timeout(timeout_s)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
        start = time.perf_counter()
        tasks = []
        for body, offset in zip(bodies, offsets, strict=True):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, body)))
        records = await asyncio.gather(*tasks)
        return records, time.perf_counter() - start


def poisson_offsets(n: int, rate: float | None, seed: int) -> list[float]:
    """Send times from 0: exponential gaps at ``rate`` requests/s (the first at 0), or all at
    once when ``rate`` is None (vLLM's ``--request-rate inf``)."""
    if rate is None:
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def stats(values: list[float], digits: int = 5) -> dict:
    """Count, mean, median and 99th percentile (linear interpolation), as vLLM reports."""
    if not values:
        return {}
    p50, p99 = (round(float(np.percentile(values, q)), digits) for q in (50, 99))
    return {"n": len(values), "mean": round(statistics.fmean(values), digits), "p50": p50,
            "p99": p99}  # fmt: skip
