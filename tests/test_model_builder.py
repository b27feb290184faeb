"""The model builder: deterministic random-weight HF checkpoints that plain HF loads and runs."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton_paged.model.builder import (
    MARKER_FILE,
    SIZES,
    build,
    build_model,
    cached_model,
    model_config,
    read_marker,
)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_checkpoint_loads_and_generates_with_plain_hf(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == arch
    ids = tokenizer("def main():\n    return 42", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)
    assert read_marker(path) == {"random_weights": True, "arch": arch, "size": "tiny", "seed": 0}


def test_tokenizer_is_byte_level_and_round_trips_any_text(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    text = "héllo wörld ✓ \x00 tabs\tand\nnewlines 🙂"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert (
        tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    )


def test_chat_template_only_where_the_real_architecture_has_one(tiny_model_dir):
    chat = AutoTokenizer.from_pretrained(tiny_model_dir("qwen2"))
    prompt = chat.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert AutoTokenizer.from_pretrained(tiny_model_dir("gpt2")).chat_template is None


def test_same_arguments_give_the_same_checkpoint(tmp_path, tiny_model_dir):
    again = build_model(tmp_path / "again", "llama", "tiny")
    first = tiny_model_dir("llama")
    a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (first / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    other_seed = load_file(
        build_model(tmp_path / "seed1", "llama", "tiny", seed=1) / "model.safetensors"
    )
    assert not torch.equal(
        a["model.layers.0.mlp.up_proj.weight"], other_seed["model.layers.0.mlp.up_proj.weight"]
    )


def test_building_does_not_disturb_the_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(tmp_path, "gpt2", "tiny")
    assert torch.equal(torch.rand(3), expected)


def test_smollm2_size_is_smollm2_135m_shape():
    """SmolLM2-135M-Instruct: 134.5M parameters, its LM head tied to the embedding."""
    config = model_config("llama", "smollm2", eos_token_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(134.5, abs=0.1)
    shape = (config.hidden_size, config.num_hidden_layers, config.intermediate_size)
    assert shape == (576, 30, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert config.rope_parameters["rope_theta"] == 100000


@pytest.mark.parametrize(("arch", "millions"), [("llama", 27.8), ("qwen2", 27.8), ("gpt2", 28.3)])
def test_small_is_about_28m_parameters(arch, millions):
    config = model_config(arch, "small", eos_token_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)
    if arch == "llama":
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
            512,
            8,
            8,
        )
        assert (config.num_key_value_heads, config.vocab_size) == (4, 4096)


@pytest.mark.parametrize(("arch", "size"), [("mamba", "tiny"), ("llama", "huge")])
def test_unknown_arch_or_size_is_refused_before_writing(tmp_path, arch, size):
    with pytest.raises(ValueError, match="unknown"):
        build_model(tmp_path / "m", arch, size)
    assert not (tmp_path / "m").exists()


def test_marker_is_absent_for_foreign_checkpoints(tmp_path):
    assert read_marker(tmp_path) is None
    (tmp_path / MARKER_FILE).write_text(json.dumps({"random_weights": True}))
    assert read_marker(tmp_path) == {"random_weights": True}


def test_cached_model_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_PAGED_CACHE", str(tmp_path))
    first = cached_model("gpt2", "tiny")
    assert first == tmp_path / "models" / "gpt2-tiny-seed0"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert cached_model("gpt2", "tiny") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    beside = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert beside == [".gpt2-tiny-seed0.flock", "gpt2-tiny-seed0"]  # its lock, and no scratch


def test_llama1b_size_is_llama_3_2_1b_shape():
    """Llama-3.2-1B: 1.24B parameters, GQA 32/8, a 128256-token vocabulary tied to the LM head,
    rope theta 500000; stored as bfloat16, weights drawn by ``draw_weights`` (not built here)."""
    config = model_config("llama", "llama1b", eos_token_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400
    shape = (config.hidden_size, config.num_hidden_layers, config.intermediate_size)
    assert shape == (2048, 16, 8192)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 64)
    assert config.vocab_size == 128256 and config.tie_word_embeddings
    assert config.rope_parameters["rope_theta"] == 500000
    assert config.max_position_embeddings >= 8192
    assert (SIZES["llama1b"].dtype, SIZES["llama1b"].fast_init) == ("bfloat16", True)


@pytest.fixture
def fast_tiny(monkeypatch):
    """The tiny shape built the way llama1b is (bfloat16, drawn weights, tied head), with a
    vocabulary larger than the builder's tokenizer learns (as llama1b's is) and pieces small
    enough that each tensor is drawn in several."""
    fast = replace(SIZES["tiny"], vocab_size=20000, tie_embeddings=True, dtype="bfloat16")
    monkeypatch.setitem(SIZES, "tiny", replace(fast, fast_init=True))
    monkeypatch.setattr(build, "DRAW_CHUNK", 1000)
    return monkeypatch


def test_drawn_weights_load_in_plain_hf_and_do_not_depend_on_the_cores(tmp_path, fast_tiny):
    path = build_model(tmp_path / "a", "llama", "tiny")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    embedding = model.model.embed_tokens.weight
    assert embedding.dtype == torch.bfloat16 and model.lm_head.weight is embedding
    assert torch.all(embedding[model.config.pad_token_id] == 0)  # HF's init zeroes the pad row
    assert torch.all(model.model.norm.weight == 1)
    std = model.model.layers[0].mlp.up_proj.weight.float().std().item()
    assert std == pytest.approx(0.02, rel=0.05)

    fast_tiny.setattr(build.os, "cpu_count", lambda: 1)  # other workers, same pieces and seeds
    again = build_model(tmp_path / "b", "llama", "tiny")
    weights = (path / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    other = build_model(tmp_path / "c", "llama", "tiny", seed=1)
    assert (other / "model.safetensors").read_bytes() != weights


def test_ids_beyond_the_tokenizer_generate_and_decode(tmp_path, fast_tiny):
    """The builder's tokenizer learns ~17.7k tokens from its corpus, fewer than llama1b's 128256
    ids: the model may pick ids the tokenizer lacks, and the engine serves them all the same
    (sampled, seeded: greedy on a tied random model mostly repeats the prompt's last token)."""
    from baton_paged import LLM, SamplingParams

    path = build_model(tmp_path / "m", "llama", "tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) < 20000
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=64, ignore_eos=True)
    with LLM(str(path), dtype="float32", kv_memory="16MiB") as llm:
        out = llm.generate(["def main():"], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 64 and out.finish_reason == "length"
    assert max(out.token_ids) >= len(tokenizer)  # such ids came up, and cost nothing
    assert isinstance(out.text, str)
