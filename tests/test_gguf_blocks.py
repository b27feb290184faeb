"""GGUF's blocks read as int4 groups (4-bit formats) and int8 groups (5-, 6- and 8-bit): the
same weights the gguf package dequantizes."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QuantType
from gguf import quants

from baton_paged.model.gguf_blocks import INT4_TYPES, int4_groups
from baton_paged.model.gguf_int8_blocks import int8_groups


def weights_of(codes, scale, low):
    rows = codes.shape[0]
    return (codes.reshape(rows, -1, 32) * scale[..., None] + low[..., None]).reshape(rows, -1)


@pytest.mark.parametrize("qtype", [QuantType.Q4_0, QuantType.Q4_1], ids=lambda t: t.name)
def test_q4_0_and_q4_1_blocks_read_back_to_the_gguf_packages_values(qtype):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((6, 256)).astype(np.float32) * np.linspace(0.01, 2, 6)[:, None]
    blocks = quants.quantize(values, qtype)
    codes, scale, low = int4_groups(blocks, qtype.name)
    assert codes.shape == (6, 256) and scale.shape == low.shape == (6, 8)
    assert codes.min() >= 0 and codes.max() <= 15
    np.testing.assert_array_equal(weights_of(codes, scale, low), quants.dequantize(blocks, qtype))


def random_q4_k_blocks(rng, rows: int, columns: int) -> np.ndarray:
    """Q4_K blocks with random codes and packed 6-bit scales and mins (every bit pattern of
    the 12 scale bytes means something), and a finite ``d`` and ``dmin`` per block."""
    blocks = rng.integers(0, 256, (rows * columns // 256, 144), dtype=np.uint8)
    halves = rng.uniform(0.001, 0.02, (blocks.shape[0], 2)).astype(np.float16)
    blocks[:, :4] = halves.view(np.uint8)
    return blocks.reshape(rows, -1)


def test_q4_k_blocks_read_back_to_the_gguf_packages_values():
    """Every sub-block's scale and min come out of llama.cpp's 6-bit packing (the second four
    pairs take their top bits from the first four's spare ones), and each 32-byte run of
    codes holds two sub-blocks."""
    blocks = random_q4_k_blocks(np.random.default_rng(1), 4, 512)
    codes, scale, low = int4_groups(blocks, "Q4_K")
    assert codes.shape == (4, 512) and scale.shape == (4, 16)
    expected = quants.dequantize(blocks, QuantType.Q4_K)
    np.testing.assert_allclose(weights_of(codes, scale, low), expected, rtol=1e-6, atol=1e-7)


def test_a_format_that_is_not_4_bit_is_refused():
    assert INT4_TYPES == ("Q4_0", "Q4_1", "Q4_K")
    with pytest.raises(ValueError, match="Q8_0 is not a 4-bit block format"):
        int4_groups(np.zeros((1, 34), np.uint8), "Q8_0")


@pytest.mark.parametrize(
    "qtype", [QuantType.Q8_0, QuantType.Q5_0, QuantType.Q5_1], ids=lambda t: t.name
)
def test_5_and_8_bit_blocks_read_back_to_the_gguf_packages_values(qtype):
    rng = np.random.default_rng(2)
    values = rng.standard_normal((4, 256)).astype(np.float32)
    blocks = quants.quantize(values, qtype)
    codes, scale, low, group = int8_groups(blocks, qtype.name)
    assert codes.dtype == np.int8 and group == 32
    got = weights_of(codes.astype(np.float32), scale, low)
    np.testing.assert_array_equal(got, quants.dequantize(blocks, qtype))


def random_k_blocks(rng, rows: int, size: int, halves_at: tuple[int, ...]) -> np.ndarray:
    """K-quant blocks of random bits, with finite ``d`` (and ``dmin``) at the given offsets."""
    blocks = rng.integers(0, 256, (rows * 2, size), dtype=np.uint8)  # 512 weights a row
    for offset in halves_at:
        halves = rng.uniform(0.001, 0.02, (blocks.shape[0], 1)).astype(np.float16)
        blocks[:, offset : offset + 2] = halves.view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize(("qtype", "size", "halves_at", "group"), [
    (QuantType.Q5_K, 176, (0, 2), 32),  # the 5th bits in their own 32 bytes
    (QuantType.Q6_K, 210, (208,), 16),  # 16 int8 scales, one per 16 weights
])  # fmt: skip
def test_k_quant_5_and_6_bit_blocks_read_back_to_the_gguf_packages_values(
    qtype, size, halves_at, group
):
    blocks = random_k_blocks(np.random.default_rng(3), 3, size, halves_at)
    codes, scale, low, found = int8_groups(blocks, qtype.name)
    assert found == group and codes.shape == (3, 512)
    rows = codes.shape[0]
    got = (codes.reshape(rows, -1, group) * scale[..., None] + low[..., None]).reshape(rows, -1)
    np.testing.assert_allclose(got, quants.dequantize(blocks, qtype), rtol=1e-6, atol=1e-7)
