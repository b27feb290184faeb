"""``flash_attn``: FlashAttention varlen kernels, in one of two forms chosen by what can run.

**In place** (``PagedFlash``): the kernel walks ``block_table`` itself, with ``cu_seqlens_q``
packing the queries and bottom-right causal masking: no gather, no padding. First choice is
FlashAttention-4 (the ``flash-attn-4`` package: ``flash_attn.cute``, CuTe DSL kernels compiled on
first use), which on Hopper and Blackwell reads a page table of any page size (a page that is not
one K tile is loaded without TMA), so our 16-token pages are read where they are. Else FA2: the
``flash-attn`` package when installed, or a PyTorch whose ``torch.nn.attention.varlen.varlen_attn``
takes a ``block_table``; upstream FA2 reads pages only of a multiple of 256 tokens. Every kernel
steps between pages by the K tensor's stride 0, so our page-major cache is read as it is.

**Packed** (``PackedFlash``): for every other page size, on any CUDA build of PyTorch (which
bundles FA2's varlen kernel without a block table, ``aten._flash_attention_forward``). Each
layer gathers its requests' pages into one ``[B * S, Hkv, D]`` run, one row of ``S`` key slots
per request, and hands the kernel that run with ``cu_seqlens_k = [0, S, 2S, ...]`` (where each
request's keys start) and ``seqused_k`` (how many of them are real): the padding past a
request's context is never read as a key and no query is padded. The gather is the price of our
16-token pages; it costs a copy of the step's K/V per layer and cannot be captured by a CUDA
graph at a useful size (a graph replays the widest block table), so this form runs eagerly.

Both need fp16/bf16, head dim <= 256 and a multiple of 8, and an Ampere or newer GPU (FA4:
compute capability 9.0-11.x and head dim <= 128); ``unsupported_reason`` checks each, and
``create`` picks the form for the page size.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable

import torch

from baton_paged.attention.base import AttentionBackend, AttentionRequirements
from baton_paged.attention.gather import GatherWorkspace, StepMemo
from baton_paged.attention.metadata import AttentionMetadata

FLASH_PAGE_MULTIPLE = 256
"""Upstream FA2's paged kernels read pages of a multiple of this many tokens."""
FLASH_DTYPES = (torch.float16, torch.bfloat16)


class FlashAttnBackend(AttentionBackend):
    """The registry's ``flash_attn``: its capability rules and the choice of form (abstract:
    ``create`` returns one of the two forms below)."""

    name = "flash_attn"

    @classmethod
    def create(cls, req: AttentionRequirements) -> AttentionBackend:
        kernel = _in_place_kernel(req)
        return PagedFlash(kernel) if kernel is not None else PackedFlash()

    @classmethod
    def page_size_for(cls, req: AttentionRequirements) -> int:
        """The engine's 16-token pages where FA4 reads them in place (or nothing does), 256 where
        only FA2 can."""
        if _fa4_reason(req) is None or _paged_varlen_kernel() is None:
            return cls.preferred_page_size
        return FLASH_PAGE_MULTIPLE

    @classmethod
    def unsupported_reason(cls, req: AttentionRequirements) -> str | None:
        if req.device.type != "cuda":
            return f"needs a CUDA device, not {req.device.type}"
        if req.dtype not in FLASH_DTYPES:
            return f"supports float16 and bfloat16 only, not {req.dtype}"
        if req.head_dim % 8 or req.head_dim > 256:
            return f"needs a head dim <= 256 and a multiple of 8, not {req.head_dim}"
        if _in_place_kernel(req) is None and not _packed_kernel_available():
            return _no_kernel_reason(req.page_size)
        major, minor = torch.cuda.get_device_capability(req.device)
        if major < 8:
            return f"needs compute capability 8.0 or newer (Ampere+), not {major}.{minor}"
        return None


class PagedFlash(FlashAttnBackend):
    """FA2 reading K/V from the pages in place; lengths come from device tensors, so a CUDA
    graph can capture it."""

    preferred_page_size = FLASH_PAGE_MULTIPLE
    graph_safe = True

    def __init__(self, kernel: PagedKernel) -> None:
        self._kernel = kernel

    def attend(self, query, key_pages, value_pages, meta: AttentionMetadata, scale: float):
        return self._kernel(query, key_pages, value_pages, meta, scale)


class PackedFlash(FlashAttnBackend):
    """FA2 over the step's pages gathered into one packed run per layer (module docstring)."""

    def __init__(self) -> None:
        self._workspace = GatherWorkspace()
        self._key_offsets: StepMemo[torch.Tensor] = StepMemo()

    def attend(self, query, key_pages, value_pages, meta: AttentionMetadata, scale: float):
        keys, values = self._workspace.gather(key_pages, value_pages, meta.block_table)
        rows, span, num_kv_heads, head_dim = keys.shape
        return _flash_varlen(
            query,
            keys.view(rows * span, num_kv_heads, head_dim),
            values.view(rows * span, num_kv_heads, head_dim),
            meta,
            self._key_offsets.get(meta, lambda: _row_starts(meta.batch_size, span, query.device)),
            span,
            scale,
        )


