"""The decoder library's argmax (csrc/row_argmax.cpp) answers as torch.argmax does: the first
index of the largest value, or of the first NaN, in float32 and bfloat16, across its 256-value
blocks and 8-value vectors."""

from __future__ import annotations

import pytest
import torch

from baton_paged.model.decoder_kernels import DECODER_KERNELS

KERNELS = DECODER_KERNELS.kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="no decoder kernel library")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 255, 256, 257, 1000, 49152])
def test_ties_pick_the_first_index(n, dtype):
    """Few distinct values, so most rows tie for their largest, in every block position."""
    generator = torch.Generator().manual_seed(n)
    logits = torch.randint(-3, 3, (16, n), generator=generator).to(dtype)
    assert torch.equal(KERNELS.row_argmax(logits), logits.float().argmax(dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_random_logits(dtype):
    logits = torch.randn(32, 4099).to(dtype)
    assert torch.equal(KERNELS.row_argmax(logits), logits.float().argmax(dim=-1))


def test_nan_and_infinities():
    logits = torch.full((4, 700), -float("inf"))
    logits[1, 300], logits[1, 600], logits[1, 5] = float("nan"), float("nan"), 1.0
    logits[2, 650], logits[2, 3] = float("inf"), float("inf")
    logits[3, 699] = float("nan")
    assert KERNELS.row_argmax(logits).tolist() == logits.argmax(dim=-1).tolist() == [0, 300, 3, 699]


def test_rows_of_a_wider_tensor():
    wide = torch.randn(5, 600)
    logits = wide[:, :513]
    assert torch.equal(KERNELS.row_argmax(logits), logits.argmax(dim=-1))


@pytest.mark.parametrize(
    "logits", [torch.randn(3, 0), torch.randn(3, 4, dtype=torch.float64), torch.randn(3)]
)
def test_misfit_logits_are_refused(logits):
    with pytest.raises(RuntimeError, match="row_argmax|dimensions"):
        KERNELS.row_argmax(logits)


def test_greedy_sampling_takes_it_only_once_the_library_is_loaded(monkeypatch):
    """On a request's path the sampler never builds the library: unloaded, torch answers."""
    from baton_paged.attention import cpu_extension
    from baton_paged.model import sampler

    calls = []

    class Spy:
        def row_argmax(self, logits):
            calls.append(logits.shape)
            return KERNELS.row_argmax(logits)

    logits = torch.randn(3, 300)
    monkeypatch.setattr(cpu_extension, "_LOADED", {DECODER_KERNELS.name: Spy()})
    assert torch.equal(sampler._argmax(logits), logits.argmax(dim=-1)) and calls == [(3, 300)]
    monkeypatch.setattr(cpu_extension, "_LOADED", {})
    assert torch.equal(sampler._argmax(logits), logits.argmax(dim=-1)) and len(calls) == 1
