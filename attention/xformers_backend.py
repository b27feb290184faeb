"""``xformers``: memory-efficient attention over a block-diagonal, padded-keys mask.

Queries stay packed (``[1, T, Hq, D]``); each request's pages are gathered into its own slot of
``S_max`` key rows (``[1, B * S_max, Hkv, D]``), and
``BlockDiagonalCausalWithOffsetPaddedKeysMask`` tells the kernel each slot's real length and
applies bottom-right causality, so no query is padded. The gather is needed because xformers'
paged masks want the pool as one ``[1, pages * page_size, Hkv, D]`` tensor, which our page-major
cache (all layers of a page together) cannot give as a view; its paged operators also need
flash-attn's 256-token pages or triton split-K's equal query lengths (APIS.md, section 2).

GQA is expressed the xformers way: 5-D ``[1, M, Hkv, G, D]`` with K/V expanded (stride 0) over
the ``G`` query heads that share a KV head.
"""

from __future__ import annotations

import importlib.util

import torch

from baton_paged.attention.base import AttentionRequirements
from baton_paged.attention.gather import GatheringBackend
from baton_paged.attention.metadata import AttentionMetadata

XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class XformersBackend(GatheringBackend):
    name = "xformers"

    @classmethod
    def unsupported_reason(cls, req: AttentionRequirements) -> str | None:
        if req.device.type != "cuda":
            return f"needs a CUDA device (xformers has no {req.device.type} operator)"
        if req.dtype not in XFORMERS_DTYPES:
            return f"supports float16, bfloat16 and float32 only, not {req.dtype}"
        if importlib.util.find_spec("xformers") is None:
            return "needs the xformers package (pip install 'baton-paged[gpu]')"
        return None

    def attend(
        self,
        query: torch.Tensor,
        key_pages: torch.Tensor,
        value_pages: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        from xformers.ops import fmha

        keys, values = self._workspace.gather(key_pages, value_pages, meta.block_table)
        batch, span, num_kv_heads, head_dim = keys.shape
        tokens, num_heads, _ = query.shape
        group = num_heads // num_kv_heads
        mask = fmha.attn_bias.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            q_seqlen=list(meta.query_lens),
            kv_padding=span,
            kv_seqlen=list(meta.context_lens),
            device=query.device,
        )
        kv_shape = (1, batch * span, num_kv_heads, group, head_dim)
        out = fmha.memory_efficient_attention(
            query.reshape(1, tokens, num_kv_heads, group, head_dim),
            keys.reshape(1, batch * span, num_kv_heads, 1, head_dim).expand(kv_shape),
            values.reshape(1, batch * span, num_kv_heads, 1, head_dim).expand(kv_shape),
            attn_bias=mask,
            scale=scale,
        )
        return out.reshape(tokens, num_heads, head_dim)
