"""Scheduler and policies without a model: who runs when, in which forward, on which pages."""

from __future__ import annotations

import pytest
from sched_helpers import PAGE, request, run_plan, scheduler

from baton_paged.allocator import PagePool
from baton_paged.allocator.page_hash import page_hashes
from baton_paged.request import Request
from baton_paged.sampling_params import SamplingParams
from baton_paged.sched.policies import make_policy
from baton_paged.sched.prefix_caching import PrefixCaching
from baton_paged.sched.scheduler import Scheduler


def test_admission_is_by_priority_then_arrival():
    sched = scheduler(max_batch=3)
    for rid, prio in [("a", 1), ("b", 0), ("c", 1), ("d", 0)]:
        sched.add(request(rid, priority=prio))
    plan = sched.schedule()
    assert plan.admitted == ("b", "d", "a")
    assert [r.request_id for r in sched.waiting] == ["c"]


def test_baton_prefills_newcomers_in_a_forward_of_their_own():
    sched = scheduler()
    sched.add(request("old", max_tokens=5))
    run_plan(sched, sched.schedule())
    sched.add(request("new"))
    plan = sched.schedule()
    assert [[r.request_id for r in f.rows] for f in plan.forwards] == [["new"], ["old"]]
    prefill, decode = plan.forwards
    assert prefill.num_tokens == 6 and decode.num_decode_rows == 1
    assert prefill.block_table.tolist() == [sched.batch.pages("new") + [0] * 30]


def test_orca_runs_newcomers_inside_the_decode_forward():
    sched = scheduler(policy="orca")
    sched.add(request("old", max_tokens=5))
    run_plan(sched, sched.schedule())
    sched.add(request("new"))
    (forward,) = sched.schedule().forwards
    assert [(r.request_id, len(r.token_ids), r.decode) for r in forward.rows] == [
        ("old", 1, True),
        ("new", 6, False),
    ]


def test_static_admits_only_when_the_whole_batch_has_finished():
    sched = scheduler(max_batch=2, policy="static")
    for rid, budget in [("short", 1), ("long", 4), ("next", 2)]:
        sched.add(request(rid, max_tokens=budget))
    admitted = []
    while sched.has_work():
        plan = sched.schedule()
        admitted.append(plan.admitted)
        run_plan(sched, plan)
    assert [a for a in admitted if a] == [("short", "long"), ("next",)]
    assert admitted.index(("next",)) == 4  # after long's 3 decode steps, not after short's 0


def test_chunked_keeps_every_forward_within_the_token_budget():
    sched = scheduler(policy="chunked", chunk_budget=5)
    sched.add(request("a", prompt_len=12, max_tokens=4))
    sched.add(request("b", prompt_len=3, max_tokens=4))
    sizes = []
    while sched.has_work():
        plan = sched.schedule()
        sizes.append([f.num_tokens for f in plan.forwards])
        run_plan(sched, plan)
    assert all(sum(s) <= 5 for s in sizes)
    assert sizes[:3] == [[5], [5], [5]]  # a: 5 + 5, then a's last 2 with b's 3 tokens


def test_chunked_lets_a_higher_priority_request_in_when_decoders_spend_the_budget():
    sched = scheduler(max_batch=4, policy="chunked", chunk_budget=4)
    for rid in "abcd":
        sched.add(request(rid, priority=2, max_tokens=30))
    while len(sched.batch) < 4 or any(r.num_computed_tokens == 0 for r in sched.batch.requests):
        run_plan(sched, sched.schedule())
    sched.add(request("urgent", priority=0, prompt_len=2, max_tokens=2))

    plan = sched.schedule()

    assert plan.admitted == ("urgent",) and plan.preempted == ("d",)
    assert [row.request_id for row in plan.forwards[0].rows][0] == "urgent"


def test_chunked_computes_a_higher_priority_prompt_before_a_long_lower_one():
    sched = scheduler(num_pages=200, policy="chunked", chunk_budget=8)
    sched.add(request("bulk", priority=3, prompt_len=120, max_tokens=2))
    run_plan(sched, sched.schedule())  # bulk's prefill takes the whole budget for 15 steps
    sched.add(request("urgent", priority=0, prompt_len=2, max_tokens=2))

    plan = sched.schedule()

    assert plan.admitted == ("urgent",) and not plan.preempted
    rows = {row.request_id: len(row.token_ids) for row in plan.forwards[0].rows}
    assert rows == {"urgent": 2, "bulk": 6}


def test_chunked_admits_one_outranking_request_per_iteration_past_a_spent_budget():
    sched = scheduler(num_pages=200, max_batch=16, policy="chunked", chunk_budget=8)
    sched.add(request("bulk", priority=3, prompt_len=120, max_tokens=2))
    run_plan(sched, sched.schedule())
    for i in range(4):
        sched.add(request(f"u{i}", priority=1, prompt_len=40, max_tokens=2))

    plan = sched.schedule()

    assert plan.admitted == ("u0",), "the others would only hold pages with no tokens"


