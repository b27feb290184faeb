"""GGUF checkpoints: a tiny Llama written with the gguf package loads equal to its HF original."""

import shutil

import pytest
import torch
from gguf_writer import write_llama_gguf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton_paged import LLM, SamplingParams
from baton_paged.config import EngineConfig
from baton_paged.model.builder.smollm2 import save_gguf_as_checkpoint
from baton_paged.model.gguf_loading import gguf_file
from baton_paged.model.loading import load_model

PROMPT = "def main():\n    return 42"


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    return write_llama_gguf(tiny_model_dir("llama"), tmp_path_factory.mktemp("gguf") / "t.gguf")


def test_gguf_file_loads_equal_to_the_hf_checkpoint(tiny_gguf, tiny_model_dir):
    model, tokenizer = load_model(EngineConfig(model=str(tiny_gguf), dtype="float32"))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    ref_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    ids = ref_tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(tokenizer(PROMPT, return_tensors="pt").input_ids, ids)
    assert torch.equal(model(ids).logits, reference(ids).logits)
    assert tokenizer.chat_template == ref_tokenizer.chat_template
    assert tokenizer.eos_token == ref_tokenizer.eos_token
    assert not hasattr(model.config, "quantization_config")


def test_engine_on_a_gguf_gives_hf_generate_greedy_tokens(tiny_gguf, tiny_model_dir):
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    ids = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))(PROMPT).input_ids
    expected = reference.generate(
        torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False
    )[0, len(ids) :].tolist()
    with LLM(str(tiny_gguf), dtype="float32", max_model_len=128) as llm:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        output = llm.generate([{"prompt_token_ids": ids}], params)[0].outputs[0]
    assert list(output.token_ids) == expected


def test_a_directory_with_one_gguf_and_no_hf_weights_is_a_gguf(tiny_gguf, tmp_path):
    shutil.copy(tiny_gguf, tmp_path / "model.gguf")
    assert gguf_file(str(tmp_path)) == tmp_path / "model.gguf"
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert gguf_file(str(tmp_path)) is None  # an HF checkpoint that also carries a GGUF


def test_ambiguous_or_missing_gguf_is_a_clear_error(tiny_gguf, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(tiny_gguf, tmp_path / name)
    with pytest.raises(ValueError, match="holds 2 GGUF files"):
        gguf_file(str(tmp_path))
    with pytest.raises(ValueError, match="no GGUF file at"):
        gguf_file(str(tmp_path / "absent.gguf"))
    assert gguf_file("HuggingFaceTB/SmolLM2-135M-Instruct") is None


def test_an_architecture_transformers_cannot_dequantize_is_a_clear_error(tiny_model_dir, tmp_path):
    path = write_llama_gguf(tiny_model_dir("llama"), tmp_path / "x.gguf", architecture="rwkv6")
    with pytest.raises(ValueError, match="cannot load the GGUF checkpoint .*rwkv6"):
        load_model(EngineConfig(model=str(path)))


def test_gguf_converts_to_a_plain_safetensors_checkpoint(tiny_gguf, tiny_model_dir, tmp_path):
    save_gguf_as_checkpoint(tiny_gguf, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    original = load_file(tiny_model_dir("llama") / "model.safetensors")
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in saved)
    assert "quantization_config" not in (tmp_path / "config.json").read_text()
    assert (
        AutoTokenizer.from_pretrained(tmp_path)(PROMPT).input_ids
        == AutoTokenizer.from_pretrained(tiny_model_dir("llama"))(PROMPT).input_ids
    )
