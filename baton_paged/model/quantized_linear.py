"""Weight-only quantized linears for the native executor: int8 per output channel, int4 per group.

Why: a CPU decode step at small batch sizes reads every weight once per step, and its time is
those bytes over the memory bandwidth. int8 reads half of bfloat16's bytes, int4 a quarter (plus
a scale, and for int4 a zero, per group). The kernels widen the weights as they read them:

- On AVX-512: our column-block kernel (``csrc/blocked_linear.cpp``; ``BlockedInt8Linear``, and
  ``BlockedInt4Linear`` with two 4-bit codes a byte and a scale and an offset per group), float32
  or bfloat16 activations, float32 sums. On SmolLM2-135M's four layer projections (an Intel
  Xeon, 2 threads, weights out of cache) at 1 row: int8 0.16-0.18 ms, int4 0.09-0.11, against
  0.50 for float32 in the same kernel, 0.30 / 0.11 for torch's int8 / int4 kernels and 0.39 for
  oneDNN bfloat16; at float32 prefill sizes (256-512 rows) on a par with float32's (each block
  pair is widened once and multiplied by every row). So float32 reads the codes at every row
  count, and holds no dense copy; bfloat16 up to ``BLOCKED_ROWS`` rows, beyond which an AMX
  matmul on the dequantized weight is faster (oneDNN's: 0.98 against 4.7-5.1 ms at 256 rows;
  ours, ``csrc/amx_linear.cpp``, where the CPU has AMX).
- Elsewhere: PyTorch's CPU kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``),
  measured on SmolLM2-135M's 120 projections (bfloat16 activations) per token at 1 row: oneDNN
  bfloat16 5.42 ms, int8 3.96 ms, int4 2.48 ms. They are matrix-vector kernels: at 8 rows int8
  takes 8.3 ms against oneDNN's 6.5, and with float32 activations they are 7-17x slower than
  float32's own matmuls at any row count. So they take up to ``KERNEL_ROWS`` rows of bfloat16
  (decode steps of small batches, a single stream), and float32 reads those weights densely.

A ``QuantizedLinear`` runs the quantized kernel for the rows it takes and otherwise a
``PackedLinear`` on the same weights dequantized: one model, two ways to read it.

The formats (``Int8Weights``, ``Int4Weights``), each with its dequantized form:

- int8: ``w[n, k] = q[n, k] * scale[n]``, ``q`` in [-127, 127], ``scale = max |w[n, :]| / 127``.
- int4: per group of ``group_size`` inputs, ``w = (q - 8) * scale + zero``, ``q`` in [0, 15]:
  asymmetric, ``scale = (max - min) / 15`` and ``zero = min + 8 * scale``, so a group's min and
  max are exact. This is llama.cpp's Q4_1 (``d * q + m``: ``scale = d``, ``zero = m + 8 d``) at
  32 inputs a group, and its Q4_0 (``d * (q - 8)``) with ``zero = 0``.

Scales and zeros are kept in float32 and handed to the kernels in the activations' dtype.
``quantized_linear`` writes the dequantized values into the weight it is given (the executor's
fused weights, which the HF modules view), so the model the engine holds is the quantized model
whichever path reads it. Memory: for bfloat16 the int8 / int4 copy comes on top of the dense
packed one (AMX pairs or oneDNN's: +50% / +38% of the weights' bytes; the HF modules' dense
weights go too for a model the engine loaded itself): quantization there makes reading faster,
not the model smaller (codes widened onto AMX tiles instead of the copy measured 12-14 ms for
SmolLM2-135M's 30 layers at 1-12 rows, against ~10 on the copy: slower from 7 rows up). int8
and int4 under float32 activations on AVX-512 keep their codes alone: a quarter and an eighth of
float32's bytes (plus the scales).

Quantized at every load, not cached: with the arithmetic in blocks of rows
(``quantize_math.in_row_blocks``), building a Llama-3.2-1B-shaped executor in bfloat16 took
9.6 s as int4 (11.5 s before the blocks) against 1.7 s dense, the quantizing itself ~3.5 s of it;
reading the same codes back from a safetensors file in the page cache took 1.9 s in a fresh
process. Most of the difference to dense is building the kernels' layouts, which a cache of
codes would not save.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from baton_paged.model.decoder_kernels import DECODER_KERNELS
from baton_paged.model.int8_groups import (
    BlockedGroupInt8Linear,
    GroupInt8Linear,
    Int8GroupWeights,
)
from baton_paged.model.packed_linear import (
    BLOCK,
    ColumnBlockCodes,
    PackedLinear,
    column_block_kernel,
    in_column_blocks,
)
from baton_paged.model.quantize_math import asymmetric_groups, in_row_blocks, row_scales

METHODS = ("int8", "int4")
"""Quantizations computed here from float weights (``gguf`` reads them from the file:
``gguf_weights.py``)."""
INT4_GROUP_SIZE = 32
"""Inputs sharing one int4 scale and zero: llama.cpp's Q4_0 / Q4_1 block."""
INT4_INNER_K_TILES = 2
"""``_convert_weight_to_int4pack_for_cpu``'s tile argument (its CPU layout ignores it)."""
INT4_OUT_MULTIPLE = 16
"""torch's int4 packing takes output counts that are a multiple of 16 only."""
KERNEL_DTYPE = torch.bfloat16
"""The activations' dtype every quantized kernel is fast for; under float32 only the column-block
kernel's formats (``COLUMN_BLOCK_KINDS``) are read quantized, the others densely."""
KERNEL_ROWS = {"int8": 4, "int4": 8, "int8-groups": 4}
"""Most rows of bfloat16 activations torch's quantized kernels (and, without AVX-512, our
matrix-vector one for int8 groups) take; more run densely (oneDNN). The crossovers measured on
SmolLM2-135M's projections (module docstring): int8 is faster up to 4 rows (4.1 against 6.0 ms),
int4 up to 8 (5.9 against 6.5 ms), int8 groups (``int8_groups.py``) up to 4 (5.8 against 6.4
ms). With AVX-512 int8 and int8 groups take the column-block kernel instead (``BLOCKED_ROWS``)."""
BLOCKED_ROWS = {"int8": 6, "int8-groups": 6, "int4": 8}
"""Most rows of bfloat16 activations the column-block kernel takes (``COLUMN_BLOCK_KINDS``) before
the dense bfloat16 matmul on the dequantized weight: measured on SmolLM2-135M's four layer
projections (2 threads, weights out of cache) against oneDNN's, int8 0.32 against 0.38 ms at 6
rows (even at 7), int8 groups 0.34 against 0.38 at 6, int4 0.30 against 0.40 at 8 (0.41 against
0.38 at 12); against our AMX kernel (30 layers' projections, one run) still even at the limits:
int8 1.04x its time at 6 rows (0.83x at 4), int4 1.01x at 8 (0.91x at 6)."""


