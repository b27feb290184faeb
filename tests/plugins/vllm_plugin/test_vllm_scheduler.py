"""BatonScheduler driven directly, without a model, on vLLM's own scheduler-test set-up.

The scheduler comes from ``make_scheduler`` (this folder's conftest.py) and is driven by
``scheduler_steps``: requests are added directly, and a fake ``ModelRunnerOutput`` samples one
token per finished prefill or decode. Every step's block arithmetic is exact, so these tests pin
down which request is preempted when, which a real engine only shows on average.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from scheduler_steps import add, fake_model_output, newly_scheduled, step  # noqa: E402
from vllm.v1.core.sched.interface import PauseState  # noqa: E402
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.request import RequestStatus  # noqa: E402

NO_SHEDDING = {"memory_high_watermark": 1.0, "memory_low_watermark": 0.5}
"""Usage never exceeds 1.0, so these settings isolate priority preemption."""


def running_ids(scheduler) -> set[str]:
    return {r.request_id for r in scheduler.running}


# -- priority preemption at admission ---------------------------------------------------------


def test_a_higher_priority_request_takes_the_blocks_of_the_latest_lower_one(make_scheduler):
    s = make_scheduler(usable_blocks=8, baton=NO_SHEDDING)
    add(s, "low-a", 40, priority=1, arrival=1.0)
    add(s, "low-b", 40, priority=1, arrival=2.0)
    step(s)  # 3 + 3 blocks taken, 2 free
    low_b = s.requests["low-b"]
    add(s, "high", 40, priority=0, arrival=3.0)  # needs 3 blocks

    out = step(s)

    assert out.preempted_req_ids == {"low-b"}
    assert "high" in newly_scheduled(out) and out.num_scheduled_tokens["high"] == 40
    assert running_ids(s) == {"low-a", "high"}
    assert low_b.status == RequestStatus.PREEMPTED and low_b.num_computed_tokens == 0
    assert s.baton_counters.priority_preemptions == 1


def test_equal_priority_never_preempts(make_scheduler):
    s = make_scheduler(usable_blocks=8, baton=NO_SHEDDING)
    add(s, "low-a", 40, priority=1, arrival=1.0)
    add(s, "low-b", 40, priority=1, arrival=2.0)
    step(s)
    add(s, "peer", 40, priority=1, arrival=3.0)

    out = step(s)

    assert not out.preempted_req_ids and "peer" not in out.num_scheduled_tokens
    assert running_ids(s) == {"low-a", "low-b"}
    assert s.baton_counters.priority_preemptions == 0


def test_only_as_many_victims_as_the_newcomer_needs(make_scheduler):
    s = make_scheduler(usable_blocks=10, baton=NO_SHEDDING)
    for i, name in enumerate(("low-a", "low-b", "low-c")):
        add(s, name, 40, priority=1, arrival=float(i))
    step(s)  # 9 blocks taken, 1 free
    add(s, "high", 70, priority=0, arrival=5.0)  # needs 5 blocks: two victims, not three

    out = step(s)

    assert out.preempted_req_ids == {"low-b", "low-c"}
    assert running_ids(s) == {"low-a", "high"}
    assert s.baton_counters.priority_preemptions == 2


def test_running_requests_growth_this_step_is_reserved_first(make_scheduler):
    """Free blocks the running batch is about to take do not count as room for the newcomer."""
    s = make_scheduler(usable_blocks=8, baton=NO_SHEDDING)
    add(s, "low-a", 32, priority=1, arrival=1.0)
    add(s, "low-b", 32, priority=1, arrival=2.0)
    step(s)  # 2 + 2 blocks, both full: each next decode opens a third block
    add(s, "high", 48, priority=0, arrival=3.0)  # 3 blocks; 4 free, but 2 of them are spoken for

    out = step(s)

    assert out.preempted_req_ids == {"low-b"}
    assert "high" in newly_scheduled(out)


def test_no_preemption_when_even_every_victim_would_not_make_room(make_scheduler):
    s = make_scheduler(usable_blocks=10, baton=NO_SHEDDING)
    add(s, "low-a", 40, priority=1, arrival=1.0)
    add(s, "low-b", 40, priority=1, arrival=2.0)
    step(s)
    add(s, "huge", 200, priority=0, arrival=3.0)  # 13 blocks: more than the pool holds

    out = step(s)

    assert not out.preempted_req_ids
    assert running_ids(s) == {"low-a", "low-b"}
    assert s.baton_counters.priority_preemptions == 0


@pytest.mark.parametrize(
    ("priorities", "victim"),
    [((2, 1, 2), "c"), ((2, 3, 2), "b"), ((3, 1, 2), "a")],
    ids=["latest-of-lowest", "lowest-in-the-middle", "lowest-is-oldest"],
)
def test_a_full_batch_gives_up_its_lowest_priority_latest_request(
    make_scheduler, priorities, victim
):
    s = make_scheduler(usable_blocks=20, max_num_seqs=3, baton=NO_SHEDDING)
    for i, (name, priority) in enumerate(zip("abc", priorities, strict=True)):
        add(s, name, 10, priority=priority, arrival=float(i))
    step(s)
    add(s, "vip", 10, priority=0, arrival=9.0)

    out = step(s)

    assert out.preempted_req_ids == {victim}
    assert "vip" in newly_scheduled(out)
    assert s.max_num_active_reqs == 3, "the per-step slot cap must be restored"


def test_fcfs_policy_never_preempts_for_admission_whatever_the_priorities(make_scheduler):
    """vLLM takes priorities under FCFS but requeues a preempted request at the head of the
    queue, so evicting for a newcomer would only recompute the victim, step after step."""
    s = make_scheduler(usable_blocks=20, max_num_seqs=2, baton=NO_SHEDDING, policy="fcfs")
    add(s, "a", 10, priority=1, arrival=1.0, max_tokens=6)
    add(s, "b", 10, priority=1, arrival=2.0, max_tokens=6)
    step(s)
    add(s, "vip", 10, priority=0, arrival=3.0, max_tokens=4)

    preempted = [step(s).preempted_req_ids for _ in range(4)]

    assert not any(preempted) and s.baton_counters.priority_preemptions == 0
    assert running_ids(s) == {"a", "b"}


def test_no_victim_when_the_staying_requests_use_up_the_token_budget(make_scheduler):
    """vLLM admits only while token budget is left after the running requests: preempting
    for a newcomer that gets no budget anyway would throw the victim's work away."""
    s = make_scheduler(usable_blocks=40, max_num_seqs=2, baton=NO_SHEDDING, token_budget=64)
    add(s, "low", 8, priority=2, arrival=1.0, max_tokens=40)
    step(s)
    add(s, "long", 250, priority=0, arrival=2.0, max_tokens=4)
    step(s)  # "long" is admitted and its prefill chunked: it takes the whole budget
    add(s, "vip", 8, priority=1, arrival=3.0, max_tokens=4)

    out = step(s)

    assert not out.preempted_req_ids and "vip" not in newly_scheduled(out)
    assert s.baton_counters.priority_preemptions == 0


