"""``triton``: paged attention on CUDA in one Triton kernel launch per layer, no gather copy.

Triton ships with every CUDA build of torch, so this is the GPU path that needs nothing beyond
torch; flash-attn and xformers stay the faster optional backends. The kernel mirrors the CPU
one (``csrc/paged_attention.cpp``): one program per (request, KV head, tile of new tokens), whose
rows are every (token, query head) pair sharing that KV head, so GQA reads each K/V page once.
It walks the request's block table a page at a time (``BLOCK_N`` = page size), scores the page
with ``tl.dot``, keeps an online softmax, and masks keys past each row's causal limit (bottom-
right aligned: new token ``i`` of ``q`` after ``c - q`` earlier tokens sees keys ``<= c - q +
i``). Decode, chunked prefill and fresh prompts are the same code. float32 runs ``tl.dot`` in
IEEE precision (not TF32), so float32 results stay float32-exact.

Written against Triton 3.x and checked on the CPU with Triton's interpreter
(``TRITON_INTERPRET=1``, tests/attention/test_triton_backend.py: float32 and float16, every
batch kind, GQA and MHA, two page sizes); its CUDA run, bfloat16 included, is what
``benchmarks/gpu_check.sh`` does when a GPU is lent: it has not run on a GPU yet.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from baton_paged.attention.base import AttentionBackend, AttentionRequirements
from baton_paged.attention.metadata import AttentionMetadata

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROWS_PER_PROGRAM = 64
"""(token, query head) rows a prefill program handles: 64 // GQA group new tokens. A decode-only
step gives each program one token, its rows just the group (padded to 16 for ``tl.dot``)."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(AttentionBackend):
    name = "triton"
    preferred_page_size = 16
    graph_safe = True

    @classmethod
    def unsupported_reason(cls, req: AttentionRequirements) -> str | None:
        if req.device.type != "cuda" and not _interpreting():
            return f"needs a CUDA device, not {req.device.type}"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (it ships with CUDA builds of torch)"
        if req.dtype not in DTYPES:
            return f"takes float16, bfloat16 or float32, not {req.dtype}"
        size = req.page_size
        if size < 16 or size & (size - 1):
            return f"needs a page size that is a power of two >= 16, not {size}"
        if req.head_dim > 256:
            return f"needs head dim <= 256, not {req.head_dim}"
        return None

    def __init__(self) -> None:
        from baton_paged.attention.triton_kernel import paged_attention_kernel

        self._kernel = paged_attention_kernel

    def attend(
        self,
        query: torch.Tensor,
        key_pages: torch.Tensor,
        value_pages: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        out = torch.empty_like(query)
        num_kv_heads, head_dim = key_pages.shape[2], key_pages.shape[3]
        group = query.shape[1] // num_kv_heads
        tokens = 1 if meta.is_decode_only else max(1, ROWS_PER_PROGRAM // group)
        tiles = -(-meta.max_query_len // tokens)
        grid = (meta.batch_size * tiles, num_kv_heads)
        self._kernel[grid](
            query,
            key_pages,
            value_pages,
            out,
            meta.block_table,
            meta.cu_seqlens_q,
            meta.seqused_k,
            scale,
            tiles,
            query.stride(0),
            query.stride(1),
            key_pages.stride(0),
            key_pages.stride(1),
            key_pages.stride(2),
            out.stride(0),
            out.stride(1),
            meta.block_table.stride(0),
            GROUP=group,
            HEAD_DIM=head_dim,
            BLOCK_D=_next_power_of_2(head_dim),
            BLOCK_T=tokens,
            BLOCK_R=max(16, _next_power_of_2(tokens * group)),
            BLOCK_N=key_pages.shape[1],
            IEEE=query.dtype == torch.float32,
        )
        return out


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()
