"""Engine fixtures: a float64 engine on a tiny checkpoint, built per test (engines hold state)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton_paged.config import EngineConfig
from baton_paged.engine import Engine


@pytest.fixture
def make_engine(tiny_model_dir):
    """``make_engine(arch="llama", **EngineConfig fields)``: a fresh engine, model loaded once."""
    loaded = {}

    def make(arch: str = "llama", **options) -> Engine:
        path = tiny_model_dir(arch)
        if arch not in loaded:
            loaded[arch] = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        config = EngineConfig(model=str(path), dtype="float64", **options)
        return Engine(config, model, loaded[arch])

    return make
