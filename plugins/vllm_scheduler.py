"""BATON's priority preemption, memory-pressure shedding and batching policy as a vLLM v1 scheduler.

vLLM preempts only when a running request cannot grow, never sheds load as its KV cache fills,
and mixes new prompts into every decode step; BATON decides otherwise. Deciding at the top of each
step, before vLLM's ``schedule()`` runs, and in vLLM's own terms (a slot cap, requests held out of
``running``, preemption through vLLM's own routine) leaves vLLM in charge of all it already does
well: its KV cache manager, queues, chunked prefill and bookkeeping. What vLLM's admission will
do is predicted by ``vllm_mirror``. Usage, settings and limits: README.md, "Inside vLLM".
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from operator import attrgetter

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.request import Request, RequestStatus

from baton_paged.plugins import vllm_mirror as mirror
from baton_paged.plugins.vllm_counters import BatonCounters, publish
from baton_paged.plugins.vllm_pressure import PressureGate, PressureSettings
from baton_paged.sched.victims import victim_order


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
        # A paused engine is left as it is: it admits nothing from the waiting queue, so a
        # request shed there would sit parked, uncounted.
        if self._pause_state == PauseState.UNPAUSED:
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
        members = len(self.running) + len(mirror.ready_kv_holders(self))
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
        joiners = bool(mirror.ready_kv_holders(self)) or self._baton_admits_with(
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
        candidate = mirror.next_admission(self)
        if candidate is None:
            return False
        need, _ = mirror.need_to_admit(self, candidate)
        return mirror.fits(self, need, mirror.room_after(self, staying), slot_cap)

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

    # -- preemption: memory pressure and priority ----------------------------------------------

    @property
    def _baton_by_priority(self) -> bool:
        """Priorities count only under vLLM's priority policy. Under FCFS vLLM puts a preempted
        request back at the head of the queue, so evicting for a newcomer would only churn."""
        return self.policy == SchedulingPolicy.PRIORITY

    def _baton_victim_order(self, candidates: Iterable[Request]) -> list[Request]:
        """``candidates`` in the engine's eviction order, recency measured by arrival time."""
        priority = attrgetter("priority") if self._baton_by_priority else None
        return victim_order(candidates, attrgetter("arrival_time"), priority)

    def _baton_shed(self) -> None:
        """Preempt the lowest-priority, latest running request to bring usage down."""
        victims = self._baton_victim_order(
            r for r in self.running if self._request_blocks_can_be_freed(r)
        )
        if victims:
            self._baton_preempt([victims[0]])
            self.baton_counters.pressure_sheds += 1

    def _baton_preempt_for_priority(self, slot_cap: int) -> None:
        """Make room for the highest-priority waiting request if lower-priority ones hold it."""
        candidate = mirror.next_admission(self)
        if candidate is not None:
            victims = self._baton_admission_victims(candidate, slot_cap)
            self._baton_preempt(victims)
            self.baton_counters.priority_preemptions += len(victims)

    def _baton_admission_victims(self, candidate: Request, slot_cap: int) -> list[Request]:
        """The fewest lower-priority running requests whose preemption admits ``candidate``.

        Empty when it already fits (vLLM admits it unaided) or when preempting every eligible
        request would still not make it fit (preempting then would only waste their work).
        """
        need, hit_ids = mirror.need_to_admit(self, candidate)
        room = mirror.room_after(self, self.running)
        eligible = self._baton_victim_order(
            r
            for r in self.running
            if r.priority > candidate.priority and self._request_blocks_can_be_freed(r)
        )
        victims: list[Request] = []
        while not mirror.fits(self, need, room, slot_cap):
            if not eligible:
                return []
            victims.append(eligible.pop(0))
            room.release(victims[-1].request_id, mirror.blocks_freed_by(self, victims[-1], hit_ids))
        return victims

    def _baton_preempt(self, victims: list[Request]) -> None:
        """Preempt ``victims`` the way vLLM does, remembering the work each had done."""
        now = time.monotonic()
        for victim in victims:
            self._baton_preempted_tokens[victim.request_id] = victim.num_computed_tokens
            mirror.preempt(self, victim, now)

    # -- counting resumes ----------------------------------------------------------------------

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