@dataclass(frozen=True)
class Int8Weights:
    method: ClassVar[str] = "int8"
    q: torch.Tensor
    """[out, in] int8 in [-127, 127]."""
    scale: torch.Tensor
    """[out] float32."""

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Weights:
        def rows(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dense = block.detach().float()
            scale = row_scales(dense, 127)
            return torch.round(dense / scale[:, None]).clamp(-127, 127).to(torch.int8), scale

        return cls(*in_row_blocks(rows, weight))

    @classmethod
    def stacked(cls, parts: list[Int8Weights]) -> Int8Weights:
        """One weight of ``parts``' rows in order (a fused projection's)."""
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        def rows(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor]:
            return ((q.float() * scale.to(dtype).float()[:, None]).to(dtype),)

        return in_row_blocks(rows, self.q, self.scale)[0]


@dataclass(frozen=True)
class Int4Weights:
    method: ClassVar[str] = "int4"
    q: torch.Tensor
    """[out, in] int32 in [0, 15]."""
    scale: torch.Tensor
    """[out, in / group_size] float32."""
    zero: torch.Tensor
    """[out, in / group_size] float32: the value ``q = 8`` stands for."""
    group_size: int = INT4_GROUP_SIZE

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> Int4Weights:
        rows, columns = weight.shape
        problem = int4_shape_problem(rows, columns, group_size)
        if problem is not None:
            raise ValueError(problem)

        def groups(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            q, scale, low = asymmetric_groups(block, group_size, 15)
            return q.to(torch.int32), scale, low + 8 * scale

        return cls(*in_row_blocks(groups, weight), group_size)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> Int4Weights:
        """The weights ``codes * scale + low`` (codes in [0, 15], one ``scale`` and ``low`` per
        ``INT4_GROUP_SIZE`` inputs): GGUF's 4-bit blocks, kept as they are."""
        return cls(codes.to(torch.int32), scale.float(), (low + 8 * scale).float())

    @classmethod
    def stacked(cls, parts: list[Int4Weights]) -> Int4Weights:
        """One weight of ``parts``' rows in order (a fused projection's); one group size."""
        (group_size,) = {p.group_size for p in parts}
        fields = (torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scale", "zero"))
        return cls(*fields, group_size)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the kernel multiplies by in ``dtype``: scales and zeros rounded to it."""

        def rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor]:
            scale, zero = (t.to(dtype).float()[..., None] for t in (scale, zero))
            groups = q.float().view(q.shape[0], -1, self.group_size)
            return (((groups - 8) * scale + zero).view(q.shape).to(dtype),)

        return in_row_blocks(rows, self.q, self.scale, self.zero)[0]


QuantizedWeights = Int8Weights | Int4Weights | Int8GroupWeights


def int4_shape_problem(rows: int, columns: int, group_size: int = INT4_GROUP_SIZE) -> str | None:
    """Why torch's int4 kernel cannot take a ``[rows, columns]`` weight, or None."""
    if columns % group_size:
        return f"int4 needs in_features ({columns}) divisible by {group_size}"
    if rows % INT4_OUT_MULTIPLE:
        return f"int4 needs out_features ({rows}) divisible by {INT4_OUT_MULTIPLE}"
    return None


class Int8Linear:
    """``layer(x)`` = ``F.linear(x, weights.dequantized(x.dtype), bias)``, reading int8."""

    def __init__(self, weights: Int8Weights, dtype: torch.dtype, bias: torch.Tensor | None = None):
        self.q, self.scale, self.bias = weights.q, weights.scale.to(dtype), bias
        self.in_features = weights.q.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _plus(torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale), self.bias)


class BlockedInt8Linear(ColumnBlockCodes):
    """``layer(x)`` = ``F.linear(x, weights.dequantized(x.dtype), bias)``: the int8 codes in
    column blocks, one scale a column applied to the sums."""

    def __init__(self, weights: Int8Weights, dtype: torch.dtype, bias, kernel: Callable):
        scale = weights.scale.to(dtype).float()  # rounded as ``dequantized`` rounds it
        codes = in_column_blocks(weights.q)
        super().__init__(codes, scale, None, bias, weights.q.shape[1], kernel)


class BlockedInt4Linear(ColumnBlockCodes):
    """``layer(x)`` = ``F.linear(x, weights.dequantized(x.dtype), bias)``: the 4-bit codes in
    column blocks two a byte, with a scale and an offset per group and column."""

    def __init__(self, weights: Int4Weights, dtype: torch.dtype, bias, kernel: Callable):
        blocks = in_column_blocks(weights.q.to(torch.uint8))  # [n / 32, k, 32]
        half = BLOCK // 2  # byte c: column c's code low, column c + 16's high
        codes = (blocks[..., :half] | (blocks[..., half:] << 4)).contiguous()
        # w = (q - 8) * scale + zero = q * scale + offset, scale and zero rounded as
        # ``dequantized`` rounds them
        scale, zero = (t.to(dtype).float() for t in (weights.scale, weights.zero))
        offset = in_column_blocks(zero - 8 * scale)
        super().__init__(codes, in_column_blocks(scale), offset, bias, weights.q.shape[1], kernel)


class Int4Linear:
    """``layer(x)`` = ``F.linear(x, weights.dequantized(x.dtype), bias)``, reading packed int4."""

    def __init__(self, weights: Int4Weights, dtype: torch.dtype, bias: torch.Tensor | None = None):
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            weights.q, INT4_INNER_K_TILES
        )
        # [groups, out, 2] in the activations' dtype, as the kernel reads them
        both = torch.stack([weights.scale, weights.zero], dim=-1).transpose(0, 1)
        self.scale_and_zero = both.contiguous().to(dtype)
        self.group_size, self.bias = weights.group_size, bias
        self.in_features = weights.q.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scale_and_zero
        )
        return _plus(out, self.bias)


