"""AsyncEngine without HTTP: the event loop never waits for an iteration, adds and aborts are
applied between iterations, a bad request or a failing iteration hurts only itself, and the step
loop can run on the caller's thread (as ``baton-paged serve`` runs it)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from serving import TEST_MEMORY
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton_paged.config import EngineConfig
from baton_paged.engine import Engine
from baton_paged.entrypoints.async_engine import (
    AsyncEngine,
    EngineStoppedError,
    QueueFullError,
    RequestFailedError,
    _Stream,
)
from baton_paged.entrypoints.llm import LLM
from baton_paged.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def tiny_engine(path, **options) -> Engine:
    config = EngineConfig(
        model=str(path), dtype="float64", max_batch_size=4, max_model_len=128,
        kv_memory=TEST_MEMORY, swap_memory=TEST_MEMORY, **options,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    return Engine(config, model, AutoTokenizer.from_pretrained(path))


class GatedSteps:
    """Wraps ``Engine.step_unbuilt`` (the AsyncEngine's iteration) so a test decides when each
    iteration may run, and can look at the engine from inside an iteration."""

    def __init__(self, engine: Engine):
        self.engine, self.real_step = engine, engine.step_unbuilt
        self.entered, self.gate = threading.Event(), threading.Event()
        self.seen: list[tuple[set[str], int]] = []
        engine.step_unbuilt = self.step

    def step(self):
        self.seen.append((set(self.engine.requests), self.engine.cache.pool.num_used))
        self.entered.set()
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        return self.real_step()


@pytest.fixture
def path(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture
def engine(path):
    async_engine = AsyncEngine(tiny_engine(path), max_waiting=4)
    yield async_engine
    async_engine.shutdown()


def wait_until(condition, timeout: float = 10.0) -> None:
    """Aborts are applied by the engine thread, a moment after the stream closes."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


async def collect(async_engine: AsyncEngine, prompt, request_id=None) -> str:
    outputs = [out async for out in async_engine.generate(prompt, GREEDY, request_id)]
    assert outputs[-1].finished and all(not out.finished for out in outputs[:-1])
    return outputs[-1].outputs[0].text


def test_outputs_equal_the_offline_llm(engine, path):
    prompts = ["def main():", "import os", "x = 1"]

    async def run_all():
        return await asyncio.gather(*(collect(engine, p) for p in prompts))

    expected = LLM.from_engine(tiny_engine(path)).generate(prompts, GREEDY)
    assert asyncio.run(run_all()) == [out.outputs[0].text for out in expected]


def test_streams_with_step_ahead_scheduling_equal_the_offline_llm(path):
    """Each iteration reports the one before it: streams still see every token, in order, and
    an early abort leaves nothing behind."""
    prompts = ["def main():", "import os", "x = 1", "for i in"]
    async_engine = AsyncEngine(tiny_engine(path, async_scheduling=True), max_waiting=8)

    async def run_all():
        abandoned = async_engine.generate("while True:", GREEDY, "gone")
        await anext(abandoned)
        await abandoned.aclose()
        return await asyncio.gather(*(collect(async_engine, p) for p in prompts))

    try:
        texts = asyncio.run(run_all())
        wait_until(lambda: not async_engine.engine.requests)
        assert async_engine.engine.cache.pool.num_used == 0
    finally:
        async_engine.shutdown()
    expected = LLM.from_engine(tiny_engine(path)).generate(prompts, GREEDY)
    assert texts == [out.outputs[0].text for out in expected]


def test_submit_returns_while_an_iteration_is_running(engine):
    gated = GatedSteps(engine.engine)

    async def scenario():
        first = asyncio.ensure_future(collect(engine, "def main():"))
        assert await asyncio.to_thread(gated.entered.wait, 10)  # an iteration is now blocked
        started = time.monotonic()
        second_id, second = engine.submit("import os", GREEDY, "second", 0)
        assert time.monotonic() - started < 1.0 and second_id == "second"
        assert "second" not in engine.engine.requests  # joins between iterations, not during
        gated.gate.set()
        await first
        while not (await second.get()).finished:
            pass
        return [seen for seen, _ in gated.seen]

    seen = asyncio.run(scenario())
    assert "second" in seen[1]  # applied before the iteration after the blocked one


def test_abort_frees_pages_before_the_next_iteration(engine):
    gated = GatedSteps(engine.engine)
    gated.gate.set()

    async def scenario():
        stream = engine.generate("def main():", SamplingParams(max_tokens=100, ignore_eos=True))
        await anext(stream)  # prefilled and decoding: it holds pages
        gated.gate.clear()
        gated.entered.clear()
        assert await asyncio.to_thread(gated.entered.wait, 10)
        await stream.aclose()  # the client goes away while an iteration runs
        iterations = len(gated.seen)
        gated.gate.set()
        return iterations

    iterations = asyncio.run(scenario())
    wait_until(lambda: not engine.engine.requests)
    assert not engine.engine.requests and engine.engine.cache.pool.num_used == 0
    assert all(not seen for seen, _ in gated.seen[iterations:])  # no iteration ran it again
    assert engine.engine.stats.aborted == 1


def test_bad_requests_fail_at_submit_and_queue_nothing(engine):
    async def scenario():
        with pytest.raises(ValueError, match="no room to generate"):
            await anext(engine.generate([1] * 200, GREEDY))
        with pytest.raises(ValueError, match="priority"):
            await anext(engine.generate("x", GREEDY, priority="high"))
        gated = GatedSteps(engine.engine)
        stream = engine.generate("x", GREEDY, request_id="same")
        first = asyncio.ensure_future(anext(stream))
        assert await asyncio.to_thread(gated.entered.wait, 10)
        with pytest.raises(ValueError, match="already in use"):
            await anext(engine.generate("y", GREEDY, request_id="same"))
        gated.gate.set()
        await first
        await stream.aclose()

    asyncio.run(scenario())
    wait_until(lambda: not engine.engine.requests)
    assert engine.engine.stats.aborted == 1  # only the one closed early


def test_a_full_waiting_queue_refuses_without_queuing(engine):
    gated = GatedSteps(engine.engine)

    async def scenario():
        running = asyncio.ensure_future(collect(engine, "x", "running"))
        assert await asyncio.to_thread(gated.entered.wait, 10)
        # "running" still waits: the blocked iteration is the one that would admit it
        waiting = [engine.submit("x", GREEDY, f"w{i}", 0) for i in range(engine.max_waiting - 1)]
        with pytest.raises(QueueFullError):
            engine.submit("x", GREEDY, "one-too-many", 0)
        gated.gate.set()
        await running
        for _, stream in waiting:
            while not (await stream.get()).finished:
                pass

    asyncio.run(scenario())
    assert engine.engine.stats.finished == engine.max_waiting
    assert "one-too-many" not in engine.engine.requests


def test_each_completion_of_a_request_takes_a_queue_place(engine):
    """max_waiting is 4: n=5 can never fit (a 400), n=3 fits once beside one more request."""
    gated = GatedSteps(engine.engine)

    async def scenario():
        with pytest.raises(ValueError, match="5 completions"):
            engine.submit("x", SamplingParams(n=5, max_tokens=2), "too-many", 0)
        running = asyncio.ensure_future(collect(engine, "x", "running"))
        assert await asyncio.to_thread(gated.entered.wait, 10)
        _, three = engine.submit("x", SamplingParams(n=3, max_tokens=2), "three", 0)
        with pytest.raises(QueueFullError):
            engine.submit("x", GREEDY, "one-too-many", 0)
        gated.gate.set()
        await running
        while not (output := await three.get()).finished:
            pass
        assert len(output.outputs) == 3

    asyncio.run(scenario())
    assert not engine.engine.requests and "too-many" not in engine.engine.groups


def test_a_failing_iteration_fails_only_its_requests(engine):
    real_step, calls = engine.engine.step_unbuilt, {"n": 0}

    def failing_second_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real_step()

    engine.engine.step_unbuilt = failing_second_step

    async def scenario():
        with pytest.raises(RequestFailedError, match="boom"):
            await collect(engine, "x")
        return await collect(engine, "x")

    assert asyncio.run(scenario())
    assert engine.is_running and engine.engine.cache.pool.num_used == 0


def test_a_request_that_finished_before_its_iteration_failed_still_gets_its_output(engine):
    """BATON prefills a newcomer in its own forward; if it finishes there and reading the same
    iteration's decode tokens raises, it has its whole output, not an error or a hang."""
    inner = engine.engine
    real_accept = inner.outputs.accept

    def accept(sampled, token_ids):
        short = inner.requests.get("short")
        if short is not None and short.output_token_ids:  # its one token is out: it finished
            raise RuntimeError("boom after short finished")
        return real_accept(sampled, token_ids)

    inner.outputs.accept = accept
    one_token = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    long_params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)

    async def scenario():
        long_stream = engine.generate("def main():", long_params, "long")
        await anext(long_stream)  # "long" is decoding
        short = [out async for out in engine.generate("x", one_token, "short")]
        with pytest.raises(RequestFailedError, match="boom"):
            async for _ in long_stream:
                pass
        return short[-1]

    short = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert short.finished and len(short.outputs[0].token_ids) == 1
    assert not inner.requests and inner.cache.pool.num_used == 0 and engine.is_running