def test_a_newcomer_that_would_get_budget_still_preempts_under_chunked_prefill(make_scheduler):
    s = make_scheduler(usable_blocks=40, max_num_seqs=2, baton=NO_SHEDDING, token_budget=64)
    add(s, "low-a", 8, priority=2, arrival=1.0, max_tokens=40)
    add(s, "low-b", 8, priority=2, arrival=2.0, max_tokens=40)
    step(s)
    add(s, "vip", 100, priority=0, arrival=3.0, max_tokens=4)

    out = step(s)

    assert out.preempted_req_ids == {"low-b"}
    assert out.num_scheduled_tokens["vip"] == 63, "the budget left after low-a's decode"


def drive_with_one_step_in_flight(scheduler, arrivals, max_steps=80):
    """Drive as vLLM's engine core does under async scheduling: step N+1 is scheduled before
    step N's output comes back. ``arrivals`` maps a step number to a callable adding requests.
    Returns the number of tokens each request received."""
    received: dict[str, int] = {}
    in_flight = None
    for number in range(max_steps):
        if number in arrivals:
            arrivals[number]()
        out = scheduler.schedule()
        model_output = fake_model_output(scheduler, out)
        if in_flight is not None:
            for outputs in scheduler.update_from_output(*in_flight).values():
                for o in outputs.outputs:
                    received[o.request_id] = received.get(o.request_id, 0) + len(o.new_token_ids)
        in_flight = (out, model_output)
        if not scheduler.get_num_unfinished_requests() and not out.num_scheduled_tokens:
            break
    return received


