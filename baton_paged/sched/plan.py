"""The scheduler <-> engine contract, as frozen data: what an iteration does, and what it did.

``Scheduler.schedule`` returns a ``StepPlan``; the engine carries it out and reports back how
many forwards ran (``Scheduler.commit``) and which requests finished (``Scheduler.finish``;
``update`` takes both as a ``StepResult``). An iteration first issues its swap copies (out, then
in: the order the page-reuse rule in ``allocator/swap.py`` relies on), then runs one or more
forwards in order. Under ``baton`` a step with newcomers runs two: their prompts alone (the
separate prefill), then the running batch's decode. Under ``orca`` and ``chunked`` one forward
mixes both. Each row says which token positions of one request to compute and whether its last
position yields a new token (a prefill chunk that stops short of the prompt's end does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from baton_paged.allocator import SwapPlan
from baton_paged.request import RequestStatus

IN_FLIGHT = -1
"""A row's input token that the previous step sampled on the device and the host has not read
yet (step-ahead scheduling): the runner takes it from that step's sampled ids, on the device."""


@dataclass(frozen=True)
class ScheduledRow:
    request_id: str
    start: int
    """First position computed: the request's ``num_computed_tokens``."""
    token_ids: tuple[int, ...]
    """Tokens at positions ``[start, start + len(token_ids))``; a decode row's one token may be
    ``IN_FLIGHT``."""
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
    batch_size: int = 0
    """Requests holding a batch slot once the plan is made: the batch its forwards serve."""
    offered_slots: int = 0
    """Batch slots work could fill this iteration: min(max batch size, requests running or
    waiting). Tokens generated / offered slots, summed over iterations, is slot efficiency."""
    admitted: tuple[str, ...] = ()
    """Requests that joined the batch this iteration."""
    preempted: tuple[str, ...] = ()
    """Requests that left the batch early, swapped out or to recompute, back in the queue."""
    swap_out: tuple[SwapPlan, ...] = ()
    """Copies of preempted requests' K/V to the host pool; issued before anything else."""
    swap_in: tuple[SwapPlan, ...] = ()
    """Copies of resumed requests' K/V back to their new pages; issued before the forwards."""

    @property
    def num_recomputed(self) -> int:
        """Preemptions that freed K/V rather than swapping it."""
        return len(self.preempted) - len(self.swap_out)


@dataclass(frozen=True)
class StepResult:
    """What the engine did with a ``StepPlan``: all of it, or how far a failed step got."""

    forwards_run: int = 0
    """How many of the plan's forwards ran, in order, writing their rows' K/V."""
    finished: tuple[tuple[str, RequestStatus], ...] = ()
    """Requests that finished on a token sampled in this step, and how."""


@dataclass(frozen=True)
class QueueSizes:
    """Where the scheduler's requests are, as every call that changes that returns it (the
    engine publishes it without reading scheduler state)."""

    running: int
    """Requests holding a batch slot."""
    waiting: int
    """Queued requests whose K/V is not in host memory (new, or to recompute)."""
    swapped: int
    """Queued requests whose K/V waits in the host swap pool."""
