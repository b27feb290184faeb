"""An iteration that raises part-way: ``Engine.salvage_failed_step`` hands back what finished,
names what may be half-done, and once those are aborted both pools are empty again."""

from __future__ import annotations

import pytest

from baton_paged.sampling_params import SamplingParams

LONG = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


def swapped_out_low(make_engine, vip_params=SHORT):
    """An engine whose one slot holds "vip" while "low" waits swapped out to host memory."""
    engine = make_engine(max_batch_size=1, page_size=4)
    engine.add_request({"prompt_token_ids": [5] * 6}, LONG, request_id="low", priority=1)
    engine.step()
    engine.add_request({"prompt_token_ids": [7] * 3}, vip_params, request_id="vip", priority=0)
    engine.step()
    assert "low" in engine.scheduler.batch.swapped
    return engine


def test_a_failed_swap_in_leaks_no_host_pages(make_engine):
    engine = swapped_out_low(make_engine)
    real_swap = engine.runner.swap

    def swap_failing_on_swap_in(plan):
        if plan.swap_in:
            raise RuntimeError("copy failed")
        real_swap(plan)

    engine.runner.swap = swap_failing_on_swap_in
    with pytest.raises(RuntimeError, match="copy failed"):
        while engine.has_unfinished_requests():
            engine.step()

    finished, suspect = engine.salvage_failed_step()
    assert suspect == ["low"]  # joined the batch, its K/V never copied back
    for request_id in suspect:
        engine.abort_request(request_id)
    engine.scheduler.check_integrity()
    assert not engine.requests and engine.cache.pool.num_used == 0
    assert engine.host.pool.num_used == 0


def test_a_failure_after_the_swaps_were_issued_frees_each_host_page_once(make_engine):
    engine = swapped_out_low(make_engine)
    real_execute = engine.runner.execute

    def execute_failing_after_swap_in(forward, *extra):
        if "low" in engine.scheduler.batch:
            raise RuntimeError("forward failed")
        return real_execute(forward, *extra)

    engine.runner.execute = execute_failing_after_swap_in
    with pytest.raises(RuntimeError, match="forward failed"):
        while engine.has_unfinished_requests():
            engine.step()

    _, suspect = engine.salvage_failed_step()
    for request_id in suspect:
        engine.abort_request(request_id)
    engine.scheduler.check_integrity()
    assert engine.cache.pool.num_used == 0 and engine.host.pool.num_used == 0


def test_a_request_swapped_out_in_an_earlier_step_survives_a_failure(make_engine):
    engine = swapped_out_low(make_engine, vip_params=LONG)
    engine.step()  # "low" has sat in host memory for a whole successful iteration since

    def execute_failing(forward, *extra):
        raise RuntimeError("vip's decode failed")

    engine.runner.execute = execute_failing
    with pytest.raises(RuntimeError):
        engine.step()

    _, suspect = engine.salvage_failed_step()
    assert suspect == ["vip"], "low's K/V was copied out steps ago: it stays queued"
    engine.scheduler.check_integrity()


def test_a_request_whose_swap_out_copy_failed_is_aborted(make_engine):
    engine = make_engine(max_batch_size=1, page_size=4)
    engine.add_request({"prompt_token_ids": [5] * 6}, LONG, request_id="low", priority=1)
    engine.step()
    engine.add_request({"prompt_token_ids": [7] * 3}, SHORT, request_id="vip", priority=0)

    def swap_failing(plan):
        raise RuntimeError("copy failed")

    engine.runner.swap = swap_failing
    with pytest.raises(RuntimeError, match="copy failed"):
        engine.step()

    _, suspect = engine.salvage_failed_step()
    assert sorted(suspect) == ["low", "vip"]  # low's host copy never happened
    for request_id in suspect:
        engine.abort_request(request_id)
    engine.scheduler.check_integrity()
    assert engine.cache.pool.num_used == 0 and engine.host.pool.num_used == 0


def test_a_failure_while_building_outputs_still_hands_back_finished_ones(make_engine):
    engine = make_engine()
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    engine.add_request("x", one, request_id="a")
    engine.add_request("y", LONG, request_id="b")
    real_snapshot = engine.outputs.snapshot

    def snapshot_failing_for_b(request):
        if request.request_id == "b":
            raise RuntimeError("detokenizer bug")
        return real_snapshot(request)

    engine.outputs.snapshot = snapshot_failing_for_b
    with pytest.raises(RuntimeError, match="detokenizer bug"):
        engine.step()  # "a" finished in this step, its output taken before "b" failed
    engine.outputs.snapshot = real_snapshot

    finished, suspect = engine.salvage_failed_step()
    assert [o.request_id for o in finished] == ["a"] and finished[0].finished
    assert suspect == ["b"]


def test_a_failure_inside_planning_after_a_swap_in_leaks_no_host_pages(make_engine):
    """Planning raises after it swapped "low" back in: only "low" is half-done (running, its
    copy never issued); its host pages go back, and the request waiting behind stays queued."""
    engine = swapped_out_low(make_engine)
    engine.step()  # vip finishes; low is next, from host memory
    engine.add_request({"prompt_token_ids": [3] * 5}, SHORT, request_id="later", priority=2)

    def form_failing(step):
        assert [r.request_id for r in step.admit()] == ["low"]
        raise RuntimeError("policy bug")

    engine.scheduler.policy.form = form_failing
    with pytest.raises(RuntimeError, match="policy bug"):
        engine.step()

    finished, suspect = engine.salvage_failed_step()
    assert finished == [] and suspect == ["low"]
    engine.abort_request("low")
    engine.scheduler.check_integrity()
    assert engine.host.pool.num_used == 0 and engine.cache.pool.num_used == 0
    assert engine.snapshot.num_waiting == 1  # "later", untouched


def test_a_failure_before_planning_changed_anything_names_only_the_running(make_engine):
    calls = []

    def reader():  # the device-memory reading fails on the third iteration
        calls.append(None)
        if len(calls) == 3:
            raise RuntimeError("NVML read failed")
        return 0.0

    engine = make_engine(max_batch_size=1, memory_reader=reader)
    engine.add_request("def main():", LONG, request_id="a")
    engine.add_request("import os", LONG, request_id="b")
    engine.step()
    engine.step()
    with pytest.raises(RuntimeError, match="NVML read failed"):
        engine.step()

    _, suspect = engine.salvage_failed_step()
    assert suspect == ["a"], "b waits untouched"
    engine.abort_request("a")
    engine.scheduler.check_integrity()
