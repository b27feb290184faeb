"""int8 codes with a scale and offset per group (``int8_groups.py``) and the decoder library's
kernels that read them (``csrc/blocked_linear.cpp``, ``csrc/group_int8.cpp`` without AVX-512):
exact conversions, and the kernels equal to a matmul on the dequantized weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_quantization import check_group_round_trip

from baton_paged.model.decoder_kernels import DECODER_KERNELS
from baton_paged.model.int8_groups import BlockedGroupInt8Linear, GroupInt8Linear, Int8GroupWeights
from baton_paged.model.quantized_linear import (
    BLOCKED_ROWS,
    KERNEL_ROWS,
    Int4Weights,
    quantized_linear,
)


def test_groups_round_trip_within_half_a_step_with_their_extremes_exact():
    weight = torch.randn(48, 128) * 0.05 + torch.linspace(-1, 1, 48)[:, None]
    q = Int8GroupWeights.quantize(weight)
    assert q.q.dtype == torch.int8 and q.scale.shape == q.zero.shape == (48, 8)
    check_group_round_trip(q, weight)


def test_int4_groups_and_coarser_groups_convert_exactly():
    int4 = Int4Weights.quantize(torch.randn(32, 128))
    widened = Int8GroupWeights.from_int4(int4)
    assert torch.equal(widened.dequantized(torch.float32), int4.dequantized(torch.float32))
    fine = Int8GroupWeights.quantize(torch.randn(16, 128), group_size=16)
    both = Int8GroupWeights.stacked([widened, fine])
    assert both.group_size == 16 and both.q.shape == (48, 128)
    expected = torch.cat([int4.dequantized(torch.float32), fine.dequantized(torch.float32)])
    assert torch.equal(both.dequantized(torch.float32), expected)


BLOCKED = hasattr(DECODER_KERNELS.kernels(), "blocked_linear")
"""Whether int8 groups are read in column blocks (the decoder library built for AVX-512)."""


def column_blocks(weights: Int8GroupWeights, dtype: torch.dtype, bias=None):
    if not BLOCKED:
        pytest.skip("the decoder library is not built for AVX-512")
    return BlockedGroupInt8Linear(weights, dtype, bias, DECODER_KERNELS.kernels().blocked_linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [16, 32])
@pytest.mark.parametrize(
    "kernel, rows",
    [*((GroupInt8Linear, r) for r in (1, 2, 3, 8)), *((column_blocks, r) for r in (1, 5, 60))],
)
def test_the_kernels_equal_a_matmul_on_the_dequantized_weights(dtype, group, kernel, rows):
    """The matrix-vector kernel (up to 8 rows) and the column-block one (any count)."""
    torch.manual_seed(rows)
    weight = torch.randn(96, 192) * 0.1 + 0.02  # offsets away from zero: the zero term counts
    weights = Int8GroupWeights.quantize(weight, group_size=group)
    bias = torch.randn(96, dtype=dtype)
    x = torch.randn(rows, 192, dtype=dtype)
    expected = F.linear(x.double(), weights.dequantized(torch.float64), bias.double())
    got = kernel(weights, dtype, bias)(x)
    assert got.dtype == dtype and got.shape == (rows, 96)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=tolerance)


def test_the_kernel_refuses_what_it_cannot_take():
    weights = Int8GroupWeights.quantize(torch.randn(16, 64))
    with pytest.raises(RuntimeError, match="1 to 8 rows, got 9"):
        GroupInt8Linear(weights, torch.float32)(torch.randn(9, 64))
    odd = Int8GroupWeights(weights.q, weights.scale[:, :2], weights.zero[:, :2], 24)
    with pytest.raises(RuntimeError, match="group 24"):
        GroupInt8Linear(odd, torch.float32)(torch.randn(1, 64))
    coarse = Int8GroupWeights(
        weights.q, weights.scale[:, :2].contiguous(), weights.zero[:, :2].contiguous(), 16
    )
    with pytest.raises(RuntimeError, match=r"scale and zero must be float32 \[n, k / group\]"):
        GroupInt8Linear(coarse, torch.float32)(torch.randn(1, 64))


def test_no_rows_give_no_rows():
    """A chunked step whose chunks end no prompt hands the LM head an empty batch."""
    weights = Int8GroupWeights.quantize(torch.randn(16, 64))
    out = GroupInt8Linear(weights, torch.bfloat16)(torch.randn(0, 64, dtype=torch.bfloat16))
    assert out.shape == (0, 16) and out.dtype == torch.bfloat16


def test_a_few_rows_of_bfloat16_take_the_kernel_and_more_take_the_dense_copy():
    weight = torch.randn(64, 64, dtype=torch.bfloat16)
    weights = Int8GroupWeights.quantize(weight)
    layer = quantized_linear(weight, None, weights)
    kernel, rows = (BlockedGroupInt8Linear, BLOCKED_ROWS["int8-groups"]) if BLOCKED else (
        GroupInt8Linear, KERNEL_ROWS["int8-groups"])  # fmt: skip
    assert isinstance(layer.kernel, kernel) and layer.kernel_rows == rows
    assert torch.equal(weight, weights.dequantized(torch.bfloat16))
    if BLOCKED:  # the codes, scales and offsets as they were, out of their blocks
        for field in ("q", "scale", "zero"):
            assert torch.equal(getattr(layer.kernel.weights, field), getattr(weights, field))


def test_float32_reads_the_groups_alone_at_every_row_count():
    weight = torch.randn(64, 64)
    weights = Int8GroupWeights.quantize(weight)
    column_blocks(weights, torch.float32)  # skips without AVX-512
    layer = quantized_linear(weight, None, weights)
    assert isinstance(layer.kernel, BlockedGroupInt8Linear) and layer.dense is None
    x = torch.randn(70, 64)
    torch.testing.assert_close(layer(x), F.linear(x, weight), atol=1e-4, rtol=1e-4)
