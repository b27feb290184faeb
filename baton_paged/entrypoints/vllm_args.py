"""vLLM's engine-argument names, translated to ``EngineConfig`` fields.

A script written for vLLM builds ``LLM(model, max_num_seqs=16, gpu_memory_utilization=0.5,
enforce_eager=True, seed=0)``. Each vLLM argument that means something here becomes the
matching ``EngineConfig`` field; one that asks for what this engine does not do (tensor
parallelism, remote code, prefix caching for now) is a ValueError naming it, never ignored.
Arguments that are ours already pass through unchanged; anything else is a ValueError that
lists what is accepted.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any

import torch

from baton_paged.config import EngineConfig

logger = logging.getLogger(__name__)

RENAMED = {"max_num_seqs": "max_batch_size", "block_size": "page_size"}
DTYPE_ALIASES = {"half": "float16", "float": "float32", "double": "float64"}
ANY = object()
NEUTRAL = {
    "tensor_parallel_size": 1,
    "pipeline_parallel_size": 1,
    "trust_remote_code": False,
    "disable_log_stats": ANY,
}
"""Accepted at these values, or None (``ANY``: any value; logging only); other values are
refused. (``quantization`` is an ``EngineConfig`` field of the same name: int8, int4 or gguf,
anything else refused.)"""


def engine_options(options: dict[str, Any]) -> dict[str, Any]:
    """``EngineConfig`` keyword arguments for ``options`` given in vLLM's or our names."""
    ours = {f.name for f in fields(EngineConfig)}
    translated: dict[str, Any] = {}
    for name, value in options.items():
        if name in NEUTRAL:
            _check_neutral(name, value)
        elif name == "gpu_memory_utilization":
            _kv_fraction(value, options, translated)
        elif name == "swap_space":
            translated["swap_memory"] = f"{value}GiB"  # vLLM's unit: GiB of CPU memory
        elif name == "dtype":
            translated["dtype"] = _dtype(value)
        elif name in RENAMED:
            translated[RENAMED[name]] = value
        elif name in ours:
            translated[name] = value
        else:
            accepted = sorted(ours | set(RENAMED) | set(NEUTRAL) | {"gpu_memory_utilization"})
            raise ValueError(f"unknown engine argument {name!r}; accepted: {', '.join(accepted)}")
    return translated


def _check_neutral(name: str, value: Any) -> None:
    expected = NEUTRAL[name]
    if expected is not ANY and value is not None and value != expected:
        raise ValueError(f"{name}={value!r} is not supported (only {expected!r})")


def _kv_fraction(value: float, options: dict[str, Any], translated: dict[str, Any]) -> None:
    """vLLM's share of GPU memory becomes the KV cache's share of free device memory. The CPU
    build of vLLM ignores it too (its KV space is VLLM_CPU_KVCACHE_SPACE): on the CPU it does
    not override ``kv_memory``, and says so."""
    if not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {value!r}")
    if torch.device(options.get("device", "cpu")).type == "cpu":
        logger.info("gpu_memory_utilization applies to GPU memory; on the CPU kv_memory sizes KV")
        return
    translated["kv_memory"] = str(value)


def _dtype(value: Any) -> str:
    """vLLM's names: ``auto`` is ours too (bfloat16 on CUDA, float32 on the CPU); torch dtypes
    and vLLM's aliases (half, float) name theirs."""
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    return DTYPE_ALIASES.get(value, value)
