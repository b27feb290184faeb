"""Every policy's greedy output equals plain ``model.generate`` on each prompt alone (float64),
with requests arriving at random iterations, finishing at different lengths, and, with a tiny
page pool, preempted and recomputed; afterwards every page is back in the pool."""

from __future__ import annotations

import random

import pytest
from equivalence import FORWARD_PATHS, check

POLICIES = ("baton", "orca", "static", "chunked")


@pytest.fixture(params=sorted(FORWARD_PATHS))
def forward_path(request) -> str:
    """Every test here runs on the fast forward path and on the general one."""
    return request.param


def random_workload(seed: int, count: int, vocab: int):
    rng = random.Random(seed)
    return [
        (
            tuple(rng.randrange(vocab) for _ in range(rng.randint(1, 40))),
            rng.randint(1, 24),
            rng.randint(0, 12),  # the iteration at which the request arrives
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_equals_generate(make_engine, reference, arch, policy):
    engine = make_engine(arch, policy=policy, max_batch_size=4, max_num_batched_tokens=24)
    check(engine, random_workload(seed=7, count=10, vocab=500), reference, arch)


@pytest.mark.parametrize("policy", POLICIES)
def test_recompute_preemption_keeps_outputs_exact(make_engine, reference, policy):
    """Five pages of 16 tokens for requests growing to 64 tokens: decoders run dry and the
    newest request is preempted, then re-prefilled from prompt + output."""
    engine = make_engine(
        "llama",
        policy=policy,
        max_batch_size=4,
        page_size=16,
        kv_memory="80KiB",
        max_num_batched_tokens=24,
        preemption_mode="recompute",
    )
    assert engine.cache.num_pages == 5
    rng = random.Random(3)
    workload = [
        (tuple(rng.randrange(500) for _ in range(20)), 40, arrival) for arrival in (0, 0, 1, 3)
    ]
    check(engine, workload, reference, "llama")
    assert engine.stats.recompute_preemptions > 0
