"""Preempted requests, swapped to host memory or recomputed, produce exactly the greedy tokens of
plain ``model.generate`` (float64), and a high-priority arrival starts at once."""

from __future__ import annotations

import random

import pytest
from equivalence import FORWARD_PATHS, check

from baton_paged.sampling_params import SamplingParams


@pytest.fixture(params=sorted(FORWARD_PATHS))
def forward_path(request) -> str:
    """Every test here runs on the fast forward path and on the general one."""
    return request.param


def priority_workload(seed: int):
    """Long low-priority requests fill the batch; high-priority ones arrive while they decode."""
    rng = random.Random(seed)
    prompt = lambda: tuple(rng.randrange(500) for _ in range(rng.randint(5, 30)))  # noqa: E731
    low = [(prompt(), rng.randint(20, 40), 0, 2) for _ in range(4)]
    high = [(prompt(), rng.randint(3, 10), arrival, 0) for arrival in (3, 4, 9)]
    return low + high


@pytest.mark.parametrize("policy", ["baton", "orca", "chunked"])
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_requests_resume_exactly(make_engine, reference, policy, mode):
    engine = make_engine(
        policy=policy, preemption_mode=mode, max_batch_size=4, page_size=4, kv_memory="1MiB"
    )
    check(engine, priority_workload(seed=5), reference, "llama")
    stats = engine.stats
    assert stats.preemptions >= 3
    if mode == "swap":
        assert stats.swap_preemptions == stats.preemptions and stats.pages_swapped_in > 0
        assert stats.pages_swapped_in == stats.pages_swapped_out
    else:
        assert stats.swap_preemptions == 0 and engine.host is None
    if engine.host is not None:
        assert engine.host.pool.num_used == 0


def test_swap_falls_back_to_recompute_when_the_host_pool_is_full(make_engine, reference):
    engine = make_engine(max_batch_size=4, page_size=4, kv_memory="1MiB", swap_memory="16KiB")
    assert engine.host.num_pages < 8  # too small to hold every victim
    check(engine, priority_workload(seed=5), reference, "llama")
    assert 0 < engine.stats.swap_preemptions < engine.stats.preemptions


def test_high_priority_arrival_into_a_full_batch_starts_within_one_iteration(make_engine):
    engine = make_engine(max_batch_size=2)
    long = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    for rid in ("a", "b"):
        engine.add_request("def main():", long, request_id=rid, priority=1)
    engine.step()
    engine.add_request("import os", SamplingParams(max_tokens=5), request_id="vip", priority=0)
    outputs = {out.request_id: out for out in engine.step()}
    assert len(outputs["vip"].outputs[0].token_ids) == 1
    assert "b" not in outputs and engine.stats.preemptions == 1
