"""Prefix caching in the scheduler: a joining request starts from its longest cached prefix, and
each full page a forward completes is indexed for the requests after it.

A request that joins (fresh, or back to recompute after a preemption) looks up the keys of its
full pages (``allocator/page_hash.py``) among the pool's cached pages and takes the longest
prefix as the first pages of its block table: BATON's insertion with nothing to copy, and its
prefill starts after them on the path that already serves prefill over earlier context. The last
token is always computed, so the first sampled token has its logits. Pages that forwards fill
are indexed as they complete; they stay cached after their requests end until the pool needs
them (``allocator/prefix_index.py``).

Requests with the same prefix admitted in one iteration would each compute it; so a request whose
next uncached page is one a running request is still computing waits for that prefill to finish
(one iteration, usually) and then takes the pages instead (``waits``): the first of sixteen
conversations with one system prompt computes it, the other fifteen share it, and the ``n``
samples of one prompt share theirs.

Requests asking for prompt log-probabilities look nothing up: those need every prompt
position's logits. A swapped-in request keeps its own copied pages (they are not re-indexed: the
pages it was copied from may well still be cached).
"""

from __future__ import annotations

from dataclasses import dataclass

from baton_paged.allocator import PagePool
from baton_paged.allocator.page_hash import page_hashes
from baton_paged.request import Request


@dataclass
class PrefixCacheStats:
    queries: int = 0
    """Prompt tokens looked up (vLLM's prefix-cache queries)."""
    hits: int = 0
    """Tokens whose K/V came from cached pages."""


class PrefixCaching:
    def __init__(self, pool: PagePool, page_size: int, salt: bytes):
        self.pool, self.page_size, self.salt = pool, page_size, salt
        self.stats = PrefixCacheStats()

    @property
    def evictions(self) -> int:
        """Cached pages evicted so far to make room for allocations: read here, so callers
        need not know that the pool's prefix index keeps the count."""
        return self.pool.prefix.evictions

    def take(self, request: Request) -> list[int]:
        """The pages of the longest cached prefix of ``request``'s tokens but its last, each
        with one more owner (the request's), and its computed-token count set past them."""
        if request.params.prompt_logprobs is not None:
            return []
        pages = self.pool.take_cached(self._keys(request, request.num_tokens - 1))
        request.num_computed_tokens = len(pages) * self.page_size
        self.stats.queries += request.num_tokens
        self.stats.hits += request.num_computed_tokens
        return pages

    def waits(self, request: Request, running: list[Request]) -> bool:
        """Whether ``request`` should join after a running request's prefill fills the next
        page of its prefix rather than compute that page itself."""
        if request.params.prompt_logprobs is not None:
            return False
        keys = self._keys(request, request.num_tokens - 1)
        cached = len(self.pool.prefix.match(keys))
        if cached == len(keys):
            return False
        return any(keys[cached] in _being_computed(r, self.page_size) for r in running)

    def index(self, request: Request, pages: list[int], start: int, end: int) -> None:
        """Index the pages a forward filled computing positions ``[start, end)``."""
        first, last = start // self.page_size, end // self.page_size
        if last <= first:
            return
        keys = self._keys(request, last * self.page_size)
        for page, key in zip(pages[first:last], keys[first:last], strict=True):
            self.pool.cache_page(page, key)

    def _keys(self, request: Request, num_tokens: int) -> list[bytes]:
        """Keys of the full pages among ``request``'s first ``num_tokens`` tokens, extending the
        ones it already has (a request's tokens never change, only grow)."""
        keys = request.page_keys
        done = len(keys) * self.page_size
        if num_tokens - done >= self.page_size:
            new_tokens = request.token_ids(done, num_tokens)
            keys += page_hashes(new_tokens, self.page_size, self.salt, keys[-1] if keys else None)
        return keys[: num_tokens // self.page_size]


def _being_computed(request: Request, page_size: int) -> list[bytes]:
    """Keys of the full pages a running request's pending prefill will fill."""
    return request.page_keys[request.num_computed_tokens // page_size :]
