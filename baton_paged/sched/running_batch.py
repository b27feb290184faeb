"""RunningBatch: the running requests as rows of one ``BlockTable``, and the host pages of the
swapped-out ones; the one owner of that state and of every move on it.

A row enters only through ``join`` (BATON's insertion: page ids, no K/V copy), leaves only through
``leave`` (the last row moves into the hole) and grows only through ``grow``: state kept per row
beside the table follows those three. A preempted request is swapped out (its computed K/V copied
to the host swap pool) when that pool has room, else its pages are freed and it recomputes later.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from types import MappingProxyType

import numpy as np

from baton_paged.allocator import BlockTable, OutOfPagesError, PagePool, SwapPlan, pages_needed
from baton_paged.allocator.swap import plan_swap_in, plan_swap_out, release_source
from baton_paged.request import Request, RequestStatus
from baton_paged.sched import victims


class RunningBatch:
    def __init__(
        self,
        pool: PagePool,
        page_size: int,
        max_rows: int,
        max_pages: int,
        host_pool: PagePool | None = None,
    ):
        self.pool, self.page_size, self.host_pool = pool, page_size, host_pool
        self._table = BlockTable(max_rows, max_pages)
        self._requests: dict[str, Request] = {}
        """Rows of ``_table`` by request id, in admission order (the oldest first)."""
        self._swapped: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __getitem__(self, request_id: str) -> Request:
        return self._requests[request_id]

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    @property
    def requests(self) -> list[Request]:
        """Running requests in admission order (the oldest first)."""
        return list(self._requests.values())

    @property
    def swapped(self) -> Mapping[str, list[int]]:
        """Host pages of swapped-out requests (waiting with status SWAPPED), by request id;
        read-only, as only ``preempt``, ``swap_in`` and ``discard`` keep it true."""
        return MappingProxyType(self._swapped)

    def pages(self, request_id: str) -> list[int]:
        return self._table.pages(request_id)

    def num_pages(self, request_id: str) -> int:
        return self._table.num_pages(request_id)

    def pages_freed_by(self, requests: Iterable[Request]) -> int:
        """Device pages that taking ``requests`` out of the batch would free: a page another row
        also holds (a shared prefix) stays owned."""
        held = Counter(page for r in requests for page in self.pages(r.request_id))
        return sum(self.pool.ref_count(page) == rows for page, rows in held.items())

    def block_table(self, request_ids: Iterable[str]) -> np.ndarray:
        """A forward's block table: these requests' rows in this order (a copy)."""
        return self._table.as_numpy()[[self._table.row_of(rid) for rid in request_ids]]

    def victim_order(self) -> list[Request]:
        """Running requests, the first to preempt first (``baton_paged/sched/victims.py``),
        recency being admission order."""
        admitted = {rid: i for i, rid in enumerate(self._requests)}
        return victims.victim_order(
            self._requests.values(), lambda r: admitted[r.request_id], lambda r: r.priority
        )

    # Moves -------------------------------------------------------------------------------------

    def join(self, request: Request, pages: list[int]) -> None:
        """Make ``request`` the last row, holding ``pages`` (already its own)."""
        self._table.insert(request.request_id, pages)
        self._requests[request.request_id] = request
        request.status = RequestStatus.RUNNING

    def leave(self, request: Request) -> list[int]:
        """Take ``request``'s row out of the batch; its pages stay owned for the caller."""
        del self._requests[request.request_id]
        return self._table.remove(request.request_id)

    def grow(self, request: Request, num_tokens: int) -> bool:
        """Extend a running request's pages to hold ``num_tokens`` tokens; False if out of pages."""
        have = self.num_pages(request.request_id)
        missing = pages_needed(num_tokens, self.page_size) - have
        if missing <= 0:
            return True
        try:
            self._table.append(request.request_id, self.pool.allocate(missing))
        except OutOfPagesError:
            return False
        return True

    def preempt(self, request: Request) -> SwapPlan | None:
        """Take ``request`` out of the batch: its computed K/V to host pages when the swap pool
        has room (returning that copy), else everything freed to recompute it later. Its device
        pages are free at once: swap-outs read them before anything writes them
        (``allocator/swap.py``)."""
        pages = self.leave(request)
        kept = pages_needed(request.num_computed_tokens, self.page_size)
        host = self.host_pool
        request.num_preemptions += 1
        if not (kept and host is not None and host.num_free >= kept):
            self.pool.free(pages)
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
            return None
        swap = plan_swap_out(pages[:kept], host)
        self.pool.free(pages[kept:])
        release_source(swap, self.pool, host)
        self._swapped[request.request_id] = list(swap.host_pages)
        request.status = RequestStatus.SWAPPED
        return swap

    def swap_in(self, request_id: str) -> SwapPlan:
        """Device pages for a swapped-out request's K/V to come back into; its host pages stay
        owned until the copy has been issued (``Scheduler.commit`` releases them)."""
        return plan_swap_in(self._swapped.pop(request_id), self.pool)

    def discard(self, request: Request) -> None:
        """Free what a request that ended holds here: its row's pages or its host pages."""
        if request.request_id in self._requests:
            self.pool.free(self.leave(request))
        if request.request_id in self._swapped:
            self.host_pool.free(self._swapped.pop(request.request_id))

    def check_integrity(self) -> None:
        """Pools and block table agree: every owned device page has as many owners as rows hold
        it (more than one: a shared prefix), every owned host page belongs to exactly one
        swapped request."""
        self.pool.check_integrity()
        self._table.check_integrity()
        if set(self._table.request_ids) != set(self._requests):
            raise AssertionError("block table rows and running requests disagree")
        rows = Counter(p for rid in self._requests for p in self._table.pages(rid))
        if len(rows) != self.pool.num_used:
            raise AssertionError(f"{len(rows)} pages in rows, {self.pool.num_used} owned in pool")
        for page, holders in rows.items():
            if self.pool.ref_count(page) != holders:
                raise AssertionError(
                    f"page {page}: {holders} rows, {self.pool.ref_count(page)} owners"
                )
        if self.host_pool is not None:
            self.host_pool.check_integrity()
            host = [p for pages in self._swapped.values() for p in pages]
            if len(host) != len(set(host)) or len(host) != self.host_pool.num_used:
                raise AssertionError(f"{len(host)} host pages swapped, {self.host_pool.num_used}")
