"""EngineSnapshot: what observers may know about an engine, as one immutable value.

Only the step loop's thread touches the engine's parts (scheduler, pools, runner). Everything
else, the ``/metrics`` scrape on an HTTP thread, admission control on the event loop, benchmarks
between steps, reads ``Engine.snapshot``: the engine builds a new snapshot after every iteration,
add and abort and swaps the attribute in one assignment, so a reader on any thread sees one
whole, consistent state, never a half-updated one.
"""

from __future__ import annotations

from dataclasses import dataclass

from baton_paged.stats import EngineStats


@dataclass(frozen=True)
class EngineSnapshot:
    num_running: int
    """Requests holding a batch slot."""
    num_waiting: int
    """Requests queued to join the batch whose K/V is not in host memory (new or recomputing)."""
    num_swapped: int
    """Requests queued to join the batch with their K/V in the host swap pool."""
    device_pages: int
    device_pages_used: int
    host_pages: int
    """Pages of the host swap pool; 0 when swapping is off."""
    host_pages_used: int
    page_size: int
    attention_backend: str
    model_impl: str
    """``native`` (the fused Llama-family executor) or ``transformers`` (the HF bridge)."""
    stats: EngineStats
    """A copy of the engine's counters at publish time; nothing writes it afterwards."""

    @property
    def num_queued(self) -> int:
        """Every request waiting to join, swapped ones included (what admission bounds)."""
        return self.num_waiting + self.num_swapped

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of device pages owned, in [0, 1]."""
        return self.device_pages_used / self.device_pages
