"""Top-k and top-p filtering without sorting the whole vocabulary when the answer is near the top.

The rule (the sampler's contract): sort each row's scores descending, ties to the lowest id (a
stable sort); top-k keeps the first k positions (exactly k tokens); top-p then drops every token
whose more likely predecessors already reach ``top_p``, which keeps the smallest set reaching it
and always the top token. A row with ``top_p == 1`` skips top-p: rounding can make a float
cumulative sum reach 1 before the tail, which would drop tokens that should stay.

Sorting 49,152 scores per row costs ~1.7 ms of CPU per row (220 ms at B=128), more than a small
model's forward, while a real model's nucleus is usually a few dozen tokens. So each row first
takes its best 64 scores (``topk``, linear time; then 1,024: ``TIERS``), orders them by the same
rule, and decides its kept set from them alone, with the probabilities normalised over the whole
row. That answer is exact when the kept set ends before the last candidate at a score strictly
above the last candidate's: every token outside the candidates then scores below every kept
token, so neither the kept set nor its order among ties could change. Rows where that does not
hold (a flat distribution, a huge top-k) take the full sort, so the result never depends on the
shortcut; a tier that the best scores already seen show cannot decide any row is skipped
(``_may_decide``), so a flat distribution goes to the sort at once.
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
    vocab, device = scores.shape[-1], scores.device
    whole = [p.top_k_disabled or p.top_k >= vocab for p in params]  # a top-k keeping every token
    top_k = torch.tensor([vocab if w else p.top_k for p, w in zip(params, whole, strict=True)])
    top_k = top_k.to(device)
    top_p = [p.top_p if p.top_p < 1 else float("inf") for p in params]
    top_p = torch.tensor(top_p, dtype=scores.dtype, device=device)
    # each whole row's mass, which top-p without a top-k shares out: summed once for all tiers
    # (and not at all when every row has a top-k: a stand-in no row reads)
    row_mass = torch.ones(len(params), 1, dtype=scores.dtype, device=device)
    if any(whole):
        row_mass = _row_mass(scores)
    filtered, pending = _by_tiers(scores, top_k, top_p, row_mass)
    if not pending.numel():
        return filtered
    sorted_rows = _filter_sorted(scores[pending], top_k[pending], top_p[pending], row_mass[pending])
    if filtered is None:
        return sorted_rows
    filtered[pending] = sorted_rows
    return filtered


def _by_tiers(
    scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, row_mass: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The rows the tiers decide, filtered (None if none), and the rows still pending."""
    filtered, seen = None, None
    pending = torch.arange(len(scores), device=scores.device)
    for width in (w for w in TIERS if w < scores.shape[-1]):
        rows = scores if filtered is None else scores[pending]
        mass = row_mass if filtered is None else row_mass[pending]
        limits = (top_k[pending], top_p[pending], mass, scores.shape[-1])
        if seen is not None and not _may_decide(seen, width, *limits):
            continue  # the best scores seen already show no row's kept set ends this early
        best = rows.topk(width, dim=-1)
        seen = best.values
        if not _may_decide(seen, width, *limits):
            continue
        decided, exact = _filter_best(rows, best, *limits[:3])
        if filtered is None and bool(exact.all()):  # the usual case: one tier decides all
            return decided, pending[:0]
        if filtered is None:
            filtered = decided
        else:
            filtered[pending[exact]] = decided[exact]
        pending, seen = pending[~exact], seen[~exact]
        if not pending.numel():
            break
    return filtered, pending


def _may_decide(
    seen: torch.Tensor,
    width: int,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    row_mass: torch.Tensor,
    vocab: int,
) -> bool:
    """Whether any row's kept set could end within its best ``width`` scores, judged from its
    best scores ``seen`` so far (sorted, the first ones or all ``width``). Only a skip: a row
    this passes over is decided by a later tier or the whole sort, exactly as it would be here.

    A row with a top-k of at most ``width`` may. A row with no top-k needs its first
    ``width - 1`` tokens to hold ``top_p`` of its mass; tokens not seen are each at most as
    likely as the last one seen, which bounds that mass from above (a flat distribution, a
    random-weight model's, fails it at once and goes straight to the whole sort)."""
    probs = (seen - seen[:, :1]).exp() / row_mass
    unseen = max(width - 1 - seen.shape[-1], 0)
    bound = probs[:, : width - 1].sum(dim=-1) + unseen * probs[:, -1]
    may = (top_k <= width) | ((top_k >= vocab) & (bound >= top_p * (1 - 1e-6)))
    return bool(may.any())


def _filter_sorted(
    scores: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    row_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rule over every row's whole vocabulary, stably sorted."""
    sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
    kept = _keep(sorted_scores, top_k, top_p, _whole_rows(scores, row_mass))
    filtered = sorted_scores.masked_fill(~kept, -torch.inf)
    return torch.empty_like(scores).scatter_(-1, order, filtered)


def _filter_best(
    scores: torch.Tensor,
    best: tuple[torch.Tensor, torch.Tensor],
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    row_mass: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule over each row's best scores (``best``: ``topk``'s values and ids); also which
    rows it decided exactly. A top-k beyond them (short of the vocabulary) would need the mass
    of scores not seen, so such rows are never exact here."""
    values, ids = _ties_by_id(*best)
    width = values.shape[-1]
    kept = _keep(values, top_k, top_p, _whole_rows(scores, row_mass))
    count = kept.sum(dim=-1)
    last_kept = values.gather(-1, (count - 1).clamp(min=0)[:, None])[:, 0]  # NaN rows keep none
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


def _whole_rows(scores: torch.Tensor, row_mass: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """``(row mass, vocabulary size)``: each whole row's mass (given by the caller, else summed
    here) and where a top-k stops being one."""
    return (_row_mass(scores) if row_mass is None else row_mass), scores.shape[-1]


def _row_mass(scores: torch.Tensor) -> torch.Tensor:
    """``sum(exp(score - row max))`` per row, ``[N, 1]``."""
    return (scores - scores.amax(dim=-1, keepdim=True)).exp().sum(dim=-1, keepdim=True)


def _keep(
    best: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    whole: tuple[torch.Tensor, int],
) -> torch.Tensor:
    """Which of ``best`` (each row's best scores in the rule's order: all of them, or the first
    ones) the rule keeps; ``whole``: the rows' whole masses and the vocabulary size.

    Every path that can decide a row must compare the same numbers with ``top_p``, or a running
    sum landing exactly on it could round one way in one path and the other way in another. So
    sums are taken over the same spans in every path: a top-k's mass over the smallest tier
    holding it, the whole row's (no top-k) over the unsorted scores, running sums tier by tier
    (``_segments``).
    """
    row_mass, vocab = whole
    positions = torch.arange(best.shape[-1], device=best.device)
    in_top_k = positions < top_k[:, None]
    weights = (best - best[:, :1]).exp().masked_fill(~in_top_k, 0)  # best[:, 0]: the row max
    mass = row_mass
    has_top_k = top_k < vocab
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
