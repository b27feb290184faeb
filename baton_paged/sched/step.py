"""Step: one iteration being planned, the moves a policy may make and the record of them.

``Scheduler.schedule`` opens a step, sheds load under memory pressure, reserves the running
requests' next pages, and hands the step to the policy, which admits requests and forms forwards
through it. Every admission, preemption and swap is made on the batch and queue at once (so the
next decision sees it) and recorded here; ``plan`` turns the record into the frozen ``StepPlan``.

Pages are reserved one step ahead: a running request gets the page its next token needs before
the forward, and newcomers are admitted only if the pages left cover the running requests' next
step too. A request leaves the batch early (preemption) in three cases: a decode cannot get a
page, a waiting request of higher priority needs its slot or pages, or memory pressure is above
the high watermark (``MemoryMonitor``). The victim is always the lowest-priority, most recently
admitted request.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from baton_paged.allocator import OutOfPagesError, SwapPlan, pages_needed
from baton_paged.request import Request
from baton_paged.sched.memory_monitor import MemoryMonitor
from baton_paged.sched.plan import IN_FLIGHT, ForwardBatch, ScheduledRow, StepPlan
from baton_paged.sched.prefix_caching import PrefixCaching
from baton_paged.sched.running_batch import RunningBatch
from baton_paged.sched.waiting_queue import WaitingQueue


class Step:
    def __init__(
        self,
        batch: RunningBatch,
        waiting: WaitingQueue,
        max_batch_size: int,
        monitor: MemoryMonitor | None = None,
        prefix_caching: PrefixCaching | None = None,
    ):
        """Plan on ``batch`` and ``waiting``; pages come from the batch's pool, in its page size."""
        self._batch, self._waiting, self._pool = batch, waiting, batch.pool
        self._max_batch_size, self._monitor, self._caching = max_batch_size, monitor, prefix_caching
        self.capacity = max_batch_size
        """Batch slots this iteration: fewer while memory pressure holds the batch."""
        self.admitted: list[Request] = []
        self.preempted: list[str] = []
        self.swap_out: list[SwapPlan] = []
        self.swap_in: list[SwapPlan] = []

    # What policies read and do --------------------------------------------------------------

    @property
    def running(self) -> list[Request]:
        """Requests in the batch, in admission order (the oldest first)."""
        return self._batch.requests

    @property
    def computable(self) -> list[Request]:
        """Running requests with tokens to compute: all but those whose last token is in
        flight (step-ahead scheduling), in admission order."""
        return [r for r in self._batch.requests if not r.is_complete]

    def waiting_head(self) -> Request | None:
        """The next request to admit, if any."""
        return self._waiting.peek()

    def decoders(self) -> list[Request]:
        """Running requests whose prompt is fully computed and whose next token is wanted,
        oldest first."""
        return [r for r in self._batch.requests if is_decoder(r) and not r.is_complete]

    def admit(self, max_requests: int | None = None, share_prefixes: bool = True) -> list[Request]:
        """Move waiting requests into the batch in service order while slots and pages last
        (preempting lower-priority ones where that makes room), giving each the pages all its
        tokens need (a chunked prompt then never waits for pages halfway). Stops at the first
        request that does not fit, that this iteration preempted, or whose prefix a running
        request is computing (it shares those pages next iteration; ``share_prefixes=False``
        admits it anyway, for a policy whose batch would then wait for its whole run), so nobody
        overtakes it."""
        admitted: list[Request] = []
        for request in self._waiting:
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
        start, total = request.num_computed_tokens, request.num_tokens
        end = total if num_tokens is None else start + num_tokens
        if end - start == 1 and end == total and start >= len(request.prompt_token_ids) > 0:
            # a decode: the last sampled token, maybe still on the device
            token_ids = (IN_FLIGHT if request.num_placeholders else request.output_token_ids[-1],)
        else:
            token_ids = tuple(request.token_ids(start, end))
        return ScheduledRow(
            request_id=request.request_id,
            start=start,
            token_ids=token_ids,
            sample=end == total,
            decode=start > 0 and end - start == 1 and end == total,
        )

    def forward(self, rows: Iterable[ScheduledRow]) -> ForwardBatch:
        rows = tuple(rows)
        return ForwardBatch(rows, self._batch.block_table(row.request_id for row in rows))

    # What the scheduler does around the policy -----------------------------------------------

    def shed_under_pressure(self) -> None:
        """Read memory pressure; above the high watermark swap one request out (the batch
        shrinks one request per iteration, down to one), and while pressure holds, grow no more."""
        monitor, batch = self._monitor, self._batch
        if monitor is None:
            return
        monitor.update()
        if monitor.above_high and len(batch) > 1:
            self._preempt(batch.victim_order()[0])
        if monitor.holding:
            self.capacity = max(1, len(batch))

    def reserve_decode_pages(self) -> None:
        """Give every decoder the page its next token needs, preempting while the pool is dry
        (possibly the decoder itself). A request whose last token is in flight needs none."""
        batch = self._batch
        for request in self.decoders():
            while request.request_id in batch and not batch.grow(request, request.num_tokens):
                self._preempt(batch.victim_order()[0])

    def plan(self, forwards: Iterable[ForwardBatch]) -> StepPlan:
        """The iteration's plan: its forwards plus every admission, preemption and swap."""
        running = len(self._batch)
        return StepPlan(
            forwards=tuple(forwards),
            batch_size=running,
            offered_slots=min(self._max_batch_size, running + len(self._waiting)),
            admitted=tuple(r.request_id for r in self.admitted),
            preempted=tuple(self.preempted),
            swap_out=tuple(self.swap_out),
            swap_in=tuple(self.swap_in),
        )

    # Moves -------------------------------------------------------------------------------------

    def _preempt(self, request: Request) -> None:
        """Swap ``request`` out or free it to recompute (``RunningBatch.preempt``), back into
        the queue at its old place."""
        swap = self._batch.preempt(request)
        if swap is not None:
            self.swap_out.append(swap)
        self.preempted.append(request.request_id)
        self._waiting.push(request)

    def _waits_for_prefix(self, request: Request) -> bool:
        """A fresh or recomputing request whose prefix a running request is computing now waits
        an iteration to share it (``baton_paged/sched/prefix_caching.py``)."""
        if self._caching is None or request.request_id in self._batch.swapped:
            return False
        return self._caching.waits(request, self.running)

    def _make_room(self, request: Request) -> bool:
        """True if ``request`` fits now, or after preempting lower-priority running requests
        (which happens only when it then fits)."""
        needed = pages_needed(request.num_tokens, self._batch.page_size)
        if self._fits(needed, self.running, self._pool.num_free, request):
            return True
        victims: list[Request] = []
        for victim in self._batch.victim_order():
            if victim.priority <= request.priority:
                return False
            victims.append(victim)
            others = [r for r in self.running if r not in victims]
            freed = self._batch.pages_freed_by(victims)
            if self._fits(needed, others, self._pool.num_free + freed, request):
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
        due = sum(r.num_tokens % self._batch.page_size == 0 for r in [*running, newcomer])
        if len(running) >= self.capacity or free - needed < due:
            return False
        used = self._pool.num_pages - free + needed + due
        return self._monitor is None or self._monitor.pool_allows(used)

    def _join(self, request: Request) -> None:
        """Insert a waiting request as a new batch row with pages for all its tokens; a swapped
        request's host pages are copied back into the first of them, and any other request's
        first pages are its longest cached prefix, if any
        (``baton_paged/sched/prefix_caching.py``)."""
        pool = self._pool
        needed = pages_needed(request.num_tokens, self._batch.page_size)
        if needed > pool.num_free:  # fail before anything changes
            raise OutOfPagesError(needed, pool.num_free, pool.num_pages, pool.name)
        pages: list[int] = []
        if request.request_id in self._batch.swapped:
            swap = self._batch.swap_in(request.request_id)
            self.swap_in.append(swap)
            pages += swap.device_pages
        elif self._caching is not None:  # its cached prefix's pages, shared
            pages += self._caching.take(request)
        pages += pool.allocate(needed - len(pages))
        self._waiting.remove(request.request_id)
        self._batch.join(request, pages)
        if request.scheduled_time is None:  # its first admission
            request.scheduled_time = time.monotonic()
            request.num_cached_tokens = request.num_computed_tokens


def is_decoder(request: Request) -> bool:
    """Prompt computed and one token pending: a request the decode forward serves."""
    computed = request.num_computed_tokens
    return computed > 0 and request.num_tokens - computed == 1
