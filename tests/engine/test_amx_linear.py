"""The bfloat16 AMX linear (csrc/amx_linear.cpp): x @ W.T (+ b) for every row count around its
tile (16) and chunk (32) sizes, each row's result independent of the others in the call, misfit
operands refused, and PackedLinear choosing it only where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fused_silu import check_fused_silu
from threads import torch_threads

from baton_paged.model import packed_linear
from baton_paged.model.decoder_kernels import DECODER_KERNELS
from baton_paged.model.packed_linear import PackedLinear

KERNELS = DECODER_KERNELS.kernels()
pytestmark = pytest.mark.skipif(
    not hasattr(KERNELS, "amx_linear") or not KERNELS.amx_linear_usable(),
    reason="the decoder library is not built for AMX, or the kernel grants no AMX tiles",
)


def pairs(weight: torch.Tensor) -> torch.Tensor:
    return packed_linear.in_pair_blocks(weight)


def operands(rows: int, n: int, k: int, bias_dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator).bfloat16()
    bias = None if bias_dtype is None else torch.randn(n, generator=generator).to(bias_dtype)
    x = torch.randn(rows, k, generator=generator).bfloat16()
    return x, weight, bias


def test_pair_blocks_lay_out_each_blocks_inputs_in_pairs():
    weight = torch.arange(64 * 32, dtype=torch.float32).view(64, 32).bfloat16()
    packed = pairs(weight)
    assert packed.shape == (2, 16, 32, 2)
    assert packed[1, 3, 5, 1] == weight[32 + 5, 2 * 3 + 1]


@pytest.mark.parametrize("rows", [0, 1, 2, 15, 16, 17, 31, 32, 33, 48, 50, 64, 100, 300])
@pytest.mark.parametrize("n, k", [(32, 32), (96, 64), (160, 576), (576, 96)])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16], ids=str)
def test_equals_the_matmul_for_every_row_count(rows, n, k, bias_dtype):
    """Within bfloat16's rounding of a float64 matmul of the same bfloat16 values: the sums are
    float32, rounded once to bfloat16."""
    x, weight, bias = operands(rows, n, k, bias_dtype, seed=rows * 1000 + n + k)
    got = KERNELS.amx_linear(x, pairs(weight), bias)
    reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), reference, atol=1e-3 * k**0.5, rtol=2**-8)


@pytest.mark.parametrize("threads", [1, 2])
def test_one_or_two_threads_run_every_block_for_every_chunk(threads):
    """18 blocks, each for every chunk of 70 rows (two full chunks, then 6 rows of zero-padded
    scratch): on one thread front to back, on two from both ends of one run."""
    x, weight, bias = operands(70, 576, 64, torch.float32, seed=threads)
    reference = F.linear(x.double(), weight.double(), bias.double())
    with torch_threads(threads):
        got = KERNELS.amx_linear(x, pairs(weight), bias)
    torch.testing.assert_close(got.double(), reference, atol=1e-3 * 64**0.5, rtol=2**-8)


@pytest.mark.parametrize("rows", [5, 40, 70])
def test_a_rows_result_does_not_depend_on_the_other_rows(rows):
    """Row by row alone and all together, to the bit: a row alone is a chunk of zero-padded
    scratch, in a batch it is read in place, in either of a chunk's two tiles."""
    x, weight, bias = operands(rows, 128, 96, torch.float32, seed=rows)
    together = KERNELS.amx_linear(x, pairs(weight), bias)
    alone = torch.cat([KERNELS.amx_linear(x[i : i + 1], pairs(weight), bias) for i in range(rows)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("silu", [False, True])
def test_claimed_items_give_the_few_row_calls_bits(threads, silu):
    """Above 256 rows threads claim (group, 128-row slab) items as they come free; every row's
    bits are those of calls of at most 256 rows (blocks taken from both ends). 300 rows: slabs of
    4, 4 and 2 chunks, the last chunk part scratch; 18 output blocks: groups of 8, 8 and 2."""
    x, weight, bias = operands(300, 1152 if silu else 576, 96, torch.float32, seed=threads)
    packed = pairs(weight)

    def call(rows: torch.Tensor) -> torch.Tensor:
        if silu:
            return KERNELS.amx_silu_linear(rows, packed)
        return KERNELS.amx_linear(rows, packed, bias)

    with torch_threads(threads):
        claimed = call(x)
        static = torch.cat([call(x[start : start + 128]) for start in range(0, 300, 128)])
    assert torch.equal(claimed, static)


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 32, 100, 200])
@pytest.mark.parametrize("blocks", [1, 2, 3, 37])
@pytest.mark.parametrize("silu", [False, True])
def test_blocks_taken_from_both_ends_give_one_threads_bits(silu, blocks, rows, threads):
    """Up to 256 rows, threads go in pairs over runs of output blocks, one from each end, and
    claim the middle quarter block by block (claimed_items.h's run_from_both_ends), a thread
    without a partner (3 threads) alone over half a pair's share. 37 blocks: one run of 37 (2
    threads: 13 from each end, 11 claimed), runs of 24 and 13 (3), of 18 and 19 (4); 1-3
    blocks: runs of one or two, a pair's claimed from the start. Every output's bits are one
    thread's, which takes the blocks front to back, and near the float64 matmul: none is left
    out."""
    n = blocks * 32 * (2 if silu else 1)
    x, weight, bias = operands(rows, n, 64, torch.float32, seed=1000 * blocks + 10 * rows + threads)
    packed = pairs(weight)

    def call() -> torch.Tensor:
        if silu:
            return KERNELS.amx_silu_linear(x, packed)
        return KERNELS.amx_linear(x, packed, bias)

    with torch_threads(1):
        alone = call()
    with torch_threads(threads):
        shared = call()
    assert torch.equal(shared, alone)
    if not silu:
        reference = F.linear(x.double(), weight.double(), bias.double())
        torch.testing.assert_close(shared.double(), reference, atol=1e-3 * 64**0.5, rtol=2**-8)


