"""The native Llama-family executor: HF's logits from fused weights and kernels, the HF model
left working, and a clear word on models it does not run."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from baton_paged.allocator import KVCache, KVCacheSpec
from baton_paged.attention import AttentionMetadata, PagedStep, attach, create_backend
from baton_paged.attention.base import AttentionRequirements
from baton_paged.config import EngineConfig
from baton_paged.engine import Engine
from baton_paged.model import llama_executor
from baton_paged.model.decoder_kernels import DECODER_KERNELS
from baton_paged.model.packed_linear import PackedLinear

TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-4, torch.bfloat16: 0.1}
"""Of the largest logit. HF's RMSNorm runs in float32 whatever the model's dtype, and so does
ours, so float64 agrees to float32 rounding of the norms (sums taken in another order)."""


def load(tiny_model_dir, arch: str, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=dtype).eval()


def prefill_logits(executor, model, prompts: list[list[int]], dtype: torch.dtype):
    """Every prompt prefilled in one packed forward: the last token's logits of each."""
    spec = KVCacheSpec.from_model_config(model.config, 16, dtype)
    cache = KVCache(spec, 64)
    pages = [list(range(i * 8, i * 8 + 8)) for i in range(len(prompts))]
    meta = AttentionMetadata.build(
        [len(p) for p in prompts], [len(p) for p in prompts], torch.tensor(pages).numpy(), 16
    )
    req = AttentionRequirements(torch.device("cpu"), dtype, 16, spec.head_dim, 4, 2)
    step = PagedStep(cache, meta, create_backend("auto", req))
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    keep = torch.cumsum(torch.tensor([len(p) for p in prompts]), 0) - 1
    return executor.forward(ids, positions, keep, step)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_equal_the_hf_model(tiny_model_dir, arch, dtype):
    """Qwen2 brings Q/K/V biases; each dtype agrees to its rounding."""
    model = load(tiny_model_dir, arch, dtype)
    prompts = [[5, 17, 300, 2, 9, 44, 100], [7, 8], list(range(30, 90))]
    with torch.inference_mode():
        expected = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts])
        executor = llama_executor.LlamaExecutor(model, DECODER_KERNELS.kernels(), 128)
        attach(model, 128)
        got = prefill_logits(executor, model, prompts, dtype)
    scale = expected.abs().max().item()
    assert (got.double() - expected.double()).abs().max().item() <= TOLERANCE[dtype] * scale


def in_memory(arch: str) -> torch.nn.Module:
    """Tiny float64 models of the executor's other shapes: Mistral, and a Llama like SmolLM2
    (LM head tied to the embedding, rope theta 1e5)."""
    from transformers import LlamaConfig, MistralConfig

    common = {"vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96}
    common |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    if arch == "mistral":
        config = MistralConfig(sliding_window=None, **common)
    else:
        rope = {"rope_type": "default", "rope_theta": 1e5}
        config = LlamaConfig(tie_word_embeddings=True, rope_parameters=rope, **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()


@pytest.mark.parametrize("arch", ["mistral", "llama-tied"])
def test_logits_equal_the_hf_model_for_mistral_and_tied_heads(arch):
    model = in_memory(arch)
    prompts = [[5, 17, 200, 2, 9], list(range(30, 70))]
    with torch.inference_mode():
        expected = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts])
        executor = llama_executor.LlamaExecutor(model, DECODER_KERNELS.kernels(), 128)
        attach(model, 128)
        got = prefill_logits(executor, model, prompts, torch.float64)
    assert (got - expected).abs().max().item() <= TOLERANCE[torch.float64] * expected.abs().max()


