"""Write a random-weight HF checkpoint (weights, config, tokenizer) that any HF loader reads."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig

from baton_paged.model.builder.configs import SIZES, ModelSize, model_config
from baton_paged.model.builder.tokenizer import (
    CHATML_TEMPLATE,
    END_OF_TEXT,
    IM_END,
    train_tokenizer,
)

MARKER_FILE = "baton_paged_model.json"
"""Written beside the weights so tools can say plainly that a model's weights are random."""
DRAW_CHUNK = 1 << 24
"""Elements per seeded piece of a tensor under ``fast_init``: small enough that the pieces spread
over every core (the 128256 x 2048 embedding alone is 16 of them), large enough that a piece's
own generator costs nothing beside its draws."""


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

    model = _random_model(config, SIZES[size], seed)
    model.generation_config = _generation_config(tokenizer, eos_id, chat=chat_template is not None)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker = {"random_weights": True, "arch": arch, "size": size, "seed": seed}
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir


def _random_model(config: PretrainedConfig, size: ModelSize, seed: int):
    """The model with its random weights: HF's own init under ``seed``, or, for a ``fast_init``
    size, ``draw_weights``."""
    dtype = getattr(torch, size.dtype)
    if not size.fast_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.device("meta"):  # the modules and their names, no memory and no init
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    std = getattr(config, "initializer_range", 0.02)
    model.load_state_dict(draw_weights(model, std, seed), strict=False, assign=True)
    model.tie_weights()  # a tied LM head points at the embedding again
    return model


def draw_weights(model: torch.nn.Module, std: float, seed: int) -> dict[str, torch.Tensor]:
    """Fresh CPU tensors for ``model``'s parameters (tied ones once), in their dtype, as HF's
    generic init fills them: norm weights 1, biases 0, every other weight normal(0, ``std``),
    the embedding's padding row 0 (GPT-2's scaled residual projections are not reproduced).

    Each piece of ``DRAW_CHUNK`` elements has its own generator, seeded from ``seed``, the
    parameter's name and the piece's index, so the pieces are drawn on all cores at once and the
    result does not depend on how many there are, nor on the order they ran in.
    """
    tensors, draws, seen = {}, [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(prefix=module_name, recurse=False):
            if id(param) in seen:  # a tied LM head: the embedding was drawn already
                continue
            seen.add(id(param))
            tensor = tensors[name] = torch.empty(param.shape, dtype=param.dtype)
            if name.endswith("bias"):
                tensor.zero_()
            elif "Norm" in type(module).__name__:
                tensor.fill_(1.0)
            else:
                draws.append((name, tensor, getattr(module, "padding_idx", None)))
    pieces = [
        (f"{seed}/{name}/{lo}", tensor.view(-1)[lo : lo + DRAW_CHUNK])
        for name, tensor, _ in draws
        for lo in range(0, tensor.numel(), DRAW_CHUNK)
    ]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # torch's normal_ lets go of the GIL
        list(pool.map(lambda piece: _draw(*piece, std), pieces))
    for _, tensor, padding_idx in draws:
        if padding_idx is not None:
            tensor[padding_idx].zero_()
    return tensors


def _draw(key: str, out: torch.Tensor, std: float) -> None:
    digest = hashlib.sha256(key.encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    out.normal_(0.0, std, generator=generator)


def _generation_config(tokenizer, eos_id: int, chat: bool) -> GenerationConfig:
    """Stop on end-of-text, and on the end of a chat turn for models with a chat template."""
    eos = [eos_id, tokenizer.convert_tokens_to_ids(IM_END)] if chat else eos_id
    return GenerationConfig(bos_token_id=eos_id, eos_token_id=eos, pad_token_id=eos_id)


def read_marker(model_dir: str | Path) -> dict | None:
    """The builder's marker of ``model_dir``, or None for a model the builder did not make."""
    path = Path(model_dir) / MARKER_FILE
    return json.loads(path.read_text()) if path.is_file() else None