def test_a_failing_finish_listener_does_not_stop_the_loop(engine):
    def broken_listener(output):
        raise KeyError("listener bug")

    engine.finish_listeners.append(broken_listener)

    async def scenario():
        return [await collect(engine, "x"), await collect(engine, "y")]

    assert all(asyncio.run(asyncio.wait_for(scenario(), 30)))
    assert engine.is_running


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_loop_fails_open_streams_and_refuses_new_requests(engine):
    inner = engine.engine
    real_has_work = inner.has_unfinished_requests
    submitted = threading.Event()

    def has_work_then_bug():
        if submitted.is_set() and inner.stats.finished == 0 and inner.requests:
            raise RuntimeError("a bug outside the iteration")
        return real_has_work()

    inner.has_unfinished_requests = has_work_then_bug

    async def scenario():
        stream = engine.generate("x", GREEDY, "victim")
        submitted.set()
        with pytest.raises(EngineStoppedError):
            async for _ in stream:
                pass
        with pytest.raises(EngineStoppedError):
            await anext(engine.generate("x", GREEDY, "late"))

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert not engine.is_running


def test_a_stream_whose_event_loop_closed_is_aborted(engine):
    async def submit_and_leave():
        engine.submit("x", SamplingParams(max_tokens=100, ignore_eos=True), "orphan", 0)

    asyncio.run(submit_and_leave())  # closes the loop the stream would be written to
    wait_until(lambda: engine.engine.stats.aborted == 1)
    assert engine.is_running and not engine.engine.requests
    assert engine.engine.cache.pool.num_used == 0


