"""Engine fixtures: a float64 engine on a tiny checkpoint, built per test (engines hold state).

Engines take the fast forward path (native Llama executor where it applies, ``cpu_paged``
attention) unless a module overrides ``forward_path``: the equivalence modules parametrize it
over ``FORWARD_PATHS`` so that every scheduling path is checked on both."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from equivalence import FORWARD_PATHS
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton_paged.config import EngineConfig
from baton_paged.engine import Engine

TEST_MEMORY = {"kv_memory": "64MiB", "swap_memory": "64MiB"}
"""Each test engine's KV and host swap pages unless a test sizes them: plenty for the tiny
models, where the defaults (1 GiB each, zeroed at start) cost every test half a second."""


@pytest.fixture
def onednn(monkeypatch):
    """float32 and bfloat16 linears packed for oneDNN, as on a CPU without AVX-512 or AMX (where
    our column-block or AMX kernel would take them, it pads nothing and builds no kernels)."""
    from baton_paged.model import packed_linear

    monkeypatch.setattr(packed_linear, "_blocked_kernel", lambda weight, bias: None)
    monkeypatch.setattr(packed_linear, "_pair_kernel", lambda weight, bias: None)


@pytest.fixture
def forward_path() -> str:
    return "fast"


@pytest.fixture
def make_engine(tiny_model_dir, forward_path):
    """``make_engine(arch="llama", memory_reader=None, **EngineConfig fields)``: a fresh engine
    (``memory_reader`` injects device-memory pressure), model loaded once."""
    loaded = {}

    def make(arch: str = "llama", memory_reader=None, **options) -> Engine:
        path = tiny_model_dir(arch)
        if arch not in loaded:
            loaded[arch] = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        options = FORWARD_PATHS[forward_path] | TEST_MEMORY | options
        config = EngineConfig(model=str(path), dtype="float64", **options)
        return Engine(config, model, loaded[arch], memory_reader=memory_reader)

    return make


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
