"""Code that already holds a transformers model switches to BATON batching in two lines:
``LLM(hf_model=model, tokenizer=tokenizer)`` generates what ``model.generate`` does, follows the
model's dtype and device, and refuses options that contradict the weights."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton_paged import LLM, SamplingParams
from baton_paged.entrypoints.async_engine import AsyncEngine

PROMPTS = ["def main():", "import os\n", "x"]


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    path = tiny_model_dir("llama")
    return load(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def hf_greedy(tiny_model_dir):
    """``model.generate`` greedy on a model of its own, never lent to an engine."""
    model = load(tiny_model_dir("llama"))

    def generate(tokenizer, prompt: str, max_tokens: int) -> list[int]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(
            ids, max_new_tokens=max_tokens, do_sample=False, attention_mask=torch.ones_like(ids)
        )
        return out[0, ids.shape[1] :].tolist()

    return generate


def test_llm_on_a_loaded_model_equals_hf_generate(loaded, hf_greedy):
    model, tokenizer = loaded
    model.train()  # as a fine-tuning script might leave it: the engine must switch dropout off
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(hf_model=model, tokenizer=tokenizer, max_batch_size=2) as llm:
        outputs = llm.generate(PROMPTS, params)
        assert llm.engine.config.dtype == "float64" and llm.engine.config.device == "cpu"
        assert not model.training
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert list(output.outputs[0].token_ids) == hf_greedy(tokenizer, prompt, 12)


def test_a_lent_model_answers_directly_again_once_the_engine_closes(loaded, hf_greedy):
    model, tokenizer = loaded
    ids = tokenizer("x", return_tensors="pt").input_ids
    llm = LLM(hf_model=model, tokenizer=tokenizer)
    with pytest.raises(RuntimeError, match="until the engine is closed"):
        model.generate(ids, max_new_tokens=2, do_sample=False)
    llm.close()
    mask = torch.ones_like(ids)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=mask)
    assert out[0, ids.shape[1] :].tolist() == hf_greedy(tokenizer, "x", 4)


def test_async_engine_on_a_loaded_model(loaded, hf_greedy):
    model, tokenizer = loaded
    engine = AsyncEngine.build(hf_model=model, tokenizer=tokenizer)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def run():
        return [out async for out in engine.generate("x", params)][-1]

    try:
        assert list(asyncio.run(run()).outputs[0].token_ids) == hf_greedy(tokenizer, "x", 6)
    finally:
        engine.close()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dtype": "float32"}, "weights are torch.float64 on cpu"),
        ({"device": "meta"}, "configured for dtype='float64' on device='meta'"),
        ({"model": "some/checkpoint"}, "either model"),
        ({"tokenizer": None}, "needs its tokenizer"),
        ({"policy": "fifo"}, "unknown policy"),
    ],
)
def test_contradicting_options_are_refused(loaded, options, message):
    model, tokenizer = loaded
    kwargs = {"tokenizer": tokenizer, **options}
    with pytest.raises(ValueError, match=message):
        LLM(hf_model=model, **kwargs)


def test_a_non_model_is_refused(loaded):
    with pytest.raises(ValueError, match="must be a transformers model"):
        LLM(hf_model="gpt2", tokenizer=loaded[1])


def test_a_failed_build_hands_the_model_back_untouched(loaded, hf_greedy):
    """The KV budget is checked after the model is switched to paged attention: a build that
    fails there must switch it back."""
    model, tokenizer = loaded
    with pytest.raises(ValueError):
        LLM(hf_model=model, tokenizer=tokenizer, kv_memory="1")
    ids = tokenizer("x", return_tensors="pt").input_ids
    out = model.generate(
        ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids)
    )
    assert out[0, ids.shape[1] :].tolist() == hf_greedy(tokenizer, "x", 4)
