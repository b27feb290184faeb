"""The whole engine on CUDA: each GPU attention path's greedy output equals HF ``generate`` on
the same device (float32), under every policy, with decode replayed from CUDA graphs where the
backend can be captured and eagerly otherwise. Skipped without a CUDA device."""

from __future__ import annotations

import random

import pytest
import torch
from equivalence import check
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton_paged.attention.base import AttentionRequirements
from baton_paged.attention.registry import backend_class
from baton_paged.config import EngineConfig
from baton_paged.engine import Engine

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_reference(tiny_model_dir):
    models = {}

    def generate(arch, prompt, max_tokens):
        if arch not in models:
            path = tiny_model_dir(arch)
            models[arch] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
        ids = torch.tensor([prompt], device="cuda")
        out = models[arch].generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                    attention_mask=torch.ones_like(ids))  # fmt: skip
        return tuple(out[0, len(prompt) :].tolist())

    return generate


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("policy", ["baton", "orca", "static", "chunked"])
@pytest.mark.parametrize("backend", ["triton", "flash_attn", "xformers", "padded", "torch"])
def test_greedy_on_cuda_equals_generate(
    tiny_model_dir, cuda_reference, backend, policy, enforce_eager
):
    req = AttentionRequirements(torch.device("cuda"), torch.float32, 16, 16, 4, 2)
    reason = backend_class(backend).unsupported_reason(req)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    path = tiny_model_dir("llama")
    if enforce_eager and not backend_class(backend).graph_safe:
        pytest.skip(f"{backend} always runs eagerly")
    options = {"page_size": 16, "policy": policy, "max_batch_size": 6, "kv_memory": "64MiB"}
    config = EngineConfig(model=str(path), device="cuda", attention_backend=backend,
                          enforce_eager=enforce_eager, **options)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path).cuda()
    engine = Engine(config, model, AutoTokenizer.from_pretrained(path))
    graphs = backend_class(backend).graph_safe and not enforce_eager
    assert (engine.runner.graphs is not None) == graphs, "a capture failed: see the warning"
    rng = random.Random(5)
    workload = [(tuple(rng.randrange(500) for _ in range(rng.randint(1, 40))),
                 rng.randint(1, 20), rng.randint(0, 8)) for _ in range(8)]  # fmt: skip
    check(engine, workload, cuda_reference, "llama")
