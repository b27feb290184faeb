"""``cpu_paged``'s bfloat16 K pages hold each head's keys in pairs of dims
(``attention/csrc/key_pairs.h``); float32 keys and all values stay token by token."""

from __future__ import annotations

import pytest
import torch
from paged_batch import make_batch, naive_attention

from baton_paged.allocator import KVCache, KVCacheSpec
from baton_paged.attention import AttentionRequirements, create_backend
from baton_paged.attention.cpu_extension import cpu_kernels
from baton_paged.attention.cpu_paged_backend import CpuPagedBackend

PAGE, HEADS, DIM = 16, 3, 8

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="no CPU attention kernels here")


def written(dtype: torch.dtype, slots: list[int]) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """A two-page cache with distinct keys and values written at `slots` by ``cpu_paged``."""
    cache = KVCache(KVCacheSpec(1, HEADS, DIM, PAGE, dtype), 2)
    cache.storage.zero_()
    shape = (len(slots), HEADS, DIM)
    key = torch.arange(1, 1 + shape[0] * HEADS * DIM, dtype=dtype).view(shape)
    value = -key
    backend = create_backend("cpu_paged", requirements(dtype, DIM))
    backend.write_slots(cache, 0, torch.tensor(slots), key, value)
    return cache, key, value


def requirements(dtype: torch.dtype, head_dim: int) -> AttentionRequirements:
    return AttentionRequirements(torch.device("cpu"), dtype, PAGE, head_dim, 3 * HEADS, HEADS)


def test_bfloat16_keys_lie_in_pairs_of_dims_per_head_and_values_token_by_token():
    slots = [0, 5, PAGE + 15]
    cache, key, value = written(torch.bfloat16, slots)
    for t, slot in enumerate(slots):
        page, position = divmod(slot, PAGE)
        block = cache.key(0)[page].flatten()  # the page's [slot, head, dim] block, in pairs
        for head in range(HEADS):
            for d in range(DIM):
                offset = head * PAGE * DIM + (d // 2) * 2 * PAGE + 2 * position + d % 2
                assert block[offset] == key[t, head, d], (slot, head, d)
        assert torch.equal(cache.value(0)[page, position], value[t])
    assert int((cache.key(0) != 0).sum()) == key.numel()  # nothing else touched


def test_float32_keys_stay_token_by_token():
    slots = [3, PAGE + 1]
    cache, key, _ = written(torch.float32, slots)
    for t, slot in enumerate(slots):
        assert torch.equal(cache.key(0)[slot // PAGE, slot % PAGE], key[t])


def test_pages_copied_whole_keep_their_keys_readable():
    """Swap and prefix sharing move whole pages: a batch's pages copied to other pages (its block
    table renumbered) attend the same."""
    req = AttentionRequirements(torch.device("cpu"), torch.bfloat16, PAGE, 64, 9, 3)
    backend = create_backend("cpu_paged", req)
    batch = make_batch(
        [1, 7], [70, 40], num_heads=9, num_kv_heads=3, head_dim=64, page_size=PAGE,
        dtype=torch.bfloat16, seed=3, backend=backend,
    )  # fmt: skip
    before = backend.forward(batch.query, batch.key, batch.value, batch.cache, 0, batch.meta, 0.125)
    pages = batch.cache.storage.shape[0]
    moved = torch.roll(torch.arange(pages), 1)  # page p now lives at p + 1 (mod pages)
    batch.cache.storage.copy_(batch.cache.storage[torch.argsort(moved)])
    batch.meta.block_table.copy_(moved[batch.meta.block_table.long()].int())
    after = backend.attend(batch.query, batch.cache.key(0), batch.cache.value(0), batch.meta, 0.125)
    assert torch.equal(after, before)
    torch.testing.assert_close(after.double(), naive_attention(batch, 0.125), atol=3e-2, rtol=3e-2)


def test_bfloat16_key_pages_must_lie_contiguous_with_even_heads():
    kernels = cpu_kernels()
    key = torch.zeros(1, HEADS, DIM, dtype=torch.bfloat16)
    scattered = torch.zeros(2, HEADS, PAGE, DIM, dtype=torch.bfloat16).transpose(1, 2)
    with pytest.raises(RuntimeError, match="must each lie contiguous"):
        kernels.write_kv(scattered, scattered.clone(), torch.tensor([0]), key, key)
    odd = torch.zeros(2, PAGE, HEADS, 7, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="even head size"):
        kernels.write_kv(odd, odd.clone(), torch.tensor([0]), key[..., :7], key[..., :7])
    assert "odd" in CpuPagedBackend.unsupported_reason(requirements(torch.bfloat16, 7))
    assert CpuPagedBackend.unsupported_reason(requirements(torch.float32, 7)) is None
