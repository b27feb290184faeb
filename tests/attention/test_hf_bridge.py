"""The HF bridge: unmodified HF models on the paged cache reproduce ``model.generate`` exactly,
and models it cannot serve exactly are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from baton_paged.allocator import KVCache, KVCacheSpec, pages_needed
from baton_paged.attention import (
    AttentionMetadata,
    AttentionRequirements,
    PagedStep,
    UnsupportedModelError,
    attach,
    create_backend,
    unsupported_model_reason,
)

PROMPT_LENS = (5, 17, 33, 40)
JOIN_AT = (0, 0, 2, 5)  # decode step at which each prompt joins the running batch
NEW_TOKENS = 12
PAGE_SIZE = 16


def paged_greedy(model, prompts, backend_name, page_size=PAGE_SIZE):
    """Greedy tokens of every prompt, decoded together on the paged cache. A prompt joining
    mid-run is prefilled in the same forward as the others' decode tokens, the most mixed packing
    a step can have."""
    config = model.config
    spec = KVCacheSpec.from_model_config(config, page_size, torch.float64)
    widths = [pages_needed(len(p) + NEW_TOKENS, page_size) for p in prompts]
    cache = KVCache(spec, sum(widths))
    pages = np.random.default_rng(0).permutation(sum(widths)).astype(np.int32)
    table = np.zeros((len(prompts), max(widths)), dtype=np.int32)
    for row, start in enumerate(np.cumsum(widths) - widths):
        table[row, : widths[row]] = pages[start : start + widths[row]]
    req = AttentionRequirements(
        torch.device("cpu"),
        torch.float64,
        page_size,
        spec.head_dim,
        config.num_attention_heads,
        spec.num_kv_heads,
    )
    backend = create_backend(backend_name, req)
    tokens = [list(p) for p in prompts]
    written = [0] * len(prompts)
    for step in range(max(JOIN_AT) + NEW_TOKENS):
        rows = [
            r
            for r in range(len(prompts))
            if JOIN_AT[r] <= step and len(tokens[r]) < len(prompts[r]) + NEW_TOKENS
        ]
        if not rows:
            break
        context = [len(tokens[r]) for r in rows]
        query = [len(tokens[r]) - written[r] for r in rows]
        meta = AttentionMetadata.build(query, context, table[rows], page_size)
        ids = torch.tensor([t for r in rows for t in tokens[r][written[r] :]])
        positions = torch.cat([torch.arange(written[r], len(tokens[r])) for r in rows])
        logits = model(
            input_ids=ids[None],
            position_ids=positions[None],
            use_cache=False,
            logits_to_keep=meta.cu_seqlens_q[1:].long() - 1,
            baton_step=PagedStep(cache, meta, backend),
        ).logits[0]
        for r, token in zip(rows, logits.argmax(-1).tolist(), strict=True):
            written[r] = len(tokens[r])
            tokens[r].append(token)
    return [t[len(p) :] for t, p in zip(tokens, prompts, strict=True)]


def until_eos(tokens, eos):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("backend_name", ["torch", "padded"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_paged_greedy_equals_model_generate(tiny_model_dir, arch, backend_name):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float64).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS
    ]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                attention_mask=torch.ones(1, len(prompt)),
            )
            expected.append(out[0, len(prompt) :].tolist())
        attach(model, max_model_len=2048)
        got = paged_greedy(model, prompts, backend_name)
    eos = model.config.eos_token_id
    assert [until_eos(g, eos) for g in got] == expected
    assert all(len(e) == NEW_TOKENS for e in expected)  # these seeds never hit EOS early


def tiny(config_class, model_class, **extra):
    config = config_class(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        **extra,
    )
    return model_class(config).eval()


def test_softcapping_model_is_refused():
    model = tiny(Gemma2Config, Gemma2ForCausalLM, attn_logit_softcapping=50.0)
    with pytest.raises(UnsupportedModelError, match="softcapping"):
        attach(model, max_model_len=64)


@pytest.mark.parametrize(
    ("model", "max_model_len"),
    [
        (tiny(MistralConfig, MistralForCausalLM, sliding_window=16), 64),
        (
            tiny(
                Qwen2Config,
                Qwen2ForCausalLM,
                use_sliding_window=True,
                sliding_window=16,
                max_window_layers=0,
            ),
            64,
        ),
    ],
    ids=["mistral", "qwen2"],
)
def test_sliding_window_shorter_than_context_is_refused(model, max_model_len):
    with pytest.raises(UnsupportedModelError, match="sliding window of 16 tokens"):
        attach(model, max_model_len)


def test_sliding_window_covering_the_whole_context_is_served():
    model = tiny(MistralConfig, MistralForCausalLM, sliding_window=4096)
    assert unsupported_model_reason(model, max_model_len=4096) is None
    plain_qwen2 = tiny(Qwen2Config, Qwen2ForCausalLM, sliding_window=16)  # use_sliding_window off
    assert unsupported_model_reason(plain_qwen2, max_model_len=4096) is None


def test_model_without_attention_interface_is_refused():
    class Legacy(LlamaForCausalLM):
        _supports_attention_backend = False

    with pytest.raises(UnsupportedModelError, match="AttentionInterface"):
        attach(tiny(LlamaConfig, Legacy), max_model_len=64)


def test_forward_without_step_metadata_says_what_is_missing():
    model = tiny(LlamaConfig, LlamaForCausalLM)
    attach(model, max_model_len=64)
    with pytest.raises(RuntimeError, match="baton_step=PagedStep"):
        model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)
