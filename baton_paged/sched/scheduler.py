"""Scheduler: the waiting queue, the running batch and its pages; policies decide the rest.

The scheduler owns bookkeeping and never touches tensors. Running requests are rows of one
``BlockTable``: admitting a request appends its row (BATON's insertion: page ids, no K/V copy) and
finishing one removes it. A policy (``sched/policies.py``) turns this state into a ``StepPlan``
each iteration using the helpers below; the engine reports back through ``forward_done`` and
``finish``.

Pages are reserved one step ahead: a running request gets the page its next token needs before
the forward, and newcomers are admitted only if the pages left cover the running requests' next
step too. When a decode still cannot get a page, the lowest-priority, most recently admitted
request is preempted by recompute: its pages are freed and it waits to be prefilled again from
prompt + output, which yields the same tokens it would have produced.
"""

from __future__ import annotations

from collections.abc import Iterable

from baton_paged.allocator import BlockTable, OutOfPagesError, PagePool, pages_needed
from baton_paged.request import Request, RequestStatus
from baton_paged.sched.plan import ForwardBatch, ScheduledRow
from baton_paged.sched.waiting_queue import WaitingQueue


class Scheduler:
    def __init__(
        self,
        pool: PagePool,
        page_size: int,
        max_batch_size: int,
        max_pages_per_request: int,
    ):
        self.pool = pool
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.waiting = WaitingQueue()
        self.batch = BlockTable(max_batch_size, max_pages_per_request)
        self.running: dict[str, Request] = {}
        """Rows of ``batch`` by request id, in admission order (the oldest first)."""

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.push(request)

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    @property
    def offered_slots(self) -> int:
        return min(self.max_batch_size, len(self.running) + len(self.waiting))

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - len(self.running)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End ``request`` wherever it is, freeing its pages at once."""
        if request.request_id in self.running:
            self._release(request)
        elif request.request_id in self.waiting:
            self.waiting.remove(request.request_id)
        self.waiting.forget(request.request_id)
        request.status = status

    def forward_done(self, forward: ForwardBatch) -> None:
        """The forward wrote K/V for its rows' positions."""
        for row in forward.rows:
            self.running[row.request_id].num_computed_tokens = row.end

    # Helpers for policies ---------------------------------------------------------------------

    def decoders(self) -> list[Request]:
        """Running requests whose prompt is fully computed, oldest first."""
        return [
            r for r in self.running.values() if r.num_computed_tokens and r.num_pending_tokens == 1
        ]

    def reserve_decode_pages(self) -> list[str]:
        """Give every decoder the page its next token needs; return the preempted request ids."""
        preempted: list[str] = []
        for request in self.decoders():
            if request.request_id in self.running:
                preempted += self.reserve(request, request.num_tokens)
        return preempted

    def reserve(self, request: Request, num_tokens: int) -> list[str]:
        """Grow a running request's pages to ``num_tokens`` tokens, preempting victims (possibly
        the request itself) while the pool is dry; return the preempted request ids."""
        preempted = []
        while request.request_id in self.running and not self.grow(request, num_tokens):
            victim = self.choose_victim()
            self.preempt(victim)
            preempted.append(victim.request_id)
        return preempted

    def grow(self, request: Request, num_tokens: int) -> bool:
        """Extend a running request's pages to hold ``num_tokens`` tokens; False if out of pages."""
        missing = pages_needed(num_tokens, self.page_size) - self.batch.num_pages(
            request.request_id
        )
        if missing <= 0:
            return True
        try:
            self.batch.append(request.request_id, self.pool.allocate(missing))
        except OutOfPagesError:
            return False
        return True

    def choose_victim(self) -> Request:
        """The lowest-priority running request, the most recently admitted among equals."""
        order = {rid: i for i, rid in enumerate(self.running)}
        return max(self.running.values(), key=lambda r: (r.priority, order[r.request_id]))

    def preempt(self, request: Request) -> None:
        """Free the request's pages and queue it to recompute everything it has so far."""
        self._release(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.push(request)

    def admit(self, max_requests: int | None = None) -> list[Request]:
        """Move waiting requests into the batch in service order while slots and pages last,
        giving each the pages all its tokens need (a chunked prompt then never waits for pages
        halfway). Stops at the first request that does not fit, so nobody overtakes it."""
        admitted = []
        limit = self.free_slots if max_requests is None else min(max_requests, self.free_slots)
        for request in self.waiting:
            if len(admitted) == limit:
                break
            needed = pages_needed(request.num_tokens, self.page_size)
            if self.pool.num_free - needed < self.pages_due_next_step():
                break
            self.waiting.remove(request.request_id)
            self.batch.insert(request.request_id, self.pool.allocate(needed))
            self.running[request.request_id] = request
            request.status = RequestStatus.RUNNING
            admitted.append(request)
        return admitted

    def pages_due_next_step(self) -> int:
        """Pages the running requests will need for the token after the one they compute now."""
        return sum(r.num_tokens % self.page_size == 0 for r in self.running.values())

    def row(self, request: Request, num_tokens: int | None = None) -> ScheduledRow:
        """Compute the next ``num_tokens`` (default: all) pending tokens of ``request``."""
        start = request.num_computed_tokens
        end = request.num_tokens if num_tokens is None else start + num_tokens
        return ScheduledRow(
            request_id=request.request_id,
            start=start,
            token_ids=tuple(request.token_ids(start, end)),
            sample=end == request.num_tokens,
            decode=start > 0 and end - start == 1 and end == request.num_tokens,
        )

    def forward(self, rows: Iterable[ScheduledRow]) -> ForwardBatch:
        rows = tuple(rows)
        table = self.batch.as_numpy()[[self.batch.row_of(row.request_id) for row in rows]]
        return ForwardBatch(rows=rows, block_table=table)

    def check_integrity(self) -> None:
        """Pool and block table agree: every owned page belongs to exactly one running row."""
        self.pool.check_integrity()
        self.batch.check_integrity()
        if set(self.batch.request_ids) != set(self.running):
            raise AssertionError("block table rows and running requests disagree")
        owned = [p for rid in self.running for p in self.batch.pages(rid)]
        if len(owned) != len(set(owned)) or len(owned) != self.pool.num_used:
            raise AssertionError(f"{len(owned)} pages in rows, {self.pool.num_used} owned in pool")

    def _release(self, request: Request) -> None:
        self.pool.free(self.batch.remove(request.request_id))
        del self.running[request.request_id]
