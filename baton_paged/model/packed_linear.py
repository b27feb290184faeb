"""PackedLinear: a linear layer whose weight is prepacked once for oneDNN, else plain F.linear.

At decode batch sizes a CPU matmul is dominated by how the weight is read: MKL's ``F.linear``
re-streams the row-major weight every call, while oneDNN reads a copy reordered into its own
blocked layout (what inductor's CPU weight freezing uses). Measured here at M = 8-32 rows
(torch 2.13, 2 threads, fp32): 1.1-2x faster; at prefill sizes (M = 256) about even. The cost is
the packed copy, held beside the dense weight the HF module keeps, unless its owner lets the
dense one go (``release_weight``: the engine does for models it loaded itself).

Packing needs a torch built with oneDNN and a dtype and CPU it has kernels for (float32; bfloat16
only where the CPU has AVX-512 BW/VL/DQ or AVX-NE-CONVERT; never float64). Anything else keeps
``F.linear``, so float64 exactness runs on the same math as HF.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKABLE = (torch.float32, torch.bfloat16)


class PackedLinear:
    """``layer(x)`` = ``F.linear(x, weight, bias)``; ``packed`` says which path it takes."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self.in_features = weight.shape[1]
        self._packed = _pack(weight)

    @property
    def packed(self) -> bool:
        return self._packed is not None

    def release_weight(self) -> bool:
        """Let go of the dense weight where the packed copy is all a call reads; whether it
        did."""
        if self._packed is not None:
            self.weight = None
        return self._packed is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE:
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (RuntimeError, AttributeError):  # no oneDNN kernel for this dtype on this CPU
        return None