def test_preempting_a_request_whose_step_is_in_flight_keeps_its_tokens_right(make_scheduler):
    """The GPU path: async scheduling, so the victim's last step has not come back yet."""
    s = make_scheduler(usable_blocks=20, max_num_seqs=2, baton=NO_SHEDDING)
    add(s, "low-a", 20, priority=1, arrival=1.0, max_tokens=12)
    add(s, "low-b", 20, priority=1, arrival=2.0, max_tokens=12)
    late = {4: lambda: add(s, "vip", 20, priority=0, arrival=3.0, max_tokens=5)}

    received = drive_with_one_step_in_flight(s, late)

    assert s.baton_counters.priority_preemptions == 1
    assert received == {"low-a": 12, "low-b": 12, "vip": 5}
    assert not s.requests and s.kv_cache_manager.usage == 0.0


# -- memory-pressure shedding and hold ----------------------------------------------------------

PRESSURE = {"memory_high_watermark": 0.8, "memory_low_watermark": 0.5}


def fill_eight_blocks(s, priorities=(1,) * 8):
    """Eight one-block requests (8-token prompts, 8 new tokens) fill a pool of eight blocks."""
    for i, priority in enumerate(priorities):
        add(s, f"r{i}", 8, priority=priority, arrival=float(i), max_tokens=8)
    out = step(s)
    assert len(out.num_scheduled_tokens) == 8 and s.kv_cache_manager.usage == 1.0


def test_above_the_high_watermark_one_request_is_shed_per_step(make_scheduler):
    s = make_scheduler(usable_blocks=8, baton=PRESSURE)
    fill_eight_blocks(s)

    first, second, third = step(s), step(s), step(s)

    assert first.preempted_req_ids == {"r7"}  # usage 1.0: lowest priority, latest arrival
    assert second.preempted_req_ids == {"r6"}  # usage 7/8 is still above 0.8
    assert not third.preempted_req_ids  # 6/8 is not
    assert s.baton_counters.pressure_sheds == 2
    assert s.baton_gate.holding, "0.75 is above the low watermark: the hold goes on"
    assert "r6" not in third.num_scheduled_tokens and "r7" not in third.num_scheduled_tokens


def test_the_hold_ends_below_the_low_watermark_and_every_request_finishes(make_scheduler):
    s = make_scheduler(usable_blocks=8, baton=PRESSURE)
    fill_eight_blocks(s)
    resumed_at = None
    for number in range(2, 40):
        out = step(s)
        if resumed_at is None and "r7" in out.num_scheduled_tokens:
            resumed_at = number
            assert not s.baton_gate.holding and s.baton_gate.low_crossings == 1
        if not s.get_num_unfinished_requests():
            break

    assert resumed_at is not None and s.baton_counters.held_steps >= 5
    assert s.baton_gate.high_crossings == 1 and s.baton_counters.pressure_sheds == 2
    assert not s.requests, "every request finished and freed its blocks"
    assert s.kv_cache_manager.usage == 0.0


def test_a_held_batch_lets_a_higher_priority_request_replace_a_lower_one(make_scheduler):
    s = make_scheduler(usable_blocks=8, baton=PRESSURE)
    fill_eight_blocks(s)
    step(s), step(s), step(s)  # r7 and r6 shed, six running, holding
    add(s, "vip", 8, priority=0, arrival=20.0, max_tokens=4)

    out = step(s)

    assert out.preempted_req_ids == {"r5"}
    assert "vip" in newly_scheduled(out)
    assert len(s.running) == 6, "the batch keeps its size while holding"
    assert s.baton_counters.priority_preemptions == 1


def test_the_last_running_request_is_never_shed(make_scheduler):
    s = make_scheduler(usable_blocks=4, baton=PRESSURE)
    add(s, "only", 60, max_tokens=3)
    for _ in range(3):
        out = step(s)
        assert not out.preempted_req_ids
    assert s.baton_gate.high_crossings == 1 and s.baton_counters.pressure_sheds == 0


@pytest.mark.parametrize("pause", [PauseState.PAUSED_ALL, PauseState.PAUSED_NEW])
def test_a_paused_engine_is_left_alone(make_scheduler, pause):
    """Under PAUSED_NEW vLLM drains the running requests and admits none from the waiting
    queue: a request shed there would sit parked while the drain reports done."""
    s = make_scheduler(usable_blocks=8, baton=PRESSURE)
    fill_eight_blocks(s)
    s.set_pause_state(pause)
    assert not step(s).preempted_req_ids and s.baton_counters.pressure_sheds == 0
    s.set_pause_state(PauseState.UNPAUSED)
    assert step(s).preempted_req_ids == {"r7"}


