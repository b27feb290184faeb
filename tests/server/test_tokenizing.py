"""The tokenizing lanes: work runs off the event loop, a small prompt never waits behind large
ones, the large lane refuses past its bound, and a caller that gives up drops queued work."""

from __future__ import annotations

import asyncio
import threading

import pytest

from baton_paged.entrypoints.async_engine import QueueFullError
from baton_paged.entrypoints.server.tokenizing import (
    SMALL_PROMPT_CHARS,
    THREADS_PER_LANE,
    Tokenizing,
)

LARGE = SMALL_PROMPT_CHARS + 1


@pytest.fixture
def lanes():
    tokenizing = Tokenizing(large_in_flight=4)
    yield tokenizing
    tokenizing.close()


def blocked(release: threading.Event, ran: list):
    def work():
        ran.append(threading.current_thread().name)
        release.wait(timeout=30)
        return "large"

    return work


def test_small_prompts_run_while_the_large_lane_is_full(lanes):
    async def scenario():
        release, ran = threading.Event(), []
        large = [asyncio.ensure_future(lanes.run(LARGE, blocked(release, ran))) for _ in range(4)]
        small = await asyncio.wait_for(lanes.run(10, lambda: threading.current_thread().name), 10)
        with pytest.raises(QueueFullError, match="large prompts"):
            await lanes.run(LARGE, lambda: "refused")
        release.set()
        return small, await asyncio.gather(*large), ran

    small, large, ran = asyncio.run(scenario())
    assert small.startswith("baton-tokenize_") and small != threading.main_thread().name
    assert large == ["large"] * 4 and all(name.startswith("baton-tokenize-xl") for name in ran)
    assert lanes.large_open == 0


def test_a_caller_that_gives_up_drops_its_queued_work(lanes):
    async def scenario():
        release, ran = threading.Event(), []
        running = [
            asyncio.ensure_future(lanes.run(LARGE, blocked(release, ran)))
            for _ in range(THREADS_PER_LANE)
        ]
        queued = asyncio.ensure_future(lanes.run(LARGE, lambda: ran.append("queued")))
        await asyncio.sleep(0)  # let it reach the executor's queue
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        await asyncio.sleep(0)  # the cancel reaches the executor's future in a callback
        release.set()
        await asyncio.gather(*running)
        return ran

    ran = asyncio.run(scenario())
    assert "queued" not in ran and len(ran) == THREADS_PER_LANE
    assert lanes.large_open == 0
