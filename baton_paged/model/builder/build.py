"""Write a random-weight HF checkpoint (weights, config, tokenizer) that any HF loader reads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from baton_paged.model.builder.configs import model_config
from baton_paged.model.builder.tokenizer import (
    CHATML_TEMPLATE,
    END_OF_TEXT,
    IM_END,
    train_tokenizer,
)

MARKER_FILE = "baton_paged_model.json"
"""Written beside the weights so tools can say plainly that a model's weights are random."""


def build_model(
    out_dir: str | Path, arch: str = "llama", size: str = "small", seed: int = 0
) -> Path:
    """Build ``arch`` at ``size`` with weights drawn from ``seed`` into ``out_dir``; return it.

    The same arguments on the same torch and Python versions give the same files.
    """
    out_dir = Path(out_dir)
    config_probe = model_config(arch, size, eos_token_id=0)  # validates arch and size up front
    chat_template = None if arch == "gpt2" else CHATML_TEMPLATE
    tokenizer = train_tokenizer(config_probe.vocab_size, chat_template)
    eos_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = model_config(arch, size, eos_token_id=eos_id)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = _generation_config(tokenizer, eos_id, chat=chat_template is not None)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker = {"random_weights": True, "arch": arch, "size": size, "seed": seed}
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir


def _generation_config(tokenizer, eos_id: int, chat: bool) -> GenerationConfig:
    """Stop on end-of-text, and on the end of a chat turn for models with a chat template."""
    eos = [eos_id, tokenizer.convert_tokens_to_ids(IM_END)] if chat else eos_id
    return GenerationConfig(bos_token_id=eos_id, eos_token_id=eos, pad_token_id=eos_id)


def read_marker(model_dir: str | Path) -> dict | None:
    """The builder's marker of ``model_dir``, or None for a model the builder did not make."""
    path = Path(model_dir) / MARKER_FILE
    return json.loads(path.read_text()) if path.is_file() else None
