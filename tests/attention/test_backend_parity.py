"""Every backend equals a naive float64 attention on random ragged batches over shuffled pages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from paged_batch import KINDS, make_batch, naive_attention, random_lengths

from baton_paged.attention import AttentionRequirements, create_backend
from baton_paged.attention.registry import BACKENDS, backend_class

TOLERANCE = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}
HEADS = {"gqa": (8, 2), "mha": (4, 4)}
HEAD_DIM = 32


def check_backend(name, kind, heads, page_size, dtype, device, seed=0):
    num_heads, num_kv_heads = HEADS[heads]
    req = AttentionRequirements(torch.device(device), dtype, page_size, HEAD_DIM, *HEADS[heads])
    reason = backend_class(name).unsupported_reason(req)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    rng = np.random.default_rng(seed)
    max_context = min(max(3 * page_size, 40), 600)
    query_lens, context_lens = random_lengths(kind, 6, max_context, rng)
    batch = make_batch(
        query_lens,
        context_lens,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=HEAD_DIM,
        page_size=page_size,
        dtype=dtype,
        device=device,
        seed=seed,
    )
    scale = HEAD_DIM**-0.5
    backend = create_backend(name, req)
    out = backend.forward(batch.query, batch.key, batch.value, batch.cache, 0, batch.meta, scale)
    assert out.shape == batch.query.shape and out.dtype == dtype
    expected = naive_attention(batch, scale)
    torch.testing.assert_close(out.double().cpu(), expected.cpu(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("page_size", [1, 16, 256])
@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["torch", "padded"])
def test_cpu_backend_matches_naive_attention(name, kind, heads, page_size, dtype):
    check_backend(name, kind, heads, page_size, dtype, "cpu")


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", ["torch", "padded"])
def test_cpu_backend_on_more_random_mixed_batches(name, seed):
    check_backend(name, "mixed", "gqa", 16, torch.float64, "cpu", seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_gpu_backend_matches_naive_attention(name, kind, heads, page_size, dtype):
    check_backend(name, kind, heads, page_size, dtype, "cuda")
