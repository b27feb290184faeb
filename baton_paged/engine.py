"""Engine: requests in, one iteration per ``step()``, outputs back.

step():  plan = scheduler.schedule()          # who runs, pages reserved, frozen plan
         runner.swap(plan)                    # preempted K/V to host, resumed K/V back
         for forward in plan.forwards:
             logits = runner.execute(forward) # packed varlen forward over the paged cache
         scheduler.commit(plan)               # their K/V is written
         outputs.sample(forward, logits)      # each forward's tokens drawn on the device
         outputs.accept(tokens read)          # appended, stop conditions checked
         scheduler.finish(finished)           # finished requests leave the batch
         publish an EngineSnapshot            # what other threads may read

Step-ahead scheduling (``EngineConfig.async_scheduling``, vLLM's async scheduling; on by default
on CUDA): a step plans and launches iteration N+1 first, its decode rows taking their input ids
on the device from N's samples, and only then reads N's tokens, accepts them and finishes
requests, while the GPU runs N+1. The host's work for N hides behind N+1's forward. Requests that
finish on one of N's tokens were planned into N+1 as well: their rows are dropped before N+1 is
sampled. Plans never depend on token values: a request whose token is in flight counts it as a
placeholder (``Request.num_placeholders``), and one whose last token is in flight gets no row.
The step returns N's outputs; N+1's come with the next call.

Only the thread that calls ``step`` may touch the engine's parts; other threads read
``snapshot``, and prepare requests with ``inputs`` (which reads nothing that changes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from baton_paged.attention import attach, detach
from baton_paged.config import EngineConfig
from baton_paged.engine_parts import build_parts
from baton_paged.model.loaded_model import check_loaded_model, config_for_loaded_model
from baton_paged.model.loading import load_model, model_max_len, resolve_quantization
from baton_paged.model.sampled_tokens import SampledTokens
from baton_paged.outputs import RequestOutput
from baton_paged.processing.input_processor import PromptInput
from baton_paged.processing.output_processor import (
    ForwardOutputs,
    Output,
    PromptPosition,
    SampledRows,
    built,
)
from baton_paged.processing.parallel_sampling import SampleGroups
from baton_paged.registries import check_registered
from baton_paged.request import Request, RequestStatus
from baton_paged.sampling_params import RequestOutputKind, SamplingParams
from baton_paged.sched.device_memory import MemoryReader
from baton_paged.sched.plan import ForwardBatch, QueueSizes, StepPlan
from baton_paged.sched.scheduler import PlanningError
from baton_paged.snapshot import EngineSnapshot
from baton_paged.stats import EngineStats


@dataclass
class _StepProgress:
    """One iteration on its way, kept so a failed one can be settled afterwards: launched (its
    copies issued, its forwards run one by one), committed, sampled on the device, then landed
    (its tokens read on the host, requests finished)."""

    plan: StepPlan
    swaps_issued: bool = False
    launched: list[tuple[ForwardBatch, torch.Tensor, list[PromptPosition]]] = field(
        default_factory=list
    )
    """Each forward run so far, with its logits and the prompt positions they score."""
    committed: bool = False
    sampled: list[SampledRows] = field(default_factory=list)
    tokens: SampledTokens | None = None
    """Every forward's sampled ids, in ``sampled`` order (None: nothing sampled)."""
    finished: list[tuple[str, RequestStatus]] = field(default_factory=list)
    touched: dict[str, Request] = field(default_factory=dict)
    """Requests that got a token, in order: each reports an output."""

    def add(self, outputs: ForwardOutputs) -> None:
        self.finished += outputs.finished
        self.touched.update((request.request_id, request) for request in outputs.touched)