COLUMN_BLOCK_KINDS = {
    "int8": BlockedInt8Linear,
    "int8-groups": BlockedGroupInt8Linear,
    "int4": BlockedInt4Linear,
}
"""The quantized formats our column-block kernel reads, and the linear that reads each (a
``ColumnBlockCodes``)."""


def _plus(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias


class QuantizedLinear:
    """``layer(x)`` = ``F.linear(x, dequantized weight, bias)``: the quantized kernel for up to
    ``kernel_rows`` rows, the dense ``PackedLinear`` on the dequantized weight beyond. No kernel:
    always the dense one; no dense one (``kernel_rows`` None): the kernel for every row count."""

    def __init__(self, kernel, dense: PackedLinear | None, kernel_rows: int | None):
        self.kernel, self.dense, self.kernel_rows = kernel, dense, kernel_rows
        self.in_features = (dense or kernel).in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and (self.dense is None or x.shape[0] <= self.kernel_rows):
            return self.kernel(x)
        return self.dense(x)

    def release_weight(self) -> bool:
        """Let go of the dense weight where what a call reads is the kernel's codes or a packed
        copy; whether it did."""
        return self.dense is None or self.dense.release_weight()


def quantize(weight: torch.Tensor, method: str) -> QuantizedWeights:
    if method == "int8":
        return Int8Weights.quantize(weight)
    if method == "int4":
        return Int4Weights.quantize(weight)
    raise ValueError(f"unknown quantization {method!r}; choose one of: {', '.join(METHODS)}")


@torch.no_grad()
def quantized_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, weights: QuantizedWeights
) -> QuantizedLinear:
    """A linear reading ``weights`` (the quantized form of ``weight``), which ``weight`` is
    overwritten with in its own dtype. Which kernel reads them, for how many rows, and whether a
    dense copy is packed beside: ``_kernel_for`` (module docstring)."""
    kernel, rows = _kernel_for(weights, weight.dtype, bias)
    weight.copy_(weights.dequantized(weight.dtype))
    dense = None if kernel is not None and rows is None else PackedLinear(weight, bias)
    return QuantizedLinear(kernel, dense, rows)


