"""Parallel sampling: ``n`` (or ``best_of``) completions of one prompt, run as child requests.

A request whose params ask for more than one completion runs as that many child requests named
``"{i}_{parent id}"`` (vLLM's naming), each with ``n=1`` and, when seeded, ``seed + i`` (so the
completions differ, yet each is reproducible). The scheduler and the runner only ever see
children, so every policy, preemption and swap path serves them unchanged. ``SampleGroups``
holds the engine's groups: it splits a parent into children, turns children's outputs back into
the parent's and aborts a parent's children together. A ``SampleGroup``
merges the children's outputs into the parent's: every child's latest completion at its index,
finished once all are. With ``best_of > n`` only the final output is reported, holding the ``n``
completions of highest cumulative log-probability, as OpenAI's ``best_of`` does.

The prompt's pages are shared through prefix caching (``sched/prefix_caching.py``) once one
child's prefill has filled them; children admitted in the same iteration each compute theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from baton_paged.outputs import CompletionOutput, RequestMetrics, RequestOutput
from baton_paged.request import Request

if TYPE_CHECKING:
    from baton_paged.processing.output_processor import Output


def child_requests(parent: Request) -> list[Request]:
    """The children that produce ``parent``'s completions, in index order."""
    params = parent.params
    children = []
    for index in range(params.num_samples):
        seed = None if params.seed is None else params.seed + index
        child_params = replace(
            params,
            n=1,
            best_of=None,
            seed=seed,
            # ranking by cumulative log-probability needs each sampled token's log-probability
            logprobs=0
            if params.logprobs is None and params.num_samples > params.n
            else params.logprobs,
        )
        children.append(
            replace(
                parent,
                request_id=f"{index}_{parent.request_id}",
                params=child_params,
                output_token_ids=[],
                token_times=[],
                page_keys=[],
                generator=None if seed is None else _generator(parent.generator, seed),
            )
        )
    return children


def _generator(like: torch.Generator, seed: int) -> torch.Generator:
    return torch.Generator(like.device).manual_seed(seed)


@dataclass
class SampleGroup:
    """One parent request's children and their latest outputs."""

    parent: Request
    child_ids: tuple[str, ...]
    latest: dict[str, RequestOutput] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return len(self.latest) == len(self.child_ids) and all(
            output.finished for output in self.latest.values()
        )

    def update(self, output: RequestOutput) -> RequestOutput | None:
        """Record a child's output; the parent's output when there is one to report."""
        self.latest[output.request_id] = output
        params = self.parent.params
        if params.num_samples > params.n and not self.finished:
            return None  # best_of: which completions are returned is known only at the end
        return self.merged()

    def merged(self) -> RequestOutput:
        outputs = [self.latest[child] for child in self.child_ids if child in self.latest]
        completions = [replace(o.outputs[0], index=i) for i, o in enumerate(outputs)]
        params = self.parent.params
        if params.num_samples > params.n:
            completions = _best(completions, params.n)
        if params.logprobs is None:
            completions = [replace(c, logprobs=None) for c in completions]
        return RequestOutput(
            request_id=self.parent.request_id,
            prompt=self.parent.prompt,
            prompt_token_ids=tuple(self.parent.prompt_token_ids),
            outputs=tuple(completions),
            finished=self.finished,
            metrics=_merged_metrics([o.metrics for o in outputs], self.finished),
            prompt_logprobs=outputs[0].prompt_logprobs,
            num_cached_tokens=max(o.num_cached_tokens for o in outputs),
        )


def _best(completions: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    ranked = sorted(completions, key=lambda c: c.cumulative_logprob or 0.0, reverse=True)
    return [replace(c, index=i) for i, c in enumerate(ranked[:n])]


def _merged_metrics(metrics: list[RequestMetrics], finished: bool) -> RequestMetrics:
    """The first completion's token times; first admission, first token and finish over all
    of them."""
    firsts = [m.first_token_time for m in metrics if m.first_token_time is not None]
    scheduled = [m.scheduled_time for m in metrics if m.scheduled_time is not None]
    return RequestMetrics(
        arrival_time=metrics[0].arrival_time,
        first_token_time=min(firsts) if firsts else None,
        finished_time=max(m.finished_time or 0.0 for m in metrics) if finished else None,
        token_times=metrics[0].token_times,
        num_preemptions=sum(m.num_preemptions for m in metrics),
        scheduled_time=min(scheduled) if scheduled else None,
    )


class SampleGroups:
    """The live requests that run as several children: where a request's path forks at
    ``split`` and joins again at ``merge``."""

    def __init__(self) -> None:
        self._groups: dict[str, SampleGroup] = {}
        self._parent_of: dict[str, str] = {}

    def __contains__(self, request_id: str) -> bool:
        """Is ``request_id`` a live parent?"""
        return request_id in self._groups

    def __len__(self) -> int:
        return len(self._groups)

    def split(self, request: Request, ids_in_use: Container[str]) -> list[Request]:
        """The requests that serve ``request``: itself, or its children (a new group); ValueError
        if a child's id is in ``ids_in_use``."""
        if request.params.num_samples == 1:
            return [request]
        children = child_requests(request)
        if any(child.request_id in ids_in_use for child in children):
            raise ValueError(f"a child id of request {request.request_id!r} is already in use")
        ids = tuple(child.request_id for child in children)
        self._groups[request.request_id] = SampleGroup(request, ids)
        self._parent_of.update(dict.fromkeys(ids, request.request_id))
        return children

    def is_child(self, request_id: str) -> bool:
        return request_id in self._parent_of

    def owner(self, request_id: str) -> str:
        """The id the caller knows ``request_id`` by: its parent's, or its own."""
        return self._parent_of.get(request_id, request_id)

    def merge(self, outputs: list[Output]) -> list[Output]:
        """Children's outputs become their parent's (one per parent, the latest); a group whose
        children have all finished is forgotten. Others' outputs (or their snapshots) pass."""
        merged: dict[str, Output | None] = {}
        for output in outputs:
            parent = self._parent_of.get(output.request_id)
            if parent is None:
                merged[output.request_id] = output
                continue
            group = self._groups[parent]
            merged[parent] = group.update(output)
            if group.finished:
                self._forget(parent)
        return [output for output in merged.values() if output is not None]

    def abort(
        self, parent: str, abort_child: Callable[[str], RequestOutput | None]
    ) -> RequestOutput:
        """Abort every child of ``parent`` still live (``abort_child`` answers None for one that
        is not) and forget the group; the parent's final output."""
        group = self._groups[parent]
        for child in group.child_ids:
            if (output := abort_child(child)) is not None:
                group.update(output)
        self._forget(parent)
        return group.merged()

    def _forget(self, parent: str) -> None:
        for child in self._groups.pop(parent).child_ids:
            self._parent_of.pop(child, None)
