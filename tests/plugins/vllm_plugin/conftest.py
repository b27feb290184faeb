"""A vLLM v1 scheduler built by hand, without a model: vLLM's own scheduler-test set-up, rebuilt.

vLLM's wheel does not ship its tests, so the set-up of its ``tests/v1/core`` is rebuilt here: a
``VllmConfig`` and a one-group ``KVCacheConfig`` made by hand (block size 16, a pool of a few
blocks, no prefix caching unless asked). vLLM is imported inside the fixture, so this file loads
in the main environment too, where the tests that use it are skipped.
"""

from __future__ import annotations

import pytest

BLOCK = 16


@pytest.fixture
def make_scheduler(tiny_model_dir):
    """``make_scheduler(usable_blocks, max_num_seqs, baton=..., policy=..., token_budget=...,
    cls=BatonScheduler, prefix_caching=False, **scheduler_options)``; a token budget below 512
    turns chunked prefill on; ``scheduler_options`` are further ``SchedulerConfig`` fields."""
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from baton_paged.plugins.vllm_scheduler import BatonScheduler

    def make(
        usable_blocks,
        max_num_seqs=8,
        baton=None,
        policy="priority",
        token_budget=512,
        cls=BatonScheduler,
        prefix_caching=False,
        **scheduler_options,
    ):
        model = ModelConfig(
            model=str(tiny_model_dir("llama")),
            dtype="float32",
            max_model_len=256,
            seed=0,
            skip_tokenizer_init=True,
        )
        scheduler = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=token_budget,
            max_model_len=256,
            is_encoder_decoder=False,
            policy=policy,
            enable_chunked_prefill=token_budget < 512,
            **scheduler_options,
        )
        cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching)
        extra = {} if baton is None else {"baton": baton}
        config = VllmConfig(
            model_config=model,
            scheduler_config=scheduler,
            cache_config=cache,
            additional_config=extra,
        )
        num_blocks = usable_blocks + 1  # block 0 is vLLM's null block
        cache.num_gpu_blocks = num_blocks
        spec = FullAttentionSpec(
            block_size=BLOCK, num_kv_heads=1, head_size=16, dtype=torch.float32
        )
        kv_cache = KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)],
        )
        return cls(
            vllm_config=config,
            kv_cache_config=kv_cache,
            structured_output_manager=StructuredOutputManager(config),
            block_size=BLOCK,
        )

    return make
