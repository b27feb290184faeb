"""The parts an engine is made of, built around a loaded model: what ``Engine`` wires together.

The KV cache is sized from ``kv_memory`` and the host swap pool from ``swap_memory`` (never more
pages than the device pool); the memory monitor reads page-pool occupancy plus, where asked,
device memory beyond what was in use at start. On CUDA, decode graphs are captured before the
runner is built, so the runner never changes after construction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from baton_paged.allocator import (
    HostSwapPool,
    KVCache,
    KVCacheSpec,
    num_pages_for_budget,
    pages_needed,
)
from baton_paged.attention import AttentionBackend
from baton_paged.config import EngineConfig
from baton_paged.host_memory import keep_freed_memory
from baton_paged.model.decode_graphs import DecodeGraphs, Forward, graph_mode
from baton_paged.model.loading import (
    choose_attention,
    choose_executor,
    eos_token_ids,
    sampling_defaults,
)
from baton_paged.model.runner import ModelRunner, model_forward
from baton_paged.processing.grammars import GrammarCompiler
from baton_paged.processing.input_processor import InputProcessor
from baton_paged.processing.output_processor import OutputProcessor
from baton_paged.sched.device_memory import MemoryReader, beyond_baseline, device_memory_reader
from baton_paged.sched.memory_monitor import MemoryMonitor
from baton_paged.sched.policies import make_policy
from baton_paged.sched.prefix_caching import PrefixCaching
from baton_paged.sched.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineParts:
    cache: KVCache
    host: HostSwapPool | None
    """Host pages for swapped-out K/V; None when swapping is off (preemption recomputes)."""
    monitor: MemoryMonitor
    prefix_caching: PrefixCaching | None
    scheduler: Scheduler
    runner: ModelRunner
    inputs: InputProcessor
    outputs: OutputProcessor
    model_impl: str
    """``"native"`` (the Llama-family executor) or ``"transformers"`` (the HF model)."""


def build_parts(
    config: EngineConfig,
    model: Any,
    tokenizer: Any,
    max_model_len: int,
    memory_reader: MemoryReader | None,
    owns_model: bool = False,
) -> EngineParts:
    """Every part around ``model``, whose attention is already attached. ``owns_model``: the
    engine loaded it, and nothing but the engine runs it."""
    page_size, backend = choose_attention(config, model)
    spec = KVCacheSpec.from_model_config(model.config, page_size, config.torch_dtype)
    if torch.device(config.device).type == "cpu":
        keep_freed_memory()  # large activations reuse freed heap memory (host_memory.py)
    mode = graph_mode(config, type(backend))
    scratch = 1 if mode else 0  # the page decode graphs' padding rows write to
    cache = KVCache.from_budget(spec, config.kv_memory, config.device, scratch)
    host = _host_pool(spec, config, cache) if config.swapping else None
    monitor = _monitor(config, cache, memory_reader)
    prefix_caching = _prefix_caching(config, cache, page_size)
    executor = choose_executor(config, model, max_model_len, owns_weights=owns_model)
    forward = model_forward(model, executor)
    graphs = _capture_graphs(forward, cache, backend, config, max_model_len, mode)
    generator = torch.Generator(config.device).manual_seed(config.seed)
    vocab_size = model.config.vocab_size  # the logits' width, which grammar masks cover
    return EngineParts(
        cache=cache,
        host=host,
        monitor=monitor,
        prefix_caching=prefix_caching,
        scheduler=_scheduler(config, cache, host, monitor, prefix_caching, max_model_len),
        runner=ModelRunner(forward, cache, backend, host, graphs),
        inputs=InputProcessor(
            tokenizer,
            eos_token_ids(model, tokenizer),
            max_model_len,
            page_size,
            cache.num_pages,
            config.device,
            config.max_logprobs,
            GrammarCompiler(tokenizer, vocab_size),
            sampling_defaults(model, config.generation_config),
        ),
        outputs=OutputProcessor(tokenizer, max_model_len, generator, vocab_size),
        model_impl="native" if executor is not None else "transformers",
    )


def _scheduler(
    config: EngineConfig,
    cache: KVCache,
    host: HostSwapPool | None,
    monitor: MemoryMonitor,
    prefix_caching: PrefixCaching | None,
    max_model_len: int,
) -> Scheduler:
    page_size = cache.spec.page_size
    return Scheduler(
        cache.pool,
        page_size,
        config.max_batch_size,
        pages_needed(max_model_len, page_size),
        make_policy(config.policy, config.max_prefill_tokens, config.max_num_batched_tokens),
        host_pool=host.pool if host else None,
        monitor=monitor,
        prefix_caching=prefix_caching,
    )


def _host_pool(spec: KVCacheSpec, config: EngineConfig, cache: KVCache) -> HostSwapPool:
    """Host pages for swapped-out K/V, never more than the device pool holds."""
    pages = num_pages_for_budget(spec, config.swap_memory, "cpu")
    pinned = cache.device.type == "cuda"  # async swap copies; a CPU cache needs none
    return HostSwapPool(spec, min(pages, cache.num_pages), pin_memory=pinned)


def _monitor(
    config: EngineConfig, cache: KVCache, memory_reader: MemoryReader | None
) -> MemoryMonitor:
    if memory_reader is None and config.watch_device_memory:
        memory_reader = beyond_baseline(device_memory_reader(config.device))
    watermarks = (config.memory_high_watermark, config.memory_low_watermark)
    return MemoryMonitor(cache.pool, *watermarks, memory_reader)


def _prefix_caching(config: EngineConfig, cache: KVCache, page_size: int) -> PrefixCaching | None:
    if not config.enable_prefix_caching:
        return None
    salt = f"{config.model}|{config.torch_dtype}".encode()  # what else shapes K/V
    return PrefixCaching(cache.pool, page_size, salt)


def _capture_graphs(
    forward: Forward,
    cache: KVCache,
    backend: AttentionBackend,
    config: EngineConfig,
    max_model_len: int,
    mode: str | None,
) -> DecodeGraphs | None:
    """Decode graphs for every batch bucket; a capture that fails leaves decode eager, with
    one warning naming the error (the engine still serves, only slower)."""
    if mode is None:
        return None
    try:
        return DecodeGraphs(forward, cache, backend, config.max_batch_size, max_model_len, mode)
    except RuntimeError as error:
        logger.warning("CUDA graph capture failed, decode runs eagerly: %s", error)
        return None
