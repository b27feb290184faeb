"""int8 codes with a scale and offset per group (``int8_groups.py``) and the decoder library's
kernel that reads them (``csrc/group_int8.cpp``): exact conversions, and the kernel equal to a
matmul on the dequantized weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_quantization import check_group_round_trip

from baton_paged.model.int8_groups import GroupInt8Linear, Int8GroupWeights
from baton_paged.model.quantized_linear import Int4Weights, quantized_linear


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [16, 32])
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_the_kernel_equals_a_matmul_on_the_dequantized_weights(dtype, group, rows):
    torch.manual_seed(rows)
    weight = torch.randn(80, 192) * 0.1 + 0.02  # offsets away from zero: the zero term counts
    weights = Int8GroupWeights.quantize(weight, group_size=group)
    bias = torch.randn(80, dtype=dtype)
    x = torch.randn(rows, 192, dtype=dtype)
    expected = F.linear(x.double(), weights.dequantized(torch.float64), bias.double())
    got = GroupInt8Linear(weights, dtype, bias)(x)
    assert got.dtype == dtype and got.shape == (rows, 80)
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


def test_a_few_rows_of_bfloat16_take_the_kernel_and_more_take_onednn():
    weight = torch.randn(64, 64, dtype=torch.bfloat16)
    layer = quantized_linear(weight, None, Int8GroupWeights.quantize(weight))
    assert isinstance(layer.kernel, GroupInt8Linear) and layer.kernel_rows == 4
    assert torch.equal(weight, Int8GroupWeights.quantize(weight).dequantized(torch.bfloat16))
