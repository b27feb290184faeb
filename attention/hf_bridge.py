"""Run any Hugging Face causal LM on the paged cache, with no change to its code.

transformers calls attention through a registry (``AttentionInterface``); we register
``paged_attention`` under ``"baton_paged"`` and switch a model to it. The model runner then calls
the unmodified model with packed ``(1, T)`` inputs, ``use_cache=False`` and one extra keyword,
``baton_step=PagedStep(...)``, which transformers forwards untouched to every attention call.
RoPE or learned positions come from ``position_ids``; causality and request boundaries come from
our metadata (transformers hands a custom implementation ``attention_mask=None``).

Some attention variants would be computed wrongly by plain causal attention over the whole
context: sliding windows shorter than the context, logit softcapping (Gemma 2), attention sinks
(gpt-oss), bidirectional attention. ``unsupported_model_reason`` refuses them when the model is
attached, and ``paged_attention`` refuses them again per call, so no output is silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch

from baton_paged.allocator.kv_cache import KVCache
from baton_paged.attention.base import AttentionBackend
from baton_paged.attention.metadata import AttentionMetadata

ATTN_IMPLEMENTATION = "baton_paged"
STEP_KWARG = "baton_step"


class UnsupportedModelError(ValueError):
    """The model uses an attention variant the bridge cannot compute exactly."""


@dataclass(frozen=True)
class PagedStep:
    """What every attention layer of one forward step needs: pass as ``model(baton_step=...)``."""

    cache: KVCache
    metadata: AttentionMetadata
    backend: AttentionBackend


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query [1, Hq, T, D]``, ``key/value [1, Hkv, T, D]``
    (after RoPE) in, ``[1, T, Hq, D]`` out."""
    step = kwargs.get(STEP_KWARG)
    _check_call(query, step, dropout, kwargs)
    out = step.backend.forward(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        step.cache,
        module.layer_idx,
        step.metadata,
        scaling if scaling is not None else query.shape[-1] ** -0.5,
    )
    return out[None], None


def _check_call(query: torch.Tensor, step: PagedStep | None, dropout: float, kwargs) -> None:
    if step is None:
        raise RuntimeError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} needs the step's metadata: call the "
            f"model with {STEP_KWARG}=PagedStep(...) (the model runner does this). A model lent "
            "to an engine answers only through it until the engine is closed (LLM.close())"
        )
    if query.shape[0] != 1:
        raise RuntimeError(f"paged attention takes packed inputs of batch 1, got {query.shape[0]}")
    if dropout:
        raise RuntimeError("paged attention is inference-only; put the model in eval() mode")
    window = kwargs.get("sliding_window")
    if window is not None and window < step.metadata.max_context_len:
        raise UnsupportedModelError(
            f"a sliding window of {window} tokens is shorter than a context of "
            f"{step.metadata.max_context_len}; the paged bridge attends to the whole context"
        )
    if kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise UnsupportedModelError(
            "attention logit softcapping and attention sinks are not supported by the paged bridge"
        )


def unsupported_model_reason(model: torch.nn.Module, max_model_len: int) -> str | None:
    """Why the bridge cannot serve ``model`` for contexts up to ``max_model_len``, or None."""
    config = model.config
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        return f"{name} does not route attention through transformers' AttentionInterface"
    if getattr(config, "attn_logit_softcapping", None):
        return f"{name} uses attention logit softcapping, which the paged bridge does not apply"
    window = sliding_window(config)
    if window is not None and window < max_model_len:
        return (
            f"{name} uses a sliding window of {window} tokens, shorter than the maximum context "
            f"of {max_model_len}; lower max_model_len to {window} or use another engine"
        )
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "sinks"):
            return f"{name} uses attention sinks, which the paged bridge does not apply"
        if hasattr(module, "layer_idx") and getattr(module, "is_causal", True) is False:
            return f"{name} has non-causal attention layers; only causal LMs are served"
    return None


def sliding_window(config) -> int | None:
    """The window of the model's sliding-attention layers, or None when every layer is full.
    Models with ``layer_types`` (Qwen2, Gemma 3, ...) name the sliding layers; models without
    it (Mistral) slide on every layer whenever ``sliding_window`` is set."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def attach(model: torch.nn.Module, max_model_len: int) -> None:
    """Switch ``model`` to paged attention, or raise UnsupportedModelError saying why not."""
    reason = unsupported_model_reason(model, max_model_len)
    if reason is not None:
        raise UnsupportedModelError(reason)
    register()
    previous = model.config._attn_implementation
    if previous != ATTN_IMPLEMENTATION:
        _PREVIOUS[model] = previous
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


def detach(model: torch.nn.Module) -> None:
    """Give ``model`` back the attention it had before ``attach``, so code that lent it to an
    engine can call it directly again."""
    if model in _PREVIOUS:
        model.set_attn_implementation(_PREVIOUS.pop(model))


_PREVIOUS: WeakKeyDictionary[torch.nn.Module, str] = WeakKeyDictionary()
"""Each attached model's attention implementation before ``attach``."""


def register() -> None:
    """Make ``"baton_paged"`` a valid ``attn_implementation`` for every transformers model."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
