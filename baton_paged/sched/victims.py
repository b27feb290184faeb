"""Who leaves the batch first when BATON preempts: one rule for the engine and the vLLM plugin.

The victim is the lowest-priority request (the largest ``priority`` number, vLLM's convention),
and among equals the most recent one, whose prefill the batch has invested in least. The engine's
scheduler measures recency by admission order; the vLLM plugin by arrival time, and without
priorities (vLLM's FCFS policy ignores them) by recency alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def victim_order(
    candidates: Iterable[T],
    recency: Callable[[T], float],
    priority: Callable[[T], int] | None = None,
) -> list[T]:
    """``candidates``, the first to preempt first: lowest priority (if ``priority`` is given),
    then most recent by ``recency`` (larger is more recent)."""
    if priority is None:
        return sorted(candidates, key=recency, reverse=True)
    return sorted(candidates, key=lambda c: (priority(c), recency(c)), reverse=True)
