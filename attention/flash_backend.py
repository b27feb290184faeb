"""``flash_attn``: FlashAttention-2 varlen kernels reading K/V straight from the pages.

No gather and no padding: the kernel walks ``block_table`` itself, with ``cu_seqlens_q`` packing
the queries and bottom-right causal masking (``causal=True``), which is what decode and prefill
after earlier context both need. The kernel comes from the ``flash-attn`` package when installed,
else from the FA2 build bundled with PyTorch (``torch.nn.attention.varlen.varlen_attn``, whose
paged form takes ``seqused_k`` instead of ``cu_seqlens_k``). Both take the page-major cache as it
is: the kernel steps between pages by the K tensor's stride 0, not by ``page_size * Hkv * D``.

Upstream FA2 requires pages of a multiple of 256 tokens, fp16/bf16, head dim <= 256 and a
multiple of 8, and an Ampere or newer GPU; ``unsupported_reason`` checks each.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable

import torch

from baton_paged.attention.base import AttentionBackend, AttentionRequirements
from baton_paged.attention.metadata import AttentionMetadata

FLASH_PAGE_MULTIPLE = 256
FLASH_DTYPES = (torch.float16, torch.bfloat16)


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    preferred_page_size = FLASH_PAGE_MULTIPLE
    graph_safe = True

    def __init__(self) -> None:
        self._kernel = _paged_varlen_kernel()
        if self._kernel is None:
            raise RuntimeError(_NO_KERNEL)

    @classmethod
    def unsupported_reason(cls, req: AttentionRequirements) -> str | None:
        if req.device.type != "cuda":
            return f"needs a CUDA device, not {req.device.type}"
        if req.dtype not in FLASH_DTYPES:
            return f"supports float16 and bfloat16 only, not {req.dtype}"
        if req.page_size % FLASH_PAGE_MULTIPLE:
            return f"needs a page size that is a multiple of 256, not {req.page_size}"
        if req.head_dim % 8 or req.head_dim > 256:
            return f"needs a head dim <= 256 and a multiple of 8, not {req.head_dim}"
        major, minor = torch.cuda.get_device_capability(req.device)
        if major < 8:
            return f"needs compute capability 8.0 or newer (Ampere+), not {major}.{minor}"
        if _paged_varlen_kernel() is None:
            return _NO_KERNEL
        return None

    def attend(
        self,
        query: torch.Tensor,
        key_pages: torch.Tensor,
        value_pages: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        return self._kernel(query, key_pages, value_pages, meta, scale)


_NO_KERNEL = (
    "needs the flash-attn package (pip install 'baton-paged[gpu]') or a PyTorch whose "
    "torch.nn.attention.varlen.varlen_attn takes a block_table"
)

PagedKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor
]


@functools.cache
def _paged_varlen_kernel() -> PagedKernel | None:
    """The flash-attn package's kernel if it imports, else torch's bundled one, else None.

    Imported here, not at the first forward: a package that is present but cannot load (built
    for another torch or CUDA; flash-attn 4 alone, whose ``flash_attn`` holds only ``cute``) must
    make the backend unavailable, not crash the first step."""
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # ImportError, or a broken build's OSError / RuntimeError
        pass
    else:
        return _flash_attn_package
    try:
        varlen = importlib.import_module("torch.nn.attention.varlen")
    except ImportError:
        return None
    attn = getattr(varlen, "varlen_attn", None)
    if attn is None or "block_table" not in inspect.signature(attn).parameters:
        return None
    return _torch_bundled


def _flash_attn_package(query, key_pages, value_pages, meta: AttentionMetadata, scale: float):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        query,
        key_pages,
        value_pages,
        cu_seqlens_q=meta.cu_seqlens_q,
        cu_seqlens_k=meta.cu_seqlens_k,
        max_seqlen_q=meta.max_query_len,
        max_seqlen_k=meta.max_context_len,
        softmax_scale=scale,
        causal=True,
        block_table=meta.block_table,
    )


def _torch_bundled(query, key_pages, value_pages, meta: AttentionMetadata, scale: float):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(
        query,
        key_pages,
        value_pages,
        meta.cu_seqlens_q,
        meta.cu_seqlens_k,
        meta.max_query_len,
        meta.max_context_len,
        scale=scale,
        # (-1, 0) is bottom-right causal; a decode-only step needs no mask, and FA2's GQA decode
        # path (queries of a KV group packed together, split-KV) requires window_size_right < 0
        window_size=(-1, -1) if meta.max_query_len == 1 else (-1, 0),
        enable_gqa=query.shape[1] != key_pages.shape[2],
        seqused_k=meta.seqused_k,
        block_table=meta.block_table,
    )
