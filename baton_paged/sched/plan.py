"""The scheduler -> runner contract: what to compute this iteration, as frozen data.

An iteration runs one or more forwards in order. Under ``baton`` a step with newcomers runs two:
their prompts alone (the separate prefill), then the running batch's decode. Under ``orca`` and
``chunked`` one forward mixes both. Each row says which token positions of one request to compute
and whether its last position yields a new token (a prefill chunk that stops short of the prompt's
end does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScheduledRow:
    request_id: str
    start: int
    """First position computed: the request's ``num_computed_tokens``."""
    token_ids: tuple[int, ...]
    """Tokens at positions ``[start, start + len(token_ids))``."""
    sample: bool
    """True when the last of these tokens is the request's newest (its logits give a token)."""
    decode: bool = False
    """One token of an already-prefilled request: the work batch slots exist for."""

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class ForwardBatch:
    rows: tuple[ScheduledRow, ...]
    block_table: np.ndarray
    """``(len(rows), max_pages)`` int32 page ids of each row's request, in row order."""

    @property
    def num_decode_rows(self) -> int:
        return sum(row.decode for row in self.rows)

    @property
    def num_tokens(self) -> int:
        return sum(len(row.token_ids) for row in self.rows)


@dataclass(frozen=True)
class StepPlan:
    forwards: tuple[ForwardBatch, ...]
    offered_slots: int = 0
    """Batch slots work could fill this iteration: min(max batch size, requests running or
    waiting). Tokens generated / offered slots, summed over iterations, is slot efficiency."""
    admitted: tuple[str, ...] = ()
    """Requests that joined the batch this iteration."""
    preempted: tuple[str, ...] = ()
    """Requests whose pages were freed to make room; they recompute from the waiting queue."""

    @property
    def is_empty(self) -> bool:
        return not self.forwards
