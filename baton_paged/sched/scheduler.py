"""Scheduler: the waiting queue, the running batch and its pages; policies decide the rest.

The scheduler owns bookkeeping and never touches tensors. Running requests are rows of one
``BlockTable``: admitting a request appends its row (BATON's insertion: page ids, no K/V copy) and
finishing one removes it. A policy (``sched/policies.py``) turns this state into a ``StepPlan``
each iteration using the helpers below; the engine reports back through ``forward_done``,
``swaps_issued`` and ``finish``.

Pages are reserved one step ahead: a running request gets the page its next token needs before
the forward, and newcomers are admitted only if the pages left cover the running requests' next
step too. A request leaves the batch early (preemption) in three cases: a decode cannot get a
page, a waiting request of higher priority needs its slot or pages, or memory pressure is above
the high watermark (``MemoryMonitor``). The victim is always the lowest-priority, most recently
admitted request. It is swapped out (its computed K/V copied to the host swap pool) when that
pool has room, else its pages are freed and it recomputes prompt + output later; either way it
resumes exactly where it stopped, from its old place in the waiting queue.

Page reuse within one iteration is safe by ordering: the engine issues the iteration's swap-out
copies before its swap-ins and forwards, all on one stream, so a device page freed by a swap-out
at planning time is read before anything writes it. Host pages read by a swap-in are freed only
once the copy is issued (``swaps_issued``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from baton_paged.allocator import (
    BlockTable,
    OutOfPagesError,
    PagePool,
    SwapDirection,
    SwapPlan,
    pages_needed,
)
from baton_paged.memory_monitor import MemoryMonitor
from baton_paged.request import Request, RequestStatus
from baton_paged.sched.plan import ForwardBatch, ScheduledRow, StepPlan
from baton_paged.sched.waiting_queue import WaitingQueue


class Scheduler:
    def __init__(
        self,
        pool: PagePool,
        page_size: int,
        max_batch_size: int,
        max_pages_per_request: int,
        host_pool: PagePool | None = None,
        monitor: MemoryMonitor | None = None,
    ):
        self.pool = pool
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.host_pool = host_pool
        """Host swap pool pages; None = preemption always recomputes."""
        self.monitor = monitor
        """Memory pressure watermarks; None = the batch is limited by pages and slots only."""
        self.waiting = WaitingQueue()
        self.batch = BlockTable(max_batch_size, max_pages_per_request)
        self.running: dict[str, Request] = {}
        """Rows of ``batch`` by request id, in admission order (the oldest first)."""
        self.swapped: dict[str, list[int]] = {}
        """Host pages of swapped-out requests (waiting with status SWAPPED), by request id."""
        self.capacity = max_batch_size
        """Batch slots this iteration: fewer while memory pressure holds the batch."""
        self._preempted: list[str] = []
        self._swap_out: list[SwapPlan] = []
        self._swap_in: list[SwapPlan] = []

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.push(request)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Queued requests whose K/V is not in host memory."""
        return len(self.waiting) - len(self.swapped)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    @property
    def offered_slots(self) -> int:
        return min(self.max_batch_size, len(self.running) + len(self.waiting))

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End ``request`` wherever it is, freeing its device and host pages at once."""
        if request.request_id in self.running:
            self.pool.free(self._release(request))
        elif request.request_id in self.waiting:
            self.waiting.remove(request.request_id)
        if request.request_id in self.swapped:
            self.host_pool.free(self.swapped.pop(request.request_id))
        self.waiting.forget(request.request_id)
        request.status = status

    def forward_done(self, forward: ForwardBatch) -> None:
        """The forward wrote K/V for its rows' positions."""
        for row in forward.rows:
            self.running[row.request_id].num_computed_tokens = row.end

    def swaps_issued(self, plan: StepPlan) -> None:
        """The plan's swap copies are issued: the host pages swap-ins read from are free again."""
        for swap in plan.swap_in:
            self.host_pool.free(swap.host_pages)
        self._swap_in, self._swap_out = [], []

    def abandon_step(self) -> list[str]:
        """The iteration failed. If that was before its swap copies were issued, free the host
        pages its swap-ins were to read (their requests are rows already, for the caller to
        abort) and return the requests it swapped out, whose host copies never happened."""
        for swap in self._swap_in:
            self.host_pool.free(swap.host_pages)
        unissued = [rid for rid in self._preempted if rid in self.swapped] if self._swap_out else []
        self._swap_in, self._swap_out = [], []
        return unissued

    # Helpers for policies ---------------------------------------------------------------------

    def begin_step(self) -> None:
        """Start planning an iteration: read memory pressure, and above the high watermark swap
        one request out (the batch shrinks one request per iteration, down to one)."""
        self._preempted, self._swap_out, self._swap_in = [], [], []
        if self.monitor is None:
            return
        self.monitor.update()
        if self.monitor.above_high and len(self.running) > 1:
            self.preempt(self.choose_victim())
        holding = self.monitor.holding
        self.capacity = max(1, len(self.running)) if holding else self.max_batch_size

    def make_plan(self, forwards: Iterable[ForwardBatch], admitted: Sequence[Request]) -> StepPlan:
        """The iteration's plan: its forwards plus every admission, preemption and swap."""
        return StepPlan(
            forwards=tuple(forwards),
            offered_slots=self.offered_slots,
            admitted=tuple(r.request_id for r in admitted),
            preempted=tuple(self._preempted),
            swap_out=tuple(self._swap_out),
            swap_in=tuple(self._swap_in),
        )

    def decoders(self) -> list[Request]:
        """Running requests whose prompt is fully computed, oldest first."""
        return [r for r in self.running.values() if is_decoder(r)]

    def reserve_decode_pages(self) -> None:
        """Give every decoder the page its next token needs, preempting while the pool is dry."""
        for request in self.decoders():
            if request.request_id in self.running:
                self.reserve(request, request.num_tokens)

    def reserve(self, request: Request, num_tokens: int) -> None:
        """Grow a running request's pages to ``num_tokens`` tokens, preempting victims (possibly
        the request itself) while the pool is dry."""
        while request.request_id in self.running and not self.grow(request, num_tokens):
            self.preempt(self.choose_victim())

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
        return self.victim_order()[0]

    def victim_order(self) -> list[Request]:
        """Running requests, the first to preempt first."""
        order = {rid: i for i, rid in enumerate(self.running)}
        return sorted(self.running.values(), key=lambda r: (-r.priority, -order[r.request_id]))

    def preempt(self, request: Request) -> None:
        """Take a running request out of the batch: swap its computed K/V to host pages when the
        swap pool has room, else free everything to recompute it later."""
        pages = self._release(request)
        kept = pages_needed(request.num_computed_tokens, self.page_size)
        if kept and self.host_pool is not None and self.host_pool.num_free >= kept:
            host = self.host_pool.allocate(kept)
            self._swap_out.append(SwapPlan(SwapDirection.OUT, tuple(pages[:kept]), tuple(host)))
            self.swapped[request.request_id] = host
            request.status = RequestStatus.SWAPPED
        else:
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
        self.pool.free(pages)  # safe before the copy: see the module docstring
        request.num_preemptions += 1
        self._preempted.append(request.request_id)
        self.waiting.push(request)

    def admit(self, max_requests: int | None = None) -> list[Request]:
        """Move waiting requests into the batch in service order while slots and pages last
        (preempting lower-priority ones where that makes room), giving each the pages all its
        tokens need (a chunked prompt then never waits for pages halfway). Stops at the first
        request that does not fit, or that this iteration preempted, so nobody overtakes it."""
        admitted: list[Request] = []
        for request in self.waiting:
            if max_requests is not None and len(admitted) == max_requests:
                break
            if request.request_id in self._preempted or not self.make_room(request):
                break
            self.join(request)
            admitted.append(request)
        return admitted

    def make_room(self, request: Request) -> bool:
        """True if ``request`` fits now, or after preempting lower-priority running requests
        (which happens only when it then fits)."""
        needed = pages_needed(request.num_tokens, self.page_size)
        if self.fits(needed, list(self.running.values()), self.pool.num_free, request):
            return True
        victims: list[Request] = []
        for victim in self.victim_order():
            if victim.priority <= request.priority:
                return False
            victims.append(victim)
            others = [r for r in self.running.values() if r not in victims]
            freed = sum(self.batch.num_pages(v.request_id) for v in victims)
            if self.fits(needed, others, self.pool.num_free + freed, request):
                for v in victims:
                    self.preempt(v)
                return True
        return False

    def fits(self, needed: int, running: list[Request], free: int, newcomer: Request) -> bool:
        """Could ``newcomer``, needing ``needed`` pages, join ``running`` with ``free`` pages
        free, leaving every request (the newcomer too) the page its next token may open? Else the
        newcomer would be the first victim of the next iteration, its prefill wasted. An empty
        batch takes any request the pool can hold, so the queue always moves."""
        if not running:
            return needed <= free
        due = sum(r.num_tokens % self.page_size == 0 for r in [*running, newcomer])
        if len(running) >= self.capacity or free - needed < due:
            return False
        used = self.pool.num_pages - free + needed + due
        return self.monitor is None or self.monitor.pool_allows(used)

    def join(self, request: Request) -> None:
        """Insert a waiting request as a new batch row with pages for all its tokens; a swapped
        request's host pages are copied back into the first of them."""
        pages = self.pool.allocate(pages_needed(request.num_tokens, self.page_size))
        host = self.swapped.pop(request.request_id, None)
        if host is not None:
            self._swap_in.append(SwapPlan(SwapDirection.IN, tuple(pages[: len(host)]), tuple(host)))
        self.waiting.remove(request.request_id)
        self.batch.insert(request.request_id, pages)
        self.running[request.request_id] = request
        request.status = RequestStatus.RUNNING

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
        """Pools, block table and queues agree: every owned device page belongs to exactly one
        running row, every owned host page to exactly one swapped request."""
        self.pool.check_integrity()
        self.batch.check_integrity()
        if set(self.batch.request_ids) != set(self.running):
            raise AssertionError("block table rows and running requests disagree")
        owned = [p for rid in self.running for p in self.batch.pages(rid)]
        if len(owned) != len(set(owned)) or len(owned) != self.pool.num_used:
            raise AssertionError(f"{len(owned)} pages in rows, {self.pool.num_used} owned in pool")
        if any(rid not in self.waiting for rid in self.swapped):
            raise AssertionError("a swapped request is not waiting")
        if self.host_pool is not None:
            self.host_pool.check_integrity()
            host = [p for pages in self.swapped.values() for p in pages]
            if len(host) != len(set(host)) or len(host) != self.host_pool.num_used:
                raise AssertionError(f"{len(host)} host pages swapped, {self.host_pool.num_used}")

    def _release(self, request: Request) -> list[int]:
        """Remove a running request's row; its pages stay owned for the caller to free."""
        del self.running[request.request_id]
        return self.batch.remove(request.request_id)


def is_decoder(request: Request) -> bool:
    """Prompt computed and one token pending: a request the decode forward serves."""
    return request.num_computed_tokens > 0 and request.num_pending_tokens == 1