def reads_quantized(dtype: torch.dtype) -> bool:
    """Whether quantized kernels read the codes under ``dtype`` activations on this machine (else
    the dequantized weights are read densely: no faster than unquantized): bfloat16 always,
    float32 where the column-block kernel is built (AVX-512)."""
    if dtype == KERNEL_DTYPE:
        return True
    return dtype == torch.float32 and hasattr(DECODER_KERNELS.kernels(), "blocked_linear")


def _kernel_for(weights: QuantizedWeights, dtype: torch.dtype, bias: torch.Tensor | None):
    """``(kernel, rows)``: the quantized kernel for ``weights`` under ``dtype`` activations and
    the most rows it takes (None: every count, so no dense copy); ``(None, 0)``: dense only.
    int8 codes in column blocks (a scale per column, or a scale and an offset per group) take
    every row count of float32 and up to ``BLOCKED_ROWS`` of bfloat16; elsewhere torch's kernels,
    and our matrix-vector one for int8 groups, take bfloat16 only."""
    kind = COLUMN_BLOCK_KINDS.get(weights.method)
    blocked = column_block_kernel(weights.q) if kind is not None else None
    if blocked is not None and dtype in (torch.float32, torch.bfloat16):
        rows = None if dtype == torch.float32 else BLOCKED_ROWS[weights.method]
        return kind(weights, dtype, bias, blocked), rows
    if dtype != KERNEL_DTYPE:
        return None, 0
    kinds = {"int8": Int8Linear, "int4": Int4Linear, "int8-groups": GroupInt8Linear}
    return kinds[weights.method](weights, dtype, bias), KERNEL_ROWS[weights.method]


Quantizer = Callable[[torch.Tensor, tuple[torch.nn.Module, ...]], "QuantizedWeights | None"]
"""``quantizer(weight, sources)``: how to store ``weight``, the (fused) weight of the HF linears
``sources``; None keeps it dense."""


@dataclass(frozen=True)
class MethodQuantizer:
    """Every weight quantized by ``method`` from its float values."""

    method: str

    def __call__(self, weight: torch.Tensor, sources: tuple[torch.nn.Module, ...]):
        return quantize(weight, self.method)


@dataclass(frozen=True)
class Quantization:
    """How the native executor stores its linears: the LM head's and the decoder layers'."""

    head: Quantizer
    layers: Quantizer

    @classmethod
    def by_method(cls, method: str) -> Quantization:
        """``method`` for the layers, int8 for the LM head (llama.cpp too keeps its output
        matrix above 4 bits: the logits are what sampling reads)."""
        return cls(head=MethodQuantizer("int8"), layers=MethodQuantizer(method))
