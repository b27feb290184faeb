"""KVCache: geometry from HF configs, page-major views, writes through the slot mapping."""

import numpy as np
import pytest
import torch

from baton_paged.allocator import KVCache, KVCacheSpec, slot_mapping
from baton_paged.model.builder import model_config

SPEC = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=4, page_size=4)


@pytest.mark.parametrize(
    ("arch", "layers", "kv_heads", "head_dim"),
    [("llama", 8, 4, 64), ("qwen2", 8, 4, 64), ("gpt2", 8, 8, 64)],
)
def test_spec_from_model_config(arch, layers, kv_heads, head_dim):
    spec = KVCacheSpec.from_model_config(model_config(arch, "small", 0), page_size=16)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (layers, kv_heads, head_dim)


def test_small_model_page_is_256_kib_in_float32():
    spec = KVCacheSpec.from_model_config(model_config("llama", "small", 0))
    assert spec.bytes_per_page == 8 * 2 * 16 * 4 * 64 * 4 == 256 * 1024


@pytest.mark.parametrize("bad", [{"num_layers": 0}, {"page_size": -1}, {"dtype": torch.int32}])
def test_spec_validation(bad):
    fields = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1, **bad}
    with pytest.raises(ValueError, match="KVCacheSpec"):
        KVCacheSpec(**fields)


def test_layer_views_alias_one_page_major_buffer():
    cache = KVCache(SPEC, num_pages=5)
    assert cache.storage.shape == (5, 3, 2, 4, 2, 4)
    key = cache.key(1)
    assert key.shape == (5, 4, 2, 4) and key.stride(-1) == 1
    key[2, 3] = 7.0
    assert torch.all(cache.storage[2, 1, 0, 3] == 7.0)
    assert not cache.storage[:, :, 1].any()  # values untouched
    assert cache.nbytes == 5 * SPEC.bytes_per_page


def read_back(cache: KVCache, layer: int, pages: list[int], num_tokens: int):
    """The first ``num_tokens`` K and V stored in ``pages``, in position order."""
    index = torch.tensor(pages, device=cache.device)
    keys = cache.key(layer)[index].flatten(0, 1)[:num_tokens]
    return keys, cache.value(layer)[index].flatten(0, 1)[:num_tokens]


def slots_of(pages: list[int], num_tokens: int) -> torch.Tensor:
    return torch.from_numpy(slot_mapping(np.array([pages]), [0], [num_tokens], SPEC.page_size))


def test_write_then_read_back_round_trips_across_pages():
    cache = KVCache(SPEC, num_pages=6)
    pages = [4, 1, 3]
    keys = torch.randn(10, 2, 4)
    values = torch.randn(10, 2, 4)
    cache.write(2, slots_of(pages, 10), keys, values)
    got_k, got_v = read_back(cache, 2, pages, 10)
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    # page 4 holds positions 0-3 in order, and no other layer was touched
    assert torch.equal(cache.key(2)[4], keys[:4])
    assert not cache.key(0).any() and not cache.value(1).any()


def test_from_budget_rounds_down_to_whole_pages():
    budget = 3 * SPEC.bytes_per_page + SPEC.bytes_per_page // 2
    assert KVCache.from_budget(SPEC, budget).num_pages == 3
    assert KVCache.from_budget(SPEC, f"{budget}B").num_pages == 3


@pytest.mark.gpu
def test_cuda_cache_write_and_read_back():
    cache = KVCache(SPEC, num_pages=4, device="cuda")
    keys = torch.randn(5, 2, 4, device="cuda")
    cache.write(0, slots_of([2, 0], 5).cuda(), keys, keys * 2)
    got_k, got_v = read_back(cache, 0, [2, 0], 5)
    assert torch.equal(got_k, keys) and torch.equal(got_v, keys * 2)
