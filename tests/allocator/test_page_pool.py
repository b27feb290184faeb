"""PagePool: exact ids, reference counts, and errors that change nothing."""

import pytest

from baton_paged.allocator import IntegrityError, OutOfPagesError, PageOwnershipError, PagePool


def snapshot(pool: PagePool):
    return pool.num_free, [pool.ref_count(p) for p in range(pool.num_pages)]


def test_fresh_pool_hands_out_ascending_ids():
    pool = PagePool(8)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert (pool.num_free, pool.num_used, pool.usage) == (3, 5, 5 / 8)


def test_freed_pages_are_reused_first():
    pool = PagePool(8)
    pool.allocate(4)
    pool.free([1, 2])
    assert pool.allocate(2) == [1, 2]


def test_a_freed_run_comes_back_in_order():
    pool = PagePool(8)
    run = pool.allocate(5)
    pool.free(run)
    assert pool.allocate(5) == run


def test_allocate_zero_is_empty_and_changes_nothing():
    pool = PagePool(4)
    before = snapshot(pool)
    assert pool.allocate(0) == []
    assert snapshot(pool) == before


def test_exhaustion_raises_and_leaves_pool_unchanged():
    pool = PagePool(4)
    pool.allocate(3)
    before = snapshot(pool)
    with pytest.raises(OutOfPagesError) as err:
        pool.allocate(2)
    assert (err.value.requested, err.value.free, err.value.total) == (2, 1, 4)
    assert "asked for 2 pages, 1 of 4 are free" in str(err.value)
    assert snapshot(pool) == before
    pool.check_integrity()


def test_negative_allocation_is_a_value_error():
    with pytest.raises(ValueError, match="negative"):
        PagePool(4).allocate(-1)


def test_pool_needs_a_page():
    with pytest.raises(ValueError, match="at least one page"):
        PagePool(0)


def test_fork_counts_owners_and_last_free_releases():
    pool = PagePool(4)
    pages = pool.allocate(2)
    shared = pool.fork(pages)
    assert shared == pages and shared is not pages
    assert [pool.ref_count(p) for p in pages] == [2, 2]
    pool.free(pages)
    assert pool.num_free == 2 and [pool.ref_count(p) for p in pages] == [1, 1]
    pool.free(shared)
    assert pool.num_free == 4
    pool.check_integrity()


def test_double_free_raises_and_changes_nothing():
    pool = PagePool(4)
    pages = pool.allocate(2)
    pool.free(pages[:1])
    before = snapshot(pool)
    with pytest.raises(PageOwnershipError, match="already free"):
        pool.free(pages)
    assert snapshot(pool) == before


def test_repeated_page_beyond_its_owners_raises_and_changes_nothing():
    pool = PagePool(4)
    page = pool.allocate(1)[0]
    before = snapshot(pool)
    with pytest.raises(PageOwnershipError, match="freed 2 times but has only 1 owners"):
        pool.free([page, page])
    assert snapshot(pool) == before
    pool.fork([page])
    pool.free([page, page])
    assert pool.num_free == 4


@pytest.mark.parametrize("page", [-1, 4, 100])
def test_foreign_page_raises_and_changes_nothing(page):
    pool = PagePool(4)
    mine = pool.allocate(2)
    before = snapshot(pool)
    with pytest.raises(PageOwnershipError, match="does not belong"):
        pool.free([*mine, page])
    with pytest.raises(PageOwnershipError, match="does not belong"):
        pool.fork([page])
    assert snapshot(pool) == before


def test_fork_of_free_page_raises_and_changes_nothing():
    pool = PagePool(4)
    mine = pool.allocate(1)
    before = snapshot(pool)
    with pytest.raises(PageOwnershipError, match="it is free"):
        pool.fork([*mine, 3])
    assert snapshot(pool) == before


def test_check_integrity_detects_corruption():
    pool = PagePool(4)
    pool.allocate(2)
    pool._ref_counts[3] = 1  # owned, yet still on the free list
    with pytest.raises(IntegrityError, match="page 3"):
        pool.check_integrity()
    pool = PagePool(4)
    pool._free.append(0)
    with pytest.raises(IntegrityError, match="twice"):
        pool.check_integrity()
