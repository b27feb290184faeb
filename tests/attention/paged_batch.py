"""Random ragged batches laid out in a paged cache, and a naive attention to check them against.

Shared by the attention tests (imported as a plain module: pytest puts this folder on sys.path).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from baton_paged.allocator import KVCache, KVCacheSpec, pages_needed, slot_mapping
from baton_paged.attention import AttentionBackend, AttentionMetadata

KINDS = ("decode", "prefill", "prefill_with_context", "mixed")


@dataclass
class PagedBatch:
    """One step: the packed new tokens, the cache holding every request's earlier K/V, and the
    full dense K/V per request that a naive attention reads."""

    cache: KVCache
    meta: AttentionMetadata
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    full_keys: list[torch.Tensor]
    full_values: list[torch.Tensor]


def random_lengths(kind: str, batch: int, max_context: int, rng: np.random.Generator):
    """(query_lens, context_lens) of a ragged batch of the given kind."""
    context = rng.integers(1, max_context + 1, size=batch)
    fresh = context.copy()
    decode = np.ones(batch, dtype=np.int64)
    middle = np.array([rng.integers(1, c + 1) for c in context])
    query = {
        "decode": decode,
        "prefill": fresh,
        "prefill_with_context": middle,
        "mixed": np.choose(rng.integers(0, 3, size=batch), [decode, fresh, middle]),
    }[kind]
    return [int(n) for n in query], [int(n) for n in context]


def make_batch(
    query_lens: list[int],
    context_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    device: str = "cpu",
    seed: int = 0,
    backend: AttentionBackend | None = None,
) -> PagedBatch:
    """Write each request's earlier tokens into shuffled pages (through ``backend``'s own
    ``write_slots`` where given, in the layout its ``attend`` reads; else token by token); return
    the rest as new tokens."""
    gen = torch.Generator().manual_seed(seed)
    widths = [pages_needed(c, page_size) for c in context_lens]
    spare = 3  # pages nobody owns, so reading a wrong page shows up as a wrong answer
    spec = KVCacheSpec(1, num_kv_heads, head_dim, page_size, dtype)
    cache = KVCache(spec, sum(widths) + spare, device)
    cache.storage.copy_(torch.randn(cache.storage.shape, generator=gen, dtype=torch.float64))
    pages = np.random.default_rng(seed).permutation(sum(widths) + spare)
    table = np.zeros((len(context_lens), max(widths)), dtype=np.int32)  # 0-padded, as BlockTable
    for row, start in enumerate(np.cumsum(widths) - widths):
        table[row, : widths[row]] = pages[start : start + widths[row]]

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    full_keys = [rand(c, num_kv_heads, head_dim) for c in context_lens]
    full_values = [rand(c, num_kv_heads, head_dim) for c in context_lens]
    rows = list(zip(query_lens, context_lens, full_keys, full_values, strict=True))
    for row, (q_len, k_len, keys, values) in enumerate(rows):
        slots = slot_mapping(table[[row], : widths[row]], [0], [k_len - q_len], page_size)
        earlier = slice(0, k_len - q_len)
        slots = torch.from_numpy(slots).to(device)
        if backend is None:
            cache.write(0, slots, keys[earlier], values[earlier])
        else:
            backend.write_slots(cache, 0, slots, keys[earlier], values[earlier])
    new = [slice(k_len - q_len, k_len) for q_len, k_len, _, _ in rows]
    return PagedBatch(
        cache=cache,
        meta=AttentionMetadata.build(query_lens, context_lens, table, page_size, device),
        query=rand(sum(query_lens), num_heads, head_dim),
        key=torch.cat([keys[part] for part, keys in zip(new, full_keys, strict=True)]),
        value=torch.cat([values[part] for part, values in zip(new, full_values, strict=True)]),
        full_keys=full_keys,
        full_values=full_values,
    )


def naive_attention(batch: PagedBatch, scale: float) -> torch.Tensor:
    """Per request, per query head: masked softmax over explicit scores, in float64."""
    outputs = []
    offset = 0
    for q_len, keys, values in zip(
        batch.meta.query_lens, batch.full_keys, batch.full_values, strict=True
    ):
        query = batch.query[offset : offset + q_len].double()
        offset += q_len
        group = query.shape[1] // keys.shape[1]
        keys = keys.double().repeat_interleave(group, dim=1)
        values = values.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query, keys) * scale
        k_len = keys.shape[0]
        visible = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values))
    return torch.cat(outputs)
