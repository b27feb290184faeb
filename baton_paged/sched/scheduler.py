"""Scheduler: the waiting queue, the running batch and its pages; a policy picks the forwards.

The engine and the scheduler meet in two calls per iteration:

    plan = scheduler.schedule()      # who runs, on which pages, with which copies: frozen data
    ...                              # the engine issues the copies, runs the forwards, samples
    scheduler.update(plan, result)   # K/V written, swap sources read, requests finished

``schedule`` opens a ``Step`` (``baton_paged/sched/step.py``), the iteration's planning transaction:
it applies memory pressure, reserves the pages the running requests' next tokens need and asks the
policy which forwards to form, which may admit, preempt and swap. The step's record becomes the plan
and the step is dropped, so nothing of one iteration lives on in scheduler fields. A step that
raises half-way is settled through ``update`` too, from its plan and what it got done; if planning
itself raises, ``PlanningError`` carries the plan of what the step had done by then.

The scheduler owns bookkeeping and never touches tensors. The running requests, their pages and the
swapped-out requests' host pages are one ``RunningBatch`` (``baton_paged/sched/running_batch.py``),
the only code that changes them. A preempted request, swapped out or to recompute, resumes exactly
where it stopped, from its old place in the queue.
"""

from __future__ import annotations

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
        """The engine did ``result`` of ``plan``: record the K/V its forwards wrote, release the
        host pages its swap-ins read, and end the requests that finished. A step that raised
        part-way is settled the same way, with the result of what it did: its swap-ins' host
        pages go back whether or not they were read, as their requests are half-done either way
        and the caller aborts every running request. Not idempotent: once per plan."""
        for swap in plan.swap_in:
            release_source(swap, self.batch.pool, self.batch.host_pool)
        for forward in plan.forwards[: result.forwards_run]:
            for row in forward.rows:
                request = self.batch[row.request_id]
                request.num_computed_tokens = row.end
                if self.prefix_caching is not None:
                    pages = self.batch.pages(row.request_id)
                    self.prefix_caching.index(request, pages, row.start, row.end)
        for request_id, status in result.finished:
            self._finish(self.batch[request_id], status)
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
