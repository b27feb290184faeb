"""Top-k / top-p filtering: the shortcut over each row's best scores decides exactly what the
whole-vocabulary stable sort decides, ties, -inf scores and every top-k range included."""

from __future__ import annotations

import pytest
import torch

from baton_paged.model import nucleus
from baton_paged.model.nucleus import TIERS, top_k_top_p
from baton_paged.sampling_params import SamplingParams

CANDIDATES = TIERS[-1]
VOCAB = 3 * CANDIDATES


def whole_sort(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The rule by the full stable sort alone (what the shortcut must equal)."""
    vocab = scores.shape[-1]
    top_k = torch.tensor([vocab if p.top_k_disabled else p.top_k for p in params])
    top_p = [p.top_p if p.top_p < 1 else float("inf") for p in params]
    return nucleus._filter_sorted(scores, top_k, torch.tensor(top_p, dtype=scores.dtype))


def rows_of(kind: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "peaked":  # a real model's shape: a few likely tokens, a long flat tail
        scores = torch.randn(n, VOCAB, generator=gen)
        scores[:, :40] += torch.linspace(14, 6, 40)
        return scores[:, torch.randperm(VOCAB, generator=gen)]
    if kind == "flat":  # the nucleus reaches far past the candidates
        return torch.randn(n, VOCAB, generator=gen) * 0.1
    if kind == "ties":  # few distinct values: ties at every boundary
        return torch.randint(0, 6, (n, VOCAB), generator=gen).float() * 2
    scores = torch.randn(n, VOCAB, generator=gen) * 4  # "suppressed": -inf scattered in
    scores[torch.rand(n, VOCAB, generator=gen) < 0.3] = -torch.inf
    return scores


PARAMS = [
    SamplingParams(top_p=0.9),
    SamplingParams(top_p=0.5),
    SamplingParams(top_p=1e-6),
    SamplingParams(top_k=1),
    SamplingParams(top_k=50),
    SamplingParams(top_k=50, top_p=0.8),
    SamplingParams(top_k=CANDIDATES),
    SamplingParams(top_k=CANDIDATES + 7, top_p=0.95),
    SamplingParams(top_k=VOCAB - 1),
    SamplingParams(top_p=0.999),
]


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "suppressed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_shortcut_equals_the_whole_sort(kind, dtype):
    scores = rows_of(kind, len(PARAMS), seed=len(kind)).to(dtype)
    got = top_k_top_p(scores, PARAMS)
    want = whole_sort(scores, PARAMS)
    assert torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got, want)


def test_peaked_rows_take_the_shortcut():
    """The shortcut is not dead code: a real model's rows are decided without the full sort."""
    scores = rows_of("peaked", len(PARAMS), seed=1)
    vocab = scores.shape[-1]
    top_k = torch.tensor([vocab if p.top_k_disabled else p.top_k for p in PARAMS])
    top_p = torch.tensor([p.top_p if p.top_p < 1 else float("inf") for p in PARAMS])
    _, exact = nucleus._filter_best(scores, scores.topk(CANDIDATES, dim=-1), top_k, top_p)
    beyond = [p.top_k >= CANDIDATES for p in PARAMS]  # a kept set must end before the last
    assert exact.tolist() == [not b for b in beyond]


def test_a_tie_straddling_the_last_candidate_falls_back_to_the_whole_sort():
    scores = torch.zeros(1, VOCAB)
    scores[0, -5:] = 1.0  # five high ids on top, then VOCAB - 5 tied zeros
    params = [SamplingParams(top_k=10)]  # keeps the five, then the five lowest ids of the tie
    got = top_k_top_p(scores, params)
    assert (~got[0].isinf()).nonzero()[:, 0].tolist() == [0, 1, 2, 3, 4, *range(VOCAB - 5, VOCAB)]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "suppressed"])
def test_the_shortcut_equals_the_whole_sort_on_cuda(kind):
    scores = rows_of(kind, len(PARAMS), seed=len(kind)).cuda()
    assert torch.equal(top_k_top_p(scores, PARAMS), whole_sort(scores.cpu(), PARAMS).cuda())


def test_a_flat_row_skips_the_shortcut_and_a_peaked_one_takes_it():
    """The skip is judged from the best scores seen: a flat row's first 64 cannot hold top_p of
    its mass, nor can 1024 tokens no likelier than its 64th; a peaked row's can."""
    params = [SamplingParams(top_p=0.9)]
    top_k, top_p = torch.tensor([VOCAB]), torch.tensor([0.9])
    for kind, expected in (("flat", False), ("peaked", True)):
        scores = rows_of(kind, 1, seed=3)
        mass = nucleus._row_mass(scores)
        seen = scores.topk(TIERS[0], dim=-1).values
        limits = (top_k, top_p, mass, VOCAB)
        decides = [nucleus._may_decide(seen, width, *limits) for width in TIERS]
        assert decides == [expected, expected], kind
        assert torch.equal(top_k_top_p(scores, params), whole_sort(scores, params))


@pytest.mark.parametrize("top_k", [VOCAB, VOCAB + 50])
def test_a_top_k_of_the_whole_vocabulary_is_no_top_k(top_k):
    """Alone in its batch too: its top-p shares out the whole row's mass."""
    scores = rows_of("peaked", 2, seed=9)
    params = [SamplingParams(top_k=top_k, top_p=0.9)] * 2
    assert torch.equal(
        top_k_top_p(scores, params), whole_sort(scores, [SamplingParams(top_p=0.9)] * 2)
    )
