"""Scheduler: the waiting queue, the running batch and its pages; a policy picks the forwards.

The engine and the scheduler meet in three calls per iteration:

    plan = scheduler.schedule()      # who runs, on which pages, with which copies: frozen data
    ...                              # the engine issues the copies, runs the forwards
    scheduler.commit(plan, ran)      # K/V written, swap sources read
    ...                              # the engine samples and reads the tokens
    scheduler.finish(finished)       # requests that finished leave

(``update`` is the last two at once.) Under step-ahead scheduling the engine plans step N+1
before it reads step N's tokens, so ``schedule`` runs between N's ``commit`` and ``finish``:
requests about to finish on a token in flight are planned once more, and their rows dropped.

``schedule`` opens a ``Step`` (``baton_paged/sched/step.py``), the iteration's planning transaction:
it applies memory pressure, reserves the pages the running requests' next tokens need and asks the
policy which forwards to form, which may admit, preempt and swap. The step's record becomes the plan
and the step is dropped, so nothing of one iteration lives on in scheduler fields. A step that
raises half-way is settled through ``commit`` and ``finish`` too, from its plan and what it got
done; if planning itself raises, ``PlanningError`` carries the plan of what the step had done.

The scheduler owns bookkeeping and never touches tensors. The running requests, their pages and the
swapped-out requests' host pages are one ``RunningBatch`` (``baton_paged/sched/running_batch.py``),
the only code that changes them. A preempted request, swapped out or to recompute, resumes exactly
where it stopped, from its old place in the queue.
"""

from __future__ import annotations

from collections.abc import Iterable

from baton_paged.allocator import PagePool, release_source
from baton_paged.request import Request, RequestStatus
from baton_paged.sched.memory_monitor import MemoryMonitor
from baton_paged.sched.plan import QueueSizes, StepPlan, StepResult
from baton_paged.sched.policies import Policy
from baton_paged.sched.prefix_caching import PrefixCaching
from baton_paged.sched.running_batch import RunningBatch
from baton_paged.sched.step import Step
from baton_paged.sched.waiting_queue import WaitingQueue


class PlanningError(RuntimeError):
    """Planning raised part-way (the cause is chained); ``plan`` holds what the step had done
    by then: admissions, preemptions and swaps, no forwards, so it is settled like any step
    that failed before its copies were issued."""

    def __init__(self, plan: StepPlan, cause: Exception):
        super().__init__(f"planning the iteration failed: {type(cause).__name__}: {cause}")
        self.plan = plan


class Scheduler:
    def __init__(
        self,
        pool: PagePool,
        page_size: int,
        max_batch_size: int,
        max_pages_per_request: int,
        policy: Policy,
        host_pool: PagePool | None = None,
        monitor: MemoryMonitor | None = None,
        prefix_caching: PrefixCaching | None = None,
    ):
        """``host_pool``: host swap pool pages; None = preemption always recomputes. The pools
        and page size belong to the batch (``self.batch``), whose moves use them."""
        self.max_batch_size = max_batch_size
        self.policy = policy
        self.monitor = monitor
        """Memory pressure watermarks; None = the batch is limited by pages and slots only."""
        self.prefix_caching = prefix_caching
        """Shared prefixes' pages; None = every request computes its whole prompt."""
        self.waiting = WaitingQueue()
        self.batch = RunningBatch(pool, page_size, max_batch_size, max_pages_per_request, host_pool)

    def add(self, request: Request) -> QueueSizes:
        request.status = RequestStatus.WAITING
        self.waiting.push(request)
        return self._sizes()

    def abort(self, request: Request) -> QueueSizes:
        """End ``request`` wherever it is (waiting, running, swapped), freeing its pages now."""
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return self._sizes()

    def has_work(self) -> bool:
        return bool(self.batch) or bool(self.waiting)

    def has_work_to_plan(self) -> bool:
        """Is there anything a new iteration could compute: a waiting request, or a running one
        whose last token is not already in flight (step-ahead scheduling)?"""
        return bool(self.waiting) or any(not r.is_complete for r in self.batch.requests)

    def schedule(self) -> StepPlan:
        """Plan the next iteration, pages reserved and copies paired (see the module docstring)."""
        step = Step(
            self.batch, self.waiting, self.max_batch_size, self.monitor, self.prefix_caching
        )
        try:
            step.shed_under_pressure()
            step.reserve_decode_pages()
            forwards = self.policy.form(step)
        except Exception as error:
            raise PlanningError(step.plan(()), error) from error
        return step.plan(forwards)

    def update(self, plan: StepPlan, result: StepResult) -> QueueSizes:
        """The engine did ``result`` of ``plan`` and read its tokens: ``commit`` then
        ``finish``. Not idempotent: once per plan."""
        self.commit(plan, result.forwards_run)
        return self.finish(result.finished)

    def commit(self, plan: StepPlan, forwards_run: int) -> None:
        """The engine issued ``plan``'s copies and ran its first ``forwards_run`` forwards:
        release the host pages its swap-ins read, and record (and index, for prefix caching)
        the K/V those forwards wrote. A step that raised part-way is settled the same way: its
        swap-ins' host pages go back whether or not they were read, as their requests are
        half-done either way and the caller aborts every running request.

        Under step-ahead scheduling a step commits after the previous step's tokens were read,
        so every row's tokens are known here; a row whose request left the batch meanwhile (it
        finished on that previous token, or was aborted) wrote K/V nobody reads and is skipped."""
        for swap in plan.swap_in:
            release_source(swap, self.batch.pool, self.batch.host_pool)
        for forward in plan.forwards[:forwards_run]:
            for row in forward.rows:
                request = self.batch.get(row.request_id)
                if request is None:
                    continue
                request.num_computed_tokens = row.end
                if self.prefix_caching is not None:
                    pages = self.batch.pages(row.request_id)
                    self.prefix_caching.index(request, pages, row.start, row.end)

    def finish(self, finished: Iterable[tuple[str, RequestStatus]]) -> QueueSizes:
        """End the requests that finished on a token just read, wherever they are now (a
        request preempted while its token was in flight is waiting)."""
        for request_id, status in finished:
            request = self.batch.get(request_id) or self.waiting.get(request_id)
            if request is not None:
                self._finish(request, status)
        return self._sizes()

    def check_integrity(self) -> None:
        """The batch's pools and block table agree (``RunningBatch.check_integrity``), and every
        swapped-out request is queued to resume."""
        self.batch.check_integrity()
        if any(rid not in self.waiting for rid in self.batch.swapped):
            raise AssertionError("a swapped request is not waiting")

    def _sizes(self) -> QueueSizes:
        swapped = len(self.batch.swapped)
        return QueueSizes(len(self.batch), len(self.waiting) - swapped, swapped)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.request_id in self.waiting:
            self.waiting.remove(request.request_id)
        self.batch.discard(request)
        self.waiting.forget(request.request_id)
        request.status = status