def step_ahead_scheduling(config: EngineConfig) -> bool:
    """Whether steps are planned one ahead (``config.async_scheduling``; None: on CUDA only,
    where the GPU would otherwise wait for the host; on the CPU the forward and the host work
    share the same cores, so there is nothing to hide the host work behind)."""
    if config.async_scheduling is not None:
        return config.async_scheduling
    return torch.device(config.device).type == "cuda"


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
        owned = model is None
        if owned:
            model, tokenizer = load_model(config)
            config = self.config = resolve_quantization(config, model)
        else:
            check_loaded_model(model, config)
            model.eval()  # dropout would make greedy decoding random
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = config.max_model_len or model_max_len(model)
        attach(model, self.max_model_len)
        try:
            parts = build_parts(
                config, model, tokenizer, self.max_model_len, memory_reader, owns_model=owned
            )
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
        self.step_ahead = step_ahead_scheduling(config)
        """Plan and launch each iteration before reading the previous one's tokens."""
        self._in_flight: _StepProgress | None = None
        """Under step-ahead scheduling: the iteration launched and sampled, not yet read."""
        self._open: list[_StepProgress] = []
        """Iterations not yet landed (at most two), the oldest first: ``salvage_failed_step``
        settles them after a failure."""
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
        self._in_flight, self._open = None, []
        detach(self.model)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """One iteration: every request that got a token reports its output."""
        return [built(output) for output in self.step_unbuilt()]

    def step_unbuilt(self) -> list[Output]:
        """``step``, leaving the outputs of single-completion requests unbuilt: snapshots whose
        ``build()`` gives the ``RequestOutput`` on any thread, later (``AsyncEngine`` has each
        stream's reader build its own, off the step loop, and only the latest one it reads).

        With step-ahead scheduling the outputs are those of the previous iteration: this one
        is planned and launched first, its decode inputs taken on the device from the previous
        iteration's samples, and only then are those samples read (see the module docstring)."""
        landing, self._in_flight = self._in_flight, None
        step = self._launch(landing.tokens if landing is not None else None)
        outputs = self._land(landing) if landing is not None else []
        if step is not None and landing is not None and not step.plan.forwards:
            # planned while every running request's last token was in flight: now that they
            # are read, their slots are free, so plan again rather than lose an iteration
            self._commit_and_sample(step)
            outputs += self._land(step)
            step = self._launch(None)
        if step is not None:
            self._commit_and_sample(step)
            if self.step_ahead and step.tokens is not None:
                self._in_flight = step
            else:
                outputs += self._land(step)
        return outputs

    def _launch(self, previous: SampledTokens | None) -> _StepProgress | None:
        """Plan an iteration, issue its copies and run its forwards; ``previous``: the samples
        its in-flight decode inputs come from. None if there is nothing to plan."""
        if not self.scheduler.has_work_to_plan():
            return None
        step = _StepProgress(self._schedule())
        self._open.append(step)
        self.stats.record_peak(self.cache.pool.num_used)  # before finished requests free pages
        self.runner.swap(step.plan)
        step.swaps_issued = True
        for forward in step.plan.forwards:
            positions = self.outputs.prompt_positions(forward)
            extra = [index for index, *_ in positions]
            logits = self.runner.execute(forward, extra, previous)
            step.launched.append((forward, logits, positions))
        return step

    def _schedule(self) -> StepPlan:
        try:
            return self.scheduler.schedule()
        except PlanningError as failure:
            self._open.append(_StepProgress(failure.plan))
            raise

    def _commit_and_sample(self, step: _StepProgress) -> None:
        """Record the K/V the iteration wrote and draw its tokens on the device."""
        self.scheduler.commit(step.plan, len(step.launched))
        step.committed = True
        for forward, logits, positions in step.launched:
            step.sampled.append(self.outputs.sample(forward, logits, positions))
        step.launched.clear()  # the logits are spent
        parts = [sampled.drawn.token_ids for sampled in step.sampled if sampled.states]
        if parts:
            owners = [s.request.request_id for sampled in step.sampled for s in sampled.states]
            step.tokens = SampledTokens(owners, parts)

    def _land(self, step: _StepProgress) -> list[Output]:
        """Read the iteration's tokens, append them, end the requests they finish."""
        token_ids = step.tokens.to_host() if step.tokens is not None else []
        start = 0
        for sampled in step.sampled:
            end = start + len(sampled.states)
            step.add(self.outputs.accept(sampled, token_ids[start:end]))
            start = end
        self._open.remove(step)
        self.stats.finished += len(step.finished)
        sizes = self.scheduler.finish(step.finished)
        if step.plan.forwards or step.plan.preempted:  # else it did nothing: no iteration
            self.stats.record(step.plan, self.monitor, len(step.touched))
        self.stats.record_prefix_cache(self.prefix_caching)
        self._publish(sizes)
        return self._report(step.touched.values())

    def salvage_failed_step(self) -> tuple[list[RequestOutput], list[str]]:
        """After ``step`` raised: the final outputs of requests that finished in what it got
        done (complete, so still theirs to deliver), and the ids of requests it may have left
        half-done (running, waiting on a token that was in flight, or swapped out by it before
        the copies were issued), which the caller aborts. Other waiting requests, swapped ones
        included, stay queued untouched."""
        steps, self._open, self._in_flight = self._open, [], None
        unissued: list[str] = []
        for step in steps:  # the oldest first; each is settled with the scheduler once
            if not step.committed:  # what its forwards wrote is of no use: nothing is indexed
                self.scheduler.commit(step.plan, 0)
            self._publish(self.scheduler.finish(step.finished))
            if not step.swaps_issued:  # these went to host pages that hold nothing
                preempted = (self.requests[rid] for rid in step.plan.preempted)
                unissued += [r.request_id for r in preempted if r.status is RequestStatus.SWAPPED]
        done = [r for r in self.requests.values() if r.status.is_finished]
        outputs = [built(output) for output in self._report(done)]
        half_done = [
            rid
            for rid, r in self.requests.items()
            if r.status is RequestStatus.RUNNING or r.num_placeholders
        ]
        suspects = (self.groups.owner(rid) for rid in half_done + unissued)
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
