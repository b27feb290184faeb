"""What vLLM's scheduler will do this step, predicted before its ``schedule()`` runs.

BATON decides whom to preempt, and whether a prefill step is worth taking, before vLLM's
admission loop runs; to decide right it must know what that loop will admit. vLLM exposes no
such query, so these functions repeat its arithmetic against its own state (queues, KV cache
manager, block pool). Each names the vLLM 0.32 function it mirrors: a vLLM upgrade that changes
one of those fails ``tests/plugins/vllm_plugin/test_vllm_upgrade.py`` until the mirror here has
been re-checked against the new code.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

ADMISSIBLE = (RequestStatus.WAITING, RequestStatus.PREEMPTED)
"""Waiting statuses vLLM admits straight away (others wait on grammars, KV transfers...)."""


@dataclass(frozen=True)
class Need:
    """What one request takes of a step: scheduled tokens and newly allocated blocks."""

    tokens: int
    blocks: int


@dataclass
class Room:
    """Free blocks, the token budget and the running requests that stay, while victims are
    being chosen."""

    free: int
    budget: int
    kept: dict[str, Need]
    """Each staying request's share of this step: vLLM schedules them before admitting."""

    def admits(self, need: Need, slots: int, watermark_blocks: int) -> bool:
        """Would vLLM's admission loop take a request needing ``need``?

        Mirrors the slot and token-budget checks of the waiting loop in
        ``vllm.v1.core.sched.scheduler.Scheduler.schedule`` and the free-block check, watermark
        included once a request is scheduled, of
        ``vllm.v1.core.kv_cache_manager.KVCacheManager.allocate_slots``.
        """
        kept = self.kept.values()
        reserve = sum(n.blocks for n in kept) + (watermark_blocks if self.kept else 0)
        tokens_left = self.budget - sum(n.tokens for n in kept)
        return (
            len(self.kept) < slots
            and self.free >= need.blocks + reserve
            and (tokens_left >= need.tokens)
        )

    def release(self, request_id: str, freed_blocks: int) -> None:
        """A victim leaves: its share of the step is no longer reserved, its blocks are free."""
        del self.kept[request_id]
        self.free += freed_blocks


def ready(request: Request) -> bool:
    """Would vLLM's admission loop take ``request`` now, rather than skip it?

    Mirrors ``vllm.v1.core.sched.scheduler.Scheduler._handle_blocked_waiting_request`` (blocked
    statuses) and the in-flight-output skip of ``vllm.v1.core.sched.scheduler.Scheduler.schedule``.
    """
    if request.status not in ADMISSIBLE:
        return False
    # A preempted request whose last step's output is still in flight waits for it to drain.
    return not (request.num_stale_output_tokens and not request.drop_stale_output)


def ready_kv_holders(scheduler: Scheduler) -> list[Request]:
    """Requests already holding blocks that are ready to run; vLLM admits them first. Their
    K/V was loaded through a KV connector (vLLM promotes them at its next admission pass),
    or their blocks were kept while they waited.

    Mirrors the queue order of ``vllm.v1.core.sched.scheduler.Scheduler.schedule`` and the
    promotion in ``vllm.v1.core.sched.scheduler.Scheduler._handle_blocked_waiting_request``.
    """
    loaded = scheduler.finished_recving_kv_req_ids
    return [
        r
        for r in scheduler.kv_holding_waiting
        if ready(r) or (r.status == RequestStatus.WAITING_FOR_REMOTE_KVS and r.request_id in loaded)
    ]


def next_admission(scheduler: Scheduler) -> Request | None:
    """The first request of the waiting queue vLLM's admission loop would take this step;
    None when there is none, or when a request already holding blocks goes first.

    vLLM drains the requests holding blocks first, and in either queue skips a blocked request
    (K/V still loading, a grammar compiling, a paused streaming session, output still in
    flight) to try the next, so one blocked request never hides the rest. Mirrors the waiting
    loop of ``vllm.v1.core.sched.scheduler.Scheduler.schedule``.
    """
    if ready_kv_holders(scheduler):
        return None
    return next((r for r in scheduler.waiting if ready(r)), None)


def room_after(scheduler: Scheduler, staying: list[Request]) -> Room:
    """Free blocks and the token budget as vLLM's admission loop will find them, after
    ``staying`` have taken this step's share.

    Mirrors ``vllm.v1.core.sched.scheduler.Scheduler.schedule``, which schedules the running
    requests before admitting any waiting one.
    """
    return Room(
        free=scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
        budget=scheduler.max_num_scheduled_tokens,
        kept={r.request_id: need_to_grow(scheduler, r) for r in staying},
    )


