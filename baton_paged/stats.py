"""EngineStats: counters over an engine's life, and the slot efficiency BATON is about.

Slot efficiency = tokens generated / slots offered, summed over iterations, where an iteration
offers min(max batch size, requests running or waiting) slots: a slot counts as idle only when
a request could have used it. A run-to-completion batch whose finished rows wait for the longest
one scores low while the queue is non-empty; BATON, refilling slots between iterations, scores
near 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from baton_paged.sched.plan import StepPlan


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
    finished: int = 0
    aborted: int = 0
    batch_rows: int = 0
    """Sum over iterations of running requests (for the mean batch occupancy)."""

    def record(self, plan: StepPlan, generated: int, running: int) -> None:
        self.iterations += 1
        self.forwards += len(plan.forwards)
        self.generated_tokens += generated
        self.offered_slots += plan.offered_slots
        self.admitted += len(plan.admitted)
        self.preemptions += len(plan.preempted)
        self.batch_rows += running
        for forward in plan.forwards:
            self.prompt_tokens += forward.num_tokens - forward.num_decode_rows

    @property
    def slot_efficiency(self) -> float:
        return self.generated_tokens / self.offered_slots if self.offered_slots else 1.0

    @property
    def idle_slot_iterations(self) -> int:
        return self.offered_slots - self.generated_tokens

    @property
    def mean_batch_size(self) -> float:
        return self.batch_rows / self.iterations if self.iterations else 0.0
