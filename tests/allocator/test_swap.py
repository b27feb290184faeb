"""Swap plans: coalesced copies, byte-exact round trips, and atomic reservation."""

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


def test_host_pool_is_pinned_only_with_cuda():
    assert HostSwapPool(SPEC, 2).pinned == torch.cuda.is_available()
    assert not HostSwapPool(SPEC, 2, pin_memory=False).pinned


def test_host_pool_from_budget():
    assert HostSwapPool.from_budget(SPEC, 5 * SPEC.bytes_per_page).num_pages == 5


@pytest.mark.gpu
def test_cuda_round_trip_through_pinned_memory():
    cache, host = KVCache(SPEC, 8, device="cuda"), HostSwapPool(SPEC, 8)
    assert host.pinned
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
