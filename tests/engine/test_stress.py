"""Memory-pressure stress: hundreds of requests with random priorities, bursts, budgets and aborts
on a 64-page pool while a fake monitor injects external pressure. Nothing may be lost or stuck,
every finished output must equal an unconstrained run's, both pools must end empty, and the batch
must shrink and hold under pressure as the watermarks say.

The default run holds a short version; ``pytest -m stress`` runs the long one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from baton_paged.engine import Engine
from baton_paged.sampling_params import SamplingParams

POOL = {"page_size": 16, "kv_memory": "1MiB", "max_batch_size": 8}
"""64 pages of 16 tokens for the tiny float64 Llama (16 KiB a page)."""

EDGE_LENGTHS = (1, 2, 15, 16, 17, 32, 33)
"""Prompt lengths at page boundaries, and the one-token prompt: every fifth request takes the next
one in turn, so every workload holds them all whatever the seed."""


@dataclass(frozen=True)
class Arrival:
    request_id: str
    step: int
    prompt: tuple[int, ...]
    max_tokens: int
    priority: int
    abortable: bool
    """Only these (every other request) may be aborted: the others must finish on their own, so
    a request that never would trips the step bound instead of being rescued by a random abort."""


def workload(seed: int, count: int, shared: bool = False) -> list[Arrival]:
    """Requests in bursts (several arriving at one iteration, quiet gaps between), priorities
    0-3, mostly short budgets with a long tail. ``shared``: each prompt starts with one of three
    system prompts (16, 33 and 48 tokens), so the prefix cache is hit, evicted and hit again."""
    rng = random.Random(seed)
    heads = (
        [tuple(rng.randrange(1, 500) for _ in range(n)) for n in (16, 33, 48)] if shared else [()]
    )
    arrivals, step = [], 0
    while len(arrivals) < count:
        step += rng.choice((0, 1, 2, 5, 15))
        for _ in range(min(rng.randint(1, 12), count - len(arrivals))):
            arrivals.append(arrival(rng, len(arrivals), step, rng.choice(heads)))
    return arrivals


def arrival(rng: random.Random, index: int, step: int, head: tuple[int, ...] = ()) -> Arrival:
    edge = EDGE_LENGTHS[index // 5 % len(EDGE_LENGTHS)]
    length = edge if index % 5 == 0 else rng.randint(1, 60)
    prompt = head + tuple(rng.randrange(1, 500) for _ in range(length))
    budget = rng.randint(60, 120) if rng.random() < 0.1 else rng.randint(1, 30)
    return Arrival(str(index), step, prompt, budget, rng.randint(0, 3), index % 2 == 1)


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
    """Aborts kept level across the states a request can be in (waiting, running, and swapped out
    when there is a host pool): each comes from a state aborted from least so far, at a random
    iteration when an abortable request is in it, or at once for a state not aborted from yet
    (the swapped state is short-lived)."""

    def __init__(self, seed: int, arrivals: list[Arrival], rate: float = 0.1):
        self.rng = random.Random(seed)
        self.rate = rate
        self.abortable = {a.request_id for a in arrivals if a.abortable}
        self.aborted: set[str] = set()
        self.by_state: dict[str, int] = {"waiting": 0, "running": 0, "swapped": 0}

    def pick(self, engine: Engine) -> str | None:
        states = self.abortable_by_state(engine)
        fewest = min(self.by_state[state] for state in states)
        due = [state for state, ids in states.items() if ids and self.by_state[state] == fewest]
        if not due or (fewest and self.rng.random() >= self.rate):
            return None
        state = self.rng.choice(due)
        victim = self.rng.choice(states[state])
        self.by_state[state] += 1
        self.aborted.add(victim)
        return victim

    def abortable_by_state(self, engine: Engine) -> dict[str, list[str]]:
        waiting, batch = engine.scheduler.waiting, engine.scheduler.batch
        states = {
            "waiting": [r.request_id for r in waiting if r.request_id not in batch.swapped],
            "running": [r.request_id for r in batch.requests],
        }
        if engine.host is not None:
            states["swapped"] = list(batch.swapped)
        return {state: sorted(set(ids) & self.abortable) for state, ids in states.items()}


@dataclass
class Run:
    finals: dict = field(default_factory=dict)
    """Each request's final output (finished or aborted), by request id."""
    sheds: int = 0
    """Iterations that began above the high watermark with more than one request running."""

    def record(self, output) -> None:
        assert output.request_id not in self.finals, f"request {output.request_id} ended twice"
        self.finals[output.request_id] = output


