"""Memory-pressure stress: hundreds of requests with random priorities, bursts, budgets and aborts
on a 64-page pool while a fake monitor injects external pressure. Nothing may be lost or stuck,
every finished output must equal an unconstrained run's, and both pools must end empty.

The default run holds a short version; ``pytest -m stress`` runs the long one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from baton_paged.engine import Engine
from baton_paged.sampling_params import SamplingParams

POOL = {"page_size": 16, "kv_memory": "1MiB", "max_batch_size": 8}
"""64 pages of 16 tokens for the tiny float64 Llama (16 KiB a page)."""


@dataclass(frozen=True)
class Arrival:
    request_id: str
    step: int
    prompt: tuple[int, ...]
    max_tokens: int
    priority: int


def workload(seed: int, count: int) -> list[Arrival]:
    """Requests in bursts (several arriving at one iteration, quiet gaps between), priorities
    0-3, mostly short budgets with a long tail."""
    rng = random.Random(seed)
    arrivals, step = [], 0
    while len(arrivals) < count:
        step += rng.choice((0, 1, 2, 5, 15))
        for _ in range(min(rng.randint(1, 12), count - len(arrivals))):
            prompt = tuple(rng.randrange(1, 500) for _ in range(rng.randint(1, 60)))
            budget = rng.randint(60, 120) if rng.random() < 0.1 else rng.randint(1, 30)
            rid = str(len(arrivals))
            arrivals.append(Arrival(rid, step, prompt, budget, rng.randint(0, 3)))
    return arrivals


class Pressure:
    """External memory pressure in bursts: above the high watermark during some iteration
    windows, below the low one otherwise. The engine calls it once per iteration."""

    def __init__(self, seed: int):
        rng = random.Random(seed)
        self.windows = [(start, start + rng.randint(3, 30)) for start in range(20, 3000, 90)]
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return 0.99 if any(a <= self.calls < b for a, b in self.windows) else 0.2


class Aborter:
    """Random aborts spread over the states a request can be in: at some iterations one request
    that is waiting, running or swapped out (a state picked at random among those occupied)."""

    def __init__(self, seed: int, rate: float = 0.04):
        self.rng = random.Random(seed)
        self.rate = rate
        self.by_state: dict[str, int] = {"waiting": 0, "running": 0, "swapped": 0}

    def pick(self, engine: Engine) -> str | None:
        if self.rng.random() >= self.rate:
            return None
        sched = engine.scheduler
        swapped = sorted(sched.swapped)
        states = {
            "waiting": sorted(r.request_id for r in sched.waiting if r.request_id not in swapped),
            "running": sorted(sched.running),
            "swapped": swapped,
        }
        occupied = [state for state, ids in states.items() if ids]
        if not occupied:
            return None
        state = self.rng.choice(occupied)
        self.by_state[state] += 1
        return self.rng.choice(states[state])


def drive(engine: Engine, arrivals: list[Arrival], aborter: Aborter | None = None) -> dict:
    """Run to the end; return each request's final output. Fails if a request ends twice, the
    pools disagree after any iteration, or the run takes more iterations than it could need."""
    finals: dict = {}
    pending = sorted(arrivals, key=lambda a: a.step)
    limit = 20 * sum(a.max_tokens + len(a.prompt) for a in arrivals)
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0].step <= step:
            a = pending.pop(0)
            params = SamplingParams(temperature=0, max_tokens=a.max_tokens)
            prompt = {"prompt_token_ids": list(a.prompt)}
            engine.add_request(prompt, params, request_id=a.request_id, priority=a.priority)
        if aborter and (victim := aborter.pick(engine)):
            record(finals, engine.abort_request(victim))
        for out in engine.step():
            if out.finished:
                record(finals, out)
        engine.scheduler.check_integrity()
        step += 1
        assert step < limit, f"stuck: {len(engine.requests)} requests unfinished after {step}"
    return finals


def record(finals: dict, output) -> None:
    assert output.request_id not in finals, f"request {output.request_id} ended twice"
    finals[output.request_id] = output


def run_stress(make_engine, seed: int, count: int, policy: str, mode: str):
    """Run the workload under pressure and against an unconstrained engine; check the endings.
    Returns the engine and the aborter for the callers' checks of what was exercised."""
    arrivals = workload(seed, count)
    engine = make_engine(
        policy=policy,
        preemption_mode=mode,
        swap_memory="256KiB",  # 16 host pages: some victims swap, others find it full
        memory_reader=Pressure(seed),
        **POOL,
    )
    assert engine.cache.num_pages == 64
    aborter = Aborter(seed)
    finals = drive(engine, arrivals, aborter)
    reference = drive(make_engine(policy="baton", kv_memory="64MiB"), arrivals)

    assert set(finals) == {a.request_id for a in arrivals}, "a request was lost"
    for a in arrivals:
        out = finals[a.request_id].outputs[0]
        if out.finish_reason != "abort":
            assert out.token_ids == reference[a.request_id].outputs[0].token_ids, a.request_id
    assert engine.cache.pool.num_used == 0 and not engine.requests
    assert engine.host is None or engine.host.pool.num_used == 0
    assert sum(aborter.by_state.values()) == engine.stats.aborted
    return engine, aborter


def assert_exercised(engine: Engine, aborter: Aborter, mode: str) -> None:
    """The run really hit what it claims to survive."""
    stats = engine.stats
    assert stats.aborted > 0 and stats.high_watermark_crossings > 0
    assert stats.low_watermark_crossings > 0
    assert aborter.by_state["waiting"] > 0 and aborter.by_state["running"] > 0, aborter.by_state
    if mode == "swap":
        assert stats.swap_preemptions > 0 and stats.pages_swapped_in > 0
        assert aborter.by_state["swapped"] > 0, aborter.by_state
    else:
        assert stats.recompute_preemptions > 0 and stats.swap_preemptions == 0


CASES = [
    ("baton", "swap"),
    ("baton", "recompute"),
    ("orca", "swap"),
    ("chunked", "swap"),
    ("static", "swap"),
]


@pytest.mark.parametrize(("policy", "mode"), CASES)
def test_memory_pressure_short(make_engine, policy, mode):
    engine, aborter = run_stress(make_engine, seed=1, count=60, policy=policy, mode=mode)
    assert_exercised(engine, aborter, mode)
    if (policy, mode) == ("baton", "swap"):  # a full host pool falls back to recompute
        assert engine.stats.recompute_preemptions > 0


@pytest.mark.stress
@pytest.mark.parametrize("seed", [2, 3, 4])
@pytest.mark.parametrize(("policy", "mode"), CASES + [("orca", "recompute")])
def test_memory_pressure_long(make_engine, seed, policy, mode):
    engine, aborter = run_stress(make_engine, seed=seed, count=300, policy=policy, mode=mode)
    assert_exercised(engine, aborter, mode)