def test_the_loop_runs_on_the_callers_thread(path):
    async_engine = AsyncEngine(tiny_engine(path), own_thread=False)
    assert not async_engine.is_running
    threads = []
    real_step = async_engine.engine.step_unbuilt

    def step():
        threads.append(threading.current_thread())
        return real_step()

    async_engine.engine.step_unbuilt = step
    result = {}

    def client():
        result["text"] = asyncio.run(collect(async_engine, "def main():"))
        async_engine.shutdown()

    helper = threading.Thread(target=client)
    helper.start()
    async_engine.run_loop()  # returns once the client thread shuts it down
    helper.join(timeout=10)
    assert result["text"] and set(threads) == {threading.current_thread()}
    assert not async_engine.is_running


class Built:
    """An unbuilt output: ``build`` counts how often it is called."""

    def __init__(self, name: str, finished: bool = False):
        self.name, self.finished, self.builds = name, finished, 0

    def build(self):
        self.builds += 1
        return SimpleNamespace(name=self.name, finished=self.finished)


def test_a_reader_that_falls_behind_builds_only_the_latest_output():
    async def scenario():
        stream = _Stream(asyncio.get_running_loop())
        outputs = [Built("1"), Built("2"), Built("3")]
        for output in outputs:
            stream.put(output)  # three steps before the reader wakes
        first = await stream.get()
        final = Built("4", finished=True)
        stream.put(final)
        stream.put(RequestFailedError("late"))  # behind a finished output: never replaces it
        return first, await stream.get(), outputs, final, stream

    first, last, outputs, final, stream = asyncio.run(scenario())
    assert first.name == "3" and [o.builds for o in outputs] == [0, 0, 1]
    assert last.name == "4" and last.finished and final.builds == 1


def test_an_error_is_never_replaced_by_a_later_output():
    async def scenario():
        stream = _Stream(asyncio.get_running_loop())
        stream.put(Built("1"))
        stream.put(RequestFailedError("boom"))
        stream.put(Built("2"))
        got = [(await stream.get()).name]
        with pytest.raises(RequestFailedError, match="boom"):
            await stream.get()
        got.append((await stream.get()).name)
        return got

    assert asyncio.run(scenario()) == ["1", "2"]
