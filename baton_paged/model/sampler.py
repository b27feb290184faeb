"""The sampler: one step's logits in, one token per request out (plus log-probabilities on request).

Order of operations, per row, as vLLM's: ``logit_bias`` is added; tokens outside
``allowed_token_ids`` and suppressed ids are set to -inf (the engine forbids EOS and stop ids
while a request is below ``min_tokens``, and the token completing a bad word); repetition,
frequency and presence penalties apply; all of this to greedy rows too. Then greedy rows take
the argmax and random rows go through temperature, min-p, top-k, top-p (``nucleus.py``) and one
draw by inverse transform.

Two rules shape the code:
- Greedy must match HF ``generate`` token for token, so greedy rows are a plain argmax (ties go to
  the lowest id, as ``torch.argmax``) and float64 logits stay float64; other dtypes work in float32.
- A seeded request must give the same tokens whatever else is in the batch, so it draws alone
  from its own generator; the rows without a seed share the engine's generator and draw in one
  batched call. The filtering before the draw is vectorised, but every operation in it is
  row-wise, so a row's probabilities never depend on its neighbours.

Log-probabilities are vLLM's default "raw" ones: ``log_softmax`` of the logits as the model gave
them, before suppression, temperature and filtering, so they describe the model, not the sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from baton_paged.model.decoder_kernels import DECODER_KERNELS
from baton_paged.model.nucleus import top_k_top_p
from baton_paged.outputs import Logprob
from baton_paged.sampling_params import SamplingParams


class SamplingRow(NamedTuple):
    """What the sampler needs to know about one row of logits (a named tuple, immutable like a
    frozen dataclass but built in ~0.2 us rather than ~0.5: one per request every step)."""

    params: SamplingParams
    generator: torch.Generator | None
    """The request's own generator (on the logits' device), or None for torch's default one."""
    suppressed_token_ids: tuple[int, ...] = ()
    """Token ids this row may not produce this step (EOS and stop ids below ``min_tokens``)."""
    prompt_token_ids: Sequence[int] = ()
    """The request's prompt: the repetition penalty counts it (read only with penalties on)."""
    output_token_ids: Sequence[int] = ()
    """The request's tokens so far: every penalty counts them."""


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]
    """Per row: None if the request did not ask, else the sampled token first, then the top
    ``params.logprobs`` tokens (one entry per token id)."""


@dataclass(frozen=True)
class DeviceSample:
    """Tokens drawn but not yet read by the host: the next step's decode rows can take them as
    inputs on the device while the host is still busy with this one (step-ahead scheduling)."""

    token_ids: torch.Tensor
    """``[N]`` int64, on the logits' device."""
    raw_logprobs: dict[int, torch.Tensor]
    """``log_softmax`` of the unmodified logits of the rows that asked, by row index."""


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
    """Sample one token per row of ``logits`` (``[N, V]``; row ``i`` belongs to ``rows[i]``)."""
    drawn = sample_on_device(logits, rows)
    token_ids = drawn.token_ids.tolist()
    return SampleResult(token_ids, collect_logprobs(drawn, token_ids, rows))


def sample_on_device(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> DeviceSample:
    """``sample``, leaving the tokens on the device: no copy to the host is waited for (the
    filtering of a random row may still read a flag or two from the device)."""
    if logits.ndim != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(rows)} rows")
    if all(_bare_argmax(row) for row in rows):  # the common greedy batch: nothing to copy
        return DeviceSample(_argmax(logits), {})
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scores = logits.detach().to(dtype=dtype, copy=True)
    raw = _raw_logprobs(scores, rows)
    _add_logit_bias(scores, rows)
    _allow_only(scores, rows)
    _suppress(scores, rows)
    _apply_penalties(scores, rows)
    random = [i for i, row in enumerate(rows) if not row.params.is_greedy]
    if len(random) == len(rows):  # a batch that samples: no copy of its scores by index
        return DeviceSample(_sample_random(scores, rows), raw)
    tokens = scores.argmax(dim=-1)
    if random:
        tokens[random] = _sample_random(scores[random], [rows[i] for i in random])
    return DeviceSample(tokens, raw)


def collect_logprobs(
    drawn: DeviceSample, token_ids: Sequence[int], rows: Sequence[SamplingRow]
) -> list[dict[int, Logprob] | None]:
    """Each row's log-probabilities (None where not asked), once its token is read."""
    raw = drawn.raw_logprobs
    return [
        token_logprobs(raw[i], token_ids[i], row.params.logprobs) if i in raw else None
        for i, row in enumerate(rows)
    ]


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax. The decoder library's ``row_argmax`` takes 0.11 ms on [32, 49152]
    logits where torch's CPU argmax took 0.99 ms in float32 and 1.16 ms in bfloat16 widened to
    float32 (2.45 ms unwidened; one run, 2 threads), with the same answer (the first index of the
    largest, or of the first NaN). The library is used once loaded (the native executor loads it
    at start-up), never built here, on a request's path; without it bfloat16 is widened first, which
    keeps order and ties, so the ids are the same."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16):
        kernels = DECODER_KERNELS.loaded()
        if kernels is not None and logits.ndim == 2 and logits.shape[1] and logits.stride(1) == 1:
            return kernels.row_argmax(logits)
    if logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float16):
        return logits.float().argmax(dim=-1)
    return logits.argmax(dim=-1)


