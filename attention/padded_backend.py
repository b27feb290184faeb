"""``padded``: the BATON paper's "vector shaping", kept as the fallback.

Every request's context is gathered into one padded batch ``[B, S_max, Hkv, D]`` and its new
tokens into ``[B, Q_max, Hq, D]``; one SDPA call runs the whole batch under a mask that hides
padding and future tokens. Slower than the varlen forms on ragged batches (it computes the
padding), but a single kernel launch per layer, so on a GPU without flash-attn or xformers it
beats launching one SDPA per request.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from baton_paged.allocator import offsets_within
from baton_paged.attention.gather import GatheringBackend
from baton_paged.attention.metadata import AttentionMetadata


class PaddedBackend(GatheringBackend):
    name = "padded"

    def attend(
        self,
        query: torch.Tensor,
        key_pages: torch.Tensor,
        value_pages: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        keys, values = self._workspace.gather(key_pages, value_pages, meta.block_table)
        rows, cols = padded_positions(meta.query_lens, query.device)
        padded = query.new_zeros(meta.batch_size, meta.max_query_len, *query.shape[1:])
        padded[rows, cols] = query
        out = F.scaled_dot_product_attention(
            padded.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=shaping_mask(meta, keys.shape[1], query.device)[:, None],
            scale=scale,
            enable_gqa=query.shape[1] != keys.shape[2],
        )
        return out.transpose(1, 2)[rows, cols]


def padded_positions(query_lens: tuple[int, ...], device: torch.device) -> tuple:
    """(row, column) in the padded batch of every packed token, in packed order."""
    lengths = np.asarray(query_lens)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = offsets_within(lengths)
    return torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)


def shaping_mask(meta: AttentionMetadata, span: int, device: torch.device) -> torch.Tensor:
    """``[B, Q_max, span]`` bool, True = attend: key ``j`` of request ``b`` is visible to its new
    token ``i`` when ``j <= context - query_len + i`` (bottom-right causal). For a real token that
    also keeps every padding key (``j >= context``) out; padding query rows may see padding keys,
    but their outputs are dropped, and key 0 keeps every row from being all-masked (NaN)."""
    lens = zip(meta.context_lens, meta.query_lens, strict=True)
    start = torch.tensor([context - query for context, query in lens], device=device)
    i = torch.arange(meta.max_query_len, device=device)[None, :, None]
    j = torch.arange(span, device=device)[None, None, :]
    return j <= start[:, None, None] + i
