"""Step: one iteration being planned, the moves a policy may make and the record of them.

``Scheduler.schedule`` opens a step, sheds load under memory pressure, reserves the running
requests' next pages, and hands the step to the policy, which admits requests and forms forwards
through it. Every admission, preemption and swap is made on the scheduler's state at once (so the
next decision sees it) and recorded here; ``plan`` turns the record into the frozen ``StepPlan``.

Pages are reserved one step ahead: a running request gets the page its next token needs before
the forward, and newcomers are admitted only if the pages left cover the running requests' next
step too. A request leaves the batch early (preemption) in three cases: a decode cannot get a
page, a waiting request of higher priority needs its slot or pages, or memory pressure is above
the high watermark (``MemoryMonitor``). The victim is always the lowest-priority, most recently
admitted request.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from baton_paged.allocator import (
    OutOfPagesError,
    SwapPlan,
    pages_needed,
    plan_swap_in,
    plan_swap_out,
    release_source,
)
from baton_paged.request import Request, RequestStatus
from baton_paged.sched.plan import ForwardBatch, ScheduledRow, StepPlan

if TYPE_CHECKING:
    from baton_paged.sched.scheduler import Scheduler


class Step:
    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.capacity = sched.max_batch_size
        """Batch slots this iteration: fewer while memory pressure holds the batch."""
        self.admitted: list[Request] = []
        self.preempted: list[str] = []
        self.swap_out: list[SwapPlan] = []
        self.swap_in: list[SwapPlan] = []

    # What policies read and do --------------------------------------------------------------

    @property
    def running(self) -> list[Request]:
        """Requests in the batch, in admission order (the oldest first)."""
        return list(self.sched.running.values())

    def waiting_head(self) -> Request | None:
        """The next request to admit, if any."""
        return self.sched.waiting.peek()

    def decoders(self) -> list[Request]:
        """Running requests whose prompt is fully computed, oldest first."""
        return [r for r in self.sched.running.values() if is_decoder(r)]

    def admit(self, max_requests: int | None = None, share_prefixes: bool = True) -> list[Request]:
        """Move waiting requests into the batch in service order while slots and pages last
        (preempting lower-priority ones where that makes room), giving each the pages all its
        tokens need (a chunked prompt then never waits for pages halfway). Stops at the first
        request that does not fit, that this iteration preempted, or whose prefix a running
        request is computing (it shares those pages next iteration; ``share_prefixes=False``
        admits it anyway, for a policy whose batch would then wait for its whole run), so nobody
        overtakes it."""
        admitted: list[Request] = []
        for request in self.sched.waiting:
            if max_requests is not None and len(admitted) == max_requests:
                break
            if request.request_id in self.preempted:
                break
            if share_prefixes and self._waits_for_prefix(request):
                break
            if not self._make_room(request):
                break
            self._join(request)
            admitted.append(request)
        self.admitted += admitted
        return admitted

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
        batch = self.sched.batch
        table = batch.as_numpy()[[batch.row_of(row.request_id) for row in rows]]
        return ForwardBatch(rows=rows, block_table=table)

    # What the scheduler does around the policy -----------------------------------------------

    def shed_under_pressure(self) -> None:
        """Read memory pressure; above the high watermark swap one request out (the batch
        shrinks one request per iteration, down to one), and while pressure holds, grow no more."""
        monitor, running = self.sched.monitor, self.sched.running
        if monitor is None:
            return
        monitor.update()
        if monitor.above_high and len(running) > 1:
            self._preempt(victim_order(running)[0])
        if monitor.holding:
            self.capacity = max(1, len(running))

    def reserve_decode_pages(self) -> None:
        """Give every decoder the page its next token needs, preempting while the pool is dry
        (possibly the decoder itself)."""
        running = self.sched.running
        for request in self.decoders():
            while request.request_id in running and not self._grow(request, request.num_tokens):
                self._preempt(victim_order(running)[0])

    def plan(self, forwards: Iterable[ForwardBatch]) -> StepPlan:
        """The iteration's plan: its forwards plus every admission, preemption and swap."""
        sched = self.sched
        return StepPlan(
            forwards=tuple(forwards),
            batch_size=len(sched.running),
            offered_slots=min(sched.max_batch_size, len(sched.running) + len(sched.waiting)),
            admitted=tuple(r.request_id for r in self.admitted),
            preempted=tuple(self.preempted),
            swap_out=tuple(self.swap_out),
            swap_in=tuple(self.swap_in),
        )

    # Moves -------------------------------------------------------------------------------------

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Extend a running request's pages to hold ``num_tokens`` tokens; False if out of pages."""
        sched = self.sched
        have = sched.batch.num_pages(request.request_id)
        missing = pages_needed(num_tokens, sched.page_size) - have
        if missing <= 0:
            return True
        try:
            sched.batch.append(request.request_id, sched.pool.allocate(missing))
        except OutOfPagesError:
            return False
        return True

    def _preempt(self, request: Request) -> None:
        """Take a running request out of the batch: swap its computed K/V to host pages when the
        swap pool has room, else free everything to recompute it later. Its device pages are free
        for this very step: swap-outs read them before anything writes (``allocator/swap.py``)."""
        sched = self.sched
        pages = sched.release_row(request)
        kept = pages_needed(request.num_computed_tokens, sched.page_size)
        host = sched.host_pool
        if kept and host is not None and host.num_free >= kept:
            swap = plan_swap_out(pages[:kept], host)
            sched.pool.free(pages[kept:])
            release_source(swap, sched.pool, host)
            self.swap_out.append(swap)
            sched.swapped[request.request_id] = list(swap.host_pages)
            request.status = RequestStatus.SWAPPED
        else:
            sched.pool.free(pages)
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.preempted.append(request.request_id)
        sched.waiting.push(request)

    def _waits_for_prefix(self, request: Request) -> bool:
        """A fresh or recomputing request whose prefix a running request is computing now waits
        an iteration to share it (``sched/prefix_caching.py``)."""
        caching = self.sched.prefix_caching
        if caching is None or request.request_id in self.sched.swapped:
            return False
        return caching.waits(request, self.running)

    def _make_room(self, request: Request) -> bool:
        """True if ``request`` fits now, or after preempting lower-priority running requests
        (which happens only when it then fits)."""
        sched = self.sched
        needed = pages_needed(request.num_tokens, sched.page_size)
        if self._fits(needed, self.running, sched.pool.num_free, request):
            return True
        victims: list[Request] = []
        for victim in victim_order(sched.running):
            if victim.priority <= request.priority:
                return False
            victims.append(victim)
            others = [r for r in sched.running.values() if r not in victims]
            freed = sum(sched.batch.num_pages(v.request_id) for v in victims)
            if self._fits(needed, others, sched.pool.num_free + freed, request):
                for v in victims:
                    self._preempt(v)
                return True
        return False

    def _fits(self, needed: int, running: list[Request], free: int, newcomer: Request) -> bool:
        """Could ``newcomer``, needing ``needed`` pages, join ``running`` with ``free`` pages
        free, leaving every request (the newcomer too) the page its next token may open? Else the
        newcomer would be the first victim of the next iteration, its prefill wasted. An empty
        batch takes any request the pool can hold, so the queue always moves."""
        if not running:
            return needed <= free
        page_size, pool, monitor = self.sched.page_size, self.sched.pool, self.sched.monitor
        due = sum(r.num_tokens % page_size == 0 for r in [*running, newcomer])
        if len(running) >= self.capacity or free - needed < due:
            return False
        used = pool.num_pages - free + needed + due
        return monitor is None or monitor.pool_allows(used)

    def _join(self, request: Request) -> None:
        """Insert a waiting request as a new batch row with pages for all its tokens; a swapped
        request's host pages are copied back into the first of them, and any other request's
        first pages are its longest cached prefix, if any (``sched/prefix_caching.py``)."""
        sched, pool = self.sched, self.sched.pool
        needed = pages_needed(request.num_tokens, sched.page_size)
        if needed > pool.num_free:  # fail before anything changes
            raise OutOfPagesError(needed, pool.num_free, pool.num_pages, pool.name)
        pages: list[int] = []
        if request.request_id in sched.swapped:
            swap = plan_swap_in(sched.swapped.pop(request.request_id), pool)
            self.swap_in.append(swap)
            pages += swap.device_pages
        elif sched.prefix_caching is not None:  # its cached prefix's pages, shared
            pages += sched.prefix_caching.take(request)
        pages += pool.allocate(needed - len(pages))
        sched.waiting.remove(request.request_id)
        sched.batch.insert(request.request_id, pages)
        sched.running[request.request_id] = request
        request.status = RequestStatus.RUNNING


def victim_order(running: dict[str, Request]) -> list[Request]:
    """Running requests (by id, in admission order), the first to preempt first: the lowest
    priority, the most recently admitted among equals."""
    order = {rid: i for i, rid in enumerate(running)}
    return sorted(running.values(), key=lambda r: (-r.priority, -order[r.request_id]))


def is_decoder(request: Request) -> bool:
    """Prompt computed and one token pending: a request the decode forward serves."""
    return request.num_computed_tokens > 0 and request.num_pending_tokens == 1
