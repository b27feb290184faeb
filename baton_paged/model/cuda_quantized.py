"""int4 and fp8 linears on CUDA, swapped into the model the transformers bridge runs.

On CUDA the model runs through the attention bridge (the native executor's fused kernels are CPU
kernels), so quantization there replaces the model's ``nn.Linear`` modules, all but the LM head,
with quantized ones computed by kernels torch ships:

- int4: the CPU's groups (``quantized_linear.Int4Weights``: a scale and a zero per 32 inputs,
  ``w = (q - 8) * scale + zero``) on torch's tinygemm kernel (``_weight_int4pack_mm``, bfloat16
  activations, compute capability 8.0+). It reads a quarter of bfloat16's bytes: decode steps,
  bound by reading the weights, are what it speeds up.
- fp8 (vLLM's name and its scheme on Hopper): e4m3 weights with one scale per output channel,
  activations quantized per row as they arrive (a scale per token), multiplied by
  ``torch._scaled_mm`` with row-wise scales (cuBLASLt on the fp8 tensor cores; compute capability
  9.0+) into bfloat16. Half of bfloat16's bytes and twice its tensor-core rate.

The LM head stays dense (vLLM's fp8 leaves it too: its logits are what sampling reads). A swapped
module keeps only the quantized form, so the model shrinks in GPU memory. Shapes the kernels
cannot take are refused, naming the layer, before any module is touched; so are CPUs, other
methods and dtypes other than bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baton_paged.model.quantize_math import row_scales
from baton_paged.model.quantized_linear import Int4Weights, int4_shape_problem

CUDA_METHODS = ("int4", "fp8")
MIN_CAPABILITY = {"int4": (8, 0), "fp8": (9, 0)}
"""tinygemm's int4 kernel needs Ampere; row-wise scaled fp8 matmuls need Hopper."""
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
FP8_MULTIPLE = 16
"""``_scaled_mm`` takes in and out features that are multiples of 16 only."""
INNER_K_TILES = (8, 4, 2)
"""tinygemm's k-tiling of its packed layout, the widest that divides the input width first."""


@dataclass(frozen=True)
class Fp8Weights:
    method: ClassVar[str] = "fp8"
    q: torch.Tensor
    """[out, in] float8_e4m3fn."""
    scale: torch.Tensor
    """[out] float32: ``w[n, :] = q[n, :] * scale[n]``."""

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Fp8Weights:
        dense = weight.detach().float()
        scale = row_scales(dense, FP8_MAX)
        return cls((dense / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.q.float() * self.scale[:, None]).to(dtype)


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: each row of ``x`` as e4m3 with its own float32 scale, ``x ~= q * scale``."""
    scale = row_scales(x, FP8_MAX)[:, None]
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(torch.nn.Module):
    """``F.linear`` with fp8 weights and each call's activations quantized per row."""

    def __init__(self, weights: Fp8Weights, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weights.q.shape
        self.register_buffer("weight_t", weights.q.t())  # [in, out], column-major as cuBLASLt reads
        self.register_buffer("scale", weights.scale[None, :].contiguous())
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, scale = fp8_rows(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(rows, self.weight_t, scale, self.scale, out_dtype=x.dtype)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


class Int4CudaLinear(torch.nn.Module):
    """``F.linear`` on the int4 groups, bfloat16 activations, through tinygemm."""

    def __init__(self, weights: Int4Weights, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weights.q.shape
        tiles = next(t for t in INNER_K_TILES if self.in_features % (16 * t) == 0)
        codes = weights.q.to(torch.uint8)
        pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).contiguous()  # even input: high nibble
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
        both = torch.stack([weights.scale, weights.zero], dim=-1).transpose(0, 1)
        self.register_buffer("packed", packed)
        self.register_buffer("scale_and_zero", both.contiguous().to(torch.bfloat16))
        self.group_size, self.bias = weights.group_size, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int4pack_mm(
            rows, self.packed, self.group_size, self.scale_and_zero
        )
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


@torch.no_grad()
def quantize_linears(model: torch.nn.Module, method: str) -> int:
    """Swap every ``nn.Linear`` of ``model`` but its LM head for ``method``'s module; the number
    swapped. ValueError, with the model untouched, for anything the kernels cannot run."""
    weights = next(model.parameters())
    problem = cuda_problem(method, weights.device, weights.dtype)
    head = model.get_output_embeddings()
    found = [
        (n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head
    ]
    problem = problem or ("the model has no nn.Linear to quantize" if not found else None)
    for name, module in found:
        problem = problem or _shape_problem(name, module, method)
    if problem is not None:
        raise ValueError(f"quantization={method!r} on CUDA: {problem}")
    for name, module in found:
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, _quantized(module, method))
    return len(found)


def cuda_problem(method: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``method`` cannot run on ``device`` with ``dtype`` activations, or None."""
    if method not in CUDA_METHODS:
        return f"{method} runs on the CPU only; CUDA takes {', '.join(CUDA_METHODS)}"
    if device.type != "cuda":
        return f"{method} needs a CUDA device"
    if dtype != torch.bfloat16:
        return f"its kernels take bfloat16 activations, not {dtype} (dtype='bfloat16')"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY[method]:
        wanted = ".".join(map(str, MIN_CAPABILITY[method]))
        return f"{method} needs compute capability {wanted}+, this device has {capability}"
    return None


def _shape_problem(name: str, module: torch.nn.Linear, method: str) -> str | None:
    rows, columns = module.weight.shape
    if method == "int4":
        problem = int4_shape_problem(rows, columns)
    elif rows % FP8_MULTIPLE or columns % FP8_MULTIPLE:
        problem = (
            f"fp8 needs in and out features divisible by {FP8_MULTIPLE}, got {columns}, {rows}"
        )
    else:
        problem = None
    return problem and f"{name}: {problem}"


def _quantized(module: torch.nn.Linear, method: str) -> torch.nn.Module:
    if method == "int4":
        return Int4CudaLinear(Int4Weights.quantize(module.weight), module.bias)
    return Fp8Linear(Fp8Weights.quantize(module.weight), module.bias)