def fits(scheduler: Scheduler, need: Need, room: Room, slot_cap: int) -> bool:
    """Would vLLM's admission loop take a request needing ``need`` into ``room``, with at most
    ``slot_cap`` requests running?

    Mirrors the slot check of ``vllm.v1.core.sched.scheduler.Scheduler.schedule``: paused
    streaming sessions hold run slots too.
    """
    slots = slot_cap - scheduler.num_waiting_for_streaming_input
    return room.admits(need, slots, scheduler.kv_cache_manager.watermark_blocks)


def need_to_admit(scheduler: Scheduler, request: Request) -> tuple[Need, set[int]]:
    """The tokens and blocks vLLM's admission check will want for ``request``, and its
    prefix-cache hits.

    Hits already held by running requests cost nothing, as in vLLM's own check. With chunked
    prefill one token of budget admits it; without, its whole uncached prompt must fit.
    Mirrors the hit lookup of ``vllm.v1.core.sched.scheduler.Scheduler._get_local_prefix_cache_hit``
    (without a KV connector), ``vllm.v1.core.kv_cache_manager.KVCacheManager.allocate_slots`` and
    the waiting loop of ``vllm.v1.core.sched.scheduler.Scheduler.schedule``.
    """
    manager = scheduler.kv_cache_manager
    hit_blocks, num_hit, _ = manager.get_computed_blocks(request)
    num_tokens = min(request.num_tokens, scheduler.max_model_len)
    if not scheduler.scheduler_reserve_full_isl:
        num_tokens = min(num_tokens, num_hit + scheduler.max_num_scheduled_tokens)
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
    chunked = scheduler.scheduler_config.enable_chunked_prefill
    tokens = 1 if chunked else chunk(scheduler, request.num_tokens - num_hit)
    hit_ids = {b.block_id for group in hit_blocks.blocks for b in group}
    return Need(tokens, blocks), hit_ids


def need_to_grow(scheduler: Scheduler, request: Request) -> Need:
    """The tokens a running request schedules this step and the new blocks they take.

    Mirrors the running loop of ``vllm.v1.core.sched.scheduler.Scheduler.schedule`` and
    ``vllm.v1.core.kv_cache_manager.KVCacheManager.allocate_slots``.
    """
    computed = request.num_computed_tokens
    pending = request.num_tokens_with_spec + request.num_output_placeholders - computed
    pending = max(chunk(scheduler, pending), 0)
    main = min(computed + pending, scheduler.max_model_len)
    manager = scheduler.kv_cache_manager
    blocks = manager.coordinator.get_num_blocks_to_allocate(
        request_id=request.request_id,
        num_tokens=min(main + scheduler.num_lookahead_tokens, scheduler.max_model_len),
        new_computed_blocks=manager.empty_kv_cache_blocks.blocks,
        num_encoder_tokens=0,
        total_computed_tokens=computed,
        num_local_computed_tokens=computed,
        num_tokens_main_model=main,
    )
    return Need(pending, blocks)


def chunk(scheduler: Scheduler, num_tokens: int) -> int:
    """``num_tokens`` cut to what vLLM schedules of one request in one step.

    Mirrors the ``long_prefill_token_threshold`` cut of
    ``vllm.v1.core.sched.scheduler.Scheduler.schedule``.
    """
    threshold = scheduler.scheduler_config.long_prefill_token_threshold
    return min(num_tokens, threshold or num_tokens, scheduler.max_num_scheduled_tokens)


def preempt(scheduler: Scheduler, request: Request, timestamp: float) -> None:
    """Preempt running ``request`` (recompute) as vLLM's out-of-blocks preemption does: out of
    ``running`` first, then vLLM's own routine frees its blocks and puts it back to waiting, so
    vLLM's bookkeeping, async-scheduling placeholders and worker notices stay right.

    Mirrors the preemption in ``vllm.v1.core.sched.scheduler.Scheduler.schedule`` and the
    contract of ``vllm.v1.core.sched.scheduler.Scheduler._preempt_request``.
    """
    scheduler.running.remove(request)
    scheduler._preempt_request(request, timestamp, drop_stale_output=scheduler.requires_kv_delivery)


def blocks_freed_by(scheduler: Scheduler, request: Request, keep: set[int]) -> int:
    """Blocks that return to the free pool for good when ``request`` lets go of them.

    A block shared through the prefix cache stays with its other holders, and a block in
    ``keep`` (a prefix-cache hit of the request being admitted) is taken straight back.
    Mirrors ``vllm.v1.core.block_pool.BlockPool.free_blocks``.
    """
    groups = scheduler.kv_cache_manager.get_blocks(request.request_id).blocks
    return sum(
        1
        for blocks in groups
        for b in blocks
        if b.ref_cnt == 1 and not b.is_null and b.block_id not in keep
    )
