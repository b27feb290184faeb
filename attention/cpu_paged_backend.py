"""``cpu_paged``: attention that reads K/V pages where they lie, one kernel call per layer.

The torch backend copies every page a step reads into a contiguous buffer and then runs SDPA over
the copy (a CPU profile of B=32 decode: the gather 18% of the step, SDPA 12.5% in ~130 calls per
step). This backend's kernel (``attention/csrc/paged_attention.cpp``) walks each request's
block table instead: one work item per (request, KV head, tile of 16 new tokens) computes all the
query heads sharing that KV head, in blocks of 256 keys with an online softmax (the scores of a
block, one softmax update, then its values), so K/V is read once, in place, and the whole step's
attention is one call. New K/V is written into the pages by one kernel call too. A request
whose new tokens see many keys (a long prompt, or a long chunk of one: from ~4k (query, key)
pairs in bfloat16; in float32 only whole prompts of ~1M pairs) is a matrix product, which the
same call hands to torch's own attention (flash attention on oneDNN's microkernels) over its
context gathered from the pages: a 2000-token bfloat16 prompt's first token in 0.45x the time on
the SmolLM2 shape. Prompt tiles (16 new tokens of a request; float32's up to 128, sized by the
group and the context) run as matrix products in the kernel instead: bfloat16 ones as AMX tile
multiplies where the CPU has them (``attention/csrc/amx_attention.h``; requests stay with the
kernel but for whole prompts from 2^20 pairs, ~1450 tokens), float32 ones on AVX-512 registers, a
query row a lane (``attention/csrc/float_tiles.h``; below 2^22 pairs, whole prompts of up to ~2900
tokens), where each measured as fast as torch's attention or faster.

Its bfloat16 K pages hold each KV head's keys transposed in pairs of dims
(``attention/csrc/key_pairs.h``: a decode row's scores need no sum across vector lanes, and an AMX
score multiply reads keys as they lie), so they are written through ``write_slots`` (the kernel's
``write_kv``), never ``KVCache.write``; float32 and float64 pages, and all V pages, are token by
token as every backend's.
"""

from __future__ import annotations

import torch

from baton_paged.allocator.kv_cache import KVCache
from baton_paged.attention.base import AttentionBackend, AttentionRequirements
from baton_paged.attention.cpu_extension import cpu_kernels, unavailable_reason
from baton_paged.attention.metadata import AttentionMetadata

DTYPES = (torch.float32, torch.bfloat16, torch.float64)


class CpuPagedBackend(AttentionBackend):
    name = "cpu_paged"

    @classmethod
    def unsupported_reason(cls, req: AttentionRequirements) -> str | None:
        if req.device.type != "cpu":
            return "runs on the CPU only"
        if req.dtype not in DTYPES:
            return f"takes float32, bfloat16 or float64, not {req.dtype}"
        if req.dtype == torch.bfloat16 and req.head_dim % 2:
            return f"lays bfloat16 keys out in pairs of dims: head size {req.head_dim} is odd"
        return unavailable_reason()

    def __init__(self) -> None:
        self._kernels = cpu_kernels()
        self.kernel_addresses = (
            self._kernels.write_kv_address(),
            self._kernels.paged_attention_address(),
        )
        """``(write_kv, paged_attention)``'s addresses, for the native executor's C++ layer loop
        (``baton_paged/model/csrc/decoder_loop.cpp``), which calls them directly."""

    def write_slots(
        self,
        cache: KVCache,
        layer: int,
        slot_mapping: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> None:
        self._kernels.write_kv(cache.key(layer), cache.value(layer), slot_mapping, key, value)

    def attend(
        self,
        query: torch.Tensor,
        key_pages: torch.Tensor,
        value_pages: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        out = query.new_empty(query.shape)
        self._kernels.paged_attention(
            out,
            query,
            key_pages,
            value_pages,
            meta.block_table,
            meta.cu_seqlens_q,
            meta.seqused_k,
            scale,
        )
        return out
