"""The scale arithmetic the quantized formats share: a symmetric scale per row (int8 and fp8
weights, fp8 activations) and asymmetric groups (int4, int8 groups: each group's min and max
exact, ``levels`` steps between them)."""

from __future__ import annotations

import torch

TINY = torch.finfo(torch.float32).tiny
"""The smallest scale: an all-zero row or a constant group still divides."""


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
