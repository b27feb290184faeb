"""``vllm_mirror``'s predictions against what vLLM's own scheduler then does.

Each case asks the mirror about a state of vLLM's plain async scheduler (no BATON in front of
it), lets vLLM schedule the step, and compares: a vLLM upgrade that changes the arithmetic the
mirror repeats fails here on the cases covered. ``test_vllm_upgrade`` fingerprints the mirrored
source, which catches the changes these cases do not reach.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from scheduler_steps import add, newly_scheduled, step  # noqa: E402
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402

from baton_paged.plugins import vllm_mirror as mirror  # noqa: E402


@pytest.fixture
def make_plain(make_scheduler):
    """vLLM's own async scheduler, the class ``BatonScheduler`` extends, on the same set-up."""

    def make(usable_blocks, **options):
        return make_scheduler(usable_blocks, cls=AsyncScheduler, **options)

    return make


def held_blocks(scheduler, request_id: str) -> int:
    return sum(len(group) for group in scheduler.kv_cache_manager.get_blocks(request_id).blocks)


def free_blocks(scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def start(scheduler, prompts: list[int]) -> None:
    """Add one request per prompt length (``r0``, ``r1``...) and run their first step."""
    for i, prompt_len in enumerate(prompts):
        add(scheduler, f"r{i}", prompt_len, arrival=float(i))
    step(scheduler)


GROWTH_CASES = {
    "decodes, some opening a block": ([16, 20, 32, 47], {}),
    "a prefill chunk beside a decode": ([150, 100], {"token_budget": 160}),
    "prefill chunks cut by the long-prefill threshold": (
        [100, 90],
        {"token_budget": 256, "long_prefill_token_threshold": 24},
    ),
}


@pytest.mark.parametrize("in_flight", [False, True], ids=["step-done", "step-in-flight"])
@pytest.mark.parametrize(("prompts", "options"), GROWTH_CASES.values(), ids=GROWTH_CASES.keys())
def test_need_to_grow_is_what_vllm_schedules_and_allocates(make_plain, prompts, options, in_flight):
    """In flight: async scheduling, the last step's output not back yet (output placeholders)."""
    s = make_plain(64, **options)
    start(s, prompts)
    if in_flight:
        s.schedule()
    predicted = {r.request_id: mirror.need_to_grow(s, r) for r in s.running}
    before = {rid: held_blocks(s, rid) for rid in predicted}

    out = s.schedule()

    done = {
        rid: mirror.Need(out.num_scheduled_tokens.get(rid, 0), held_blocks(s, rid) - before[rid])
        for rid in predicted
    }
    assert done == predicted


ADMISSION_CASES = {
    # name: (usable blocks, running prompts, newcomer's prompt, options, admitted)
    "blocks to spare": (8, [40, 40], 20, {}, True),
    "one block short": (8, [40, 40], 40, {}, False),
    "the running requests' growth leaves just enough": (8, [32, 32], 32, {}, True),
    "the running requests' growth leaves one block short": (8, [32, 32], 33, {}, False),
    "the watermark leaves just enough": (9, [40], 64, {"watermark": 0.2}, True),
    "the watermark leaves one block short": (9, [40], 65, {"watermark": 0.2}, False),
    "no watermark with nothing running": (5, [], 80, {"watermark": 0.2}, True),
    "a slot left": (32, [16, 16], 16, {"max_num_seqs": 3}, True),
    "no slot left": (32, [16, 16], 16, {"max_num_seqs": 2}, False),
    "budget left beside a prefill chunk": (32, [100], 16, {"token_budget": 64}, True),
    "a prefill chunk takes the whole budget": (32, [200], 16, {"token_budget": 64}, False),
}


@pytest.mark.parametrize(
    ("usable_blocks", "running", "newcomer", "options", "admitted"),
    ADMISSION_CASES.values(),
    ids=ADMISSION_CASES.keys(),
)
def test_fits_predicts_whether_vllm_admits_the_next_request(
    make_plain, usable_blocks, running, newcomer, options, admitted
):
    s = make_plain(usable_blocks, **options)
    start(s, running)
    add(s, "new", newcomer, arrival=10.0)
    candidate = mirror.next_admission(s)
    need, _ = mirror.need_to_admit(s, candidate)
    predicted = mirror.fits(s, need, mirror.room_after(s, s.running), s.max_num_active_reqs)

    out = s.schedule()

    assert candidate.request_id == "new"
    assert predicted == ("new" in newly_scheduled(out)) == admitted


@pytest.mark.parametrize(
    ("policy", "first"), [("priority", "urgent"), ("fcfs", "early")], ids=["priority", "fcfs"]
)
def test_next_admission_is_the_request_vllm_admits_first(make_plain, policy, first):
    s = make_plain(32, max_num_seqs=1, policy=policy)
    add(s, "early", 16, priority=1, arrival=1.0)
    add(s, "urgent", 16, priority=0, arrival=2.0)

    assert mirror.next_admission(s).request_id == first
    assert newly_scheduled(s.schedule()) == {first}


def test_next_admission_skips_a_blocked_request_as_vllm_does(make_plain):
    """A paused streaming session keeps its blocks in vLLM's KV-holding queue, drained first,
    but cannot run until its next chunk comes: vLLM skips it, and so does the mirror."""
    s = make_plain(16)
    add(s, "session", 20, arrival=1.0, max_tokens=2, resumable=True)
    for _ in range(4):
        step(s)
    assert [r.request_id for r in s.kv_holding_waiting] == ["session"]
    add(s, "new", 8, arrival=2.0)

    assert mirror.ready_kv_holders(s) == []
    assert mirror.next_admission(s).request_id == "new"
    assert newly_scheduled(s.schedule()) == {"new"}


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["private", "shared-prefix"])
def test_blocks_freed_by_is_what_preempting_returns_to_the_pool(make_plain, prefix_caching):
    """With prefix caching, ``a`` and ``b`` share their prompt's three full blocks: preempting
    ``b`` frees only its own last block, then preempting ``a`` frees the shared ones too."""
    s = make_plain(16, prefix_caching=prefix_caching)
    add(s, "a", 50, arrival=1.0)
    step(s)
    add(s, "b", 50, arrival=2.0)
    step(s)
    for victim in (s.requests["b"], s.requests["a"]):
        predicted = mirror.blocks_freed_by(s, victim, keep=set())
        before = free_blocks(s)
        mirror.preempt(s, victim, timestamp=3.0)
        assert free_blocks(s) - before == predicted
        assert predicted == (1 if prefix_caching and victim.request_id == "b" else 4)


def test_the_newcomers_own_hits_are_not_counted_as_freed(make_plain):
    """Preempting ``a`` for ``c``, which hits ``a``'s cached prompt blocks: those blocks stay
    (``c`` adopts them), so the pool ``c`` finds is the one the mirror counted on."""
    s = make_plain(16, prefix_caching=True)
    add(s, "a", 50, arrival=1.0)
    step(s)
    add(s, "c", 50, arrival=2.0)
    need, hits = mirror.need_to_admit(s, s.requests["c"])
    predicted_room = free_blocks(s) + mirror.blocks_freed_by(s, s.requests["a"], hits) - need.blocks
    assert len(hits) == 3

    mirror.preempt(s, s.requests["a"], timestamp=3.0)

    need_now, _ = mirror.need_to_admit(s, s.requests["c"])
    assert free_blocks(s) - need_now.blocks == predicted_room
