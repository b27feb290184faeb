"""Where the engine's modules meet: three calls into the scheduler per iteration (schedule,
commit, finish; step-ahead scheduling finishes the previous iteration before committing this one),
observers that read only the snapshot, and no scheduler fields read from outside
``baton_paged/sched/``."""

from __future__ import annotations

import re
from pathlib import Path

from equivalence import run
from test_preemption import priority_workload

from baton_paged.metrics import EngineMetrics

REPO = Path(__file__).resolve().parents[2]
SCHEDULER_API = {
    "add",
    "abort",
    "has_work",
    "has_work_to_plan",
    "schedule",
    "commit",
    "finish",
}


class Recorder:
    """Stands in for the scheduler and records every attribute the engine reads from it."""

    def __init__(self, target):
        self._target = target
        self.reads: list[str] = []

    def __getattr__(self, name):
        self.reads.append(name)
        return getattr(self._target, name)


def record_scheduler_calls(engine, monkeypatch) -> list[list[str]]:
    """Every scheduler attribute each ``engine.step`` reads, one list per step."""
    recorder, steps = Recorder(engine.scheduler), []
    real_step = engine.step

    def recorded_step():
        recorder.reads.clear()
        engine.scheduler = recorder
        try:
            return real_step()
        finally:
            engine.scheduler = recorder._target
            steps.append(list(recorder.reads))

    monkeypatch.setattr(engine, "step", recorded_step)
    return steps


def test_each_step_calls_the_scheduler_three_times(make_engine, monkeypatch):
    """Through admissions, swap preemptions, swap-ins and finishes alike: schedule, commit,
    finish (after asking whether there is anything to plan)."""
    engine = make_engine(max_batch_size=4, page_size=4, kv_memory="1MiB")
    steps = record_scheduler_calls(engine, monkeypatch)
    run(engine, priority_workload(seed=5))
    assert all(reads == ["has_work_to_plan", "schedule", "commit", "finish"] for reads in steps)
    assert engine.stats.swap_preemptions > 0 and engine.stats.pages_swapped_in > 0


def test_step_ahead_finishes_the_last_iteration_before_committing_the_next(
    make_engine, monkeypatch
):
    """Step-ahead: plan N+1, read N's tokens and finish its requests, then commit N+1; every
    plan is committed once and finished once."""
    engine = make_engine(max_batch_size=4, page_size=4, kv_memory="1MiB", async_scheduling=True)
    steps = record_scheduler_calls(engine, monkeypatch)
    run(engine, priority_workload(seed=5))
    shapes = {
        ("has_work_to_plan", "schedule", "commit"),  # nothing in flight: the first step
        ("has_work_to_plan", "schedule", "finish", "commit"),
        ("has_work_to_plan", "finish"),  # only the last tokens were in flight
    }
    assert all(tuple(reads) in shapes for reads in steps), steps
    calls = [name for reads in steps for name in reads]
    assert calls.count("schedule") == calls.count("commit") == calls.count("finish")
    assert engine.stats.swap_preemptions > 0 and engine.stats.pages_swapped_in > 0


def test_metrics_read_nothing_but_the_snapshot(make_engine):
    engine = make_engine()

    class OnlyASnapshot:
        snapshot = engine.snapshot
        inputs = engine.inputs  # read once, for the token-count buckets

    text = EngineMetrics(OnlyASnapshot(), "m").render().decode()
    assert 'vllm:num_requests_running{model_name="m"} 0.0' in text
    assert 'vllm:kv_cache_usage_perc{model_name="m"} 0.0' in text


def test_the_snapshot_follows_adds_steps_and_aborts(make_engine):
    engine = make_engine(max_batch_size=1)
    engine.add_request("def main():", request_id="a")
    engine.add_request("import os", request_id="b")
    assert (engine.snapshot.num_waiting, engine.snapshot.num_running) == (2, 0)
    before = engine.snapshot
    engine.step()
    snap = engine.snapshot
    assert (snap.num_waiting, snap.num_running, snap.stats.iterations) == (1, 1, 1)
    assert snap.device_pages_used > 0 and before.stats.iterations == 0  # old one unchanged
    engine.abort_request("a")
    engine.abort_request("b")
    assert engine.snapshot.num_queued == 0 and engine.snapshot.stats.aborted == 2


def test_no_module_outside_sched_reads_scheduler_fields():
    """Only the scheduler's public calls appear after ``scheduler.`` outside baton_paged/sched/
    (the vLLM plugin's ``scheduler`` is vLLM's own, whose fields its upgrade test pins)."""
    used = set()
    for folder in ("baton_paged", "allocator", "attention", "plugins"):
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO).parts
            if "sched" not in parts and not path.name.startswith("vllm_"):
                used |= set(re.findall(r"\bscheduler\.(\w+)", path.read_text()))
    assert used <= SCHEDULER_API, used - SCHEDULER_API
