"""EngineStats: counters over an engine's life, and the slot efficiency BATON is about.

Slot efficiency = tokens generated / slots offered, summed over iterations, where an iteration
offers min(max batch size, requests running or waiting) slots: a slot counts as idle only when
a request could have used it. A run-to-completion batch whose finished rows wait for the longest
one scores low while the queue is non-empty; BATON, refilling slots between iterations, scores
near 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from baton_paged.sched.memory_monitor import MemoryMonitor
from baton_paged.sched.plan import StepPlan
from baton_paged.sched.prefix_caching import PrefixCaching


@dataclass
class EngineStats:
    iterations: int = 0
    forwards: int = 0
    prompt_tokens: int = 0
    """Prompt (and recomputed) tokens run through the model."""
    generated_tokens: int = 0
    offered_slots: int = 0
    admitted: int = 0
    preemptions: int = 0
    swap_preemptions: int = 0
    """Preemptions whose K/V went to the host swap pool (the rest recompute)."""
    pages_swapped_out: int = 0
    pages_swapped_in: int = 0
    page_bytes: int = 0
    """Bytes of one KV page (all layers, K and V), to turn page counts into bytes."""
    peak_pages_in_use: int = 0
    """Most device pages owned at once: sampled after planning, when the step's pages are all
    reserved and before finished requests return theirs."""
    high_watermark_crossings: int = 0
    low_watermark_crossings: int = 0
    finished: int = 0
    aborted: int = 0
    batch_rows: int = 0
    """Sum over iterations of running requests (for the mean batch occupancy)."""
    prefix_cache_queries: int = 0
    """Tokens of joining requests looked up in the prefix cache."""
    prefix_cache_hits: int = 0
    """Of those, tokens whose K/V came from cached pages (not computed)."""
    prefix_cache_evictions: int = 0
    """Cached pages evicted for new allocations."""

    def record(self, plan: StepPlan, monitor: MemoryMonitor, generated: int) -> None:
        """Count a finished iteration that gave ``generated`` requests a token (under step-ahead
        scheduling fewer than its sampling rows: rows of requests that finished on the token
        before are dropped)."""
        self.iterations += 1
        self.forwards += len(plan.forwards)
        self.generated_tokens += generated
        self.offered_slots += plan.offered_slots
        self.admitted += len(plan.admitted)
        self.preemptions += len(plan.preempted)
        self.swap_preemptions += len(plan.swap_out)
        self.pages_swapped_out += sum(swap.num_pages for swap in plan.swap_out)
        self.pages_swapped_in += sum(swap.num_pages for swap in plan.swap_in)
        self.batch_rows += plan.batch_size
        for forward in plan.forwards:
            self.prompt_tokens += forward.num_tokens - forward.num_decode_rows
        self.high_watermark_crossings = monitor.high_crossings
        self.low_watermark_crossings = monitor.low_crossings

    def record_peak(self, pages: int) -> None:
        self.peak_pages_in_use = max(self.peak_pages_in_use, pages)

    def record_prefix_cache(self, caching: PrefixCaching | None) -> None:
        """Copy the prefix cache's counters (they are kept where lookups and evictions happen)."""
        if caching is not None:
            self.prefix_cache_queries = caching.stats.queries
            self.prefix_cache_hits = caching.stats.hits
            self.prefix_cache_evictions = caching.evictions

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hit tokens / queried tokens (vLLM's prefix-cache hit rate); 0 before any query."""
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )

    @property
    def recompute_preemptions(self) -> int:
        return self.preemptions - self.swap_preemptions

    @property
    def swapped_out_bytes(self) -> int:
        return self.pages_swapped_out * self.page_bytes

    @property
    def swapped_in_bytes(self) -> int:
        return self.pages_swapped_in * self.page_bytes

    @property
    def slot_efficiency(self) -> float:
        return self.generated_tokens / self.offered_slots if self.offered_slots else 1.0

    @property
    def idle_slot_iterations(self) -> int:
        return self.offered_slots - self.generated_tokens

    @property
    def mean_batch_size(self) -> float:
        return self.batch_rows / self.iterations if self.iterations else 0.0
