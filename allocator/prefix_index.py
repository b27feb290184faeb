"""PrefixIndex: which pages hold which prefix, and which cached pages may be evicted.

The pool keeps computed pages whose last owner left instead of wiping them: they stay indexed by
their key (``page_hash.py``) and sit in least-recently-freed order until an allocation needs a
page and finds the free list empty. A page is in one of three states:

- owned: reference count >= 1 (indexed or not);
- cached: count 0, indexed, in ``evictable`` (counted as free: any allocation may take it);
- free: count 0, not indexed, on the pool's free list.

Only a page with no owner is ever evicted, so no request reads a page that changes under it. The
pool frees a run of pages last page first, so a freed prefix loses its tail before its head: what
is left of it still matches from the start.
"""

from __future__ import annotations

from collections import OrderedDict

from baton_paged.allocator.errors import IntegrityError


class PrefixIndex:
    def __init__(self) -> None:
        self.page_of: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()
        """Cached pages with no owner, least recently freed first."""
        self.evictions = 0

    def match(self, keys: list[bytes]) -> list[int]:
        """Pages of the longest indexed prefix of ``keys`` (in order)."""
        pages = []
        for key in keys:
            page = self.page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def add(self, page: int, key: bytes) -> bool:
        """Index an owned page under ``key``; False (nothing changes) if the key or the page is
        already indexed: the first page computed for a prefix stays its page."""
        if key in self.page_of or page in self.key_of:
            return False
        self.page_of[key] = page
        self.key_of[page] = key
        return True

    def evict_oldest(self) -> int:
        page, _ = self.evictable.popitem(last=False)
        del self.page_of[self.key_of.pop(page)]
        self.evictions += 1
        return page

    def clear_evictable(self) -> list[int]:
        """Unindex every cached page with no owner; return them (for the free list)."""
        pages = list(self.evictable)
        for page in pages:
            del self.page_of[self.key_of.pop(page)]
        self.evictable.clear()
        return pages

    def check(self, ref_counts: list[int], free: set[int]) -> None:
        if {p: k for k, p in self.page_of.items()} != self.key_of:
            raise IntegrityError("prefix index: keys and pages do not map one to one")
        for page in self.evictable:
            if page not in self.key_of or ref_counts[page] != 0 or page in free:
                raise IntegrityError(f"prefix index: evictable page {page} is not cached")
        for page in self.key_of:
            if ref_counts[page] == 0 and page not in self.evictable:
                raise IntegrityError(f"prefix index: page {page} has no owner but is not evictable")
            if page in free:
                raise IntegrityError(f"prefix index: indexed page {page} is on the free list")