def test_a_hold_admits_while_paused_streaming_sessions_keep_their_memory(make_scheduler):
    """Paused sessions take run slots in vLLM's admission count and keep their blocks, so usage
    stays high; the hold must still let an empty batch take a request."""
    s = make_scheduler(usable_blocks=10, baton=PRESSURE)
    add(s, "s1", 56, arrival=1.0, max_tokens=2, resumable=True)  # 4 blocks each
    add(s, "s2", 56, arrival=2.0, max_tokens=2, resumable=True)
    add(s, "r", 8, arrival=3.0, max_tokens=8)  # usage 0.9: r is shed, then runs alone
    for _ in range(12):
        step(s)
    assert s.baton_gate.holding and s.num_waiting_for_streaming_input == 2
    assert not s.running and "r" not in s.requests, "r finished"

    add(s, "s1", 4, arrival=10.0, max_tokens=2, resumable=True)  # s1's next chunk
    scheduled = [step(s).num_scheduled_tokens.get("s1", 0) for _ in range(3)]

    assert scheduled[0] == 4, "the empty batch admits the chunk despite the hold"
    assert s.baton_gate.holding


@pytest.mark.parametrize(("policy", "shed"), [("fcfs", "r7"), ("priority", "r6")])
def test_shedding_follows_the_engines_victim_order(make_scheduler, policy, shed):
    """The latest request goes first, after the lowest priority under the priority policy only:
    under FCFS vLLM ignores priorities, so r7's higher priority does not save it there."""
    s = make_scheduler(usable_blocks=8, baton=PRESSURE, policy=policy)
    fill_eight_blocks(s, priorities=(1,) * 7 + (0,))

    assert step(s).preempted_req_ids == {shed}


# -- settings ----------------------------------------------------------------------------------


def test_defaults_apply_without_additional_config(make_scheduler):
    settings = make_scheduler(usable_blocks=4).baton_gate.settings
    assert (settings.memory_high_watermark, settings.memory_low_watermark) == (0.9, 0.7)


