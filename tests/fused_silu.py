"""A gate-up projection with its SiLU-and-mul in the matmul's own pass, checked to the bit
against the two calls (imported as a plain module from tests/)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from threads import torch_threads


def check_fused_silu(
    kernels, linear: Callable, fused: Callable, x: torch.Tensor, packed, odd_packed, threads: int
) -> None:
    """``fused(x, packed)`` equals ``linear(x, packed)`` then ``kernels.silu_and_mul`` to the bit
    on ``threads`` threads, and refuses ``odd_packed`` (gate and up not as many blocks)."""
    with torch_threads(threads):
        gate_up = linear(x, packed)
        expected = gate_up.new_empty(x.shape[0], gate_up.shape[1] // 2)
        kernels.silu_and_mul(expected, gate_up)
        got = fused(x, packed)
    assert got.shape == expected.shape and torch.equal(got, expected)
    with pytest.raises(RuntimeError, match="as many up blocks"):
        fused(x, odd_packed)
