"""Batching policies: which forwards an iteration runs, formed through the scheduler's ``Step``.

The scheduler opens every step the same way (memory-pressure shedding, the running requests'
next pages reserved) and closes it into a plan; a policy only decides, in between, when
newcomers join and how their prompts run. All admit in priority-then-FCFS order with preemption
by swap or recompute (``Step.admit``):

* ``baton``: newcomers join between any two iterations; their prompts run in a forward of their
  own (the separate prefill), never stretching the running batch's decode step; finished requests
  leave at once.
* ``orca``: newcomers join between iterations too, but their whole prompts run inside the same
  forward as the running batch's decode tokens (Orca's iteration-level batching).
* ``static``: a batch is admitted only when the previous one has fully finished; finished
  requests' slots stay empty until then.
* ``chunked``: one forward per iteration under a token budget: every decode token first, then
  prompt chunks (continuing ones before new ones).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from baton_paged.request import Request
from baton_paged.sched.plan import ForwardBatch, ScheduledRow
from baton_paged.sched.step import Step, is_decoder


class Policy(ABC):
    name: str

    def __init__(self, token_budget: int):
        self.token_budget = token_budget
        """Most tokens per forward: prompts' under baton/orca/static, all under chunked."""

    @abstractmethod
    def form(self, step: Step) -> list[ForwardBatch]:
        """This iteration's forwards, admitting through ``step`` as the policy sees fit."""

    def prompt_groups(self, step: Step, admitted: list[Request]) -> list[list[ScheduledRow]]:
        """Whole prompts of the admitted requests, in groups of at most ``token_budget`` tokens
        (a longer prompt runs alone)."""
        groups: list[list[ScheduledRow]] = []
        used = self.token_budget
        for row in (step.row(r) for r in admitted):
            if used + len(row.token_ids) > self.token_budget:
                groups.append([])
                used = 0
            groups[-1].append(row)
            used += len(row.token_ids)
        return groups


class BatonPolicy(Policy):
    name = "baton"

    def form(self, step: Step) -> list[ForwardBatch]:
        return self.prefill_then_decode(step, step.admit())

    def prefill_then_decode(self, step: Step, admitted: list[Request]) -> list[ForwardBatch]:
        """Newcomers' prompts in forwards of their own, then one decode forward for the batch
        (requests swapped back in rejoin it directly: their K/V is already computed)."""
        prompts = [r for r in admitted if not is_decoder(r)]
        forwards = [step.forward(rows) for rows in self.prompt_groups(step, prompts)]
        decoders = step.decoders()
        if decoders:
            forwards.append(step.forward(step.row(r) for r in decoders))
        return forwards


class OrcaPolicy(Policy):
    name = "orca"

    def form(self, step: Step) -> list[ForwardBatch]:
        admitted = step.admit()
        prompts = self.prompt_groups(step, [r for r in admitted if not is_decoder(r)]) or [[]]
        # The first group of prompts shares the decode forward; more than the prefill budget
        # (a burst of arrivals) runs as further forwards in the same iteration.
        decode = [step.row(r) for r in step.decoders()]
        groups = [decode + prompts[0], *prompts[1:]]
        return [step.forward(group) for group in groups if group]


class StaticPolicy(BatonPolicy):
    name = "static"

    def form(self, step: Step) -> list[ForwardBatch]:
        if step.running:  # (its decoders may all have their last token in flight)
            rows = [step.row(r) for r in step.decoders()]
            return [step.forward(rows)] if rows else []
        # run to completion: a request held back to share a prefix would wait for the batch
        return self.prefill_then_decode(step, step.admit(share_prefixes=False))


class ChunkedPolicy(Policy):
    name = "chunked"

    def form(self, step: Step) -> list[ForwardBatch]:
        while self.tokens_left(step) > 0 and step.admit(max_requests=1):
            pass
        if self.tokens_left(step) <= 0 and self.head_outranks_the_batch(step):
            step.admit(max_requests=1)  # one per iteration past a spent budget
        # The budget goes by priority, then decodes before prompt chunks, then admission order:
        # a request that took a lower one's place is computed now, and a started prompt
        # finishes before a new one starts.
        rows, left = [], self.token_budget
        for request in sorted(step.computable, key=lambda r: (r.priority, not is_decoder(r))):
            if left == 0:
                break
            rows.append(step.row(request, min(left, request.num_pending_tokens)))
            left -= len(rows[-1].token_ids)
        return [step.forward(rows)] if rows else []

    def tokens_left(self, step: Step) -> int:
        """Budget the running requests' pending tokens leave for another prompt."""
        return self.token_budget - sum(r.num_pending_tokens for r in step.computable)

    @staticmethod
    def head_outranks_the_batch(step: Step) -> bool:
        """Does the next waiting request have a higher priority than some running one? Then it
        may take that one's place (slot, pages or budget share) even when the budget is spent."""
        head = step.waiting_head()
        return head is not None and any(r.priority > head.priority for r in step.running)


POLICIES = {cls.name: cls for cls in (BatonPolicy, OrcaPolicy, StaticPolicy, ChunkedPolicy)}


def register_policy(policy: type[Policy]) -> None:
    """Make a ``Policy`` subclass selectable by its ``name`` (plugins call this; see
    ``baton_paged.plugins.registry``). Registering the same class again changes nothing;
    another class under a name in use is an error."""
    if not (isinstance(policy, type) and issubclass(policy, Policy)):
        raise TypeError(f"a policy must be a Policy subclass, got {policy!r}")
    name = getattr(policy, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{policy.__qualname__} needs a non-empty str class attribute 'name'")
    if POLICIES.get(name, policy) is not policy:
        raise ValueError(f"policy name {name!r} is taken by {POLICIES[name].__qualname__}")
    POLICIES[name] = policy


def make_policy(name: str, max_prefill_tokens: int, max_num_batched_tokens: int) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    budget = max_num_batched_tokens if name == "chunked" else max_prefill_tokens
    return POLICIES[name](budget)
