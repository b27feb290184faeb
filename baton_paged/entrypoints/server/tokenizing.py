"""Where the server templates and tokenizes prompts: on worker threads, never on the event loop,
and never a small prompt behind a large one.

Tokenizing a multi-megabyte prompt takes seconds; on the event loop it stalled every client and
/health for that long. On a thread it does not: the Rust tokenizer releases the GIL while it
works, and ``prompt_encoding`` keeps the rest short. But one queue in front of a few threads
would still put every small request behind a handful of huge ones, so prompts go by size to one
of two lanes, and the large lane takes a bounded number at a time (past it: 503 and retry), so
clients sending large prompts cannot queue unbounded work and memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from baton_paged.entrypoints.async_engine import QueueFullError

T = TypeVar("T")

SMALL_PROMPT_CHARS = 65536
"""Prompts up to this many characters (or token ids) take the small lane: a few milliseconds
of tokenizing each."""
THREADS_PER_LANE = 2
LARGE_IN_FLIGHT = 8
"""Large prompts being tokenized or waiting for a thread, at most; more are refused (503)."""


class Tokenizing:
    def __init__(self, large_in_flight: int = LARGE_IN_FLIGHT):
        self.small = ThreadPoolExecutor(THREADS_PER_LANE, thread_name_prefix="baton-tokenize")
        self.large = ThreadPoolExecutor(THREADS_PER_LANE, thread_name_prefix="baton-tokenize-xl")
        self.large_in_flight = large_in_flight
        self.large_open = 0
        """Large prompts taken and not finished; read and written on the event loop only."""

    async def run(self, size: int, work: Callable[[], T]) -> T:
        """``work()`` on the lane for a prompt of ``size`` characters; cancelling the caller
        drops it if it has not started."""
        loop = asyncio.get_running_loop()
        if size <= SMALL_PROMPT_CHARS:
            return await loop.run_in_executor(self.small, work)
        if self.large_open >= self.large_in_flight:
            raise QueueFullError(
                f"{self.large_open} large prompts (over {SMALL_PROMPT_CHARS} characters) are "
                "being tokenized already; retry shortly"
            )
        self.large_open += 1
        try:
            return await loop.run_in_executor(self.large, work)
        finally:
            self.large_open -= 1

    def close(self) -> None:
        """Drop queued work and let the threads end (work already running finishes)."""
        for lane in (self.small, self.large):
            lane.shutdown(wait=False, cancel_futures=True)
