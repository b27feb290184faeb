"""GGUF's 5-, 6- and 8-bit block formats read as they are: an int8 code per weight, a scale and
an offset per 16 or 32 weights (the layout ``group_int8.cpp`` multiplies by).

Every weight of these formats is ``code * scale + low`` over a small run of inputs, the code a
few bits wide: so they fit int8 codes exactly, where torch's int8 kernel, with one scale per
output row, would re-round them. The layouts (llama.cpp's ``ggml-common.h``; floats are IEEE
half, little-endian; ``gguf_blocks.py`` reads the 4-bit ones and the 6-bit scale packing):

- Q8_0, 34 bytes: ``d``, 32 int8 codes; weight = ``d * code``.
- Q5_0, 22 bytes: ``d``, 4 bytes of high bits, 16 bytes of low nibbles; weight = ``d * (q - 16)``.
- Q5_1, 24 bytes: ``d``, ``m``, the same 20 bytes; weight = ``d * q + m``.
- Q5_K, 176 bytes: ``d``, ``dmin``, 12 bytes of eight 6-bit ``(scale, min)`` pairs, 32 bytes of
  high bits, 128 of low nibbles; sub-block ``j`` of 32: ``d * scale_j * q - dmin * min_j``.
- Q6_K, 210 bytes: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, ``d``; sub-block
  ``j`` of 16: ``d * scale_j * (q - 32)``.

In Q5_0 / Q5_1 weight ``i`` < 16 takes byte ``i``'s low nibble and high bit ``i``, weight
``i + 16`` its high nibble and bit ``i + 16``.
"""

from __future__ import annotations

import numpy as np

from baton_paged.model.gguf_blocks import halves, six_bit_pairs


def int8_groups(blocks: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(codes, scale, low, group)`` of a tensor stored as ``qtype`` (a name in
    ``INT8_TYPES``): ``blocks`` is its raw bytes, ``[rows, bytes per row]`` uint8; ``codes``
    ``[rows, columns]`` int8, ``scale`` and ``low`` ``[rows, columns / group]`` float32, weight =
    ``codes * scale + low``."""
    if qtype not in INT8_TYPES:
        raise ValueError(f"{qtype} is not a 5-8-bit block format ({', '.join(INT8_TYPES)})")
    rows = blocks.shape[0]
    group, reader = _READERS[qtype]
    codes, scale, low = reader(np.ascontiguousarray(blocks).reshape(-1))
    return codes.reshape(rows, -1), scale.reshape(rows, -1), low.reshape(rows, -1), group


def _q8_0(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    blocks = raw.reshape(-1, 34)
    d = halves(blocks[:, :2])
    return blocks[:, 2:].view(np.int8), d, np.zeros_like(d)


def _five_bit_codes(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1's codes in [0, 31]: ``high`` 4 bytes of bits, ``low`` 16 bytes of nibbles."""
    bits = np.unpackbits(high, axis=1, bitorder="little")  # [blocks, 32], bit i of the uint32
    nibbles = np.concatenate([low & 0x0F, low >> 4], axis=1)
    return (nibbles | (bits << 4)).astype(np.int16)


def _q5_0(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    blocks = raw.reshape(-1, 22)
    d = halves(blocks[:, :2])
    codes = _five_bit_codes(blocks[:, 2:6], blocks[:, 6:]) - 16
    return codes.astype(np.int8), d, np.zeros_like(d)


def _q5_1(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    blocks = raw.reshape(-1, 24)
    d, m = halves(blocks[:, :2]), halves(blocks[:, 2:4])
    codes = _five_bit_codes(blocks[:, 4:8], blocks[:, 8:]) - 16
    return codes.astype(np.int8), d, m + 16 * d


def _q5_k(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    blocks = raw.reshape(-1, 176)
    d, dmin = halves(blocks[:, :2]), halves(blocks[:, 2:4])
    scales, mins = six_bit_pairs(blocks[:, 4:16])
    high = np.unpackbits(blocks[:, 16:48, None], axis=2, bitorder="little")  # [blocks, 32, 8]
    low = blocks[:, 48:].reshape(-1, 4, 1, 32)  # four 32-byte runs: two sub-blocks each
    nibbles = np.concatenate([low & 0x0F, low >> 4], axis=2)  # [blocks, 4, 2, 32]
    bits = high.transpose(0, 2, 1).reshape(-1, 4, 2, 32)  # sub-block j's bit is bit j of byte l
    codes = (nibbles | (bits << 4)).astype(np.int16) - 16
    return (
        codes.reshape(-1, 32).astype(np.int8),
        d[:, None] * scales,
        16 * d[:, None] * scales - dmin[:, None] * mins,
    )


def _q6_k(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    blocks = raw.reshape(-1, 210)
    low = blocks[:, :128].reshape(-1, 2, 2, 32)  # two halves of 128 weights, 64 bytes each
    high = blocks[:, 128:192].reshape(-1, 2, 1, 32)
    nibbles = np.stack(
        [low[:, :, 0] & 0x0F, low[:, :, 1] & 0x0F, low[:, :, 0] >> 4, low[:, :, 1] >> 4], axis=2
    )  # [blocks, 2, 4, 32]: weights 32j + l
    two_bits = np.stack([(high[:, :, 0] >> shift) & 3 for shift in (0, 2, 4, 6)], axis=2)
    codes = (nibbles | (two_bits << 4)).astype(np.int16) - 32
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = halves(blocks[:, 208:210])
    scale = d[:, None] * scales
    return codes.reshape(-1, 16).astype(np.int8), scale, np.zeros_like(scale)


_READERS = {"Q8_0": (32, _q8_0), "Q5_0": (32, _q5_0), "Q5_1": (32, _q5_1), "Q5_K": (32, _q5_k),
            "Q6_K": (16, _q6_k)}  # fmt: skip
INT8_TYPES = tuple(_READERS)
