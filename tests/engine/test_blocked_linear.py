"""The float32 column-block linear (csrc/blocked_linear.cpp): x @ W.T (+ b) for every row count
and both of its work splits, each row's result independent of the others in the call, and
PackedLinear choosing it only where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fused_silu import check_fused_silu

from baton_paged.model import packed_linear
from baton_paged.model.decoder_kernels import DECODER_KERNELS
from baton_paged.model.packed_linear import PackedLinear

KERNELS = DECODER_KERNELS.kernels()
pytestmark = pytest.mark.skipif(
    not hasattr(KERNELS, "blocked_linear"), reason="the decoder library is not built for AVX-512"
)


def blocks(weight: torch.Tensor) -> torch.Tensor:
    return packed_linear.in_column_blocks(weight)


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5, 6, 7, 11, 13, 32, 48, 49, 64, 100, 600])
@pytest.mark.parametrize("n, k", [(32, 1), (96, 17), (160, 64), (256, 300)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_the_matmul_for_every_row_count(rows, n, k, with_bias):
    """Odd block counts (96, 160: a block left over from the pairs), row counts around the tile
    (6) and the chunk (48) sizes, tiles of every size asking for the next pair's weights (11, 32;
    64: two chunks), and many rows (the pairs x chunks split)."""
    generator = torch.Generator().manual_seed(rows * 1000 + n + k)
    weight = torch.randn(n, k, generator=generator)
    bias = torch.randn(n, generator=generator) if with_bias else None
    x = torch.randn(rows, k, generator=generator)
    got = KERNELS.blocked_linear(x, blocks(weight), bias)
    reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference, atol=1e-4 * k**0.5, rtol=1e-5)


@pytest.mark.parametrize("rows", [7, 61, 200])
def test_a_rows_result_does_not_depend_on_the_other_rows(rows):
    """Row by row alone and all together, to the bit: each output is summed over k in order in
    one accumulator, whatever tile the row lands in and whichever thread claims its item (200
    rows: five chunks, claimed as threads come free)."""
    weight, bias = torch.randn(128, 96), torch.randn(128)
    x = torch.randn(rows, 96)
    together = KERNELS.blocked_linear(x, blocks(weight), bias)
    alone = torch.cat(
        [KERNELS.blocked_linear(x[i : i + 1], blocks(weight), bias) for i in range(rows)]
    )
    assert torch.equal(together, alone)


@pytest.mark.parametrize("rows", [0, 1, 5, 6, 7, 32, 48, 49, 64, 97, 200])
@pytest.mark.parametrize("threads", [1, 2])
def test_gate_up_with_silu_is_the_two_calls_to_the_bit(rows, threads):
    """blocked_silu_linear: gate block j and up block j + n / 2 in one tile into one block of
    silu(gate) * up, every bit that of blocked_linear then silu_and_mul, on every work split (up
    to 48 rows each thread its own blocks; 49-96 two chunks; more, items claimed), with gates that
    reach exp's clamp; an odd block count is refused."""
    generator = torch.Generator().manual_seed(rows * 10 + threads)
    weight = torch.randn(2 * 96, 40, generator=generator)
    x = torch.randn(rows, 40, generator=generator) * 8
    linear = lambda x, packed: KERNELS.blocked_linear(x, packed, None)  # noqa: E731
    check_fused_silu(
        KERNELS,
        linear,
        KERNELS.blocked_silu_linear,
        x,
        blocks(weight),
        blocks(weight[:96]),
        threads,
    )


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
    [torch.randn(100, 64), torch.randn(96, 48, dtype=torch.bfloat16)],
    ids=["n100", "bf16-k48"],
)
def test_other_weights_stay_with_onednn(weight):
    """Widths our kernels do not take: float32 outputs not whole blocks, bfloat16 inputs not
    whole AMX steps of 32."""
    linear = PackedLinear(weight)
    assert linear._kernel is None and linear._blocks is None
    assert linear.packed_weight is linear.onednn_weight


