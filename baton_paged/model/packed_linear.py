"""PackedLinear: a linear layer whose weight is prepacked once for the kernel that reads it, else
plain F.linear.

At decode batch sizes a CPU matmul is dominated by how the weight is read: MKL's ``F.linear``
re-streams the row-major weight every call, while a packed copy is laid out for the kernel's own
loop. Three packings:

- float32 where the decoder library is built for AVX-512 and the output width is a multiple of
  32: column blocks for our own kernel (``csrc/blocked_linear.cpp``). Measured on an Intel Xeon
  (2 threads) against oneDNN on its own packing: 0.56-0.82x its time at one row (a single stream's
  every step), 0.81-0.96x at 32 (since then 0.76-0.86x of that at 8-32 rows, by asking for the
  next blocks' weights while a block pair's later tiles run), 0.93-1.10x at 256-512; and it
  compiles nothing per row count.
- bfloat16 where the library is built for AMX and the kernel lets the process use its tiles,
  both widths multiples of 32: pair blocks for our AMX kernel (``csrc/amx_linear.cpp``), on the
  same machine 0.62-0.71x oneDNN's time at 1-32 rows, 0.85-1.07x at 256-1024; nothing compiled
  per row count either.
- otherwise oneDNN's blocked layout (what inductor's CPU weight freezing uses): 1.1-2x faster
  than ``F.linear`` at M = 8-32 rows, about even at prefill sizes (M = 256). oneDNN compiles a
  kernel per row count and the first call at a new count is slow, so rows are padded to a fixed
  set of counts (``row_buckets.py``) whose kernels ``warm_up`` builds at start-up.

The packed copy is held beside the dense weight the HF module keeps, unless its owner lets the
dense one go (``release_weight``: the engine does for models it loaded itself).

oneDNN packing needs a torch built with oneDNN and a dtype and CPU it has kernels for (float32;
bfloat16 only where the CPU has AVX-512 BW/VL/DQ or AVX-NE-CONVERT; never float64). Anything else
keeps ``F.linear``, so float64 exactness runs on the same math as HF.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from baton_paged.model.decoder_kernels import DECODER_KERNELS
from baton_paged.model.row_buckets import LARGEST, bucket_for, buckets_up_to, row_chunks

PACKABLE = (torch.float32, torch.bfloat16)
BLOCK = 32
"""Output columns per block of our kernels' packings (float32 weights, codes, bfloat16 pairs)."""
PAIR_STEP = 32
"""Inputs one AMX multiply covers: a bfloat16 weight's input count must be a multiple."""


class PackedLinear:
    """``layer(x)`` = ``F.linear(x, weight, bias)`` for 2-D ``x``; ``packed``: whether it reads a
    packed copy (float32 column blocks, bfloat16 pair blocks or oneDNN's), ``onednn_weight``:
    whether that copy is oneDNN's."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self.in_features = weight.shape[1]
        self._kernel, self._blocks = _own_kernel(weight, bias)
        self._packed = None if self._kernel else _pack(weight)

    @property
    def packed(self) -> bool:
        return self.packed_weight is not None

    def release_weight(self) -> bool:
        """Let go of the dense weight where the packed copy is all a call reads; whether it
        did."""
        if self.packed:
            self.weight = None
        return self.packed

    @property
    def packed_weight(self) -> torch.Tensor | None:
        """The packed copy a call reads, our kernels' blocks or oneDNN's (None where unpacked):
        what the C++ layer loop reads."""
        return self._blocks if self._blocks is not None else self._packed

    @property
    def onednn_weight(self) -> torch.Tensor | None:
        """The weight as oneDNN packed it (None where it is not)."""
        return self._packed

    @property
    def shape(self) -> tuple:
        """What oneDNN builds a kernel for, besides the row count (oneDNN-packed linears only)."""
        return (*self._packed.shape, self._packed.dtype, self.bias is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None:
            return self._kernel(x, self._blocks, self.bias)
        if self._packed is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.shape[0]
        if rows <= LARGEST:
            return self._bucketed(x)
        out = x.new_empty((rows, self._packed.shape[0]))
        for start, stop in row_chunks(rows):
            out[start:stop] = self._bucketed(x[start:stop])
        return out

    def _bucketed(self, x: torch.Tensor) -> torch.Tensor:
        """oneDNN on ``x``'s rows padded with zeros to their bucket (``row_buckets.py``)."""
        rows = x.shape[0]
        bucket = bucket_for(rows) if rows else 0
        if bucket != rows:
            padded = x.new_zeros((bucket, x.shape[1]))
            padded[:rows] = x
            x = padded
        out = torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return out[:rows]