def test_admission_never_lets_a_later_request_overtake_one_that_does_not_fit():
    sched = scheduler(num_pages=4)
    sched.add(request("big", prompt_len=13))  # needs all 4 pages
    sched.add(request("small", prompt_len=2))  # would fit in 1
    held = sched.batch.pool.allocate(1)  # a page held elsewhere: big cannot fit yet
    assert sched.schedule().admitted == ()
    sched.batch.pool.free(held)
    assert sched.schedule().admitted == ("big",)


def test_a_newcomer_waits_for_the_page_its_first_decode_opens():
    """Admitting B into exactly its prompt's pages would make it the next iteration's victim
    (its ninth token opens a page the pool no longer has): its prefill would be wasted."""
    sched = scheduler(num_pages=4, policy="baton", chunk_budget=64)
    sched.add(request("A", prompt_len=6, max_tokens=8))
    run_plan(sched, sched.schedule())  # A: 7 tokens on 2 pages
    sched.add(request("B", prompt_len=8, max_tokens=4))  # 2 pages, then a third at once
    assert sched.schedule().admitted == ()
    plans = []
    while sched.has_work():
        plans.append(sched.schedule())
        run_plan(sched, plans[-1])
    assert not any(plan.preempted for plan in plans), "nobody's work was thrown away"
    assert sched.batch.pool.num_used == 0


def test_victim_is_lowest_priority_then_most_recently_admitted():
    sched = scheduler()
    for rid, prio in [("a", 0), ("b", 2), ("c", 2), ("d", 1)]:
        sched.add(request(rid, priority=prio))
    sched.schedule()
    assert sched.batch.victim_order()[0].request_id == "c"


@pytest.mark.parametrize("policy", ["baton", "orca", "static", "chunked"])
def test_decode_growth_preempts_by_recompute_when_pages_run_out(policy):
    sched = scheduler(num_pages=4, max_batch=2, policy=policy, chunk_budget=8)
    sched.add(request("first", prompt_len=4, max_tokens=8))
    sched.add(request("second", prompt_len=4, max_tokens=8))
    preempted = []
    while sched.has_work():
        plan = sched.schedule()
        preempted += plan.preempted
        run_plan(sched, plan)
    assert preempted and set(preempted) <= {"second"}
    assert sched.batch.pool.num_used == 0


@pytest.mark.parametrize("policy", ["baton", "orca", "static", "chunked"])
def test_a_one_token_prompt_is_prefilled(policy):
    """One pending token but nothing computed yet: a prompt, not a decode (chunked once left
    such a request in the batch forever)."""
    sched = scheduler(policy=policy, chunk_budget=8)
    sched.add(request("a", prompt_len=1, max_tokens=2))
    plan = sched.schedule()
    assert [(r.request_id, r.start, r.sample) for f in plan.forwards for r in f.rows] == [
        ("a", 0, True)
    ]


def test_prefix_caching_counts_the_pools_evictions():
    pool = PagePool(2)
    caching = PrefixCaching(pool, PAGE, salt=b"")
    (page,) = pool.allocate(1)
    pool.cache_page(page, page_hashes(range(PAGE), PAGE)[0])
    pool.free([page])
    pool.allocate(2)  # the cached page is the last one left to hand out
    assert caching.evictions == pool.prefix.evictions == 1


def test_priority_preemption_counts_only_pages_the_victims_free():
    """A victim's pages shared with a running request (a cached prefix) stay owned when it
    leaves: counting them as freed once preempted ``b`` for a newcomer that then did not fit,
    and the step failed with OutOfPagesError."""
    pool = PagePool(7)
    policy = make_policy("baton", 4096, 512)
    sched = Scheduler(pool, PAGE, 4, 32, policy, prefix_caching=PrefixCaching(pool, PAGE, b""))
    sched.add(prompt_request("a", range(1, 9), priority=0))
    run_plan(sched, sched.schedule())
    sched.add(prompt_request("b", range(1, 13), priority=5))  # shares a's two full pages
    for _ in range(2):
        run_plan(sched, sched.schedule())
    assert set(sched.batch.pages("a")) & set(sched.batch.pages("b"))
    sched.add(prompt_request("c", range(20, 40), priority=0))  # 5 pages; b's leaving frees 2
    plan = sched.schedule()
    assert plan.admitted == () and plan.preempted == ()
    run_plan(sched, plan)


def prompt_request(rid: str, tokens, priority: int) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=list(tokens),
        params=SamplingParams(temperature=0, max_tokens=8),
        max_tokens=8,
        eos_token_ids=(),
        priority=priority,
    )
