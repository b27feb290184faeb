"""Loading a Hugging Face causal LM and choosing the attention backend and page size for it."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from baton_paged.allocator import KVCacheSpec
from baton_paged.attention import (
    AttentionBackend,
    AttentionRequirements,
    create_backend,
    suggested_page_size,
)
from baton_paged.config import EngineConfig
from baton_paged.model import llama_executor
from baton_paged.model.cuda_quantized import CUDA_METHODS, quantize_linears
from baton_paged.model.decoder_kernels import DECODER_KERNELS
from baton_paged.model.gguf_loading import gguf_file
from baton_paged.model.gguf_weights import GGUFQuantizer
from baton_paged.model.llama_executor import LlamaExecutor
from baton_paged.model.quantized_linear import (
    KERNEL_DTYPE,
    METHODS,
    Quantization,
    reads_quantized,
)

logger = logging.getLogger(__name__)

CUDA_ONLY = tuple(m for m in CUDA_METHODS if m not in METHODS)
"""Quantizations with no CPU kernel here (fp8)."""

RANDOM_MODEL_NAME = "random"
"""``--model random``: the random-weight ~28M Llama, built locally on first use (no download)."""
RANDOM_MODEL = ("llama", "small")


def load_model(config: EngineConfig) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode on the device, from ``config.model``: None (the
    built-in SmolLM2-135M-Instruct), ``random``, a GGUF file, a local directory or a hub id."""
    model, tokenizer = _load(config)
    return model.to(config.device).eval(), tokenizer


def _load(config: EngineConfig) -> tuple[Any, Any]:
    """Safetensors checkpoints load straight onto the device (``device_map``: no float32 copy
    in host memory first); GGUF dequantizes on the CPU, then moves."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baton_paged.model.gguf_loading import load_gguf

    path = checkpoint_path(config.model)
    if config.model == RANDOM_MODEL_NAME:
        logger.warning("serving the built-in random-weight model at %s: its text is noise", path)
    gguf = gguf_file(path)
    if gguf is not None:
        return load_gguf(gguf, config.torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=config.torch_dtype, device_map=config.device
    )
    return model, tokenizer


def checkpoint_path(model: str | None) -> str:
    """Where ``model`` loads from; the two built-in names resolve to their cache directories."""
    from baton_paged.model import builder as model_builder

    if model is None:
        return str(model_builder.default_model())
    if model == RANDOM_MODEL_NAME:
        return str(model_builder.cached_model(*RANDOM_MODEL))
    return model


def model_max_len(model: Any) -> int:
    length = getattr(_text_config(model), "max_position_embeddings", None)
    if not length:
        raise ValueError("the model config states no max_position_embeddings; set max_model_len")
    return int(length)


def eos_token_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every token that ends a generation: the tokenizer's EOS plus the generation config's
    (chat models list their end-of-turn token there, e.g. ``<|im_end|>``); HF ``generate`` and
    vLLM stop on all of them."""
    ids = [tokenizer.eos_token_id]
    generation = getattr(model, "generation_config", None)
    configured = getattr(generation, "eos_token_id", None)
    ids += configured if isinstance(configured, list | tuple) else [configured]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
"""``generation_config.json`` field -> the ``SamplingParams`` default it sets (vLLM's set)."""


def sampling_defaults(model: Any, source: str) -> dict[str, Any]:
    """The sampling defaults ``source`` (``EngineConfig.generation_config``) gives: the fields
    the generation config sets away from transformers' own defaults."""
    if source == "vllm":
        return {}
    if source == "auto":
        generation = getattr(model, "generation_config", None)
    else:
        generation = GenerationConfig.from_pretrained(source)
    explicit = generation.to_diff_dict() if generation is not None else {}
    return {
        ours: explicit[theirs] for theirs, ours in GENERATION_DEFAULTS.items() if theirs in explicit
    }


def choose_attention(config: EngineConfig, model: Any) -> tuple[int, AttentionBackend]:
    """The page size (configured, else the backend's preference) and a ready backend."""
    text_config = _text_config(model)
    spec = KVCacheSpec.from_model_config(text_config)
    req = AttentionRequirements(
        device=torch.device(config.device),
        dtype=config.torch_dtype,
        page_size=config.page_size or 1,
        head_dim=spec.head_dim,
        num_query_heads=text_config.num_attention_heads,
        num_kv_heads=spec.num_kv_heads,
    )
    page_size = config.page_size or suggested_page_size(config.attention_backend, req)
    req = replace(req, page_size=page_size)
    return page_size, create_backend(config.attention_backend, req)


