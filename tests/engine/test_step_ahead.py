"""Step-ahead scheduling (``async_scheduling=True``): iteration N+1 is planned and launched before
N's tokens are read, its decode inputs taken from N's samples on the device. Greedy outputs still
equal HF ``generate`` token for token under every policy, both forward paths, preemption by swap
and by recompute and prefix caching; sampled outputs (seeds, penalties, logprobs, stop strings,
``n``) equal those of the same engine without it; requests that finish or are aborted while a
token is in flight lose nothing and leak nothing; a failed iteration is settled with the one in
flight."""

from __future__ import annotations

import random

import pytest
from equivalence import FORWARD_PATHS, check
from test_policy_equivalence import random_workload
from test_preemption import priority_workload
from test_prefix_caching import shared_prefix_workload

from baton_paged.sampling_params import SamplingParams

POLICIES = ("baton", "orca", "static", "chunked")
AHEAD = {"async_scheduling": True}


@pytest.fixture(params=sorted(FORWARD_PATHS))
def forward_path(request) -> str:
    return request.param


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_equals_generate(make_engine, reference, arch, policy):
    engine = make_engine(arch, policy=policy, max_batch_size=4, max_num_batched_tokens=24, **AHEAD)
    assert engine.step_ahead
    check(engine, random_workload(seed=7, count=10, vocab=500), reference, arch)


@pytest.mark.parametrize("policy", ["baton", "orca", "chunked"])
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_requests_resume_exactly(make_engine, reference, policy, mode):
    """Requests preempted while their token is in flight get it afterwards, in the queue."""
    engine = make_engine(policy=policy, preemption_mode=mode, max_batch_size=4, page_size=4,
                         kv_memory="1MiB", **AHEAD)  # fmt: skip
    check(engine, priority_workload(seed=5), reference, "llama")
    assert engine.stats.preemptions >= 3
    if mode == "swap":
        assert engine.stats.pages_swapped_in == engine.stats.pages_swapped_out > 0
        assert engine.host.pool.num_used == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_decoders_running_dry_preempt_and_recompute_exactly(make_engine, reference, policy):
    """Five pages of 16 tokens for requests growing to 64: pages for a token in flight are
    reserved before it is read."""
    engine = make_engine(policy=policy, max_batch_size=4, page_size=16, kv_memory="80KiB",
                         max_num_batched_tokens=24, preemption_mode="recompute",
                         **AHEAD)  # fmt: skip
    rng = random.Random(3)
    workload = [
        (tuple(rng.randrange(500) for _ in range(20)), 40, arrival) for arrival in (0, 0, 1, 3)
    ]
    check(engine, workload, reference, "llama")
    assert engine.stats.recompute_preemptions > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_shared_prefixes_equal_generate_and_hit(make_engine, reference, policy):
    engine = make_engine(policy=policy, page_size=16, max_batch_size=4,
                         max_num_batched_tokens=24, **AHEAD)  # fmt: skip
    check(engine, shared_prefix_workload(seed=1), reference, "llama")
    assert engine.scheduler.prefix_caching.stats.hits > 0


def sampled_outputs(engine, requests):
    """Every request's final output, as comparable values: ids, text, finish reason, logprobs."""
    for request_id, prompt, params in requests:
        engine.add_request({"prompt_token_ids": prompt}, params, request_id=request_id)
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
        engine.scheduler.check_integrity()
    assert engine.cache.pool.num_used == 0 and not engine.requests
    return {
        rid: [
            (c.token_ids, c.text, c.finish_reason, c.stop_reason, logprob_values(c.logprobs))
            for c in output.outputs
        ]
        for rid, output in done.items()
    }


def logprob_values(logprobs):
    """Each position's (token, rank, decoded text, log-probability to 1e-9): a batch of other
    rows may change the forward's last bits (float64 sums over different GEMM shapes)."""
    if logprobs is None:
        return None
    return [
        [(t, lp.rank, lp.decoded_token, round(lp.logprob, 9)) for t, lp in position.items()]
        for position in logprobs
    ]


