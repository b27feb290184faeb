"""GGUF's 4-bit block formats read as they are: a code in [0, 15] per weight, a scale and an
offset per 32 weights.

llama.cpp stores Q4_0, Q4_1 and Q4_K as blocks whose every weight is ``code * scale + low`` with
one ``scale`` and ``low`` per 32 consecutive inputs (Q4_K: per 32-weight sub-block of its
256-weight super-block, the scale and low themselves 6-bit multiples of the block's ``d`` and
``dmin``). That is exactly the int4 layout of ``quantized_linear.Int4Weights`` at group size 32,
so these files run on the int4 kernels (``quantized_linear.py``) with the file's own codes, not
re-quantized values.
The layouts (llama.cpp's ``ggml-common.h``; every float is IEEE half, little-endian):

- Q4_0, 18 bytes: ``d``, 16 bytes of codes; weight = ``d * (code - 8)``.
- Q4_1, 20 bytes: ``d``, ``m``, 16 bytes of codes; weight = ``d * code + m``.
- Q4_K, 144 bytes: ``d``, ``dmin``, 12 bytes packing eight 6-bit ``(scale, min)`` pairs,
  128 bytes of codes; sub-block ``j``'s weight = ``d * scale_j * code - dmin * min_j``.

In Q4_0 / Q4_1 byte ``i`` of the codes holds weight ``i`` (low nibble) and ``i + 16`` (high);
in Q4_K each 32 bytes hold two sub-blocks, the first in the low nibbles.
"""

from __future__ import annotations

import numpy as np

GROUP = 32
"""Weights sharing one scale and low in every format here."""


def int4_groups(blocks: np.ndarray, qtype: str) -> tuple[np.ndarray, ...]:
    """``(codes, scale, low)`` of a tensor stored as ``qtype`` (a name in ``INT4_TYPES``,
    gguf's ``GGMLQuantizationType.name``): ``blocks`` is its raw bytes,
    ``[rows, bytes per row]`` uint8 (as ``GGUFReader`` gives them); ``codes`` ``[rows,
    columns]`` uint8 and ``scale``, ``low`` ``[rows, columns / 32]`` float32, weight =
    ``codes * scale + low``."""
    rows = blocks.shape[0]
    if qtype not in INT4_TYPES:
        raise ValueError(f"{qtype} is not a 4-bit block format ({', '.join(INT4_TYPES)})")
    codes, scale, low = _READERS[qtype](np.ascontiguousarray(blocks).reshape(-1))
    return codes.reshape(rows, -1), scale.reshape(rows, -1), low.reshape(rows, -1)


def _q4_0(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    blocks = raw.reshape(-1, 18)
    d = halves(blocks[:, :2])
    return _nibbles_in_halves(blocks[:, 2:]), d, -8 * d


def _q4_1(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    blocks = raw.reshape(-1, 20)
    return _nibbles_in_halves(blocks[:, 4:]), halves(blocks[:, :2]), halves(blocks[:, 2:4])


def _q4_k(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    blocks = raw.reshape(-1, 144)
    d, dmin = halves(blocks[:, :2]), halves(blocks[:, 2:4])
    scales, mins = six_bit_pairs(blocks[:, 4:16])
    pairs = blocks[:, 16:].reshape(-1, 4, 1, 32)  # four 32-byte chunks: two sub-blocks each
    codes = np.concatenate([pairs & 0x0F, pairs >> 4], axis=2)  # [blocks, 4, 2, 32]
    return codes.reshape(-1, GROUP), d[:, None] * scales, -(dmin[:, None] * mins)


def six_bit_pairs(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's eight ``(scale, min)`` pairs per block (``get_scale_min_k4``): pairs 0-3 are the
    low 6 bits of bytes 0-3 and 4-7; pairs 4-7 take their low 4 bits from bytes 8-11 and their
    top 2 from the spare top bits of bytes 0-3 (scale) and 4-7 (min)."""
    q = packed.astype(np.int32)
    scales = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)], 1)
    mins = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
    return scales.astype(np.float32), mins.astype(np.float32)


def halves(two_bytes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(two_bytes).view("<f2").reshape(-1).astype(np.float32)


def _nibbles_in_halves(codes: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 codes: the low nibbles first, then the high ones."""
    return np.concatenate([codes & 0x0F, codes >> 4], axis=1)


_READERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}
INT4_TYPES = tuple(_READERS)
