"""Engine: requests in, one iteration per ``step()``, outputs back.

step():  plan = scheduler.schedule()          # who runs, pages reserved, frozen plan
         runner.swap(plan)                    # preempted K/V to host, resumed K/V back
         for forward in plan.forwards:
             logits = runner.execute(forward) # packed varlen forward over the paged cache
             sample, append, check stops
         scheduler.update(plan, result)       # finished requests leave the batch
         publish an EngineSnapshot            # what other threads may read

Only the thread that calls ``step`` may touch the engine's parts; other threads read
``snapshot``, and prepare requests with ``inputs`` (which reads nothing that changes).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from baton_paged.allocator import (
    HostSwapPool,
    KVCache,
    KVCacheSpec,
    num_pages_for_budget,
    pages_needed,
)
from baton_paged.attention import attach, detach
from baton_paged.config import EngineConfig
from baton_paged.decode_graphs import DecodeGraphs, graph_mode
from baton_paged.device_memory import MemoryReader, beyond_baseline, device_memory_reader
from baton_paged.input_processor import InputProcessor, PromptInput
from baton_paged.loaded_model import check_loaded_model, config_for_loaded_model
from baton_paged.memory_monitor import MemoryMonitor
from baton_paged.model_loading import (
    choose_attention,
    choose_executor,
    eos_token_ids,
    load_model,
    model_max_len,
)
from baton_paged.model_runner import ModelRunner
from baton_paged.output_processor import OutputProcessor
from baton_paged.outputs import RequestOutput
from baton_paged.parallel_sampling import SampleGroup, child_requests
from baton_paged.registries import check_registered
from baton_paged.request import Request, RequestStatus
from baton_paged.sampler import SamplingRow, sample
from baton_paged.sampling_params import SamplingParams
from baton_paged.sched.plan import ForwardBatch, QueueSizes, StepPlan, StepResult
from baton_paged.sched.policies import make_policy
from baton_paged.sched.prefix_caching import PrefixCaching
from baton_paged.sched.scheduler import PlanningError, Scheduler
from baton_paged.snapshot import EngineSnapshot
from baton_paged.stats import EngineStats

logger = logging.getLogger(__name__)


@dataclass
class _StepProgress:
    """How far the running iteration got, kept so a failed one can be settled afterwards."""

    plan: StepPlan
    swaps_issued: bool = False
    forwards_run: int = 0
    finished: list[tuple[str, RequestStatus]] = field(default_factory=list)
    touched: dict[str, Request] = field(default_factory=dict)
    """Requests that got a token, in order: each reports an output."""

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
        """Load ``config.model`` (or use an already-loaded HF ``model`` and ``tokenizer``), size
        the KV cache from ``config.kv_memory`` and the host swap pool from ``config.swap_memory``,
        and build the scheduler and runner. ``memory_reader`` replaces the device-memory reading
        the memory monitor adds to page-pool occupancy (tests inject external pressure so)."""
        check_registered(config)  # an unknown policy or backend fails before any model loads
        self.config = config
        if model is None:
            model, tokenizer = load_model(config)
        else:
            check_loaded_model(model, config)
            model.eval()  # dropout would make greedy decoding random
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len or model_max_len(model)
        attach(model, self.max_model_len)
        try:
            self._build_parts(model, memory_reader)
        except BaseException:
            detach(model)  # a lent model goes back as it came, whatever failed
            raise

    def _build_parts(self, model: Any, memory_reader: MemoryReader | None) -> None:
        """The KV cache, host pool, monitor, scheduler and runner around ``model``."""
        config = self.config
        page_size, backend = choose_attention(config, model)
        spec = KVCacheSpec.from_model_config(model.config, page_size, config.torch_dtype)
        graphs = graph_mode(config, type(backend))
        scratch = 1 if graphs else 0  # the page decode graphs' padding rows write to
        self.cache = KVCache.from_budget(spec, config.kv_memory, config.device, scratch)
        self.host = self._host_pool(spec) if config.swapping else None
        if memory_reader is None and config.watch_device_memory:
            memory_reader = beyond_baseline(device_memory_reader(config.device))
        watermarks = (config.memory_high_watermark, config.memory_low_watermark)
        self.monitor = MemoryMonitor(self.cache.pool, *watermarks, memory_reader)
        self.prefix_caching = self._prefix_caching(page_size)
        self.scheduler = Scheduler(
            self.cache.pool,
            page_size,
            config.max_batch_size,
            pages_needed(self.max_model_len, page_size),
            make_policy(config.policy, config.max_prefill_tokens, config.max_num_batched_tokens),
            host_pool=self.host.pool if self.host else None,
            monitor=self.monitor,
            prefix_caching=self.prefix_caching,
        )
        executor = choose_executor(config, model, self.max_model_len)
        self.runner = ModelRunner(model, self.cache, backend, self.host, executor)
        if graphs:
            self.runner.graphs = self._capture_graphs(backend, graphs)
        self.inputs = InputProcessor(
            self.tokenizer,
            eos_token_ids(model, self.tokenizer),
            self.max_model_len,
            page_size,
            self.cache.num_pages,
            config.device,
            config.max_logprobs,
        )
        self.outputs = OutputProcessor(self.tokenizer, self.max_model_len)
        self.stats = EngineStats(page_bytes=spec.bytes_per_page)
        self.requests: dict[str, Request] = {}
        self.groups: dict[str, SampleGroup] = {}
        """Requests with several completions, by parent id; their children are in ``requests``."""
        self._parent_of: dict[str, str] = {}
        self._generator = torch.Generator(config.device).manual_seed(config.seed)
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
        ``parallel_sampling.py``); ValueError if its id is in use."""
        if request.request_id in self.requests or request.request_id in self.groups:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.params.num_samples == 1:
            self._queue(request)
            return request.request_id
        children = child_requests(request)
        if any(child.request_id in self.requests for child in children):
            raise ValueError(f"a child id of request {request.request_id!r} is already in use")
        self.groups[request.request_id] = SampleGroup(
            request, tuple(c.request_id for c in children)
        )
        for child in children:
            self._parent_of[child.request_id] = request.request_id
            self._queue(child)
        return request.request_id

    def _queue(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.outputs.add(request)
        self._publish(self.scheduler.add(request))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is (waiting, running, swapped) and free its device and host
        pages now; None if it is not live. A parent request stops all its children."""
        if request_id in self.groups:
            group = self.groups[request_id]
            for child in group.child_ids:
                if child in self.requests:
                    group.update(self._abort(child))
            self._forget_group(request_id)
            return group.merged()
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
        detach(self.runner.model)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """One iteration: every request that got a token reports its output."""
        try:
            plan = self.scheduler.schedule()
        except PlanningError as failure:
            self._step = _StepProgress(failure.plan)
            raise
        self._step = progress = _StepProgress(plan)
        self.stats.record_peak(self.cache.pool.num_used)  # before finished requests free pages
        self.runner.swap(plan)
        progress.swaps_issued = True
        for forward in plan.forwards:
            prompt_positions = self.outputs.prompt_positions(forward, self.requests)
            logits = self.runner.execute(forward, [index for index, *_ in prompt_positions])
            progress.forwards_run += 1
            sampled = sum(row.sample for row in forward.rows)
            self.outputs.add_prompt_logprobs(prompt_positions, logits[sampled:])
            self._take_tokens(forward, logits[:sampled], progress)
        self._step = None  # the scheduler hears back once, even if update itself raises
        sizes = self.scheduler.update(plan, progress.result())
        self.stats.record(plan, self.monitor)
        self._record_prefix_cache()
        self._publish(sizes)
        return self._report(progress.touched.values())

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
        outputs = self._report(done)
        running = [rid for rid, r in self.requests.items() if r.status is RequestStatus.RUNNING]
        suspects = (self._parent_of.get(rid, rid) for rid in running + unissued)
        return outputs, list(dict.fromkeys(suspects))

    def _report(self, requests) -> list[RequestOutput]:
        """Outputs for ``requests``; finished ones are forgotten once theirs is built."""
        requests = list(requests)
        outputs = [self.outputs.output(request) for request in requests]
        for request in requests:
            if request.status.is_finished:
                del self.requests[request.request_id]
                self.outputs.release(request.request_id)
        return self._merge(outputs)

    def _merge(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Children's outputs become their parent's (one per parent, the latest)."""
        merged: dict[str, RequestOutput | None] = {}
        for output in outputs:
            parent = self._parent_of.get(output.request_id)
            if parent is None:
                merged[output.request_id] = output
                continue
            group = self.groups[parent]
            merged[parent] = group.update(output)
            if group.finished:
                self._forget_group(parent)
        return [output for output in merged.values() if output is not None]

    def _forget_group(self, parent: str) -> None:
        for child in self.groups.pop(parent).child_ids:
            self._parent_of.pop(child, None)

    def _take_tokens(
        self, forward: ForwardBatch, logits: torch.Tensor, progress: _StepProgress
    ) -> None:
        requests = [self.requests[row.request_id] for row in forward.rows if row.sample]
        rows = [
            SamplingRow(
                r.params,
                r.generator or self._generator,
                self.outputs.suppressed_token_ids(r),
                r.prompt_token_ids,
                r.output_token_ids,
            )
            for r in requests
        ]
        result = sample(logits, rows)
        now = time.monotonic()
        for request, token, logprobs in zip(
            requests, result.token_ids, result.logprobs, strict=True
        ):
            request.first_token_time = request.first_token_time or now
            request.token_times.append(now)
            status = self.outputs.append(request, token, logprobs)
            if status is not None:
                progress.finished.append((request.request_id, status))
                request.finished_time = now
                self.stats.finished += 1
            progress.touched[request.request_id] = request

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
            model_impl="native" if self.runner.executor else "transformers",
            stats=replace(self.stats),
        )

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (for benchmarks: a cold cache); True, as vLLM answers when
        it could. Requests running keep their pages; only the index is dropped."""
        self.cache.pool.reset_prefix_cache()
        snap = self.snapshot
        self._publish(QueueSizes(snap.num_running, snap.num_waiting, snap.num_swapped))
        return True

    def _record_prefix_cache(self) -> None:
        caching = self.prefix_caching
        if caching is not None:
            evictions = self.cache.pool.prefix.evictions
            self.stats.record_prefix_cache(caching.stats.queries, caching.stats.hits, evictions)

    def _prefix_caching(self, page_size: int) -> PrefixCaching | None:
        if not self.config.enable_prefix_caching:
            return None
        salt = f"{self.config.model}|{self.config.torch_dtype}".encode()  # what else shapes K/V
        return PrefixCaching(self.cache.pool, page_size, salt)

    def _capture_graphs(self, backend: Any, mode: str) -> DecodeGraphs | None:
        """Decode graphs for every batch bucket; a capture that fails leaves decode eager, with
        one warning naming the error (the engine still serves, only slower)."""
        try:
            return DecodeGraphs(
                self.runner.forward,
                self.cache,
                backend,
                self.config.max_batch_size,
                self.max_model_len,
                mode,
            )
        except RuntimeError as error:
            logger.warning("CUDA graph capture failed, decode runs eagerly: %s", error)
            return None

    def _host_pool(self, spec: KVCacheSpec) -> HostSwapPool:
        """Host pages for swapped-out K/V, never more than the device pool holds."""
        pages = num_pages_for_budget(spec, self.config.swap_memory, "cpu")
        pinned = self.cache.device.type == "cuda"  # async swap copies; a CPU cache needs none
        return HostSwapPool(spec, min(pages, self.cache.num_pages), pin_memory=pinned)
