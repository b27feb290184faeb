"""The sampler: greedy equals argmax, filters keep the right tokens, seeds are per request,
draws follow the softmax, and log-probabilities are the model's raw ones."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import pytest
import torch

from baton_paged.model.nucleus import top_k_top_p
from baton_paged.model.sampler import SamplingRow, sample, token_logprobs
from baton_paged.outputs import Logprob
from baton_paged.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def row(params: SamplingParams = GREEDY, seed: int | None = None, suppress=()) -> SamplingRow:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return SamplingRow(params, generator, tuple(suppress))


def random_logits(n: int, vocab: int = 64, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_greedy_is_argmax_for_every_dtype(dtype):
    logits = random_logits(8, dtype=dtype)
    result = sample(logits, [row() for _ in range(8)])
    assert result.token_ids == logits.float().argmax(dim=-1).tolist()
    assert result.logprobs == [None] * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_bare_greedy_batch_equals_the_full_path(dtype):
    """An all-greedy batch takes the argmax of the logits as given; one row asking for logprobs
    sends the batch down the full path: the greedy tokens must not differ (bf16 ties included)."""
    logits = (random_logits(16, vocab=32, seed=4, dtype=dtype) * 0.3).round()  # many ties
    bare = sample(logits, [row() for _ in range(16)])
    full = sample(logits, [row(SamplingParams(temperature=0.0, logprobs=0))] + [row()] * 15)
    assert bare.token_ids == full.token_ids
    assert bare.logprobs == [None] * 16 and full.logprobs[0] is not None


def test_float64_logits_are_not_rounded_to_float32():
    logits = torch.zeros(1, 8, dtype=torch.float64)
    logits[0, 2] = 1.0
    logits[0, 5] = 1.0 + 1e-12  # the same float32 value as 1.0: float32 would pick 2
    assert sample(logits, [row()]).token_ids == [5]


def test_greedy_ties_go_to_the_lowest_id():
    logits = torch.zeros(2, 6)
    logits[0, [1, 4]] = 2.0
    logits[1, [3, 5]] = 7.0
    assert sample(logits, [row(), row()]).token_ids == [1, 3]


def test_suppressed_ids_are_never_chosen_greedy_or_random():
    logits = torch.full((2, 5), -5.0)
    logits[:, 0] = 20.0  # e.g. EOS, overwhelmingly likely
    logits[:, 3] = 1.0
    rows = [row(suppress=(0,)), row(SamplingParams(temperature=1.0), seed=1, suppress=(0, 3))]
    for _ in range(50):
        tokens = sample(logits, rows).token_ids
        assert tokens[0] == 3
        assert tokens[1] not in (0, 3)


def test_suppression_is_per_row():
    logits = torch.zeros(2, 4)
    logits[:, 2] = 5.0
    assert sample(logits, [row(suppress=(2,)), row()]).token_ids == [0, 2]


def test_input_logits_are_left_unchanged():
    logits = random_logits(2)
    before = logits.clone()
    sample(logits, [row(suppress=(1, 2)), row(SamplingParams(top_k=3), seed=0, suppress=(0,))])
    assert torch.equal(logits, before)


def test_top_k_1_and_tiny_top_p_equal_greedy_even_with_ties():
    logits = random_logits(16, vocab=32, seed=3)
    logits[0, [4, 9]] = logits[0].max() + 1  # a tie: both must resolve to the lowest id
    greedy = sample(logits, [row() for _ in range(16)]).token_ids
    for params in (SamplingParams(top_k=1, temperature=1.5), SamplingParams(top_p=1e-6)):
        for seed in range(3):
            rows = [row(params, seed=seed + i) for i in range(16)]
            assert sample(logits, rows).token_ids == greedy


def draw_counts(logits_row: torch.Tensor, params: SamplingParams, draws: int, seed: int) -> Counter:
    """``draws`` samples of one distribution, as one batch of identical rows sharing a generator."""
    generator = torch.Generator().manual_seed(seed)
    rows = [SamplingRow(params, generator) for _ in range(draws)]
    return Counter(sample(logits_row.expand(draws, -1), rows).token_ids)


def test_top_k_keeps_only_the_k_most_likely_tokens():
    logits = torch.tensor([[0.5, 3.0, 2.9, -1.0, 2.8, 2.7]])
    counts = draw_counts(logits, SamplingParams(top_k=3), draws=2000, seed=0)
    assert set(counts) == {1, 2, 4}


def test_top_p_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1]])
    logits = probs.log()
    # Sorted: 0.4, 0.3 (0.7), 0.15 (0.85 >= 0.8): three tokens.
    counts = draw_counts(logits, SamplingParams(top_p=0.8), draws=3000, seed=1)
    assert set(counts) == {1, 2, 3}
    for token, p in ((1, 0.4), (2, 0.3), (3, 0.15)):
        assert counts[token] / 3000 == pytest.approx(p / 0.85, abs=0.03)


def test_top_k_then_top_p():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # top_k=3 renormalises to 4/9, 3/9, 2/9; top_p=0.7 then needs 4/9 + 3/9 = 0.78.
    counts = draw_counts(logits, SamplingParams(top_k=3, top_p=0.7), draws=2000, seed=2)
    assert set(counts) == {0, 1}


def test_top_p_one_keeps_every_token():
    # In float32 the top token's probability rounds to 1, so a cumulative-sum rule alone would
    # drop the tail: top_p == 1 must mean no filtering at all.
    scores = torch.tensor([[30.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams(top_p=1.0, top_k=2), SamplingParams(top_p=1.0)]
    filtered = top_k_top_p(scores, params)
    assert torch.isinf(filtered[0]).tolist() == [False, False, True, True]
    assert torch.equal(filtered[1], scores[1])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_the_tempered_softmax(temperature):
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0]])
    draws = 6000
    counts = draw_counts(logits, SamplingParams(temperature=temperature), draws, seed=4)
    expected = (logits[0] / temperature).softmax(dim=-1)
    for token in range(5):
        assert counts[token] / draws == pytest.approx(float(expected[token]), abs=0.025)


def run_steps(logits_steps, make_rows) -> list[list[int]]:
    rows = make_rows()
    return [sample(logits, rows).token_ids for logits in logits_steps]


def test_a_seeded_row_is_reproducible_and_ignores_the_rest_of_the_batch():
    vocab = 50
    params = SamplingParams(temperature=1.3, top_k=20, top_p=0.9, seed=11)
    steps = [random_logits(4, vocab, seed=s) for s in range(20)]

    def alone():
        return [row(params, seed=11)]

    def crowded():
        other = SamplingParams(temperature=0.9)
        return [row(), row(other), row(params, seed=11), row(other, seed=5)]

    solo = [tokens[0] for tokens in run_steps([s[2:3] for s in steps], alone)]
    again = [tokens[0] for tokens in run_steps([s[2:3] for s in steps], alone)]
    torch.manual_seed(123)  # the unseeded neighbour draws from the default generator
    batched = [tokens[2] for tokens in run_steps(steps, crowded)]
    assert solo == again == batched
    assert len(set(solo)) > 3  # really random, not stuck on one token


def test_different_seeds_give_different_tokens():
    logits = torch.zeros(1, 1000)
    tokens = {sample(logits, [row(SamplingParams(), seed=s)]).token_ids[0] for s in range(10)}
    assert len(tokens) > 5


def test_unseeded_rows_use_the_default_generator():
    logits = torch.zeros(3, 1000)
    rows = [row(SamplingParams()) for _ in range(3)]
    torch.manual_seed(0)
    first = sample(logits, rows).token_ids
    torch.manual_seed(0)
    assert sample(logits, rows).token_ids == first


def test_logprobs_hold_the_sampled_token_and_the_top_n_raw_values():
    logits = random_logits(3, vocab=40, seed=7)
    rows = [
        row(SamplingParams(temperature=0.0, logprobs=3)),
        row(SamplingParams(temperature=2.0, top_k=5, logprobs=2), seed=0),
        row(SamplingParams(temperature=0.0)),
    ]
    result = sample(logits, rows)
    assert result.logprobs[2] is None
    raw = logits.log_softmax(dim=-1)  # before temperature and top-k
    order = raw.argsort(dim=-1, descending=True)
    for i, n in ((0, 3), (1, 2)):
        entries = result.logprobs[i]
        sampled = result.token_ids[i]
        assert next(iter(entries)) == sampled  # the sampled token comes first
        expected_ids = {sampled, *order[i, :n].tolist()}
        assert set(entries) == expected_ids
        for token, entry in entries.items():
            assert entry.logprob == pytest.approx(float(raw[i, token]), abs=1e-6)
            assert entry.rank == int((raw[i] > raw[i, token]).sum()) + 1
            assert entry.decoded_token is None
        assert sorted(entries[t].rank for t in order[i, :n].tolist()) == list(range(1, n + 1))
    assert sum(math.exp(e.logprob) for e in result.logprobs[0].values()) < 1


def test_logprobs_are_taken_before_suppression():
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.0]])
    result = sample(logits, [row(SamplingParams(temperature=0.0, logprobs=0), suppress=(0,))])
    assert result.token_ids == [1]
    (entry,) = result.logprobs[0].values()
    assert entry.rank == 2  # token 0 is still more likely in the model's own distribution
    assert entry.logprob == pytest.approx(float(logits.log_softmax(-1)[0, 1]))


def test_logprobs_in_float64_are_exact():
    logits = random_logits(1, vocab=16, dtype=torch.float64)
    result = sample(logits, [row(SamplingParams(temperature=0.0, logprobs=1))])
    token = result.token_ids[0]
    assert result.logprobs[0][token] == Logprob(float(logits.log_softmax(-1)[0, token]), 1)


def test_logits_must_match_the_rows():
    with pytest.raises(ValueError, match="do not match 2 rows"):
        sample(torch.zeros(3, 4), [row(), row()])
    with pytest.raises(ValueError):
        sample(torch.zeros(4), [row()])


def test_tied_logprobs_share_a_rank_counted_from_strictly_more_likely_tokens():
    logprobs = torch.tensor([0.0, -1.0, -1.0, -3.0, -1.0, -3.0]).log_softmax(-1)
    entries = token_logprobs(logprobs, sampled=5, top_n=6)
    ranks = {token: entry.rank for token, entry in entries.items()}
    assert ranks == {0: 1, 1: 2, 2: 2, 4: 2, 3: 5, 5: 5}
    assert next(iter(entries)) == 5  # the sampled token first


RANK_MEMORY_PROBE = """
import resource, torch
from baton_paged.model.sampler import token_logprobs
vocab = 49152  # SmolLM2's: a k x k comparison would need 2.4 GB here
logprobs = torch.randn(vocab, dtype=torch.float64).log_softmax(-1)
status = open("/proc/self/status").read()
mapped = int(status.split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + (1 << 30),) * 2)  # 1 GiB more address space
entries = token_logprobs(logprobs, sampled=0, top_n=vocab)
assert len(entries) == vocab
assert sorted(e.rank for e in entries.values()) == list(range(1, vocab + 1))
"""


def test_ranking_the_whole_vocabulary_needs_memory_in_the_vocabulary_not_its_square():
    """logprobs=vocab once OOM-killed the server: ranking the top-k built a k x k matrix."""
    probe = subprocess.run([sys.executable, "-c", RANK_MEMORY_PROBE], capture_output=True)
    assert probe.returncode == 0, probe.stderr.decode()[-2000:]


def penalised_row_by_row(scores: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The penalties one row at a time, the plain way (what the batched form must equal)."""
    scores = scores.clone()
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({*r.prompt_token_ids, *r.output_token_ids}))
            values = scores[i, seen]
            penalty = p.repetition_penalty
            scores[i, seen] = torch.where(values < 0, values * penalty, values / penalty)
        if r.output_token_ids:
            counts = torch.bincount(torch.tensor(r.output_token_ids), minlength=scores.shape[1])
            scores[i] -= p.frequency_penalty * counts.to(scores.dtype)
            scores[i] -= p.presence_penalty * (counts > 0).to(scores.dtype)
    return scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_penalties_equal_row_by_row_ones_exactly(dtype):
    from baton_paged.model.sampler import _apply_penalties

    gen = torch.Generator().manual_seed(5)
    vocab = 300
    scores = torch.randn(6, vocab, generator=gen, dtype=dtype) * 3
    scores[0, 7] = -torch.inf  # a suppressed token stays suppressed

    def ids(n):
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    params = [
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2),
        SamplingParams(),  # no penalty: untouched
        SamplingParams(frequency_penalty=-0.4),
        SamplingParams(repetition_penalty=0.8),
        SamplingParams(presence_penalty=1.0),  # no output yet: untouched
        SamplingParams(repetition_penalty=1.1, frequency_penalty=2.0),
    ]
    outputs = [ids(40) + [7, 7], ids(10), ids(25), ids(5), [], ids(60)]
    rows = [
        row(p)._replace(prompt_token_ids=ids(30), output_token_ids=o)
        for p, o in zip(params, outputs, strict=True)
    ]
    want = penalised_row_by_row(scores, rows)
    got = scores.clone()
    _apply_penalties(got, rows)
    assert torch.equal(got, want)
    assert torch.equal(got[1], scores[1]) and torch.equal(got[4], scores[4])


