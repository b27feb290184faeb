"""GGUF checkpoints (llama.cpp's format): found by path, dequantized through transformers.

transformers reads GGUF for the architectures it maps (Llama, Mistral, Qwen2, Qwen3, Phi-3,
GPT-2, ...) and dequantizes every tensor; the engine then runs the result like any HF model.
It marks such a model as quantized and refuses to ``save_pretrained`` it, so ``plain_copy``
rebuilds an ordinary model around the same weights (the default model is cached that way).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

GGUF_SUFFIX = ".gguf"
HF_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def gguf_file(path: str) -> Path | None:
    """The GGUF file ``path`` names: a ``.gguf`` file, or a directory holding exactly one of
    them and no HF weights. None for anything else (an HF directory, a hub id)."""
    candidate = Path(path)
    if candidate.suffix == GGUF_SUFFIX:
        if not candidate.is_file():
            raise ValueError(f"no GGUF file at {candidate}")
        return candidate
    if not candidate.is_dir() or any(any(candidate.glob(p)) for p in HF_WEIGHT_PATTERNS):
        return None
    found = sorted(candidate.glob(f"*{GGUF_SUFFIX}"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"{candidate} holds {len(found)} GGUF files ({names}); name one of them")
    return found[0] if found else None


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a GGUF file, every weight dequantized to ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_package()
    where = {"pretrained_model_name_or_path": path.parent, "gguf_file": path.name}
    try:
        with _quiet_packed_gguf_advice():
            model = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except (ValueError, NotImplementedError, KeyError) as error:
        raise ValueError(f"cannot load the GGUF checkpoint {path}: {error}") from error
    return plain_copy(model), tokenizer


def plain_copy(model: Any) -> Any:
    """An ordinary HF model with ``model``'s config (minus the GGUF quantization marker),
    weights and generation config: one that ``save_pretrained`` writes as safetensors."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


@contextmanager
def _quiet_packed_gguf_advice():
    """transformers advises float32 for a GGUF loaded in another dtype "with its weights packed",
    also when it dequantizes them (no ``kernels`` GGUF kernel here): we always take them
    dequantized, so the advice only misleads."""
    advice = logging.getLogger("transformers.quantizers.quantizer_gguf")
    level = advice.level
    advice.setLevel(logging.ERROR)
    try:
        yield
    finally:
        advice.setLevel(level)


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        hint = "loading a GGUF checkpoint needs the gguf package: pip install gguf"
        raise ValueError(hint) from error
