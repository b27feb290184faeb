"""int8 codes with a scale and an offset per group of 16 or 32 inputs: GGUF's 5-, 6- and 8-bit
formats kept exactly (``gguf_int8_blocks.py``), read by the decoder library's own kernels.

torch's int8 kernel takes one scale per output row, which re-rounds a file whose scales change
every 32 inputs (0.8-0.9% relative error on SmolLM2's Q5_0 / Q8_0 tensors, +1.6% perplexity on a
Q4_K_M file of it). Here ``w = code * scale + zero`` per group, in float32, holds them as they
are, and holds int4 groups too (``code = q - 8``), so a fused projection whose parts the file
stores in different formats stays exact.

Where the CPU has AVX-512 the column-block kernel reads them (``csrc/blocked_linear.cpp``,
``BlockedGroupInt8Linear``), each code scaled and offset as it is widened: on SmolLM2-135M's four
layer projections (2 threads, weights out of cache) 0.19 / 0.34 ms at 1 / 6 rows of bfloat16
against oneDNN bfloat16's 0.37 / 0.38, so it takes every row count of float32 and up to 6 of
bfloat16 (``quantized_linear.BLOCKED_ROWS``). Elsewhere a matrix-vector kernel
(``csrc/group_int8.cpp``, ``GroupInt8Linear``): on the 120 projections 4.5 / 4.8 / 5.8 / 8.9 ms
at 1 / 2 / 4 / 8 rows, against torch's per-row int8 kernel's 4.2 / 3.8 / 4.2 / 7.9 and oneDNN's
6.7 / 6.5 / 6.4 / 7.0: so it takes up to 4 rows (``KERNEL_ROWS``) of bfloat16 and oneDNN the
rest, on the same weights dequantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baton_paged.model.decoder_kernels import DECODER_KERNELS
from baton_paged.model.packed_linear import ColumnBlockCodes, in_column_blocks, out_of_blocks
from baton_paged.model.quantize_math import asymmetric_groups, in_row_blocks

GROUP_SIZE = 16
"""The group re-quantized weights get (and the finest a GGUF format has: Q6_K's)."""


@dataclass(frozen=True)
class Int8GroupWeights:
    method: ClassVar[str] = "int8-groups"
    q: torch.Tensor
    """[out, in] int8."""
    scale: torch.Tensor
    """[out, in / group_size] float32."""
    zero: torch.Tensor
    """[out, in / group_size] float32: the value code 0 stands for."""
    group_size: int

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = GROUP_SIZE) -> Int8GroupWeights:
        """Asymmetric: each group's min and max exact, 255 steps between them."""

        def groups(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            q, scale, low = asymmetric_groups(block, group_size, 255)
            return (q - 128).to(torch.int8), scale, low + 128 * scale

        return cls(*in_row_blocks(groups, weight), group_size)

    @classmethod
    def from_codes(cls, codes, scale, low, group_size: int) -> Int8GroupWeights:
        return cls(codes.to(torch.int8), scale.float(), low.float(), group_size)

    @classmethod
    def from_int4(cls, weights) -> Int8GroupWeights:
        """``quantized_linear.Int4Weights`` exactly: ``(q - 8) * scale + zero``."""
        return cls((weights.q - 8).to(torch.int8), weights.scale, weights.zero, weights.group_size)

    @classmethod
    def stacked(cls, parts: list[Int8GroupWeights]) -> Int8GroupWeights:
        """One weight of ``parts``' rows in order, at their finest group (exact: a coarser
        group's scale and offset repeat)."""
        group_size = min(p.group_size for p in parts)
        fine = [p.regrouped(group_size) for p in parts]
        fields = (torch.cat([getattr(p, f) for p in fine]) for f in ("q", "scale", "zero"))
        return cls(*fields, group_size)

    def regrouped(self, group_size: int) -> Int8GroupWeights:
        repeat = self.group_size // group_size
        scale, zero = (t.repeat_interleave(repeat, dim=1) for t in (self.scale, self.zero))
        return Int8GroupWeights(self.q, scale, zero, group_size)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        def rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor]:
            groups = q.float().view(q.shape[0], -1, self.group_size)
            return ((groups * scale[..., None] + zero[..., None]).view(q.shape).to(dtype),)

        return in_row_blocks(rows, self.q, self.scale, self.zero)[0]


class BlockedGroupInt8Linear(ColumnBlockCodes):
    """``layer(x)`` = ``F.linear(x, weights.dequantized(float32), bias)``: the codes in column
    blocks, their scales and offsets in blocks too, applied as each code is widened."""

    def __init__(self, weights: Int8GroupWeights, dtype: torch.dtype, bias, kernel):
        """Any ``dtype`` of activations: the scales and offsets stay float32, as
        ``dequantized`` applies them."""
        blocked = (in_column_blocks(t) for t in (weights.q, weights.scale, weights.zero))
        super().__init__(*blocked, bias, weights.q.shape[1], kernel)

    @property
    def weights(self) -> Int8GroupWeights:
        """The weights it reads, out of their blocks (a copy: for checks, not for the forward)."""
        rows = [out_of_blocks(t) for t in (self.codes, self.scale, self.zero)]
        return Int8GroupWeights(*rows, self.in_features // rows[1].shape[1])


class GroupInt8Linear:
    """``layer(x)`` = ``F.linear(x, weights.dequantized(float32), bias)`` for up to 8 rows."""

    def __init__(self, weights: Int8GroupWeights, dtype: torch.dtype, bias=None):
        self.weights, self.bias = weights, bias
        self.kernels = DECODER_KERNELS.kernels()
        self.in_features = weights.q.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights
        out = x.new_empty((x.shape[0], w.q.shape[0]))
        if x.shape[0]:  # a chunked step that ends no prompt keeps no rows for the LM head
            self.kernels.group_int8_linear(out, x, w.q, w.scale, w.zero, w.group_size)
        return out if self.bias is None else out + self.bias
