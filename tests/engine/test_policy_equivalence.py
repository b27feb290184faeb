"""Every policy's greedy output equals plain ``model.generate`` on each prompt alone (float64),
with requests arriving at random iterations, finishing at different lengths, and, with a tiny
page pool, preempted and recomputed; afterwards every page is back in the pool."""

from __future__ import annotations

import random
from functools import cache

import pytest
import torch
from transformers import AutoModelForCausalLM

from baton_paged.engine import Engine
from baton_paged.sampling_params import SamplingParams

POLICIES = ("baton", "orca", "static", "chunked")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """``reference(arch, prompt, max_tokens)``: HF greedy tokens, memoised across tests."""

    @cache
    def generate(arch: str, prompt: tuple[int, ...], max_tokens: int) -> tuple[int, ...]:
        model = load(arch)
        ids = torch.tensor([prompt])
        out = model.generate(
            ids, max_new_tokens=max_tokens, do_sample=False, attention_mask=torch.ones_like(ids)
        )
        return tuple(out[0, len(prompt) :].tolist())

    @cache
    def load(arch: str):
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float64)

    return generate


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


def run(engine: Engine, workload) -> dict[str, tuple[int, ...]]:
    """Add each request at its arrival iteration; step until all finish; check pages each step."""
    done: dict[str, tuple[int, ...]] = {}
    step = 0
    while len(done) < len(workload):
        for i, (prompt, max_tokens, arrival) in enumerate(workload):
            if arrival == step:
                params = SamplingParams(temperature=0, max_tokens=max_tokens)
                engine.add_request({"prompt_token_ids": list(prompt)}, params, request_id=str(i))
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.outputs[0].token_ids
        engine.scheduler.check_integrity()
        step += 1
        assert step < 2000, "the engine stopped making progress"
    return done


def check(engine, workload, reference, arch):
    done = run(engine, workload)
    for i, (prompt, max_tokens, _) in enumerate(workload):
        assert done[str(i)] == reference(arch, prompt, max_tokens), f"request {i}"
    assert engine.cache.pool.num_used == 0 and not engine.scheduler.has_work()
    assert not engine.requests


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
    )
    assert engine.cache.num_pages == 5
    rng = random.Random(3)
    workload = [
        (tuple(rng.randrange(500) for _ in range(20)), 40, arrival) for arrival in (0, 0, 1, 3)
    ]
    check(engine, workload, reference, "llama")
    assert engine.stats.preemptions > 0