def _row_starts(rows: int, span: int, device) -> torch.Tensor:
    """``[0, S, 2S, ..., rows*S]``: where each request's row of key slots starts."""
    return torch.arange(0, (rows + 1) * span, span, dtype=torch.int32, device=device)


def _in_place_kernel(req: AttentionRequirements) -> PagedKernel | None:
    """The kernel that reads ``req``'s pages where they are: FA4's where it runs, else FA2's
    for pages of a multiple of 256 tokens, else None."""
    if _fa4_reason(req) is None:
        return _flash_attn_4
    if req.page_size % FLASH_PAGE_MULTIPLE == 0:
        return _paged_varlen_kernel()
    return None


FA4_HEAD_DIMS = range(8, 129, 8)
"""FA4's standard head dims (16-bit: a multiple of 8 elements, 16 bytes)."""


def _fa4_reason(req: AttentionRequirements) -> str | None:
    """Why FlashAttention-4 cannot serve ``req`` here, or None when it can."""
    if not _fa4_imports():
        return "needs the flash-attn-4 package (flash_attn.cute)"
    if req.device.type != "cuda" or req.dtype not in FLASH_DTYPES:
        return "runs on CUDA in float16 or bfloat16 only"
    if req.head_dim not in FA4_HEAD_DIMS:
        return f"needs a head dim of 8-128 in steps of 8, not {req.head_dim}"
    major, _ = torch.cuda.get_device_capability(req.device)
    if major not in (9, 10, 11):  # its SM80 path takes no page table of small pages
        return f"reads small pages on compute capability 9.x-11.x only, not {major}.x"
    return None


@functools.cache
def _fa4_imports() -> bool:
    """Whether ``flash_attn.cute`` loads (a package present but built for another CUDA or
    missing its CuTe DSL libraries makes FA4 unavailable, not the first step fail)."""
    try:
        from flash_attn.cute import flash_attn_varlen_func  # noqa: F401
    except Exception:
        return False
    return True


def _flash_attn_4(query, key_pages, value_pages, meta: AttentionMetadata, scale: float):
    """FA4 over the page table: the keys' lengths from ``seqused_k`` (a page table takes no
    ``cu_seqlens_k``), causality bottom-right aligned to them; a decode-only step is not causal
    (one query sees its whole context)."""
    from flash_attn.cute import flash_attn_varlen_func

    out, _ = flash_attn_varlen_func(
        query,
        key_pages,
        value_pages,
        cu_seqlens_q=meta.cu_seqlens_q,
        max_seqlen_q=meta.max_query_len,
        seqused_k=meta.seqused_k,
        page_table=meta.block_table,
        softmax_scale=scale,
        causal=meta.max_query_len > 1,
    )
    return out


def _flash_varlen(query, keys, values, meta, key_offsets, span, scale):
    """PyTorch's bundled FA2 varlen forward. A decode-only step is not causal (one query sees
    its whole context), which also lets FA2 fold a KV group's query heads into one tile (its
    GQA decode path needs no right window); otherwise causality is bottom-right aligned to each
    request's ``seqused_k``, as our chunks and recomputes need."""
    out, *_ = torch.ops.aten._flash_attention_forward(
        query,
        keys,
        values,
        meta.cu_seqlens_q,
        key_offsets,
        meta.max_query_len,
        span,
        0.0,  # dropout
        meta.max_query_len > 1,  # causal
        False,  # return the debug mask
        scale=scale,
        seqused_k=meta.seqused_k,
    )
    return out


def _packed_kernel_available() -> bool:
    """Whether this PyTorch was built with FlashAttention (CUDA builds are; CPU builds not)."""
    available = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    return bool(available and available()) and hasattr(torch.ops.aten, "_flash_attention_forward")


def _no_kernel_reason(page_size: int) -> str:
    if page_size % FLASH_PAGE_MULTIPLE:
        return (
            f"needs a PyTorch built with FlashAttention for pages of {page_size} tokens (the "
            "packed form), or pages of a multiple of 256 for the flash-attn package"
        )
    return (
        "needs the flash-attn package (pip install 'baton-paged[gpu]'), a PyTorch whose "
        "torch.nn.attention.varlen.varlen_attn takes a block_table, or a PyTorch built with "
        "FlashAttention"
    )


PagedKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor
]


@functools.cache
def _paged_varlen_kernel() -> PagedKernel | None:
    """The flash-attn package's kernel if it imports, else torch's bundled one if it takes a
    block table, else None.

    Imported here, not at the first forward: a package that is present but cannot load (built
    for another torch or CUDA; flash-attn 4 alone, whose ``flash_attn`` holds only ``cute``) must
    make the in-place form unavailable, not crash the first step."""
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