@pytest.mark.parametrize(
    ("baton", "message"),
    [
        ({"memory_high_watermark": 0.6, "memory_low_watermark": 0.7}, "0 < low < high <= 1"),
        ({"memory_high_watermark": 1.5}, "0 < low < high <= 1"),
        ({"memory_low_watermark": 0}, "0 < low < high <= 1"),
        ({"memory_high_watermark": "0.9"}, "0 < low < high <= 1"),
        ({"high_watermark": 0.9}, "unknown key"),
    ],
)
def test_bad_settings_fail_when_the_scheduler_is_built(make_scheduler, baton, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler(usable_blocks=4, baton=baton)


# -- the batching policy -------------------------------------------------------------------------


def prefill_and_decode(out: SchedulerOutput, before: dict[str, tuple[int, int]]) -> tuple[set, set]:
    """Which scheduled requests computed prompt tokens and which decoded, from each request's
    (computed tokens, prompt tokens) before the step."""
    prefill, decode = set(), set()
    for rid in out.num_scheduled_tokens:
        computed, prompt = before[rid]
        (prefill if computed < prompt else decode).add(rid)
    return prefill, decode


def drive_with_arrivals(scheduler, arrivals, steps: int = 200, budgets=None):
    """Step until idle, adding ``arrivals[step]`` as (id, prompt length) at each step, each for
    ``budgets[id]`` tokens (default 12); yield each step's output with every request's
    (computed, prompt) token counts from before it."""
    for number in range(steps):
        for rid, length in arrivals.get(number, []):
            add(scheduler, rid, length, max_tokens=(budgets or {}).get(rid, 12))
        if not scheduler.has_requests() and number > max(arrivals):
            return
        before = {
            rid: (r.num_computed_tokens, r.num_prompt_tokens)
            for rid, r in scheduler.requests.items()
        }
        out = step(scheduler)
        yield out, before
    raise AssertionError("the scheduler did not finish")


ARRIVALS = {0: [("a", 20), ("b", 40)], 3: [("c", 30)], 4: [("d", 50)], 9: [("e", 10)]}


def test_baton_never_mixes_a_prefill_with_decodes(make_scheduler):
    s = make_scheduler(usable_blocks=64, baton=NO_SHEDDING | {"policy": "baton"}, token_budget=32)
    kinds = []
    for out, before in drive_with_arrivals(s, ARRIVALS):
        prefill, decode = prefill_and_decode(out, before)
        assert not (prefill and decode), f"mixed step: prefill {prefill}, decode {decode}"
        kinds.append("p" if prefill else "d" if decode else "-")
    assert "p" in kinds and "d" in kinds and "pd" in "".join(kinds)


def test_vllm_policy_mixes_them(make_scheduler):
    s = make_scheduler(usable_blocks=64, baton=NO_SHEDDING, token_budget=32)
    mixed = [
        all(prefill_and_decode(out, before)) for out, before in drive_with_arrivals(s, ARRIVALS)
    ]
    assert any(mixed)


def test_static_admits_only_into_an_empty_batch(make_scheduler):
    s = make_scheduler(usable_blocks=64, baton=NO_SHEDDING | {"policy": "static"})
    for out, before in drive_with_arrivals(s, ARRIVALS):
        running_before = {rid for rid, (computed, _) in before.items() if computed > 0}
        if running_before:  # a batch was running: nobody joined it
            assert not newly_scheduled(out), newly_scheduled(out)


def test_an_unknown_policy_is_refused(make_scheduler):
    with pytest.raises(ValueError, match="unknown policy 'orca'"):
        make_scheduler(usable_blocks=4, baton={"policy": "orca"})


def test_slot_efficiency_counts_sampled_tokens_against_offered_slots(make_scheduler):
    """Budgets of 4 to 16 tokens: a static batch of two idles a slot while its longer request
    finishes; vLLM's own policy refills it."""
    budgets = {"a": 4, "b": 16, "c": 8, "d": 12, "e": 6}
    efficiency = {}
    for policy in ("vllm", "static"):
        s = make_scheduler(usable_blocks=64, max_num_seqs=2, baton=NO_SHEDDING | {"policy": policy})
        for _ in drive_with_arrivals(s, ARRIVALS, budgets=budgets):
            pass
        counters = s.baton_counters
        assert counters.sampled_tokens == sum(budgets.values())  # each token counted once
        assert counters.idle_slots == counters.offered_slots - counters.sampled_tokens >= 0
        efficiency[policy] = counters.slot_efficiency
    assert efficiency["static"] < efficiency["vllm"] <= 1.0


def test_baton_takes_no_empty_prefill_step_when_the_newcomer_cannot_fit(make_scheduler):
    """12 blocks of 16: a and b hold 4 each for their whole run, so c's 5-block prompt cannot
    fit until one finishes and vLLM would admit nothing. Holding the decoders out for that
    prefill would waste every other step; every step here has work it can schedule."""
    s = make_scheduler(usable_blocks=12, baton=NO_SHEDDING | {"policy": "baton"})
    arrivals = {0: [("a", 56), ("b", 56)], 2: [("c", 70)]}
    budgets = {"a": 6, "b": 8, "c": 4}
    kinds = []
    for out, before in drive_with_arrivals(s, arrivals, budgets=budgets):
        if before:  # requests were there to schedule
            prefill, decode = prefill_and_decode(out, before)
            kinds.append("p" if prefill else "d" if decode else "-")
    assert "-" not in kinds, "".join(kinds)
    assert "".join(kinds).startswith("pddddd"), "a and b decode while c cannot fit"


def test_baton_admits_behind_a_blocked_queue_head_when_nothing_runs(make_scheduler):
    """A paused streaming session keeps its blocks in vLLM's KV-holding queue, ahead of new
    requests; it cannot run until its next chunk comes. With nothing decoding, the baton policy
    must still let vLLM admit the request behind it (it once capped admission at the empty
    batch and stalled here; the same happened to a request loading offloaded K/V)."""
    s = make_scheduler(usable_blocks=16, baton=NO_SHEDDING | {"policy": "baton"})
    add(s, "session", 20, arrival=1.0, max_tokens=2, resumable=True)
    for _ in range(4):
        step(s)
    assert not s.running and s.num_waiting_for_streaming_input == 1
    add(s, "new", 8, arrival=2.0, max_tokens=3)
    scheduled = [set(step(s).num_scheduled_tokens) for _ in range(6)]
    assert scheduled[0] == {"new"} and "new" not in s.requests, scheduled
