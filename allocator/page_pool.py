"""PagePool: the bookkeeping of fixed-size KV pages, a free list plus reference counts.

The pool knows nothing about tensors: a page is an integer id in ``[0, num_pages)`` and the
storage that backs it (``KVCache`` on the device, ``HostSwapPool`` on the host) is indexed by the
same id. A page is either free (reference count 0, on the free list exactly once) or owned
(count >= 1, not on the free list). Sharing a common prefix (``fork``) adds an owner instead of
copying, so a page returns to the free list only when its last owner frees it.

Prefix caching (``prefix_index.py``): a computed full page can be indexed under its key
(``cache_page``); when its last owner frees it, it stays cached, still counted as free, until an
allocation finds the free list empty and evicts the least recently freed one. ``take_cached``
gives a new owner the pages of the longest cached prefix, from either state.

Every method validates its whole argument before it mutates anything, so an error (out of pages,
double free, a foreign id) leaves the pool exactly as it was.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from baton_paged.allocator.errors import IntegrityError, OutOfPagesError, PageOwnershipError
from baton_paged.allocator.prefix_index import PrefixIndex


class PagePool:
    """Free list and reference counts for ``num_pages`` pages."""

    def __init__(self, num_pages: int, name: str = "page pool"):
        if num_pages < 1:
            raise ValueError(f"{name} needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.name = name
        self._ref_counts = [0] * num_pages
        # A stack whose top holds the lowest ids: a fresh pool hands out 0, 1, 2, ... in order,
        # so early allocations are contiguous, and a freed page is the next one reused (LIFO).
        self._free = list(range(num_pages - 1, -1, -1))
        self.prefix = PrefixIndex()

    @property
    def num_free(self) -> int:
        """Pages an allocation can take: free ones and cached ones nobody owns."""
        return len(self._free) + len(self.prefix.evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Indexed pages, owned or not."""
        return len(self.prefix.key_of)

    @property
    def usage(self) -> float:
        """Fraction of pages owned, in [0, 1]."""
        return self.num_used / self.num_pages

    def ref_count(self, page: int) -> int:
        self._check_in_range(page)
        return self._ref_counts[page]

    def allocate(self, n: int) -> list[int]:
        """Return ``n`` pages with one owner each, or raise ``OutOfPagesError`` changing nothing."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > self.num_free:
            raise OutOfPagesError(n, self.num_free, self.num_pages, self.name)
        if n == 0:
            return []
        fresh = min(n, len(self._free))
        pages = self._free[len(self._free) - fresh :]
        del self._free[len(self._free) - fresh :]
        pages.reverse()
        pages += [self.prefix.evict_oldest() for _ in range(n - fresh)]
        for page in pages:
            self._ref_counts[page] = 1
        return pages

    def fork(self, pages: Sequence[int]) -> list[int]:
        """Add one owner to each of ``pages`` (all must be owned) and return them as a new list."""
        for page in pages:
            self._check_in_range(page)
            if self._ref_counts[page] == 0:
                raise PageOwnershipError(f"{self.name}: cannot share page {page}: it is free")
        for page in pages:
            self._ref_counts[page] += 1
        return list(pages)

    def free(self, pages: Sequence[int]) -> None:
        """Drop one owner from each of ``pages``; a page whose last owner leaves becomes free."""
        self._check_releasable(pages)
        # Pushed last page first, so the next allocate returns a freed run in its original
        # order: contiguous pages stay contiguous and swap as one copy.
        for page in reversed(pages):
            self._ref_counts[page] -= 1
            if self._ref_counts[page] == 0:
                if page in self.prefix.key_of:
                    self.prefix.evictable[page] = None
                else:
                    self._free.append(page)

    def cache_page(self, page: int, key: bytes) -> bool:
        """Index an owned page of computed K/V under ``key``; False if either is indexed."""
        self._check_in_range(page)
        if self._ref_counts[page] == 0:
            raise PageOwnershipError(f"{self.name}: cannot cache page {page}: it is free")
        return self.prefix.add(page, key)

    def take_cached(self, keys: list[bytes]) -> list[int]:
        """One more owner for each page of the longest cached prefix of ``keys``; its pages."""
        pages = self.prefix.match(keys)
        for page in pages:
            self.prefix.evictable.pop(page, None)
            self._ref_counts[page] += 1
        return pages

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: pages nobody owns go back to the free list."""
        self._free.extend(reversed(self.prefix.clear_evictable()))
        self.prefix.page_of.clear()
        self.prefix.key_of.clear()

    def check_integrity(self) -> None:
        """Raise ``IntegrityError`` unless free list and reference counts agree exactly."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise IntegrityError(f"{self.name}: a page is on the free list twice")
        for page, count in enumerate(self._ref_counts):
            if count < 0:
                raise IntegrityError(f"{self.name}: page {page} has reference count {count}")
            unowned = page in free or page in self.prefix.evictable
            if (count == 0) != unowned:
                state = "free" if unowned else "not free"
                raise IntegrityError(f"{self.name}: page {page} has count {count} but is {state}")
        self.prefix.check(self._ref_counts, free)

    def _check_in_range(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise PageOwnershipError(
                f"{self.name}: page {page} does not belong to this pool of {self.num_pages} pages"
            )

    def _check_releasable(self, pages: Sequence[int]) -> None:
        """Every page must be in range and owned at least as often as it appears in ``pages``."""
        for page in pages:
            self._check_in_range(page)
            if self._ref_counts[page] == 0:
                raise PageOwnershipError(f"{self.name}: page {page} is already free (double free)")
        if len(set(pages)) != len(pages):
            for page, times in Counter(pages).items():
                if times > self._ref_counts[page]:
                    raise PageOwnershipError(
                        f"{self.name}: page {page} freed {times} times "
                        f"but has only {self._ref_counts[page]} owners"
                    )
