"""Serving a transformers model the caller has already loaded.

Code that holds a model switches to BATON batching with ``LLM(hf_model=model,
tokenizer=tokenizer)``. The engine takes the model's dtype and device as its own unless told
otherwise, and an option that contradicts the weights is an error: casting or moving the caller's
model behind their back would double its memory or change its numerics.
"""

from __future__ import annotations

from typing import Any

import torch

from baton_paged.config import DTYPES, EngineConfig

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def config_for_loaded_model(hf_model: Any, tokenizer: Any, options: dict) -> EngineConfig:
    """The ``EngineConfig`` for serving ``hf_model``: ``options`` plus its dtype and device."""
    if tokenizer is None:
        raise ValueError("an already-loaded model needs its tokenizer too: pass tokenizer=...")
    if options.get("model") is not None:
        raise ValueError("pass either model (a checkpoint to load) or hf_model, not both")
    weights = _first_weight(hf_model)
    if weights.dtype not in DTYPE_NAMES:
        raise ValueError(f"the model's weights are {weights.dtype}; supported: {', '.join(DTYPES)}")
    found = {"dtype": DTYPE_NAMES[weights.dtype], "device": str(weights.device)}
    config = EngineConfig(**{**found, **options})
    check_loaded_model(hf_model, config)
    return config


def check_loaded_model(hf_model: Any, config: EngineConfig) -> None:
    """ValueError unless the model's weights have the config's dtype and sit on its device, and
    no quantization is asked for (it rewrites the weights it quantizes: the caller's model would
    come back changed)."""
    if config.quantization is not None:
        raise ValueError(
            "quantization rewrites the weights of a checkpoint the engine loads itself; an "
            "already-loaded model is served as it is (pass model=PATH to quantize)"
        )
    weights = _first_weight(hf_model)
    wanted = torch.device(config.device)
    same_device = weights.device.type == wanted.type and (
        wanted.index is None or weights.device.index == wanted.index
    )
    if weights.dtype != config.torch_dtype or not same_device:
        raise ValueError(
            f"the model's weights are {weights.dtype} on {weights.device}, but the engine was "
            f"configured for dtype={config.dtype!r} on device={config.device!r}; convert the "
            "model (model.to(...)) or leave dtype and device unset to follow the model"
        )


def _first_weight(hf_model: Any) -> torch.Tensor:
    if not isinstance(hf_model, torch.nn.Module):
        raise ValueError(f"hf_model must be a transformers model, got {type(hf_model).__name__}")
    weights = next(hf_model.parameters(), None)
    if weights is None:
        raise ValueError("the model has no parameters")
    return weights
