"""Prefix caching through the whole engine: greedy outputs with shared prefixes equal HF
``generate`` (float64) and the same engine with caching off, under every policy and both forward
paths; requests share no, some or all full pages, end exactly on a page boundary, race for the
same prefix in one step, and are preempted (swap and recompute) or aborted halfway. Integrity,
the cache index included, is checked after every step; the pool is empty at the end but for
cached pages, and empty after a reset."""

from __future__ import annotations

import random

import pytest
from equivalence import FORWARD_PATHS, check, run

from baton_paged.sampling_params import SamplingParams

POLICIES = ("baton", "orca", "static", "chunked")
PAGE = 16


@pytest.fixture(params=sorted(FORWARD_PATHS))
def forward_path(request) -> str:
    return request.param


def shared_prefix_workload(seed: int, count: int = 12):
    """Prompts built from one 40-token system prefix (two full pages and a partial one): some
    take all of it, some a page-aligned part (32 tokens, exactly two pages), some none; a few
    are identical and arrive together (they race for the same pages)."""
    rng = random.Random(seed)
    system = [rng.randrange(500) for _ in range(40)]
    workload = []
    for i in range(count):
        kind = i % 4
        head = system if kind in (0, 1) else system[:32] if kind == 2 else []
        tail = (
            []
            if kind == 2 and i % 8 == 2
            else [rng.randrange(500) for _ in range(rng.randint(1, 20))]
        )
        workload.append((tuple(head + tail), rng.randint(1, 16), rng.randint(0, 6)))
    workload += [(tuple(system[:32]), 6, 3), (tuple(system[:32]), 6, 3)]  # identical, same step
    return workload


@pytest.mark.parametrize("policy", POLICIES)
def test_shared_prefixes_equal_generate_and_hit(make_engine, reference, policy):
    engine = make_engine("llama", policy=policy, page_size=PAGE, max_batch_size=4,
                         max_num_batched_tokens=24)  # fmt: skip
    check(engine, shared_prefix_workload(seed=1), reference, "llama")
    caching = engine.scheduler.prefix_caching
    assert caching.stats.hits > 0 and engine.cache.pool.num_cached > 0
    engine.cache.pool.reset_prefix_cache()
    assert (
        engine.cache.pool.num_cached == 0 and engine.cache.pool.num_free == engine.cache.num_pages
    )


def test_caching_on_equals_caching_off(make_engine):
    workload = shared_prefix_workload(seed=2)
    on = run(make_engine("llama", page_size=PAGE, max_batch_size=4), workload)
    off = run(make_engine("llama", page_size=PAGE, max_batch_size=4,
                          enable_prefix_caching=False), workload)  # fmt: skip
    assert on == off


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_with_shared_pages(make_engine, reference, mode):
    """Ten pages for requests of up to 60 tokens sharing a two-page prefix: decoders run dry and
    preempt each other; swapped requests copy their shared pages too and drop their share."""
    engine = make_engine("llama", page_size=PAGE, max_batch_size=4, kv_memory="160KiB",
                         preemption_mode=mode)  # fmt: skip
    assert engine.cache.num_pages == 10
    rng = random.Random(4)
    system = [rng.randrange(500) for _ in range(32)]
    workload = [(tuple(system + [rng.randrange(500) for _ in range(4)]), 24, arrival)
                for arrival in (0, 0, 1, 2, 4, 6)]  # fmt: skip
    check(engine, workload, reference, "llama")
    stats = engine.stats
    preempted = stats.swap_preemptions if mode == "swap" else stats.recompute_preemptions
    assert preempted > 0 and engine.scheduler.prefix_caching.stats.hits > 0


def test_abort_in_the_middle_keeps_the_cache_sound(make_engine, reference):
    engine = make_engine("llama", page_size=PAGE, max_batch_size=4)
    rng = random.Random(6)
    system = [rng.randrange(500) for _ in range(48)]
    params = SamplingParams(temperature=0, max_tokens=12)
    for i in range(4):
        engine.add_request(system + [i], params, request_id=str(i))
    engine.step()
    engine.abort_request("1")
    engine.add_request(system + [9], params, request_id="late")
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
        engine.scheduler.check_integrity()
    for request_id, prompt in (("0", system + [0]), ("late", system + [9])):
        expected = reference("llama", tuple(prompt), 12)
        assert done[request_id].outputs[0].token_ids == expected
    # "0" computed the prefix; "2", "3" and "late" waited an iteration and shared it ("1" was
    # aborted while waiting)
    assert engine.scheduler.prefix_caching.stats.hits == 48 * 3
    assert engine.cache.pool.num_used == 0


def test_prompt_logprobs_requests_compute_their_whole_prompt(make_engine):
    engine = make_engine("llama", page_size=PAGE)
    prompt = list(range(40))
    greedy = SamplingParams(temperature=0, max_tokens=2)
    for request_id, params in (
        ("a", greedy),
        ("b", SamplingParams(max_tokens=2, prompt_logprobs=0)),
    ):
        engine.add_request(prompt, params, request_id=request_id)
        outputs = []
        while engine.has_unfinished_requests():
            outputs += engine.step()
    assert engine.scheduler.prefix_caching.stats.hits == 0  # "b" looked nothing up
    assert len(outputs[-1].prompt_logprobs) == 40


def test_counters_and_reset(make_engine):
    engine = make_engine("llama", page_size=PAGE)
    prompt = list(range(50))
    params = SamplingParams(temperature=0, max_tokens=2)
    for request_id in ("a", "b"):
        engine.add_request(prompt, params, request_id=request_id)
        while engine.has_unfinished_requests():
            engine.step()
    stats = engine.snapshot.stats
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (100, 48)
    assert stats.prefix_cache_hit_rate == pytest.approx(0.48)
    assert engine.reset_prefix_cache() and engine.cache.pool.num_cached == 0
    engine.add_request(prompt, params, request_id="c")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.snapshot.stats.prefix_cache_hits == 48  # "c" started cold


def test_n_samples_share_their_prompt_pages(make_engine):
    """Child 0 computes the 40-token prompt; children 1 and 2 wait an iteration and take its two
    full pages."""
    engine = make_engine("llama", page_size=PAGE)
    engine.add_request(list(range(40)), SamplingParams(n=3, seed=0, max_tokens=4), "p")
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert len(outputs[0].outputs) == 3
    assert engine.scheduler.prefix_caching.stats.hits == 2 * 32
