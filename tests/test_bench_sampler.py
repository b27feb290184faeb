"""bench_sampler measures what it says: its plain reference follows the same rule as the sampler
(the same greedy tokens with a penalty, draws only among the kept tokens), and a case runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_sampler  # noqa: E402

from baton_paged.model.sampler import SamplingRow, sample  # noqa: E402


def rows_for(case: str, batch: int, vocab: int) -> list[SamplingRow]:
    generator = torch.Generator().manual_seed(0)
    earlier = torch.randint(0, vocab, (batch, 20), generator=generator).tolist()
    return [
        SamplingRow(bench_sampler.CASES[case], generator, (), (), earlier[i]) for i in range(batch)
    ]


def test_the_reference_gives_the_samplers_greedy_tokens_under_a_penalty():
    logits = bench_sampler.peaked_logits(8, 500, seed=1)
    rows = rows_for("frequency penalty", 8, 500)
    assert bench_sampler.plain(logits, rows) == sample(logits, rows).token_ids


@pytest.mark.parametrize("case", ["t 0.8, top-p 0.95", "top-k 50"])
def test_both_draw_only_kept_tokens(case):
    logits = bench_sampler.peaked_logits(64, 2000, seed=2)
    rows = rows_for(case, 64, 2000)
    top = set(logits.topk(50, dim=-1).indices.flatten().tolist())
    assert set(bench_sampler.plain(logits, rows)) <= top
    assert set(sample(logits, rows).token_ids) <= top


def test_a_case_runs():
    row = bench_sampler.measure(4096, 4, "temperature 1", repeats=1, device=torch.device("cpu"))
    assert row["ours_ms"] > 0 and row["plain_ms"] > 0 and row["speedup"] > 0
