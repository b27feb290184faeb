"""An iteration that raises part-way: ``Engine.salvage_failed_step`` hands back what finished,
names what may be half-done, and once those are aborted both pools are empty again."""

from __future__ import annotations

import pytest

from baton_paged.sampling_params import SamplingParams

LONG = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


def swapped_out_low(make_engine):
    """An engine whose one slot holds "vip" while "low" waits swapped out to host memory."""
    engine = make_engine(max_batch_size=1, page_size=4)
    engine.add_request({"prompt_token_ids": [5] * 6}, LONG, request_id="low", priority=1)
    engine.step()
    engine.add_request({"prompt_token_ids": [7] * 3}, SHORT, request_id="vip", priority=0)
    engine.step()
    assert "low" in engine.scheduler.swapped
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

    def execute_failing_after_swap_in(forward):
        if "low" in engine.scheduler.running:
            raise RuntimeError("forward failed")
        return real_execute(forward)

    engine.runner.execute = execute_failing_after_swap_in
    with pytest.raises(RuntimeError, match="forward failed"):
        while engine.has_unfinished_requests():
            engine.step()

    _, suspect = engine.salvage_failed_step()
    for request_id in suspect:
        engine.abort_request(request_id)
    engine.scheduler.check_integrity()
    assert engine.cache.pool.num_used == 0 and engine.host.pool.num_used == 0
