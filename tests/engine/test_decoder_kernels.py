"""Each small CPU kernel against the torch ops it replaces (HF's formulas), in every dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baton_paged.model.decoder_kernels import DECODER_KERNELS

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
TOLERANCE = {
    torch.float64: {"atol": 1e-12, "rtol": 1e-12},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@pytest.fixture(scope="module")
def kernels():
    loaded = DECODER_KERNELS.kernels()
    assert loaded is not None
    return loaded


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: float32 whatever the input dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_and_fused_residual_add(kernels, dtype):
    x, residual = torch.randn(7, 72, dtype=dtype), torch.randn(7, 72, dtype=dtype)
    weight = torch.rand(72, dtype=dtype) + 0.5
    out = torch.empty_like(x)
    kernels.rms_norm(out, x, weight, 1e-5)
    # float64 inputs are normalised in float32, as HF does: compare at float32 precision there
    tolerance = TOLERANCE[torch.float32 if dtype == torch.float64 else dtype]
    torch.testing.assert_close(out, hf_rms_norm(x, weight, 1e-5), **tolerance)
    summed = residual + x
    kernels.add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(residual, summed, **TOLERANCE[dtype])
    torch.testing.assert_close(x, hf_rms_norm(summed, weight, 1e-5), **tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [40, 37, 61])
def test_silu_and_mul_on_vector_widths_and_tails(kernels, dtype, width):
    """37 leaves a tail past the last 16- or 8-lane vector, 61 runs all three (bfloat16 takes 16
    lanes on AVX-512); the gate spans values whose exp clamps."""
    x = torch.randn(5, 2 * width, dtype=torch.float64).mul(30).to(dtype)
    out = x.new_empty(5, width)
    kernels.silu_and_mul(out, x)
    expected = F.silu(x[:, :width]) * x[:, width:]
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("width", [61, 1536])
def test_bfloat16_silu_and_mul_rounds_as_torch_does(kernels, width):
    """silu in float rounded to bfloat16, times the up half rounded again: torch's own roundings,
    to the bit, on every vector width."""
    x = torch.randn(7, 2 * width).mul(4).bfloat16()
    out = x.new_empty(7, width)
    kernels.silu_and_mul(out, x)
    assert torch.equal(out, F.silu(x[:, :width].float()).bfloat16() * x[:, width:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_embedding_on_strided_views_of_one_qkv_tensor(kernels, dtype):
    tokens, heads, kv_heads, dim = 6, 4, 2, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype)
    query = qkv[:, : heads * dim].view(tokens, heads, dim)
    key = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    positions = torch.tensor([0, 5, 3, 9, 1, 2])
    freqs = torch.arange(12, dtype=torch.float32)[:, None] * torch.rand(dim // 2)[None]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def rotate(x):
        c, s = cos[positions][:, None], sin[positions][:, None]
        return x * c + torch.cat((-x[..., dim // 2 :], x[..., : dim // 2]), -1) * s

    expected = rotate(query.clone()), rotate(key.clone())
    untouched = qkv[:, (heads + kv_heads) * dim :].clone()
    kernels.rotary_embedding(query, key, positions, cos, sin)
    torch.testing.assert_close(query, expected[0], **TOLERANCE[dtype])
    torch.testing.assert_close(key, expected[1], **TOLERANCE[dtype])
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], untouched)  # V left alone


@pytest.mark.parametrize("dim", [64, 80])
def test_bfloat16_rotary_and_residual_add_round_as_torch_does(kernels, dim):
    """The bfloat16 rotary embedding on its 16-lane path (dim 80 also leaves its scalar tail),
    and the residual add: each product and sum rounded where torch's bfloat16 ops round, so every
    bit is HF's formula's."""
    tokens, heads, kv_heads = 5, 3, 1
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).bfloat16()
    query = qkv[:, : heads * dim].view(tokens, heads, dim)
    key = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    positions = torch.tensor([0, 7, 3, 11, 1])
    freqs = torch.arange(12, dtype=torch.float32)[:, None] * torch.rand(dim // 2)[None]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()

    def rotate(x):
        c, s = cos[positions][:, None], sin[positions][:, None]
        return x * c + torch.cat((-x[..., dim // 2 :], x[..., : dim // 2]), -1) * s

    expected = rotate(query.clone()), rotate(key.clone())
    kernels.rotary_embedding(query, key, positions, cos, sin)
    assert torch.equal(query, expected[0]) and torch.equal(key, expected[1])
    x, residual = torch.randn(2, 3, dim).bfloat16().unbind()
    summed = residual + x
    kernels.add_rms_norm(x, residual, torch.ones(dim).bfloat16(), 1e-5)
    assert torch.equal(residual, summed)


def test_kernels_refuse_what_they_cannot_read(kernels):
    x = torch.randn(4, 8).t()  # last dimension not contiguous
    with pytest.raises(RuntimeError, match="last dimension must be contiguous"):
        kernels.rms_norm(torch.empty(8, 4), x, torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="x must be \\[T, 2 \\* I\\]"):
        kernels.silu_and_mul(torch.empty(2, 3), torch.randn(2, 5))