def test_fused_weights_are_the_hf_modules_weights(tiny_model_dir):
    """The fused QKV and gate-up tensors are the only copies: each HF projection's weight is a
    view of them, so the model still computes the same after an engine has run it."""
    model = load(tiny_model_dir, "llama", torch.float32)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        before = model(ids).logits
        executor = llama_executor.LlamaExecutor(model, DECODER_KERNELS.kernels(), 64)
        after = model(ids).logits
    layer, attn = executor.layers[0], model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == layer.qkv.weight.data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == layer.qkv.weight.data_ptr()
    gate_up = model.model.layers[0].mlp
    assert gate_up.up_proj.weight.untyped_storage().data_ptr() == layer.gate_up.weight.data_ptr()
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-head"])
def test_an_owned_models_dense_weights_go_and_its_logits_stay(tiny_model_dir, tied):
    """``owns_weights``: each projection's dense weight is let go once its packed copy exists
    (the HF modules then hold meta tensors); the embedding, a head tied to it, and the norms
    stay; the logits are those of the model before."""
    model = in_memory("llama").float() if tied else load(tiny_model_dir, "llama", torch.float32)
    prompts = [[5, 17, 200, 2, 9], list(range(30, 90))]
    with torch.inference_mode():
        expected = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts])
    projections = [m for layer in model.model.layers for m in layer.modules()
                   if isinstance(m, torch.nn.Linear)]  # fmt: skip
    size = sum(m.weight.numel() * 4 for m in projections)
    head_size = 0 if tied else model.lm_head.weight.numel() * 4
    executor = llama_executor.LlamaExecutor(
        model, DECODER_KERNELS.kernels(), 128, owns_weights=True
    )
    assert executor.released == size + head_size
    assert all(m.weight.is_meta for m in projections)
    assert model.lm_head.weight.is_meta != tied and not model.model.embed_tokens.weight.is_meta
    attach(model, 128)
    got = prefill_logits(executor, model, prompts, torch.float32)
    scale = expected.abs().max().item()
    assert (got.double() - expected.double()).abs().max().item() <= TOLERANCE[torch.float32] * scale


def test_packed_linear_equals_f_linear_and_float64_stays_unpacked():
    weight, bias, x = torch.randn(96, 40), torch.randn(96), torch.randn(5, 40)
    packed = PackedLinear(weight, bias)
    torch.testing.assert_close(packed(x), torch.nn.functional.linear(x, weight, bias))
    assert not PackedLinear(weight.double()).packed


def test_unsupported_models_are_named_with_their_reason(tiny_model_dir):
    gpt2 = load(tiny_model_dir, "gpt2", torch.float32)
    assert "not one of the Llama-family" in llama_executor.unsupported_reason(
        gpt2, torch.device("cpu")
    )
    llama = load(tiny_model_dir, "llama", torch.float32)
    assert llama_executor.unsupported_reason(llama, torch.device("cpu")) is None
    assert "CPU kernels" in llama_executor.unsupported_reason(llama, torch.device("cuda"))
    llama.config.hidden_act = "gelu"
    assert "activation 'gelu'" in llama_executor.unsupported_reason(llama, torch.device("cpu"))
    llama.config.hidden_act = "silu"
    llama.model.rotary_emb.rope_type = "dynamic"
    assert "changes with the sequence length" in llama_executor.unsupported_reason(
        llama, torch.device("cpu")
    )


def test_engine_takes_native_where_it_can_and_says_why_not(tiny_model_dir, caplog):
    llama = Engine(EngineConfig(model=str(tiny_model_dir("llama")), kv_memory="1MiB"))
    assert llama.snapshot.model_impl == llama.model_impl == "native"
    with caplog.at_level(logging.INFO, logger="baton_paged.model.loading"):
        gpt2 = Engine(EngineConfig(model=str(tiny_model_dir("gpt2")), kv_memory="1MiB"))
    assert gpt2.snapshot.model_impl == "transformers"
    assert "GPT2LMHeadModel is not one of" in caplog.text
    with pytest.raises(ValueError, match="model_impl='native' needs the native executor.*: GPT2"):
        Engine(EngineConfig(model=str(tiny_model_dir("gpt2")), model_impl="native"))
    forced = Engine(EngineConfig(model=str(tiny_model_dir("llama")), model_impl="transformers"))
    assert forced.snapshot.model_impl == "transformers"


def test_unknown_model_impl_is_refused_before_loading():
    with pytest.raises(ValueError, match="unknown model_impl 'vllm'; choose one of: auto"):
        EngineConfig(model_impl="vllm")


def test_without_a_compiler_the_engine_runs_the_general_path(
    tiny_model_dir, monkeypatch, reference
):
    """No compiler: one warning, then the HF bridge on the torch backend, outputs still exact."""
    from baton_paged.attention import cpu_extension
    from baton_paged.sampling_params import SamplingParams

    cpu_extension._built.cache_clear()
    monkeypatch.setattr(
        cpu_extension, "_build_problem", lambda lib: "no C++ compiler (c++) on PATH"
    )
    try:
        engine = Engine(EngineConfig(model=str(tiny_model_dir("llama")), dtype="float64"))
        assert (engine.snapshot.attention_backend, engine.snapshot.model_impl) == (
            "torch",
            "transformers",
        )
        prompt = [5, 9, 200, 31]
        engine.add_request(
            {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6), "r"
        )
        tokens = None
        while tokens is None:
            tokens = next((o.outputs[0].token_ids for o in engine.step() if o.finished), None)
        assert tuple(tokens) == reference("llama", tuple(prompt), 6)
    finally:
        cpu_extension._built.cache_clear()
