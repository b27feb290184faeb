"""Engine: requests in, one iteration per ``step()``, outputs back.

step():  plan = scheduler.schedule()          # who runs, pages reserved, frozen plan
         runner.swap(plan)                    # preempted K/V to host, resumed K/V back
         for forward in plan.forwards:
             logits = runner.execute(forward) # packed varlen forward over the paged cache
             outputs.process(forward, logits) # sample, append, check stops
         scheduler.update(plan, result)       # finished requests leave the batch
         publish an EngineSnapshot            # what other threads may read

Only the thread that calls ``step`` may touch the engine's parts; other threads read
``snapshot``, and prepare requests with ``inputs`` (which reads nothing that changes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from baton_paged.attention import attach, detach
from baton_paged.config import EngineConfig
from baton_paged.engine_parts import build_parts
from baton_paged.model.loaded_model import check_loaded_model, config_for_loaded_model
from baton_paged.model.loading import load_model, model_max_len
from baton_paged.outputs import RequestOutput
from baton_paged.processing.input_processor import PromptInput
from baton_paged.processing.output_processor import ForwardOutputs, Output, built
from baton_paged.processing.parallel_sampling import SampleGroups
from baton_paged.registries import check_registered
from baton_paged.request import Request, RequestStatus
from baton_paged.sampling_params import RequestOutputKind, SamplingParams
from baton_paged.sched.device_memory import MemoryReader
from baton_paged.sched.plan import ForwardBatch, QueueSizes, StepPlan, StepResult
from baton_paged.sched.scheduler import PlanningError
from baton_paged.snapshot import EngineSnapshot
from baton_paged.stats import EngineStats


@dataclass
class _StepProgress:
    """How far the running iteration got, kept so a failed one can be settled afterwards."""

    plan: StepPlan
    swaps_issued: bool = False
    forwards_run: int = 0
    finished: list[tuple[str, RequestStatus]] = field(default_factory=list)
    touched: dict[str, Request] = field(default_factory=dict)
    """Requests that got a token, in order: each reports an output."""

    def add(self, outputs: ForwardOutputs) -> None:
        self.forwards_run += 1
        self.finished += outputs.finished
        self.touched.update((request.request_id, request) for request in outputs.touched)

    def result(self) -> StepResult:
        return StepResult(self.forwards_run, tuple(self.finished))


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        model: Any = None,
        tokenizer: Any = None,
        memory_reader: MemoryReader | None = None,
    ):
        """Load ``config.model`` (or use an already-loaded HF ``model`` and ``tokenizer``) and
        build the parts around it (``engine_parts.py``). ``memory_reader`` replaces the
        device-memory reading the memory monitor adds to page-pool occupancy (tests inject
        external pressure so)."""
        check_registered(config)  # an unknown policy or backend fails before any model loads
        self.config = config
        if model is None:
            model, tokenizer = load_model(config)
        else:
            check_loaded_model(model, config)
            model.eval()  # dropout would make greedy decoding random
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = config.max_model_len or model_max_len(model)
        attach(model, self.max_model_len)
        try:
            parts = build_parts(config, model, tokenizer, self.max_model_len, memory_reader)
        except BaseException:
            detach(model)  # a lent model goes back as it came, whatever failed
            raise
        self.cache, self.host, self.monitor = parts.cache, parts.host, parts.monitor
        self.prefix_caching, self.scheduler = parts.prefix_caching, parts.scheduler
        self.runner, self.model_impl = parts.runner, parts.model_impl
        self.inputs, self.outputs = parts.inputs, parts.outputs
        self.stats = EngineStats(page_bytes=self.cache.spec.bytes_per_page)
        self.requests: dict[str, Request] = {}
        """Live requests by id; a request with several completions is here as its children."""
        self.groups = SampleGroups()
        self._step: _StepProgress | None = None
        self._publish(QueueSizes(0, 0, 0))

    @classmethod
    def build(
        cls, model: str | None = None, *, hf_model: Any = None, tokenizer: Any = None, **options
    ) -> Engine:
        """An engine for a checkpoint (``model``: a directory or hub id; None: the built-in
        model) or for an already-loaded transformers ``hf_model`` and its ``tokenizer``, whose
        dtype and device it follows. ``options`` are ``EngineConfig`` fields."""
        if hf_model is None:
            return cls(EngineConfig(model=model, **options))
        config = config_for_loaded_model(hf_model, tokenizer, {"model": model, **options})
        return cls(config, hf_model, tokenizer)

    def add_request(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Queue one request; raise ValueError (queuing nothing) when it can never be served."""
        return self.enqueue(self.inputs.prepare(prompt, params, request_id, priority))

    def enqueue(self, request: Request) -> str:
        """Queue a request from ``inputs.prepare`` (several completions: its children, see
        ``processing/parallel_sampling.py``); ValueError if its id is in use."""
        if request.request_id in self.requests or request.request_id in self.groups:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        for queued in self.groups.split(request, self.requests):
            self.requests[queued.request_id] = queued
            self.outputs.add(queued)
            self._publish(self.scheduler.add(queued))
        return request.request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is (waiting, running, swapped) and free its device and host
        pages now; None if it is not live. A parent request stops all its children."""
        if request_id in self.groups:
            return self.groups.abort(request_id, self._abort)
        return self._abort(request_id)

    def _abort(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        sizes = self.scheduler.abort(request)
        request.finished_time = time.monotonic()
        self.stats.aborted += 1
        self._publish(sizes)
        try:
            return self.outputs.output(request)
        finally:
            self.outputs.release(request_id)

    def close(self) -> None:
        """Abort what is left and give the model back its own attention, so code that lent an
        already-loaded model can call it directly again."""
        for request_id in list(self.requests):
            self.abort_request(request_id)
        detach(self.model)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """One iteration: every request that got a token reports its output."""
        return [built(output) for output in self.step_unbuilt()]

    def step_unbuilt(self) -> list[Output]:
        """``step``, leaving the outputs of single-completion requests unbuilt: snapshots whose
        ``build()`` gives the ``RequestOutput`` on any thread, later (``AsyncEngine`` has each
        stream's reader build its own, off the step loop, and only the latest one it reads)."""
        self._step = progress = _StepProgress(self._schedule())
        self.stats.record_peak(self.cache.pool.num_used)  # before finished requests free pages
        self.runner.swap(progress.plan)
        progress.swaps_issued = True
        for forward in progress.plan.forwards:
            progress.add(self._run(forward))
        self._step = None  # the scheduler hears back once, even if update itself raises
        sizes = self.scheduler.update(progress.plan, progress.result())
        self.stats.record(progress.plan, self.monitor)
        self.stats.record_prefix_cache(self.prefix_caching)
        self._publish(sizes)
        return self._report(progress.touched.values())

    def _schedule(self) -> StepPlan:
        try:
            return self.scheduler.schedule()
        except PlanningError as failure:
            self._step = _StepProgress(failure.plan)
            raise

    def _run(self, forward: ForwardBatch) -> ForwardOutputs:
        """One forward: its logits (with those of the prompt positions scored), handed over."""
        positions = self.outputs.prompt_positions(forward)
        logits = self.runner.execute(forward, [index for index, *_ in positions])
        outputs = self.outputs.process(forward, logits, positions)
        self.stats.finished += len(outputs.finished)
        return outputs

    def salvage_failed_step(self) -> tuple[list[RequestOutput], list[str]]:
        """After ``step`` raised: the final outputs of requests that finished in its earlier
        forwards (complete, so still theirs to deliver), and the ids of requests it may have
        left half-done (running, or swapped out by it before the copies were issued), which the
        caller aborts. Waiting requests, swapped ones included, stay queued untouched."""
        progress, self._step = self._step, None
        unissued: list[str] = []
        if progress is not None:  # it failed before the scheduler heard back
            self._publish(self.scheduler.update(progress.plan, progress.result()))
            if not progress.swaps_issued:  # these went to host pages that hold nothing
                preempted = (self.requests[rid] for rid in progress.plan.preempted)
                unissued = [r.request_id for r in preempted if r.status is RequestStatus.SWAPPED]
        done = [r for r in self.requests.values() if r.status.is_finished]
        outputs = [built(output) for output in self._report(done)]
        running = [rid for rid, r in self.requests.items() if r.status is RequestStatus.RUNNING]
        suspects = (self.groups.owner(rid) for rid in running + unissued)
        return outputs, list(dict.fromkeys(suspects))

    def _report(self, requests) -> list[Output]:
        """Outputs for ``requests``, but none for an unfinished one that asked only for its final
        output; finished ones are forgotten once theirs is captured. A child of a request with
        several completions has its output built here, to merge into its parent's."""
        requests = list(requests)
        final_only = {
            self.groups.owner(request.request_id)
            for request in requests
            if request.params.output_kind == RequestOutputKind.FINAL_ONLY
        }
        outputs = [
            self.outputs.output(request)
            if self.groups.is_child(request.request_id)
            else self.outputs.snapshot(request)
            for request in requests
            if request.status.is_finished or request.request_id not in final_only
        ]
        for request in requests:
            if request.status.is_finished:
                del self.requests[request.request_id]
                self.outputs.release(request.request_id)
        merged = self.groups.merge(outputs)
        return [out for out in merged if out.finished or out.request_id not in final_only]

    def _publish(self, sizes: QueueSizes) -> None:
        """Replace ``snapshot`` (one assignment: readers on other threads see old or new)."""
        self.snapshot = EngineSnapshot(
            num_running=sizes.running,
            num_waiting=sizes.waiting,
            num_swapped=sizes.swapped,
            device_pages=self.cache.num_pages,
            device_pages_used=self.cache.pool.num_used,
            host_pages=self.host.num_pages if self.host else 0,
            host_pages_used=self.host.pool.num_used if self.host else 0,
            page_size=self.cache.spec.page_size,
            attention_backend=self.runner.backend.name,
            model_impl=self.model_impl,
            stats=replace(self.stats),
        )

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (for benchmarks: a cold cache); True, as vLLM answers when
        it could. Requests running keep their pages; only the index is dropped."""
        self.cache.pool.reset_prefix_cache()
        snap = self.snapshot
        self._publish(QueueSizes(snap.num_running, snap.num_waiting, snap.num_swapped))
        return True
