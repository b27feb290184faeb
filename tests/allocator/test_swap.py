"""Swap plans: coalesced copies, byte-exact round trips, and atomic reservation."""

import gc
import types

import pytest
import torch

from baton_paged.allocator import (
    CopyRun,
    HostSwapPool,
    KVCache,
    KVCacheSpec,
    OutOfPagesError,
    SwapDirection,
    SwapPlan,
    coalesce_runs,
    execute_swap,
    plan_swap_in,
    plan_swap_out,
    release_source,
)

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4)


def fill(storage, pages):
    data = torch.randn(len(pages), *SPEC.page_shape)
    storage[pages] = data
    return data


def test_coalesce_merges_runs_consecutive_on_both_sides():
    assert coalesce_runs([4, 5, 2, 3], [2, 3, 0, 1]) == [CopyRun(2, 0, 4)]
    assert coalesce_runs([0, 1, 2], [5, 6, 9]) == [CopyRun(0, 5, 2), CopyRun(2, 9, 1)]
    assert coalesce_runs([], []) == []


def test_plan_pairs_pages_one_to_one():
    with pytest.raises(ValueError, match="one to one"):
        SwapPlan(SwapDirection.OUT, (1, 2), (3,))


def test_swap_out_and_in_round_trip_byte_exact():
    cache, host = KVCache(SPEC, 8), HostSwapPool(SPEC, 8)
    pages = cache.pool.allocate(5)
    cache.pool.free(pages[1:3])  # leave a hole so the request's pages are not one run
    pages = [pages[0], *pages[3:], *cache.pool.allocate(1)]
    data = fill(cache.storage, pages)

    out = plan_swap_out(pages, host.pool)
    execute_swap(out, cache, host)
    release_source(out, cache.pool, host.pool)
    assert cache.pool.num_used == 0 and host.pool.num_used == len(pages)
    cache.storage.fill_(float("nan"))  # the device copy is gone; only the host copy remains

    back = plan_swap_in(out.host_pages, cache.pool)
    execute_swap(back, cache, host)
    release_source(back, cache.pool, host.pool)
    assert host.pool.num_used == 0 and cache.pool.num_used == len(pages)
    assert torch.equal(cache.storage[list(back.device_pages)], data)
    cache.check_integrity()
    host.check_integrity()


def python_copy_pages(calls):
    """The ``copy_pages`` contract in plain torch, recording each call."""

    def copy(dst, src, dst_pages, src_pages):
        calls.append(len(dst_pages))
        dst[dst_pages] = src[src_pages]

    return copy


def kernel_copy_pages():
    from baton_paged.attention.cpu_extension import cpu_kernels

    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("the attention kernels cannot be built here")
    return kernels.copy_pages


@pytest.mark.parametrize("copier", ["python", "kernel"])
def test_scattered_pages_swap_in_one_call_byte_exact(copier):
    calls = []
    copy = python_copy_pages(calls) if copier == "python" else kernel_copy_pages()
    cache, host = KVCache(SPEC, 12), HostSwapPool(SPEC, 12)
    taken = cache.pool.allocate(12)
    cache.pool.free(taken[1::2])  # every other page: no two of a request's pages consecutive
    pages = taken[::2][::-1]
    data = fill(cache.storage, pages)
    host.pool.allocate(1)  # the host side starts one page in, unlike the device side
    out = plan_swap_out(pages, host.pool)
    execute_swap(out, cache, host, copy)
    assert torch.equal(host.storage[list(out.host_pages)], data)
    release_source(out, cache.pool, host.pool)
    cache.storage.fill_(float("nan"))
    back = plan_swap_in(out.host_pages, cache.pool)
    assert len(back.runs()) > 1
    execute_swap(back, cache, host, copy)
    assert torch.equal(cache.storage[list(back.device_pages)], data)
    assert calls in ([], [len(pages), len(pages)])  # one call per swap (kernel: not recorded)
    fresh, fresh_host = KVCache(SPEC, 4), HostSwapPool(SPEC, 4)
    one_run = plan_swap_out(fresh.pool.allocate(3), fresh_host.pool)
    execute_swap(one_run, fresh, fresh_host, copy)  # one run of pages: a plain copy_
    assert calls in ([], [len(pages), len(pages)])


def test_contiguous_pages_swap_in_one_copy():
    cache, host = KVCache(SPEC, 8), HostSwapPool(SPEC, 8)
    plan = plan_swap_out(cache.pool.allocate(6), host.pool)
    assert plan.runs() == [CopyRun(0, 0, 6)]


def test_reservation_without_room_changes_nothing():
    cache, host = KVCache(SPEC, 8), HostSwapPool(SPEC, 2)
    pages = cache.pool.allocate(3)
    with pytest.raises(OutOfPagesError, match="host swap pool: asked for 3 pages, 2 of 2"):
        plan_swap_out(pages, host.pool)
    assert host.pool.num_free == 2 and cache.pool.num_used == 3
    held = host.pool.allocate(2)
    cache.pool.allocate(5)
    with pytest.raises(OutOfPagesError, match="device page pool"):
        plan_swap_in(held, cache.pool)
    assert cache.pool.num_free == 0 and host.pool.num_used == 2


def test_geometry_mismatch_is_refused():
    other = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=4, page_size=8)
    cache, host = KVCache(SPEC, 4), HostSwapPool(other, 4)
    plan = plan_swap_out(cache.pool.allocate(1), host.pool)
    with pytest.raises(ValueError, match="differ in geometry"):
        execute_swap(plan, cache, host)


def test_host_pool_is_pageable_unless_asked(monkeypatch):
    """A CPU engine's pool never touches CUDA (no pinned RAM, no CUDA context)."""

    def no_cuda():
        raise AssertionError("a pageable pool must not call the CUDA runtime")

    monkeypatch.setattr(torch.cuda, "cudart", no_cuda)
    assert not HostSwapPool(SPEC, 2).pinned


def test_pinned_pool_is_registered_at_its_exact_size(monkeypatch):
    """cudaHostRegister on the pool's own memory: torch's pinned allocator would round a 9 GiB
    pool up to 16 GiB."""
    registered, unregistered = [], []
    fake = types.SimpleNamespace(
        cudaHostRegister=lambda ptr, size, flags: registered.append((ptr, size)) or 0,
        cudaHostUnregister=lambda ptr: unregistered.append(ptr) or 0,
    )
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    host = HostSwapPool(SPEC, 3, pin_memory=True)
    assert registered == [(host.storage.data_ptr(), 3 * SPEC.bytes_per_page)]
    pointer = host.storage.data_ptr()
    del host
    gc.collect()
    assert unregistered == [pointer]


def test_host_pool_from_budget():
    assert HostSwapPool.from_budget(SPEC, 5 * SPEC.bytes_per_page).num_pages == 5


@pytest.mark.gpu
def test_cuda_round_trip_through_pinned_memory():
    cache, host = KVCache(SPEC, 8, device="cuda"), HostSwapPool(SPEC, 8, pin_memory=True)
    assert host.pinned  # cudaHostRegister'ed memory counts as pinned
    pages = cache.pool.allocate(4)
    data = torch.randn(4, *SPEC.page_shape, device="cuda")
    cache.storage[pages] = data
    out = plan_swap_out(pages, host.pool)
    execute_swap(out, cache, host)
    release_source(out, cache.pool, host.pool)
    cache.storage.zero_()  # ordered after the copies on the same stream
    back = plan_swap_in(out.host_pages, cache.pool)
    execute_swap(back, cache, host)
    torch.cuda.synchronize()
    assert torch.equal(cache.storage[list(back.device_pages)], data)
