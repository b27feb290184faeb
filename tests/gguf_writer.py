"""Write a small HF Llama as a GGUF file with the gguf package's writer, as llama.cpp lays it out.

Tests use it to load a GGUF without downloading one: float32 tensors (nothing to dequantize
except the layout) unless ``formats`` names a block format for some (quantized by the gguf
package, as llama.cpp's quantizer would), llama.cpp's tensor names and its rotary permutation
of the Q/K rows, and the byte-level BPE tokenizer as ``tokenizer.ggml.*`` metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file
from transformers import AutoConfig

LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
CONTROL_TOKEN = 3
NORMAL_TOKEN = 1


def write_llama_gguf(
    model_dir: Path, out_file: Path, architecture: str = "llama", formats: dict | None = None
) -> Path:
    """``out_file``: the HF Llama checkpoint in ``model_dir`` as GGUF: float32, except the
    tensors ``formats`` names by their GGUF role (``attn_q``, ``ffn_down``, ``output``, ...), in
    the ``GGMLQuantizationType`` given (one the gguf package can quantize: Q4_0, Q4_1, Q5_0,
    Q5_1, Q8_0, F16, BF16)."""
    import gguf

    config = AutoConfig.from_pretrained(model_dir)
    writer = gguf.GGUFWriter(str(out_file), architecture)
    _add_config(writer, config, architecture)
    _add_tokenizer(writer, model_dir, config)
    for name, tensor in _gguf_tensors(model_dir, config).items():
        qtype = (formats or {}).get(name.split(".")[-2])
        if qtype is None:
            writer.add_tensor(name, tensor)
        else:
            writer.add_tensor(name, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def _add_config(writer, config, arch: str) -> None:
    writer.add_name("tiny test llama")
    writer.add_uint32(f"{arch}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{arch}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{arch}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{arch}.attention.head_count", config.num_attention_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", config.num_key_value_heads)
    writer.add_uint32(f"{arch}.rope.dimension_count", config.head_dim)
    writer.add_float32(f"{arch}.rope.freq_base", config.rope_parameters["rope_theta"])
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_uint32(f"{arch}.vocab_size", config.vocab_size)


def _add_tokenizer(writer, model_dir: Path, config) -> None:
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {entry["content"] for entry in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL_TOKEN if t in special else NORMAL_TOKEN for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text())


def _gguf_tensors(model_dir: Path, config) -> dict[str, np.ndarray]:
    weights = {k: v.float().numpy() for k, v in load_file(model_dir / "model.safetensors").items()}
    out = {
        "token_embd.weight": weights["model.embed_tokens.weight"],
        "output_norm.weight": weights["model.norm.weight"],
    }
    if "lm_head.weight" in weights and not config.tie_word_embeddings:
        out["output.weight"] = weights["lm_head.weight"]
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            tensor = weights[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name in heads:
                tensor = _rotary_permute(tensor, heads[gguf_name])
            out[f"blk.{layer}.{gguf_name}.weight"] = tensor
    return out


def _rotary_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for Q/K: each head's two rotary halves interleaved."""
    rows = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, rows, -1).swapaxes(1, 2).reshape(weight.shape).copy()
