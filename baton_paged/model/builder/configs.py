"""Model shapes the builder knows: three architectures at four sizes.

``tiny`` is for unit tests (a forward takes microseconds); ``small`` is a ~28M-parameter model
whose decode step costs enough for benchmarks to mean something on a CPU; ``smollm2`` is
SmolLM2-135M-Instruct's exact shape (30 thin layers, a 49152-token vocabulary shared by the
embedding and the LM head), so a benchmark on it meets the per-layer overheads a real model has;
``llama1b`` is Llama-3.2-1B's shape (1.24B parameters, GQA 32/8, a 128256-token vocabulary tied
to the LM head), so a GPU benchmark meets the weight traffic and LM-head cost of a model people
serve. Only the shape is Llama's: the weights are random and the tokenizer is the builder's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import GPT2Config, LlamaConfig, PretrainedConfig, Qwen2Config

ARCHS = ("llama", "qwen2", "gpt2")


@dataclass(frozen=True)
class ModelSize:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """GQA for Llama/Qwen2; GPT-2 has no GQA and uses ``num_heads``."""
    intermediate_size: int
    max_positions: int
    tie_embeddings: bool = False
    """Llama/Qwen2 only; GPT-2 always ties its LM head to the embedding, as the real one does."""
    rope_theta: float = 10000.0
    dtype: str = "float32"
    """What the checkpoint stores. bfloat16 halves a 1B model's files (2.5 GB, not 5), as real
    checkpoints of that size ship; float32 keeps the smaller sizes' files as they always were."""
    fast_init: bool = False
    """Draw the weights with seeded ``normal_`` calls in parallel (``build.draw_weights``) rather
    than through HF's per-module init, which took 13-20 s (bfloat16-float32) for 1B parameters on
    a 2-vCPU VM, where this takes ~3 s (a 16-core machine: well under 1 s). Off for the older
    sizes, so that their files stay byte-identical."""


SIZES = {
    "tiny": ModelSize(512, 64, 2, 4, 2, 128, 1024),
    "small": ModelSize(4096, 512, 8, 8, 4, 1408, 2048),
    "smollm2": ModelSize(49152, 576, 30, 9, 3, 1536, 8192, tie_embeddings=True, rope_theta=1e5),
    "llama1b": ModelSize(
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        max_positions=8192,
        tie_embeddings=True,
        rope_theta=5e5,
        dtype="bfloat16",
        fast_init=True,
    ),
}


def model_config(arch: str, size: str, eos_token_id: int) -> PretrainedConfig:
    """The HF config of ``arch`` at ``size``, with ``eos_token_id`` as BOS, EOS and padding."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    s = SIZES[size]
    special = {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
    special["pad_token_id"] = eos_token_id
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=s.vocab_size,
            n_embd=s.hidden_size,
            n_layer=s.num_layers,
            n_head=s.num_heads,
            n_positions=s.max_positions,
            **special,
        )
    config_class = LlamaConfig if arch == "llama" else Qwen2Config
    return config_class(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        intermediate_size=s.intermediate_size,
        max_position_embeddings=s.max_positions,
        tie_word_embeddings=s.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
        **special,
    )