def code_operands(n: int, k: int, kind: str, seed: int) -> tuple[tuple, torch.Tensor]:
    """Codes ``[n, k]`` in column blocks with their scales as the kernel takes them, and the
    weight they stand for in float64: ``kind`` "column" (int8, ``codes * scale[n]``), "group G"
    (int8, ``codes * scale[n, g] + zero[n, g]`` per G inputs, scales and offsets in blocks too)
    or "nibbles G" (4-bit codes alike)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), generator=generator, dtype=torch.int8)
    if kind == "column":
        scale = torch.rand(n, generator=generator) * 0.01
        return (blocks(codes), scale), codes.double() * scale.double()[:, None]
    nibbles, group = kind.split()[0] == "nibbles", int(kind.split()[1])
    if nibbles:  # 4-bit codes, two a byte: column c low, c + 16 high, in each block
        codes = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=generator) * 0.01
    zero = torch.randn(n, k // group, generator=generator) * 0.1
    stretch = lambda t: t.double().repeat_interleave(group, dim=1)  # noqa: E731
    weight = codes.double() * stretch(scale) + stretch(zero)
    packed = blocks(codes)
    if nibbles:
        packed = (packed[..., :16] | (packed[..., 16:] << 4)).contiguous()
    return (packed, blocks(scale), blocks(zero)), weight


CODE_SHAPES = [(32, 1, "column"), (96, 17, "column"), (160, 64, "column"),
               (32, 16, "group 16"), (96, 64, "group 32"), (160, 96, "group 16"),
               (32, 32, "nibbles 32"), (160, 96, "nibbles 32")]  # fmt: skip


@pytest.mark.parametrize("rows", [0, 1, 5, 7, 11, 32, 48, 49, 64, 100, 600])
@pytest.mark.parametrize("n, k, kind", CODE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_codes_equal_the_matmul_on_the_weight_they_stand_for(rows, n, k, kind, dtype):
    """int8 codes times a scale per column, or per group and column plus an offset (GGUF's 5-8-bit
    formats), and 4-bit codes alike (int4, GGUF's 4-bit formats), for float32 and bfloat16 rows;
    beyond 48 rows each pair of blocks is widened to floats once (the second work split)."""
    (codes, *scales), weight = code_operands(n, k, kind, rows * 1000 + n + k)
    bias = torch.randn(n)
    x = torch.randn(rows, k).to(dtype)
    got = KERNELS.blocked_linear(x, codes, bias, *scales)
    reference = F.linear(x.double(), weight, bias.double())
    assert got.shape == (rows, n) and got.dtype == dtype
    # bfloat16: the sum's one rounding on the way out
    atol, rtol = (1e-4 * k**0.5, 1e-5) if dtype == torch.float32 else (1e-4, 2**-8)
    torch.testing.assert_close(got.double(), reference, atol=atol, rtol=rtol)


@pytest.mark.parametrize("kind", ["column", "group 32", "nibbles 32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [61, 200])
def test_a_coded_rows_result_does_not_depend_on_the_other_rows(kind, dtype, rows):
    """Alone and among 61 or 200 (both work splits; 200 rows' items claimed), to the bit, with a
    bias and an odd block count (a block left over from the pairs): for groups, the tile's codes
    scaled in registers and the many-rows split's scaled once into floats are the same floats; a
    column's scale and the bias are one fused multiply-add in every tile."""
    (codes, *scales), _ = code_operands(160, 96, kind, 0)
    bias = torch.randn(160)
    x = torch.randn(rows, 96).to(dtype)
    together = KERNELS.blocked_linear(x, codes, bias, *scales)
    alone = [KERNELS.blocked_linear(x[i : i + 1], codes, bias, *scales) for i in range(rows)]
    assert torch.equal(together, torch.cat(alone))


@pytest.mark.parametrize(
    "packed, scale",
    [
        (torch.zeros(2, 16, 32, dtype=torch.int8), None),  # codes without their scale
        (torch.randn(2, 16, 32), torch.ones(64)),  # a scale for float weights
        (torch.zeros(2, 16, 32, dtype=torch.int8), torch.ones(32)),  # a scale of one block
        (torch.zeros(2, 16, 32, dtype=torch.int8), torch.ones(64, dtype=torch.float64)),
        (torch.zeros(2, 16, 16, dtype=torch.uint8), torch.ones(64)),  # 4-bit, one scale a column
        (torch.zeros(2, 16, 32, dtype=torch.uint8), torch.ones(64)),  # 4-bit, 32 bytes a row
    ],
)
def test_misfit_scales_are_refused(packed, scale):
    """(Also 4-bit codes with a scale per column: they take groups only.)"""
    with pytest.raises(RuntimeError, match="blocked_linear"):
        KERNELS.blocked_linear(torch.randn(2, 16), packed, None, scale)


@pytest.mark.parametrize(
    "scale, zero",
    [
        (torch.ones(64), torch.zeros(64)),  # offsets need group scales
        (torch.ones(2, 2, 32), None),  # group scales need their offsets
        (torch.ones(2, 3, 32), torch.zeros(2, 3, 32)),  # 3 groups misfit k = 16
        (torch.ones(2, 2, 32), torch.zeros(2, 1, 32)),  # offsets of another shape
        (torch.ones(1, 2, 32), torch.zeros(1, 2, 32)),  # one block of two
        (None, torch.zeros(2, 2, 32)),  # offsets alone
    ],
)
@pytest.mark.parametrize("dtype", [torch.int8, torch.float32, torch.uint8], ids=str)
def test_misfit_group_scales_are_refused(scale, zero, dtype):
    packed = torch.zeros(2, 16, 16 if dtype == torch.uint8 else 32, dtype=dtype)
    with pytest.raises(RuntimeError, match="blocked_linear"):
        KERNELS.blocked_linear(torch.randn(2, 16), packed, None, scale, zero)
