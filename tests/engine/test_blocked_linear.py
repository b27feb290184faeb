"""The float32 column-block linear (csrc/blocked_linear.cpp): x @ W.T (+ b) for every row count
and both of its work splits, each row's result independent of the others in the call, and
PackedLinear choosing it only where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baton_paged.model import packed_linear
from baton_paged.model.decoder_kernels import DECODER_KERNELS
from baton_paged.model.packed_linear import PackedLinear

KERNELS = DECODER_KERNELS.kernels()
pytestmark = pytest.mark.skipif(
    not hasattr(KERNELS, "blocked_linear"), reason="the decoder library is not built for AVX-512"
)


def blocks(weight: torch.Tensor) -> torch.Tensor:
    return packed_linear.in_column_blocks(weight)


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5, 6, 7, 13, 48, 49, 100, 600])
@pytest.mark.parametrize("n, k", [(32, 1), (96, 17), (160, 64), (256, 300)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_the_matmul_for_every_row_count(rows, n, k, with_bias):
    """Odd block counts (96, 160: a block left over from the pairs), row counts around the tile
    (6) and the chunk (48) sizes, and many rows (the pairs x chunks split)."""
    generator = torch.Generator().manual_seed(rows * 1000 + n + k)
    weight = torch.randn(n, k, generator=generator)
    bias = torch.randn(n, generator=generator) if with_bias else None
    x = torch.randn(rows, k, generator=generator)
    got = KERNELS.blocked_linear(x, blocks(weight), bias)
    reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference, atol=1e-4 * k**0.5, rtol=1e-5)


@pytest.mark.parametrize("rows", [7, 61])
def test_a_rows_result_does_not_depend_on_the_other_rows(rows):
    """Row by row alone and all together, to the bit: each output is summed over k in order in
    one accumulator, whatever tile the row lands in."""
    weight, bias = torch.randn(128, 96), torch.randn(128)
    x = torch.randn(rows, 96)
    together = KERNELS.blocked_linear(x, blocks(weight), bias)
    alone = torch.cat(
        [KERNELS.blocked_linear(x[i : i + 1], blocks(weight), bias) for i in range(rows)]
    )
    assert torch.equal(together, alone)


def test_a_non_contiguous_input_is_read_as_its_values():
    weight, wide = torch.randn(64, 40), torch.randn(9, 80)
    x = wide[:, ::2]
    torch.testing.assert_close(KERNELS.blocked_linear(x, blocks(weight), None), F.linear(x, weight))


@pytest.mark.parametrize(
    "x, packed, bias",
    [
        (torch.randn(2, 16), torch.randn(2, 17, 32), None),  # k differs
        (torch.randn(2, 16, dtype=torch.float64), torch.randn(2, 16, 32), None),
        (torch.randn(2, 16), torch.randn(2, 16, 16), None),  # not 32-column blocks
        (torch.randn(2, 16), torch.randn(2, 16, 32), torch.randn(32)),  # bias of one block
    ],
)
def test_misfit_operands_are_refused(x, packed, bias):
    with pytest.raises(RuntimeError, match="blocked_linear"):
        KERNELS.blocked_linear(x, packed, bias)


def test_packed_linear_takes_it_for_float32_widths_of_whole_blocks():
    weight, bias = torch.randn(96, 64), torch.randn(96)
    linear = PackedLinear(weight.clone(), bias)
    assert linear.packed and linear.onednn_weight is None
    assert linear.packed_weight.shape == (3, 64, 32)
    x = torch.randn(5, 64)
    torch.testing.assert_close(linear(x), F.linear(x, weight, bias))
    assert linear.release_weight() and linear.weight is None
    torch.testing.assert_close(linear(x), F.linear(x, weight, bias))


@pytest.mark.parametrize(
    "weight",
    [torch.randn(100, 64), torch.randn(96, 64, dtype=torch.bfloat16)],
    ids=["n100", "bf16"],
)
def test_other_weights_stay_with_onednn(weight):
    linear = PackedLinear(weight)
    assert linear._blocks is None
    assert linear.packed_weight is linear.onednn_weight


def int8_operands(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 codes ``[n, k]``, their ``[n]`` scales, and the weight they stand for in float64."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    scale = torch.rand(n, generator=generator) * 0.01
    return codes, scale, codes.double() * scale.double()[:, None]


@pytest.mark.parametrize("rows", [0, 1, 5, 7, 48, 49, 100, 600])
@pytest.mark.parametrize("n, k", [(32, 1), (96, 17), (160, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_codes_equal_the_matmul_on_the_weight_they_stand_for(rows, n, k, dtype):
    """Codes times a scale per column, for float32 and bfloat16 rows; beyond 48 rows each pair
    of blocks is widened to floats once (the second work split)."""
    codes, scale, weight = int8_operands(n, k, rows * 1000 + n + k)
    bias = torch.randn(n)
    x = torch.randn(rows, k).to(dtype)
    got = KERNELS.blocked_linear(x, blocks(codes), bias, scale)
    reference = F.linear(x.double(), weight, bias.double())
    assert got.shape == (rows, n) and got.dtype == dtype
    # bfloat16: the sum's one rounding on the way out
    atol, rtol = (1e-4 * k**0.5, 1e-5) if dtype == torch.float32 else (1e-4, 2**-8)
    torch.testing.assert_close(got.double(), reference, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_an_int8_rows_result_does_not_depend_on_the_other_rows(dtype):
    """Alone and among 61 (both work splits), to the bit."""
    codes, scale, _ = int8_operands(128, 96, 0)
    x = torch.randn(61, 96).to(dtype)
    together = KERNELS.blocked_linear(x, blocks(codes), None, scale)
    alone = [KERNELS.blocked_linear(x[i : i + 1], blocks(codes), None, scale) for i in range(61)]
    assert torch.equal(together, torch.cat(alone))


@pytest.mark.parametrize(
    "packed, scale",
    [
        (torch.zeros(2, 16, 32, dtype=torch.int8), None),  # codes without their scale
        (torch.randn(2, 16, 32), torch.ones(64)),  # a scale for float weights
        (torch.zeros(2, 16, 32, dtype=torch.int8), torch.ones(32)),  # a scale of one block
        (torch.zeros(2, 16, 32, dtype=torch.int8), torch.ones(64, dtype=torch.float64)),
    ],
)
def test_misfit_scales_are_refused(packed, scale):
    with pytest.raises(RuntimeError, match="blocked_linear"):
        KERNELS.blocked_linear(torch.randn(2, 16), packed, None, scale)