def drive(engine: Engine, arrivals: list[Arrival], aborter: Aborter | None = None) -> Run:
    """Run to the end. Fails if a request ends twice, if after any iteration the pools disagree
    or the batch broke the watermarks' rule, or if the run takes more iterations than it could
    need: the bound is 6-20 times what these runs take, so only a stuck request reaches it."""
    run = Run()
    pending = sorted(arrivals, key=lambda a: a.step)
    limit = pending[-1].step + sum(len(a.prompt) + a.max_tokens for a in arrivals)
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0].step <= step:
            submit(engine, pending.pop(0))
        if aborter and (victim := aborter.pick(engine)):
            run.record(engine.abort_request(victim))
        before = len(engine.scheduler.batch)
        for out in engine.step():
            if out.finished:
                run.record(out)
        run.sheds += check_scaling(engine, before)
        engine.scheduler.check_integrity()
        step += 1
        assert step < limit, f"stuck: {sorted(engine.requests)} unfinished after {step} iterations"
    return run


def submit(engine: Engine, a: Arrival) -> None:
    params = SamplingParams(temperature=0, max_tokens=a.max_tokens)
    prompt = {"prompt_token_ids": list(a.prompt)}
    engine.add_request(prompt, params, request_id=a.request_id, priority=a.priority)


def check_scaling(engine: Engine, before: int) -> int:
    """The scaling itself, not only surviving it: while pressure holds, the batch never grows,
    and above the high watermark it sheds a request per iteration, down to one. Returns 1 if this
    iteration had to shed."""
    monitor = engine.monitor
    if not monitor.holding:
        return 0
    shed = monitor.above_high and before > 1
    bound = before - 1 if shed else max(1, before)
    running = len(engine.scheduler.batch)
    assert running <= bound, f"batch {before} -> {running} at pressure {monitor.reading:.2f}"
    return int(shed)


def run_stress(make_engine, seed: int, count: int, policy: str, mode: str, shared: bool = False):
    """Run the workload under pressure and against an unconstrained engine; check the endings.
    Returns the engine, the aborter and the run for the callers' checks of what was exercised."""
    arrivals = workload(seed, count, shared)
    engine = make_engine(
        policy=policy,
        preemption_mode=mode,
        swap_memory="256KiB",  # 16 host pages: some victims swap, others find it full
        memory_reader=Pressure(seed),
        **POOL,
    )
    assert engine.cache.num_pages == 64
    aborter = Aborter(seed, arrivals)
    run = drive(engine, arrivals, aborter)
    reference = drive(make_engine(policy="baton", kv_memory="64MiB"), arrivals)
    check_endings(arrivals, run, reference, aborter)
    assert engine.cache.pool.num_used == 0 and not engine.requests
    assert engine.host is None or engine.host.pool.num_used == 0
    assert len(aborter.aborted) == engine.stats.aborted
    return engine, aborter, run


def check_endings(arrivals: list[Arrival], run: Run, reference: Run, aborter: Aborter) -> None:
    """Every request ended exactly once: aborted if and only if the test aborted it, otherwise
    with the unconstrained run's tokens and finish reason."""
    assert set(run.finals) == {a.request_id for a in arrivals}, "a request was lost"
    for a in arrivals:
        out = run.finals[a.request_id].outputs[0]
        if a.request_id in aborter.aborted:
            assert out.finish_reason == "abort", a.request_id
        else:
            ref = reference.finals[a.request_id].outputs[0]
            assert (out.token_ids, out.finish_reason) == (ref.token_ids, ref.finish_reason), (
                a.request_id
            )


def assert_exercised(engine: Engine, aborter: Aborter, run: Run, mode: str) -> None:
    """The run really hit what it claims to survive."""
    stats = engine.stats
    assert stats.aborted > 0 and stats.high_watermark_crossings > 0 and run.sheds > 0
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
    engine, aborter, run = run_stress(make_engine, seed=4, count=60, policy=policy, mode=mode)
    assert_exercised(engine, aborter, run, mode)
    if (policy, mode) == ("baton", "swap"):  # a full host pool falls back to recompute
        assert engine.stats.recompute_preemptions > 0


@pytest.mark.parametrize(("policy", "mode"), [("baton", "swap"), ("chunked", "recompute")])
def test_shared_prefixes_under_pressure_short(make_engine, policy, mode):
    """Shared pages under preemption, swap, abort and eviction: nothing lost, no page leaked
    (integrity every iteration: each page's owners are the rows holding it), outputs equal."""
    engine, aborter, run = run_stress(make_engine, 5, 60, policy, mode, shared=True)
    assert_exercised(engine, aborter, run, mode)
    assert engine.stats.prefix_cache_hits > 0 and engine.stats.prefix_cache_evictions > 0


@pytest.mark.stress
@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize(("policy", "mode"), CASES)
def test_shared_prefixes_under_pressure_long(make_engine, seed, policy, mode):
    engine, aborter, run = run_stress(make_engine, seed, 300, policy, mode, shared=True)
    assert_exercised(engine, aborter, run, mode)
    assert engine.stats.prefix_cache_hits > 0


@pytest.mark.stress
@pytest.mark.parametrize("seed", [2, 3, 4])
@pytest.mark.parametrize(("policy", "mode"), CASES + [("orca", "recompute")])
def test_memory_pressure_long(make_engine, seed, policy, mode):
    engine, aborter, run = run_stress(make_engine, seed=seed, count=300, policy=policy, mode=mode)
    assert_exercised(engine, aborter, run, mode)