def test_a_non_contiguous_input_is_read_as_its_values():
    _, weight, _ = operands(0, 64, 64, None, seed=1)
    x = torch.randn(9, 128).bfloat16()[:, ::2]
    got = KERNELS.amx_linear(x, pairs(weight), None)
    torch.testing.assert_close(got, F.linear(x.contiguous(), weight), atol=0.05, rtol=2**-7)


@pytest.mark.parametrize("rows", [0, 1, 5, 16, 17, 32, 33, 70, 200, 300])
@pytest.mark.parametrize("threads", [1, 2])
def test_gate_up_with_silu_is_the_two_calls_to_the_bit(rows, threads):
    """amx_silu_linear: gate block j and up block j + n / 2 into one block of silu(gate) * up,
    every bit that of amx_linear then silu_and_mul (18 output blocks: taken from both ends up to
    256 rows, in groups of 8, 8 and 2 at 300), with gates that reach exp's clamp."""
    x, weight, _ = operands(rows, 2 * 576, 96, None, seed=rows + threads)
    x = x * 4
    linear = lambda x, packed: KERNELS.amx_linear(x, packed, None)  # noqa: E731
    check_fused_silu(
        KERNELS, linear, KERNELS.amx_silu_linear, x, pairs(weight), pairs(weight[:96]), threads
    )


@pytest.mark.parametrize(
    "x, packed, bias",
    [
        (torch.randn(2, 64).bfloat16(), torch.randn(2, 16, 32, 2).bfloat16(), None),  # k differs
        (torch.randn(2, 48).bfloat16(), torch.randn(2, 24, 32, 2).bfloat16(), None),  # k % 32
        (torch.randn(2, 64), torch.randn(2, 32, 32, 2).bfloat16(), None),  # float32 x
        (torch.randn(2, 64).bfloat16(), torch.randn(2, 32, 32, 2), None),  # float32 weights
        (torch.randn(2, 64).bfloat16(), torch.randn(2, 64, 32).bfloat16(), None),  # not pairs
        (torch.randn(2, 64).bfloat16(), torch.randn(2, 32, 32, 2).bfloat16(), torch.randn(32)),
        (
            torch.randn(2, 64).bfloat16(),
            torch.randn(2, 32, 32, 2).bfloat16(),
            torch.randn(64, dtype=torch.float64),
        ),
    ],
    ids=["k", "k48", "x-fp32", "w-fp32", "blocks", "bias-short", "bias-fp64"],
)
def test_misfit_operands_are_refused(x, packed, bias):
    with pytest.raises(RuntimeError, match="amx_linear"):
        KERNELS.amx_linear(x, packed, bias)


@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_takes_it_for_bfloat16_widths_of_whole_blocks(with_bias):
    x, weight, bias = operands(5, 96, 64, torch.bfloat16 if with_bias else None, seed=3)
    linear = PackedLinear(weight.clone(), bias)
    assert linear.packed and linear.onednn_weight is None
    assert linear.packed_weight.shape == (3, 32, 32, 2)
    expected = KERNELS.amx_linear(x, pairs(weight), bias)
    assert torch.equal(linear(x), expected)
    assert linear.release_weight() and linear.weight is None
    assert torch.equal(linear(x), expected)
