"""The server's log lines a vLLM operator reads: one per finished request (unless
``--disable-log-requests``) and a periodic stats line (unless ``--disable-log-stats``), with
vLLM's figures: prompt and generation throughput over the interval, requests running / swapped /
waiting, KV cache usage and the prefix cache's hit rate.

A request's line says how it went, not what it said: its id, finish reason, token counts and
times, never its prompt or text (those belong to the client). It is written on the engine
thread as the request finishes (a few microseconds, once per request, never per token). The
stats line reads the engine's snapshot, as ``/metrics`` does; an idle server writes it at DEBUG
level after one quiet interval, so the log does not fill with zeros.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from baton_paged.entrypoints.async_engine import AsyncEngine
    from baton_paged.outputs import RequestOutput

request_log = logging.getLogger("baton_paged.requests")
stats_log = logging.getLogger("baton_paged.stats")

STATS_INTERVAL = 10.0
"""Seconds between stats lines (vLLM's default)."""


def show_server_logs(level: int = logging.INFO) -> None:
    """Send the engine's and server's log lines (``baton_paged.*``) to stderr, formatted as
    uvicorn's beside them; without this only warnings reach Python's last-resort handler."""
    root = logging.getLogger("baton_paged")
    if any(getattr(h, "baton_server", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.baton_server = True
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S")
    )
    root.addHandler(handler)
    root.setLevel(level)


def log_request(output: RequestOutput) -> None:
    """One line for a finished request (a finish listener of the ``AsyncEngine``)."""
    m = output.metrics
    generated = sum(len(choice.token_ids) for choice in output.outputs)
    reasons = ",".join(sorted({choice.finish_reason or "abort" for choice in output.outputs}))
    end = m.finished_time or time.monotonic()
    request_log.info(
        "Finished request %s: %s; prompt %d tokens (%d cached), generated %d in %d choice(s); "
        "queue %s, first token %s, total %.3f s, preempted %d time(s)",
        output.request_id, reasons, len(output.prompt_token_ids), output.num_cached_tokens,
        generated, len(output.outputs), _seconds(m.queue_time), _seconds(m.time_to_first_token),
        end - m.arrival_time, m.num_preemptions,
    )  # fmt: skip


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


class StatsLog:
    """vLLM's periodic stats line, from the engine's snapshot."""

    def __init__(self, engine: AsyncEngine, interval: float = STATS_INTERVAL):
        self.engine = engine
        self.interval = interval
        self.last = self._counts(time.monotonic())
        self.was_busy = False

    def _counts(self, now: float) -> tuple[float, int, int]:
        stats = self.engine.snapshot.stats
        return now, stats.prompt_tokens, stats.generated_tokens

    def emit(self, now: float | None = None) -> None:
        """Write the line for the interval since the last one."""
        snap = self.engine.snapshot
        counts = self._counts(time.monotonic() if now is None else now)
        elapsed = max(counts[0] - self.last[0], 1e-9)
        prompt = (counts[1] - self.last[1]) / elapsed
        generation = (counts[2] - self.last[2]) / elapsed
        self.last = counts
        busy = bool(prompt or generation or snap.num_running or snap.num_queued)
        level = logging.INFO if busy or self.was_busy else logging.DEBUG
        self.was_busy = busy
        stats_log.log(
            level,
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Swapped: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
            "Prefix cache hit rate: %.1f%%",
            prompt, generation, snap.num_running, snap.num_swapped, snap.num_waiting,
            100 * snap.kv_cache_usage, 100 * snap.stats.prefix_cache_hit_rate,
        )  # fmt: skip

    async def run(self) -> None:
        """Emit every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            self.emit()
