"""Preemption and memory-pressure scaling without a model: who leaves, how, and who comes back."""

from __future__ import annotations

import pytest
from sched_helpers import request, run_plan, scheduler

from baton_paged.request import RequestStatus

POLICIES = ("baton", "orca", "chunked")
"""The dynamic policies: static admits nobody while a batch runs, so it never preempts for one."""


def started(sched, *rids, priority=1, **shape):
    """Admit ``rids`` and run one iteration (their prefill), so each has computed K/V."""
    for rid in rids:
        sched.add(request(rid, priority=priority, **shape))
    run_plan(sched, sched.schedule())
    assert all(rid in sched.batch for rid in rids)


@pytest.mark.parametrize("name", POLICIES)
def test_high_priority_arrival_swaps_out_the_newest_low_priority_request(name):
    sched = scheduler(max_batch=2, host_pages=16, policy=name, chunk_budget=64)
    started(sched, "old", "new", max_tokens=6)
    pages = sched.batch.pages("new")
    sched.add(request("urgent", priority=0))
    plan = sched.schedule()
    assert plan.preempted == ("new",) and plan.admitted == ("urgent",)
    (swap,) = plan.swap_out
    assert swap.device_pages == tuple(pages[: len(swap.device_pages)])
    new = sched.waiting.peek()
    assert new.request_id == "new" and new.status is RequestStatus.SWAPPED
    assert new.num_computed_tokens == 6 and sched.batch.swapped["new"] == list(swap.host_pages)
    assert any(r.request_id == "urgent" for f in plan.forwards for r in f.rows)
    run_plan(sched, plan)


@pytest.mark.parametrize("name", POLICIES)
def test_without_host_room_the_victim_recomputes(name):
    sched = scheduler(max_batch=2, host_pages=1, policy=name, chunk_budget=64)
    started(sched, "old", "new", max_tokens=6)  # 6 prompt tokens: 2 pages each
    sched.add(request("urgent", priority=0))
    plan = sched.schedule()
    assert plan.preempted == ("new",) and plan.swap_out == () and plan.num_recomputed == 1
    new = sched.waiting.peek()
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    run_plan(sched, plan)


def test_equal_priority_never_preempts():
    sched = scheduler(max_batch=2, host_pages=16)
    started(sched, "a", "b", priority=0)
    sched.add(request("c", priority=0))
    plan = sched.schedule()
    assert plan.preempted == () and plan.admitted == ()


def test_preempts_only_when_that_makes_room():
    """The arrival needs 8 pages; evicting the one low-priority request frees 2 of the 3 missing,
    so nobody is evicted for nothing."""
    sched = scheduler(num_pages=8, max_batch=4, host_pages=16)
    sched.add(request("high", priority=0, prompt_len=12))  # 3 pages, priority 0
    sched.add(request("low", priority=2, prompt_len=8))  # 2 pages
    run_plan(sched, sched.schedule())
    sched.add(request("huge", priority=1, prompt_len=29))  # 8 pages
    plan = sched.schedule()
    assert plan.preempted == () and plan.admitted == ()


@pytest.mark.parametrize("name", POLICIES)
def test_swapped_request_resumes_where_it_stopped(name):
    sched = scheduler(max_batch=2, host_pages=16, policy=name, chunk_budget=64)
    started(sched, "old", "new", max_tokens=8)
    victim = sched.batch["new"]
    tokens_before = list(victim.output_token_ids)
    sched.add(request("urgent", priority=0, max_tokens=2))
    plan = sched.schedule()
    swapped_pages = plan.swap_out[0].host_pages
    run_plan(sched, plan)
    plan = sched.schedule()
    while "new" not in sched.batch:
        run_plan(sched, plan)
        plan = sched.schedule()
    (swap_in,) = plan.swap_in
    assert swap_in.host_pages == swapped_pages
    assert sched.batch.pages("new")[: swap_in.num_pages] == list(swap_in.device_pages)
    assert victim.output_token_ids == tokens_before  # nothing recomputed, nothing lost
    (row,) = [r for f in plan.forwards for r in f.rows if r.request_id == "new"]
    assert row.decode and len(row.token_ids) == 1  # straight back into the decode forward
    run_plan(sched, plan)
    while sched.has_work():
        run_plan(sched, sched.schedule())
    assert len(victim.output_token_ids) == 8
    assert sched.batch.pool.num_used == 0 and sched.batch.host_pool.num_used == 0


def test_finishing_a_swapped_request_frees_its_host_pages():
    sched = scheduler(max_batch=1, host_pages=16)
    started(sched, "low", max_tokens=6)
    sched.add(request("urgent", priority=0))
    run_plan(sched, sched.schedule())
    assert sched.batch.host_pool.num_used > 0
    sched.abort(_waiting(sched, "low"))
    sched.check_integrity()
    assert sched.batch.host_pool.num_used == 0 and "low" not in sched.waiting


def _waiting(sched, rid):
    return next(r for r in sched.waiting if r.request_id == rid)


class Pressure:
    """A fake device-memory reading the test sets between iterations."""

    def __init__(self):
        self.value = 0.0

    def __call__(self) -> float:
        return self.value


@pytest.mark.parametrize("name", POLICIES)
def test_pressure_shrinks_one_request_per_iteration_then_holds_then_grows(name):
    pressure = Pressure()
    sched = scheduler(
        max_batch=4,
        host_pages=64,
        watermarks=(0.9, 0.5),
        reader=pressure,
        policy=name,
        chunk_budget=64,
    )
    started(sched, "a", "b", "c", "d", max_tokens=30)
    pressure.value = 0.95
    sizes = []
    for _ in range(4):
        run_plan(sched, sched.schedule())
        sizes.append(len(sched.batch))
    assert sizes == [3, 2, 1, 1]  # down to one, never zero
    pressure.value = 0.7  # between the watermarks: hold, no growth
    run_plan(sched, sched.schedule())
    assert len(sched.batch) == 1 and sched.monitor.holding
    pressure.value = 0.3
    run_plan(sched, sched.schedule())
    assert len(sched.batch) == 4 and not sched.monitor.holding
    assert (sched.monitor.high_crossings, sched.monitor.low_crossings) == (1, 1)


def test_high_priority_arrival_takes_a_slot_while_pressure_holds_the_batch():
    pressure = Pressure()
    sched = scheduler(max_batch=4, host_pages=64, watermarks=(0.9, 0.5), reader=pressure)
    started(sched, "a", "b", max_tokens=30)
    pressure.value = 0.7
    sched.monitor.holding = True  # as after a crossing; the batch may not grow past 2
    sched.add(request("low", priority=1))
    assert sched.schedule().admitted == ()
    sched.add(request("urgent", priority=0))
    plan = sched.schedule()
    assert plan.admitted == ("urgent",) and plan.preempted == ("b",)
    assert len(sched.batch) == 2


def test_admission_keeps_the_pool_under_the_high_watermark():
    sched = scheduler(num_pages=10, max_batch=4, watermarks=(0.75, 0.5))
    for rid in "abc":
        sched.add(request(rid, prompt_len=8, max_tokens=2))  # 2 pages + 1 due next step
    plan = sched.schedule()
    assert plan.admitted == ("a", "b")  # a third would take the pool past 7.5 of 10 pages
    run_plan(sched, plan)


def test_an_empty_batch_admits_a_request_the_watermark_alone_would_refuse():
    sched = scheduler(num_pages=4, max_batch=2, watermarks=(0.5, 0.25))
    sched.add(request("whole-pool", prompt_len=13, max_tokens=1))  # 4 pages: 100% > 50%
    assert sched.schedule().admitted == ("whole-pool",)