def _bare_argmax(row: SamplingRow) -> bool:
    """Greedy with nothing to change the logits first and no log-probabilities to report (the
    argmax of the logits as given equals that of their float copy: widening keeps order and
    ties)."""
    params = row.params
    return (
        params.is_greedy
        and params.logprobs is None
        and not params.logit_bias
        and params.allowed_token_ids is None
        and not row.suppressed_token_ids
        and not params.has_penalties
    )


def _suppress(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Set every row's suppressed ids to -inf in place, with one indexed write for the batch."""
    row_index = [i for i, row in enumerate(rows) for _ in row.suppressed_token_ids]
    if not row_index:
        return
    token_index = [t for row in rows for t in row.suppressed_token_ids]
    device = scores.device
    scores[torch.tensor(row_index, device=device), torch.tensor(token_index, device=device)] = (
        float("-inf")
    )


def _allow_only(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Rows with ``allowed_token_ids``: every other token to -inf."""
    for i, row in enumerate(rows):
        allowed = row.params.allowed_token_ids
        if allowed is not None:
            keep = scores[i, list(allowed)]
            scores[i] = float("-inf")
            scores[i, list(allowed)] = keep


def _add_logit_bias(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        if row.params.logit_bias:
            ids, biases = zip(*row.params.logit_bias, strict=True)
            scores[i, list(ids)] += torch.tensor(biases, dtype=scores.dtype, device=scores.device)


def _apply_penalties(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Repetition penalty over prompt and output (transformers' ``RepetitionPenaltyLogitsProcessor``
    rule), then OpenAI's frequency and presence penalties over the output, in place.

    All penalised rows at once, touching only the (row, token) entries that occur: each is one
    position of the flattened scores, found with its count by one ``unique`` over the batch,
    never a vocabulary-sized tensor per row (or for the batch: 25 MB at B=128 x 49,152). A
    penalty at its neutral value changes nothing (x * 1, x / 1 and x - 0 are exact).
    """
    index = [i for i, row in enumerate(rows) if row.params.has_penalties]
    if not index:
        return
    flat = scores.view(-1)  # the sampler's own contiguous copy
    params = [rows[i].params for i in index]
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = [(*rows[i].prompt_token_ids, *rows[i].output_token_ids) for i in index]
        at, _ = _occurrences(index, seen, scores)
        (penalty,) = _per_row(scores, index, at, [p.repetition_penalty for p in params])
        values = flat[at]
        flat[at] = torch.where(values < 0, values * penalty, _divided(values, penalty))
    at, counts = _occurrences(index, [rows[i].output_token_ids for i in index], scores)
    if len(at):
        frequencies = [p.frequency_penalty for p in params]
        presences = [p.presence_penalty for p in params]
        frequency, presence = _per_row(scores, index, at, frequencies, presences)
        flat[at] = (flat[at] - frequency * counts) - presence


def _divided(values: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """``values / divisor`` as dividing by a Python float does, which transformers' processor
    (and the row-by-row form) do: a true division on the CPU, a multiplication by the divisor's
    reciprocal on CUDA (PyTorch's kernel for a scalar divisor), one bit apart at times."""
    return values * divisor.reciprocal() if values.is_cuda else values / divisor


def _occurrences(
    index: list[int], token_lists: Sequence[Sequence[int]], scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat positions in ``scores`` of every (row ``index[j]``, token in ``token_lists[j]``)
    pair, each once, and how often it occurs (in ``scores``' dtype)."""
    vocab, device = scores.shape[1], scores.device
    keys = [index[j] * vocab + t for j, ids in enumerate(token_lists) for t in ids]
    at, counts = torch.tensor(keys, dtype=torch.long, device=device).unique(return_counts=True)
    return at, counts.to(scores.dtype)


def _per_row(
    scores: torch.Tensor, index: list[int], at: torch.Tensor, *values: list[float]
) -> list[torch.Tensor]:
    """For each list in ``values`` (one value per row of ``index``): each flat position's row's
    value, the positions' rows found once for all lists."""
    rows_at = at // scores.shape[1]
    found = []
    for per_row in values:
        by_row = torch.zeros(scores.shape[0], **_like(scores))
        by_row[index] = torch.tensor(per_row, **_like(scores))
        found.append(by_row[rows_at])
    return found


def _sample_random(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Temperature, then min-p, top-k and top-p, then one draw per row. ``scores`` is the
    sampler's own copy: the temperature divides it in place."""
    temperatures = [row.params.temperature for row in rows]
    scores = scores.div_(torch.tensor(temperatures, **_like(scores))[:, None])
    if any(row.params.min_p > 0 for row in rows):
        scores = _min_p(scores, [row.params.min_p for row in rows])
    filtered = [i for i, row in enumerate(rows) if _filters(row.params)]
    if len(filtered) == len(rows):
        scores = top_k_top_p(scores, [row.params for row in rows])
    elif filtered:
        scores[filtered] = top_k_top_p(scores[filtered], [rows[i].params for i in filtered])
    return _draw(scores, rows)


def _draw(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """One token per row by inverse transform: the first token whose cumulative probability
    passes a uniform draw. One random number per row, where ``multinomial`` (or an exponential
    race) draws one per vocabulary entry: 100 ms of CPU at B=128 over 49,152 tokens, against
    ~3 ms for the cumulative sums. The sums are of ``exp(score - row max)`` and the draw is
    scaled by their total, so the softmax's normalising pass is never made (the same
    distribution in two fewer passes over the scores). A token of probability 0 is never
    chosen: the first index past the draw has a larger sum than its predecessor, and a draw
    that rounds up to the whole mass takes the last token with any. That needs sums that never
    fall and do not move at a zero: so they are on the CPU (added in order); CUDA's parallel scan
    associates neighbouring sums differently, so there a zero's sum is set to its predecessor's.

    A row with no finite score (all -inf, or NaN from the model) has nothing to draw: an error
    names it rather than a token outside the vocabulary."""
    peak = scores.amax(dim=-1, keepdim=True)
    if not bool(torch.isfinite(peak).all()):
        raise ValueError("a row of logits has no finite score (NaN, or every token -inf)")
    weights = (scores - peak).exp_()
    cdf = weights.cumsum(dim=-1)
    if cdf.is_cuda:
        cdf = torch.where(weights > 0, cdf, -torch.inf).cummax(dim=-1).values
    total = cdf[:, -1:].contiguous()
    uniform = torch.empty(len(rows), 1, dtype=cdf.dtype, device=cdf.device)
    for generator, index in _by_generator(rows).items():
        uniform[index] = torch.rand(len(index), 1, generator=generator, **_like(cdf))
    chosen = torch.searchsorted(cdf, uniform * total, right=True)
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(chosen, last)[:, 0]


def _like(tensor: torch.Tensor) -> dict:
    return {"dtype": tensor.dtype, "device": tensor.device}


def _by_generator(rows: Sequence[SamplingRow]) -> dict[torch.Generator | None, list[int]]:
    """Row indices by the generator they draw from, in row order (a seeded request has one of
    its own; the others share the engine's): one call draws each group's numbers."""
    groups: dict[torch.Generator | None, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.generator, []).append(i)
    return groups


def _min_p(scores: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Drop tokens less likely than ``min_p`` times the row's most likely token (``min_p == 0``
    keeps every finite-score token)."""
    probs = scores.softmax(dim=-1)
    threshold = torch.tensor(min_p, dtype=probs.dtype, device=probs.device)[:, None]
    return scores.masked_fill(probs < threshold * probs.amax(dim=-1, keepdim=True), float("-inf"))


def _filters(params: SamplingParams) -> bool:
    return not params.top_k_disabled or params.top_p < 1


def _raw_logprobs(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> dict[int, torch.Tensor]:
    """``log_softmax`` of the unmodified logits of the rows that asked, by row index."""
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return {}
    logprobs = scores[wanted].log_softmax(dim=-1)
    return dict(zip(wanted, logprobs, strict=True))


def token_logprobs(logprobs: torch.Tensor, sampled: int, top_n: int) -> dict[int, Logprob]:
    """From one position's ``log_softmax`` (also a prompt position's, for ``prompt_logprobs``):
    the sampled token, then the ``top_n`` most likely ones; a token in both appears once.

    A rank counts strictly more likely tokens, so it does not depend on how ``topk`` orders ties.
    Every token more likely than the j-th top value is itself among the first j - 1, so the top
    tokens' ranks come from the top values alone: the position of the first value equal to each
    (a binary search in the sorted values), in O(top_n) memory, never a top_n x top_n matrix.
    """
    sampled_logprob = logprobs[sampled]
    sampled_rank = int((logprobs > sampled_logprob).sum()) + 1
    result = {sampled: Logprob(float(sampled_logprob), sampled_rank)}
    if top_n == 0:
        return result
    values, ids = logprobs.topk(min(top_n, logprobs.shape[-1]))  # sorted, most likely first
    descending = values.neg()  # ascending, as searchsorted wants
    ranks = torch.searchsorted(descending, descending, side="left") + 1
    for token_id, value, rank in zip(ids.tolist(), values.tolist(), ranks.tolist(), strict=True):
        result.setdefault(token_id, Logprob(value, rank))
    return result