@pytest.mark.gpu
def test_draws_on_cuda_follow_the_filtered_distribution_and_seeds():
    """The inverse-transform draw on the device: only kept tokens, at their probabilities, and a
    seeded row repeats itself whatever its neighbours."""
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().cuda()
    generator = torch.Generator("cuda").manual_seed(0)
    rows = [SamplingRow(SamplingParams(top_k=3, top_p=0.7), generator) for _ in range(4000)]
    counts = Counter(sample(logits.expand(4000, -1), rows).token_ids)
    assert set(counts) == {0, 1} and counts[0] / 4000 == pytest.approx(4 / 7, abs=0.03)
    params = SamplingParams(temperature=1.3, seed=3)

    def seeded(batch):
        seeded_row = SamplingRow(params, torch.Generator("cuda").manual_seed(3))
        others = [SamplingRow(SamplingParams(), None)] * (batch - 1)
        steps = [
            torch.cat([random_logits(1, 50, s), random_logits(batch - 1, 50, 99)])
            for s in range(10)
        ]
        return [sample(step.cuda(), [seeded_row, *others]).token_ids[0] for step in steps]

    alone = seeded(1)
    assert alone == seeded(3) and len(set(alone)) > 2


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_a_row_with_nothing_to_draw_is_an_error_not_a_token(bad):
    logits = random_logits(2, vocab=40, seed=1)
    logits[1] = bad
    for params in (SamplingParams(temperature=1.0), SamplingParams(top_k=5, top_p=0.9)):
        with pytest.raises(ValueError, match="no finite score"):
            sample(logits, [row(params), row(params)])