def warm_up(linears: Iterable[PackedLinear], max_rows: int) -> int:
    """Run one linear of each weight shape among ``linears`` once at every bucket up to
    ``max_rows``, so that oneDNN builds their kernels now rather than inside a request's forward
    (it keeps them per shape, whatever the weight). Returns the kernels built."""
    shapes = {linear.shape: linear for linear in linears if linear.onednn_weight is not None}
    built = 0
    with torch.inference_mode():
        for linear in shapes.values():
            for rows in buckets_up_to(max_rows):
                linear(torch.zeros((rows, linear.in_features), dtype=linear.onednn_weight.dtype))
                built += 1
    return built


class ColumnBlockCodes:
    """``layer(x)`` = ``x @ W.T (+ bias)`` with ``W`` quantized codes in column blocks, read by
    ``csrc/blocked_linear.cpp``: ``scale`` per column (``zero`` None), or ``scale`` and ``zero``
    per group and column in blocks too. float32 sums, float32 or bfloat16 ``x``, any row count,
    each row's result independent of the others in the call. The formats' subclasses
    (``quantized_linear.py``, ``int8_groups.py``) say how their weights are laid out so."""

    def __init__(self, codes, scale, zero, bias, in_features: int, kernel: Callable):
        self.codes, self.scale, self.zero = codes, scale, zero
        self.bias = None if bias is None else bias.contiguous()  # widened by the kernel
        self.in_features = in_features
        self._kernel = kernel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel(x, self.codes, self.bias, self.scale, self.zero)


def column_block_kernel(weight: torch.Tensor) -> Callable | None:
    """``csrc/blocked_linear.cpp`` where it can read ``weight`` (float32 or int8 codes) in
    column blocks: a CPU weight whose output count is a multiple of 32, on a library built for
    AVX-512; else None."""
    if weight.device.type != "cpu" or weight.shape[0] % BLOCK:
        return None
    return getattr(DECODER_KERNELS.kernels(), "blocked_linear", None)  # None: no AVX-512


def in_pair_blocks(weight: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` -> ``[n / 32, k / 2, 32, 2]``: ``pairs[b, p, c, i] = weight[32 b + c, 2 p + i]``,
    the AMX kernel's packing (``csrc/amx_linear.cpp``)."""
    n, k = weight.shape
    return weight.detach().view(n // BLOCK, BLOCK, k // 2, 2).transpose(1, 2).contiguous()


def _own_kernel(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[Callable | None, torch.Tensor | None]:
    """One of our kernels and ``weight`` packed for it, where one takes this weight and bias
    (float32 in column blocks, bfloat16 in pair blocks on AMX), else ``(None, None)``."""
    if (kernel := _blocked_kernel(weight, bias)) is not None:
        return kernel, in_column_blocks(weight)
    if (kernel := _pair_kernel(weight, bias)) is not None:
        return kernel, in_pair_blocks(weight)
    return None, None


def _blocked_kernel(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable | None:
    """The float32 column-block kernel where it takes this weight and bias, else None."""
    if weight.dtype != torch.float32 or not _fits(bias, weight, (torch.float32,)):
        return None
    return column_block_kernel(weight)


def _pair_kernel(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable | None:
    """The AMX kernel where it takes this weight and bias (bfloat16, whole blocks of 32
    outputs and 32 inputs, a library built for AMX that the kernel lets use its tiles), else
    None."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return None
    if weight.shape[0] % BLOCK or weight.shape[1] % PAIR_STEP or not _fits(bias, weight, PACKABLE):
        return None
    kernels = DECODER_KERNELS.kernels()
    if kernels is None or not hasattr(kernels, "amx_linear") or not kernels.amx_linear_usable():
        return None
    return kernels.amx_linear


def _fits(bias: torch.Tensor | None, weight: torch.Tensor, dtypes: tuple) -> bool:
    """Whether our kernels read ``bias`` as it is: none, or a contiguous CPU ``[n]`` of
    ``dtypes``."""
    return bias is None or (
        bias.dtype in dtypes
        and bias.device.type == "cpu"
        and bias.is_contiguous()
        and bias.shape == (weight.shape[0],)
    )


def in_column_blocks(weight: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` -> ``[n / 32, k, 32]``: ``blocks[b, k, c] = weight[32 b + c, k]``."""
    n, k = weight.shape
    return weight.detach().view(n // BLOCK, BLOCK, k).transpose(1, 2).contiguous()


def out_of_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """``in_column_blocks`` undone: ``[n / 32, k, 32]`` -> ``[n, k]``."""
    count, k, _ = blocks.shape
    return blocks.transpose(1, 2).reshape(count * BLOCK, k)


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE:
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (RuntimeError, AttributeError):  # no oneDNN kernel for this dtype on this CPU
        return None
