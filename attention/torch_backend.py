"""``torch``: varlen attention over pages in plain PyTorch; the reference and the CPU default.

Nothing is padded beyond a page. Measured on CPU (benchmarks/bench_attention.py), the forms
that win are:

* decode (one new token): the ``G = Hq / Hkv`` query heads sharing a KV head are folded into the
  query-length axis, ``q (Hkv, G, D)`` against ``k (Hkv, S, D)``, so SDPA never expands K/V.
  Requests with the same number of pages share one page gather and one SDPA call (a key mask
  hides the unused tail of their last page), which saves per-call overhead when contexts are
  alike and degrades to one call per request when they are not;
* a prompt with no earlier context: SDPA's own ``is_causal`` (top-left aligned, which is right
  when queries and keys have the same length), one call per request;
* new tokens after earlier context (chunked prefill, recompute): a bottom-right causal mask.

One packed SDPA with a block-diagonal mask was ~3x slower and the fully padded batch (the
``padded`` backend) ~1.5-2x slower on ragged contexts.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import torch
import torch.nn.functional as F

from baton_paged.attention.gather import GatheringBackend
from baton_paged.attention.metadata import AttentionMetadata

CPU_GATHER_CHUNK_BYTES = 4 << 20


class TorchBackend(GatheringBackend):
    name = "torch"

    def attend(
        self,
        query: torch.Tensor,
        key_pages: torch.Tensor,
        value_pages: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        out = torch.empty_like(query)
        starts = [0, *itertools.accumulate(meta.query_lens)]
        decode_groups = defaultdict(list)
        for row, (q_len, k_len) in enumerate(zip(meta.query_lens, meta.context_lens, strict=True)):
            if q_len == 1:
                decode_groups[-(-k_len // meta.page_size)].append(row)
                continue
            table = meta.block_table[row : row + 1, : -(-k_len // meta.page_size)]
            keys, values = self._workspace.gather(key_pages, value_pages, table)
            tokens = slice(starts[row], starts[row + 1])
            out[tokens] = prefill_one(query[tokens], keys[0, :k_len], values[0, :k_len], scale)
        for num_pages, rows in decode_groups.items():
            step = _rows_per_call(key_pages, num_pages)
            for chunk in (rows[i : i + step] for i in range(0, len(rows), step)):
                table = meta.block_table[torch.tensor(chunk, device=query.device), :num_pages]
                keys, values = self._workspace.gather(key_pages, value_pages, table)
                lengths = [meta.context_lens[row] for row in chunk]
                tokens = torch.tensor([starts[row] for row in chunk], device=query.device)
                attended = decode(query.index_select(0, tokens), keys, values, lengths, scale)
                out.index_copy_(0, tokens, attended)
        return out


def _rows_per_call(pages: torch.Tensor, num_pages: int) -> int:
    """How many decode requests share one gather: on CPU, as many as keep the gathered K+V near
    4 MiB, so SDPA reads it back from cache (measured at 32 x 256 tokens, fp32: chunks of 8-16
    rows ran 1.3x faster than one call for all 32 and 1.9x faster than one call per row); on GPU,
    all of them."""
    if pages.device.type != "cpu":
        return 1 << 30
    row_bytes = 2 * num_pages * pages[0].numel() * pages.element_size()
    return max(1, CPU_GATHER_CHUNK_BYTES // row_bytes)


def decode(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: list[int], scale: float
) -> torch.Tensor:
    """One token per request: query ``[B, Hq, D]``; keys ``[B, S, Hkv, D]`` valid to ``lengths``."""
    batch, num_heads, head_dim = query.shape
    span, num_kv_heads = keys.shape[1], keys.shape[2]
    folded = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    mask = None
    if any(n != span for n in lengths):
        valid = torch.tensor(lengths, device=query.device)
        mask = (torch.arange(span, device=query.device) < valid[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(
        folded, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.reshape(batch, num_heads, head_dim)  # SDPA on CUDA may return it strided


def prefill_one(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    """One request's new tokens ``[q, Hq, D]``, ending at the end of its keys ``[k, Hkv, D]``."""
    q_len, num_heads, _ = query.shape
    k_len, num_kv_heads, _ = key.shape
    mask = None
    if q_len != k_len:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None],
        key.transpose(0, 1)[None],
        value.transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=num_kv_heads != num_heads,
    )
    return out[0].transpose(0, 1)