def resolve_quantization(config: EngineConfig, model: Any) -> EngineConfig:
    """``config`` with ``quantization=None`` made what it means for the loaded ``model``
    (``EngineConfig.quantization``): gguf for a GGUF checkpoint or the built-in default model
    running in bfloat16 on the native executor, else none. ``gguf`` asked of a checkpoint that
    is not one is an error."""
    if config.quantization == "gguf" and _gguf_source(config) is None:
        raise ValueError(
            f"quantization='gguf' reads a GGUF file's own blocks; {config.model} is not a GGUF "
            "checkpoint (use int8 or int4 to quantize it as it loads)"
        )
    if config.quantization is not None or config.torch_dtype != KERNEL_DTYPE:
        return config
    if config.model_impl == "transformers" or _native_problem(config, model) is not None:
        return config
    if _gguf_source(config, fetch=False) is None:
        if config.model is None:
            logger.warning(
                "the default model runs its dequantized checkpoint: its own GGUF file (which "
                "runs faster at the file's width) is not in the cache, and quantization='gguf' "
                "fetches it"
            )
        return config
    return replace(config, quantization="gguf")


def choose_executor(
    config: EngineConfig, model: Any, max_model_len: int, owns_weights: bool = False
) -> LlamaExecutor | None:
    """The native executor when ``config.model_impl`` allows it and it can run ``model`` here;
    None runs the HF model through the bridge. ``native`` or a quantization that cannot run is an
    error saying why; ``auto`` falls back with one logged line naming the reason.
    ``owns_weights``: the engine loaded ``model`` and nothing else runs it, so the executor lets
    the HF modules' dense weights go (``LlamaExecutor``)."""
    quantized = config.quantization is not None
    on_cuda = torch.device(config.device).type == "cuda"
    if quantized and on_cuda and config.model_impl != "native":
        swapped = quantize_linears(model, config.quantization)  # the bridge runs them
        logger.info("quantization=%s: %d linears swapped", config.quantization, swapped)
        return None
    if config.quantization in CUDA_ONLY:
        raise ValueError(f"quantization={config.quantization!r} needs CUDA (cuda_quantized.py)")
    if config.model_impl == "transformers":
        if quantized:
            raise ValueError("quantization runs in the native executor; use model_impl='auto'")
        return None
    reason = _native_problem(config, model)
    if reason is not None:
        if config.model_impl == "native" or quantized:
            wanted = "model_impl='native'" if config.model_impl == "native" else "quantization"
            raise ValueError(f"{wanted} needs the native executor, which cannot run here: {reason}")
        logger.info("running the model through the transformers bridge: %s", reason)
        return None
    if quantized and not reads_quantized(config.torch_dtype):
        logger.warning(
            "quantization=%s with %s activations runs the quantized weights densely (no "
            "quantized kernel here is faster than the %s matmuls): no speed-up; use bfloat16",
            config.quantization, config.dtype, config.dtype,
        )  # fmt: skip
    quantization = _quantization(config, model)
    kernels = DECODER_KERNELS.kernels()
    executor = LlamaExecutor(model, kernels, max_model_len, quantization, owns_weights)
    started = time.perf_counter()
    built = executor.warm_up(head_rows=config.max_batch_size)
    logger.info("oneDNN kernels for %d row buckets built in %.2f s (none where every linear "
                "is in column blocks: float32, or int8 under float32)", built,
                time.perf_counter() - started)  # fmt: skip
    if executor.released:
        logger.info("released %.0f MiB of dense weights the executor does not read",
                    executor.released / 2**20)  # fmt: skip
    if quantization is not None and isinstance(quantization.layers, GGUFQuantizer):
        logger.warning("%s", quantization.layers.summary())
    return executor


def _native_problem(config: EngineConfig, model: Any) -> str | None:
    reason = llama_executor.unsupported_reason(model, torch.device(config.device))
    return reason or DECODER_KERNELS.unavailable_reason()


def _quantization(config: EngineConfig, model: Any) -> Quantization | None:
    if config.quantization is None:
        return None
    if config.quantization != "gguf":
        return Quantization.by_method(config.quantization)
    quantizer = GGUFQuantizer(_gguf_source(config), model)
    return Quantization(head=quantizer, layers=quantizer)


def _gguf_source(config: EngineConfig, fetch: bool = True) -> Path | None:
    """The GGUF file ``config.model`` was loaded from (the default model's own: fetched first
    if need be, else only if already cached), or None."""
    from baton_paged.model import builder as model_builder

    if config.model is None:
        return model_builder.default_model_gguf() if fetch else model_builder.cached_default_gguf()
    return gguf_file(checkpoint_path(config.model))


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config
