"""Engine: requests in, one iteration per ``step()``, outputs back.

step():  plan = policy.plan(scheduler)       # who runs, pages reserved, frozen plan
         runner.swap(plan)                    # preempted K/V to host, resumed K/V back
         for forward in plan.forwards:
             logits = runner.execute(forward) # packed varlen forward over the paged cache
             sample, append, stop             # finished requests leave the batch at once
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import replace
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
from baton_paged.device_memory import MemoryReader, device_memory_reader
from baton_paged.loaded_model import check_loaded_model, config_for_loaded_model
from baton_paged.memory_monitor import MemoryMonitor
from baton_paged.model_loading import (
    choose_attention,
    eos_token_ids,
    load_model,
    model_max_len,
)
from baton_paged.model_runner import ModelRunner
from baton_paged.output_processor import OutputProcessor
from baton_paged.outputs import RequestOutput
from baton_paged.request import Request, RequestStatus
from baton_paged.sampler import SamplingRow, sample
from baton_paged.sampling_params import SamplingParams
from baton_paged.sched.plan import ForwardBatch
from baton_paged.sched.policies import make_policy
from baton_paged.sched.scheduler import Scheduler
from baton_paged.snapshot import EngineSnapshot
from baton_paged.stats import EngineStats

PromptInput = str | Sequence[int] | dict


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
        self.config = config
        if model is None:
            model, tokenizer = load_model(config)
        else:
            check_loaded_model(model, config)
            model.eval()  # dropout would make greedy decoding random
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.max_model_len = config.max_model_len or model_max_len(model)
        attach(model, self.max_model_len)
        try:
            self._build_parts(model, memory_reader)
        except BaseException:
            detach(model)  # a lent model goes back as it came, whatever failed
            raise

    def _build_parts(self, model: Any, memory_reader: MemoryReader | None) -> None:
        """The KV cache, host pool, monitor, scheduler, policy and runner around ``model``."""
        config = self.config
        page_size, backend = choose_attention(config, model)
        spec = KVCacheSpec.from_model_config(model.config, page_size, config.torch_dtype)
        self.cache = KVCache.from_budget(spec, config.kv_memory, config.device)
        self.host = self._host_pool(spec) if config.swapping else None
        if memory_reader is None and config.watch_device_memory:
            memory_reader = device_memory_reader(config.device)
        self.monitor = MemoryMonitor(
            self.cache.pool,
            config.memory_high_watermark,
            config.memory_low_watermark,
            memory_reader,
        )
        self.scheduler = Scheduler(
            self.cache.pool,
            page_size,
            config.max_batch_size,
            pages_needed(self.max_model_len, page_size),
            host_pool=self.host.pool if self.host else None,
            monitor=self.monitor,
        )
        self.policy = make_policy(
            config.policy, config.max_prefill_tokens, config.max_num_batched_tokens
        )
        self.runner = ModelRunner(model, self.cache, backend, self.host)
        self.outputs = OutputProcessor(self.tokenizer, self.max_model_len)
        self.stats = EngineStats(page_bytes=spec.bytes_per_page)
        self.requests: dict[str, Request] = {}
        self._generator = torch.Generator(config.device).manual_seed(config.seed)
        self._ids = itertools.count()
        self._publish()

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
        return self.enqueue(self.prepare_request(prompt, params, request_id, priority))

    def prepare_request(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> Request:
        """Check and tokenize a request without touching the engine's state, so a server can do
        it on its own thread while an iteration runs; ValueError says why it cannot run."""
        params = params or SamplingParams()
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an int, got {priority!r}")
        text, ids, max_tokens = self.check_request(prompt, params)
        return Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            max_tokens=max_tokens,
            eos_token_ids=self.eos_token_ids,
            priority=priority,
            prompt=text,
            generator=self._request_generator(params),
        )

    def enqueue(self, request: Request) -> str:
        """Queue a request from ``prepare_request``."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.outputs.add(request)
        self.scheduler.add(request)
        self._publish()
        return request.request_id

    def check_request(
        self, prompt: PromptInput, params: SamplingParams
    ) -> tuple[str | None, list[int], int]:
        """``(prompt text, token ids, max_tokens)``, or ValueError saying why it cannot run."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"expected SamplingParams, got {type(params).__name__}")
        text, ids = self._tokenize(prompt)
        return text, ids, self._check_fits(ids, params)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is (waiting, running, swapped) and free its device and host
        pages now; None if it is not live."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        request.finished_time = time.monotonic()
        self.stats.aborted += 1
        self._publish()
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

    def salvage_failed_step(self) -> tuple[list[RequestOutput], list[str]]:
        """After ``step`` raised: the final outputs of requests that finished in its earlier
        forwards (complete, so still theirs to deliver), and the ids of requests it may have
        left half-done (running, or swapped out by it before the copies were issued), which the
        caller aborts. Waiting requests, swapped ones included, stay queued untouched."""
        unissued = self.scheduler.abandon_step()
        done = [r for r in self.requests.values() if r.status.is_finished]
        outputs = [self.outputs.output(r) for r in done]
        for request in done:
            del self.requests[request.request_id]
            self.outputs.release(request.request_id)
        running = [rid for rid in self.requests if rid in self.scheduler.running]
        return outputs, running + unissued

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """One iteration: every request that got a token reports its output."""
        plan = self.policy.plan(self.scheduler)
        self.stats.record_peak(self.cache.pool.num_used)  # before finished requests free pages
        self.runner.swap(plan)
        self.scheduler.swaps_issued(plan)
        batch_size = len(self.scheduler.running)
        touched: dict[str, Request] = {}
        for forward in plan.forwards:
            logits = self.runner.execute(forward)
            self.scheduler.forward_done(forward)
            self._take_tokens(forward, logits, touched)
        generated = sum(row.sample for forward in plan.forwards for row in forward.rows)
        self.stats.record(plan, generated, batch_size)
        host_pages = self.host.pool.num_used if self.host else 0
        self.stats.record_memory(self.cache.pool.num_used, host_pages, self.monitor)
        self._publish()
        outputs = [self.outputs.output(request) for request in touched.values()]
        for request in touched.values():
            if request.status.is_finished:
                del self.requests[request.request_id]
                self.outputs.release(request.request_id)
        return outputs

    def _publish(self) -> None:
        """Replace ``snapshot`` (one assignment: readers on other threads see old or new)."""
        sched = self.scheduler
        self.snapshot = EngineSnapshot(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            num_swapped=sched.num_swapped,
            device_pages=self.cache.num_pages,
            device_pages_used=self.cache.pool.num_used,
            host_pages=self.host.num_pages if self.host else 0,
            host_pages_used=self.host.pool.num_used if self.host else 0,
            page_size=sched.page_size,
            attention_backend=self.runner.backend.name,
            stats=replace(self.stats),
        )

    def _take_tokens(
        self, forward: ForwardBatch, logits: torch.Tensor, touched: dict[str, Request]
    ) -> None:
        requests = [self.requests[row.request_id] for row in forward.rows if row.sample]
        rows = [
            SamplingRow(
                r.params, r.generator or self._generator, self.outputs.suppressed_token_ids(r)
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
                self.scheduler.finish(request, status)
                request.finished_time = now
                self.stats.finished += 1
            touched[request.request_id] = request

    def _tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return prompt, self._check_ids(self.tokenizer.encode(prompt))
        return None, self._check_ids(prompt)

    def _check_ids(self, ids) -> list[int]:
        ids = list(ids)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = len(self.tokenizer)
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        return ids

    def _check_fits(self, ids: list[int], params: SamplingParams) -> int:
        """The request's max_tokens; ValueError if its prompt fits neither model nor pool."""
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the model's context is "
                f"{self.max_model_len} tokens, leaving no room to generate"
            )
        max_tokens = min(params.max_tokens or room, room)
        needed = pages_needed(len(ids) + max_tokens, self.scheduler.page_size)
        if needed > self.cache.num_pages:
            raise ValueError(
                f"the request needs {needed} KV pages (prompt {len(ids)} + up to {max_tokens} "
                f"new tokens) but the whole pool has {self.cache.num_pages}; raise kv_memory or "
                "lower max_tokens"
            )
        return max_tokens

    def _host_pool(self, spec: KVCacheSpec) -> HostSwapPool:
        """Host pages for swapped-out K/V, never more than the device pool holds."""
        pages = num_pages_for_budget(spec, self.config.swap_memory, "cpu")
        return HostSwapPool(spec, min(pages, self.cache.num_pages))

    def _request_generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None:
            return None
        return torch.Generator(self.config.device).manual_seed(params.seed)
