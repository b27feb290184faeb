"""The OpenAI server with its engine on CUDA in bfloat16: answers, streamed or not, equal the
offline engine's on the same device (same kernels, one request at a time: deterministic)."""

from __future__ import annotations

import openai
import pytest
import torch
from serving import KEY, MAX_MODEL_LEN, MODEL, offline, serving
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton_paged.config import EngineConfig
from baton_paged.engine import Engine

pytestmark = pytest.mark.gpu


def cuda_engine(path) -> Engine:
    config = EngineConfig(model=str(path), device="cuda", dtype="bfloat16", max_batch_size=8,
                          max_model_len=MAX_MODEL_LEN)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    return Engine(config, model, AutoTokenizer.from_pretrained(path))


def test_served_completions_on_cuda_equal_the_offline_engine(tiny_model_dir):
    with serving(tiny_model_dir("llama"), cuda_engine) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        expected = offline(server, "The paged cache", 24).text
        answer = client.completions.create(model=MODEL, prompt="The paged cache", max_tokens=24,
                                           temperature=0)  # fmt: skip
        assert answer.choices[0].text == expected and answer.usage.completion_tokens == 24
        stream = client.completions.create(model=MODEL, prompt="The paged cache", max_tokens=24,
                                           temperature=0, stream=True)  # fmt: skip
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert chat.choices[0].finish_reason in ("length", "stop")
        assert server.engine.engine.config.device == "cuda"
