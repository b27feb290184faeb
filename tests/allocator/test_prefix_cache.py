"""Prefix caching in the page pool: chained page keys, cached pages that stay until evicted
least recently freed first, never a page anyone owns; plus a state machine that plays random
allocate / cache / free / take / reset sequences against a model of owners and keys."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from baton_paged.allocator import PageOwnershipError, PagePool
from baton_paged.allocator.page_hash import page_hashes


def test_keys_chain_over_every_token_before_the_page():
    a = page_hashes([1, 2, 3, 4, 5, 6, 7], page_size=2)
    b = page_hashes([1, 2, 3, 4, 9, 9], page_size=2)
    c = page_hashes([0, 2, 3, 4], page_size=2)
    assert len(a) == 3 and len(b) == 3  # a trailing partial page has no key
    assert a[:2] == b[:2] and a[2] != b[2]
    assert c[1] != a[1]  # the same second page after a different first one
    assert page_hashes([1, 2], 2, salt=b"float32") != page_hashes([1, 2], 2, salt=b"bfloat16")
    assert page_hashes([3, 4], 2, start_key=a[0]) == a[1:2]


def test_a_freed_cached_page_stays_until_the_pool_needs_it():
    pool = PagePool(4)
    first, second = pool.allocate(2)
    keys = page_hashes(range(8), 4)
    assert pool.cache_page(first, keys[0]) and pool.cache_page(second, keys[1])
    pool.free([first, second])
    assert pool.num_free == 4 and pool.num_cached == 2  # cached pages count as free
    assert pool.allocate(2) == [2, 3]  # fresh pages first
    assert pool.take_cached(keys) == [first, second]
    pool.check_integrity()
    pool.free([first, second])
    pool.free([2, 3])
    # then the least recently freed cached page: a run is freed last page first, so a prefix
    # loses its tail before its head and the head still matches
    assert pool.allocate(3) == [2, 3, second]
    assert pool.prefix.evictions == 1 and pool.take_cached(keys) == [first]
    pool.check_integrity()


def test_taking_an_owned_prefix_adds_an_owner():
    pool = PagePool(2)
    (page,) = pool.allocate(1)
    key = page_hashes([5, 6], 2)[0]
    pool.cache_page(page, key)
    assert pool.take_cached([key]) == [page] and pool.ref_count(page) == 2
    pool.free([page])
    assert pool.num_free == 1  # still owned once
    pool.free([page])
    assert pool.num_free == 2 and pool.num_cached == 1


def test_a_key_or_page_is_indexed_once_and_only_while_owned():
    pool = PagePool(3)
    a, b = pool.allocate(2)
    key = page_hashes([1], 1)[0]
    assert pool.cache_page(a, key) and not pool.cache_page(b, key)  # the first page stays
    assert not pool.cache_page(a, page_hashes([2], 1)[0])
    with pytest.raises(PageOwnershipError, match="it is free"):
        pool.cache_page(2, key)


def test_reset_forgets_every_prefix():
    pool = PagePool(3)
    pages = pool.allocate(2)
    keys = page_hashes([1, 2], 1)
    for page, key in zip(pages, keys, strict=True):
        pool.cache_page(page, key)
    pool.free(pages[:1])
    pool.reset_prefix_cache()
    assert pool.num_cached == 0 and pool.take_cached(keys) == [] and pool.num_free == 2
    pool.free(pages[1:])
    assert pool.num_free == 3
    pool.check_integrity()


class CachingPool(RuleBasedStateMachine):
    """Owners and keys modelled beside the pool; the pool must agree after every rule."""

    def __init__(self):
        super().__init__()
        self.pool = PagePool(8)
        self.owners: dict[int, int] = {}  # page -> owners the model expects
        self.key_of: dict[int, bytes] = {}  # page -> key (pages the model knows are indexed)
        self.next_key = 0

    @rule(n=st.integers(0, 4))
    def allocate(self, n):
        if n > self.pool.num_free:
            return
        pages = self.pool.allocate(n)
        for page in pages:
            assert page not in self.owners, "an owned page was handed out again"
            self.key_of.pop(page, None)  # evicted, if it was cached
            self.owners[page] = 1

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def cache(self, data):
        page = data.draw(st.sampled_from(sorted(self.owners)))
        key = self.next_key.to_bytes(16, "big")
        self.next_key += 1
        if self.pool.cache_page(page, key):
            self.key_of[page] = key
        else:
            assert page in self.key_of

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free(self, data):
        page = data.draw(st.sampled_from(sorted(self.owners)))
        self.pool.free([page])
        self.owners[page] -= 1
        if not self.owners[page]:
            del self.owners[page]

    @precondition(lambda self: self.key_of)
    @rule(data=st.data())
    def take(self, data):
        page = data.draw(st.sampled_from(sorted(self.key_of)))
        assert self.pool.take_cached([self.key_of[page]]) == [page]
        self.owners[page] = self.owners.get(page, 0) + 1

    @rule()
    def reset(self):
        self.pool.reset_prefix_cache()
        self.key_of.clear()

    @invariant()
    def agrees(self):
        self.pool.check_integrity()
        for page, owners in self.owners.items():
            assert self.pool.ref_count(page) == owners
        assert self.pool.num_used == len(self.owners)
        assert self.pool.prefix.key_of == self.key_of


TestCachingPool = CachingPool.TestCase
TestCachingPool.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