def test_sampled_outputs_equal_those_without_it(make_engine):
    """Seeded sampling, penalties (which read the token just accepted), logprobs, min_tokens,
    stop strings and stop ids, several completions, and requests that queue for a slot."""
    rng = random.Random(11)
    kinds = [
        SamplingParams(temperature=0.9, top_p=0.8, seed=1, max_tokens=14),
        SamplingParams(temperature=1.0, top_k=20, seed=2, frequency_penalty=0.8, max_tokens=12),
        SamplingParams(temperature=0, presence_penalty=1.0, repetition_penalty=1.3, max_tokens=10),
        SamplingParams(temperature=0, logprobs=3, max_tokens=9, min_tokens=4),
        SamplingParams(temperature=0.7, seed=3, stop=["e", "a "], max_tokens=16),
        SamplingParams(temperature=0, stop_token_ids=[7, 11, 13], max_tokens=15),
        SamplingParams(temperature=0.8, seed=4, n=2, max_tokens=8),
    ]
    requests = [
        (f"r{i}", [rng.randrange(500) for _ in range(rng.randint(2, 12))], params)
        for i, params in enumerate(kinds * 2)
    ]
    plain = sampled_outputs(make_engine(max_batch_size=4), requests)
    ahead = sampled_outputs(make_engine(max_batch_size=4, **AHEAD), requests)
    assert ahead == plain


def test_unseeded_draws_equal_when_the_batch_is_the_same(make_engine):
    """Requests without a seed share the engine's generator: with every request admitted at
    once, the rows dropped for finished requests draw nothing, so the draws line up."""
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12)
    short = SamplingParams(temperature=1.0, max_tokens=3)
    requests = [(f"r{i}", [5 + i, 9, 2 * i], short if i % 3 == 0 else params) for i in range(6)]
    plain = sampled_outputs(make_engine(max_batch_size=8), requests)
    ahead = sampled_outputs(make_engine(max_batch_size=8, **AHEAD), requests)
    assert ahead == plain


def test_a_request_aborted_while_its_token_is_in_flight(make_engine, reference):
    engine = make_engine(max_batch_size=4, **AHEAD)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = {rid: [3 + i, 40, 7 * i + 1] for i, rid in enumerate("abc")}
    for rid, prompt in prompts.items():
        engine.add_request({"prompt_token_ids": prompt}, params, request_id=rid)
    engine.step()
    engine.step()
    assert engine.requests["b"].num_placeholders == 1  # its second token is not read yet
    aborted = engine.abort_request("b")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
        engine.scheduler.check_integrity()
    assert sorted(done) == ["a", "c"]
    for rid in done:
        assert done[rid].outputs[0].token_ids == reference("llama", tuple(prompts[rid]), 10)
    assert engine.cache.pool.num_used == 0 and not engine.requests


def test_a_request_finishing_in_flight_frees_its_slot_one_step_later(make_engine, reference):
    """The plan made while a request's last token is in flight gives it no row, and the next
    request joins once that token is read."""
    engine = make_engine(max_batch_size=1, **AHEAD)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request({"prompt_token_ids": [1, 2]}, params, request_id="first")
    engine.add_request({"prompt_token_ids": [3, 4]}, params, request_id="second")
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert engine.stats.iterations == 6  # 3 tokens each, one forward per step, none wasted
    for rid, prompt in (("first", (1, 2)), ("second", (3, 4))):
        assert done[rid].outputs[0].token_ids == reference("llama", prompt, 3)


def test_a_failure_with_a_step_in_flight_leaks_nothing(make_engine, reference):
    """The forward of N+1 raises while N's tokens are in flight: those are never read, so every
    request holding one, running or preempted into the queue, is named; after aborting them both
    pools are empty and the untouched waiting request still runs."""
    engine = make_engine(max_batch_size=2, page_size=4, **AHEAD)
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for rid in ("a", "b"):
        engine.add_request({"prompt_token_ids": [5, 6, 7]}, long, request_id=rid)
    engine.add_request({"prompt_token_ids": [9, 9]}, long, request_id="queued")
    engine.step()
    engine.step()
    real_execute = engine.runner.execute

    def execute_failing(forward, *args):
        raise RuntimeError("forward failed")

    engine.runner.execute = execute_failing
    with pytest.raises(RuntimeError, match="forward failed"):
        engine.step()
    engine.runner.execute = real_execute
    finished, suspect = engine.salvage_failed_step()
    assert finished == [] and sorted(suspect) == ["a", "b"]
    for rid in suspect:
        engine.abort_request(rid)
    engine.scheduler.check_integrity()
    assert engine.cache.pool.num_used == 0 and engine.host.pool.num_used == 0
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert done["queued"].outputs[0].token_ids == reference("llama", (9, 9), 30)
    assert engine.cache.pool.num_used == 0 and not engine.requests


def test_on_by_default_on_cuda_only(make_engine):
    from baton_paged.config import EngineConfig
    from baton_paged.engine import step_ahead_scheduling

    assert not make_engine().step_ahead
    assert step_ahead_scheduling(EngineConfig(device="cuda"))
    assert not step_ahead_scheduling(EngineConfig(device="cuda", async_scheduling=False))
    assert step_ahead_scheduling(EngineConfig(async_scheduling=True))
