"""The scale arithmetic the quantized formats share: a symmetric scale per row (int8 and fp8
weights, fp8 activations) and asymmetric groups (int4, int8 groups: each group's min and max
exact, ``levels`` steps between them), and ``in_row_blocks``, which runs that arithmetic a few
hundred KiB at a time."""

from __future__ import annotations

from collections.abc import Callable

import torch

TINY = torch.finfo(torch.float32).tiny
"""The smallest scale: an all-zero row or a constant group still divides."""

ROW_BLOCK_BYTES = 1 << 19
"""Float32 bytes of the widest input a block of rows holds in ``in_row_blocks``."""


def row_scales(x: torch.Tensor, largest_code: float) -> torch.Tensor:
    """[rows] float32: each row's largest magnitude over ``largest_code``."""
    return (x.abs().amax(dim=1).float() / largest_code).clamp(min=TINY)


def asymmetric_groups(
    weight: torch.Tensor, group_size: int, levels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, low)``: ``weight ~= codes * scale + low`` per group of ``group_size``
    inputs, codes [rows, columns] (float) in [0, levels], scale and low [rows, groups]."""
    rows, columns = weight.shape
    groups = weight.detach().float().view(rows, columns // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scale = ((high - low) / levels).clamp(min=TINY)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, levels)
    return codes.view(rows, columns), scale, low


def in_row_blocks(
    compute: Callable[..., tuple[torch.Tensor, ...]], *tensors: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``compute(*tensors)`` for a ``compute`` that treats each row on its own (quantizing or
    dequantizing weights; every tensor has the same rows), run on blocks of rows and gathered
    into whole outputs.

    Why: on a whole weight each step of the arithmetic makes a float32 temporary of the weight's
    size, which the allocator maps fresh and the kernel faults in; in blocks of ``ROW_BLOCK_BYTES``
    the temporaries stay in cache and their memory is reused. Measured on a 16384 x 2048 bfloat16
    weight, 2 threads: int4 quantization 0.20 -> 0.08 s, its dequantization 0.14 -> 0.03 s."""
    rows = tensors[0].shape[0]
    widest = max(t[0].numel() for t in tensors) if rows else 1
    step = max(1, ROW_BLOCK_BYTES // (4 * max(1, widest)))
    if rows <= step:
        return compute(*tensors)
    outputs: tuple[torch.Tensor, ...] = ()
    for start in range(0, rows, step):
        parts = compute(*(t[start : start + step] for t in tensors))
        if not outputs:
            outputs = tuple(p.new_empty((rows, *p.shape[1:])) for p in parts)
        for out, part in zip(outputs, parts, strict=True):
            out[start : start + part.shape[0]] = part
    return outputs
