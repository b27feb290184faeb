"""Top-k and top-p filtering without sorting the whole vocabulary when the answer is near the top.

The rule (the sampler's contract): sort each row's scores descending, ties to the lowest id (a
stable sort); top-k keeps the first k positions (exactly k tokens); top-p then drops every token
whose more likely predecessors already reach ``top_p``, which keeps the smallest set reaching it
and always the top token. A row with ``top_p == 1`` skips top-p: rounding can make a float
cumulative sum reach 1 before the tail, which would drop tokens that should stay.

Sorting 49,152 scores per row costs ~1.7 ms of CPU per row (220 ms at B=128), more than a small
model's forward, while a real model's nucleus is usually a few dozen tokens. So each row first
takes its ``CANDIDATES`` best scores (``topk``, linear time), orders them by the same rule, and
decides its kept set from them alone, with the probabilities normalised over the whole row. That
answer is exact when the kept set ends before the last candidate at a score strictly above the
last candidate's: every token outside the candidates then scores below every kept token, so
neither the kept set nor its order among ties could change. Rows where that does not hold (a flat
distribution, a huge top-k) take the full sort, so the result never depends on the shortcut.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from baton_paged.sampling_params import SamplingParams

TIERS = (64, 1024)
"""How many of each row's best scores the shortcut looks at, tried in turn: rows the first
tier cannot decide try the next, and the rest sort whole."""


def top_k_top_p(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """``scores`` (``[N, V]``) with the tokens outside each row's top-k, then outside its top-p
    nucleus, set to -inf (``params[i]`` is row ``i``'s)."""
    vocab = scores.shape[-1]
    device = scores.device
    top_k = torch.tensor([vocab if p.top_k_disabled else p.top_k for p in params], device=device)
    top_p = [p.top_p if p.top_p < 1 else float("inf") for p in params]
    top_p = torch.tensor(top_p, dtype=scores.dtype, device=device)
    whole_row = any(p.top_k_disabled for p in params)  # some row's top-p shares all its mass
    filtered = None
    pending = torch.arange(len(params), device=device)
    for width in (w for w in TIERS if w < vocab):
        rows = scores if filtered is None else scores[pending]
        decided, exact = _filter_best(rows, width, top_k[pending], top_p[pending], whole_row)
        if filtered is None and bool(exact.all()):  # the usual case: one tier decides all
            return decided
        if filtered is None:
            filtered = decided
        else:
            filtered[pending[exact]] = decided[exact]
        pending = pending[~exact]
        if not pending.numel():
            return filtered
    sorted_rows = _filter_sorted(scores[pending], top_k[pending], top_p[pending], whole_row)
    if filtered is None:
        return sorted_rows
    filtered[pending] = sorted_rows
    return filtered


def _filter_sorted(
    scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, whole_row: bool = True
) -> torch.Tensor:
    """The rule over every row's whole vocabulary, stably sorted."""
    sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
    kept = _keep(scores, sorted_scores, top_k, top_p, whole_row)
    filtered = sorted_scores.masked_fill(~kept, -torch.inf)
    return torch.empty_like(scores).scatter_(-1, order, filtered)


def _filter_best(
    scores: torch.Tensor, width: int, top_k: torch.Tensor, top_p: torch.Tensor, whole_row: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule over each row's best ``width`` scores; also which rows it decided exactly. A
    top-k beyond ``width`` (short of the vocabulary) would need the mass of scores not seen,
    so such rows are never exact here."""
    values, ids = _ties_by_id(*scores.topk(width, dim=-1))
    kept = _keep(scores, values, top_k, top_p, whole_row)
    count = kept.sum(dim=-1)
    last_kept = values.gather(-1, (count - 1)[:, None])[:, 0]
    known_mass = (top_k <= width) | (top_k >= scores.shape[-1])
    exact = (count < width) & (last_kept > values[:, -1]) & known_mass
    filtered = torch.full_like(scores, -torch.inf)
    filtered.scatter_(-1, ids, values.masked_fill(~kept, -torch.inf))
    return filtered, exact


def _ties_by_id(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates in the rule's order: descending score, ties to the lowest id (``topk``
    leaves the order of ties unspecified)."""
    by_id = ids.argsort(dim=-1)
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    by_score = values.argsort(dim=-1, descending=True, stable=True)
    return values.gather(-1, by_score), ids.gather(-1, by_score)


def _keep(
    scores: torch.Tensor,
    best: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    whole_row: bool,
) -> torch.Tensor:
    """Which of ``best`` (each row's best scores in the rule's order: all of them, or the first
    ones) the rule keeps; ``whole_row``: some row has no top-k.

    Every path that can decide a row must compare the same numbers with ``top_p``, or a running
    sum landing exactly on it could round one way in one path and the other way in another. So
    sums are taken over the same spans in every path: a top-k's mass over the smallest tier
    holding it, the whole row's (no top-k) over the unsorted scores, running sums tier by tier
    (``_segments``).
    """
    positions = torch.arange(best.shape[-1], device=best.device)
    in_top_k = positions < top_k[:, None]
    peak = best[:, :1]
    weights = (best - peak).exp().masked_fill(~in_top_k, 0)
    mass = (scores - peak).exp().sum(dim=-1, keepdim=True) if whole_row else 1.0
    has_top_k = top_k < scores.shape[-1]
    for _, end in reversed(_segments(best.shape[-1])):  # widest first: the smallest span wins
        top_mass = weights[:, :end].sum(dim=-1, keepdim=True)
        mass = torch.where((has_top_k & (top_k <= end))[:, None], top_mass, mass)
    probs = weights / mass
    before = _running_sum(probs) - probs
    return in_top_k & (before < top_p[:, None])


def _segments(width: int) -> list[tuple[int, int]]:
    """``[0, width)`` cut at the tiers."""
    cuts = [0, *(t for t in TIERS if t < width), width]
    return list(zip(cuts, cuts[1:], strict=False))


def _running_sum(probs: torch.Tensor) -> torch.Tensor:
    """Running sums along each row, tier by tier: how a cumulative sum is blocked can depend on
    its length, and every path must add the same way."""
    total, parts = 0, []
    for start, end in _segments(probs.shape[-1]):
        parts.append(probs[:, start:end].cumsum(dim=-1) + total)
        total = parts[-1][:, -1:]
    return torch.cat(parts, dim=-1)
