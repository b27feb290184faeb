"""GGUF's 4-bit blocks read as int4 groups: the same weights the gguf package dequantizes."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QuantType
from gguf import quants

from baton_paged.model.gguf_blocks import INT4_TYPES, int4_groups


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
