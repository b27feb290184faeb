"""AttentionMetadata: where one forward step's tokens come from and where their K/V goes.

The model runner packs every scheduled request's new tokens into one sequence of ``T`` tokens
(request ``b`` owns ``[cu_seqlens_q[b], cu_seqlens_q[b+1])``). Each request already has
``context_len - query_len`` tokens of K/V in its pages; this step appends ``query_len`` more, so
after the step its K covers ``context_len`` positions. A decode request has ``query_len == 1``; a
fresh prompt has ``query_len == context_len``; a chunk or a recompute sits in between. Built once
per step and shared by every layer, so no layer pays for host->device copies of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from baton_paged.allocator.slots import pages_needed, slot_mapping


@dataclass(frozen=True)
class AttentionMetadata:
    """One step's packing: device tensors for kernels, host tuples for Python loops."""

    query_lens: tuple[int, ...]
    """New tokens per request in this step (host)."""
    context_lens: tuple[int, ...]
    """K/V length per request once this step's tokens are written (host)."""
    page_size: int
    cu_seqlens_q: torch.Tensor
    """``(batch + 1,)`` int32 offsets of each request's tokens in the packed query."""
    cu_seqlens_k: torch.Tensor
    """``(batch + 1,)`` int32 cumulative context lengths (upstream flash-attn wants these)."""
    seqused_k: torch.Tensor
    """``(batch,)`` int32 context lengths (vLLM/torch-style paged kernels want these)."""
    block_table: torch.Tensor
    """``(batch, max_pages)`` int32, trimmed to the pages the longest context needs."""
    slot_mapping: torch.Tensor
    """``(T,)`` int64 cache slot of every new token, in packed order."""

    @property
    def batch_size(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_table: np.ndarray,
        page_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for requests whose pages are rows of ``block_table``, in row order.

        The new tokens of request ``b`` are positions ``[context_lens[b] - query_lens[b],
        context_lens[b])``; their slots come from the same table the kernels read, so a slot
        mapping can never disagree with the block table. Entries past a row's pages are padding
        and must still be valid page ids (``BlockTable`` pads with 0): backends that gather whole
        rows read them and then mask them out.
        """
        query = np.asarray(query_lens, dtype=np.int64)
        context = np.asarray(context_lens, dtype=np.int64)
        _check_shapes(query, context, block_table, page_size)
        width = pages_needed(int(context.max()), page_size)
        table = np.ascontiguousarray(block_table[: len(query), :width], dtype=np.int32)
        if (table < 0).any():
            raise ValueError("block table entries must be page ids >= 0 (pad rows with 0)")
        slots = slot_mapping(table, context - query, context, page_size)

        def to_device(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(device, non_blocking=True)

        return cls(
            query_lens=tuple(int(n) for n in query),
            context_lens=tuple(int(n) for n in context),
            page_size=page_size,
            cu_seqlens_q=to_device(_cumulative(query)),
            cu_seqlens_k=to_device(_cumulative(context)),
            seqused_k=to_device(context.astype(np.int32)),
            block_table=to_device(table),
            slot_mapping=to_device(slots),
        )


def _cumulative(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def _check_shapes(
    query: np.ndarray, context: np.ndarray, block_table: np.ndarray, page_size: int
) -> None:
    if query.ndim != 1 or query.shape != context.shape or len(query) == 0:
        raise ValueError("query_lens and context_lens must be equal-length, non-empty sequences")
    if (query < 1).any() or (query > context).any():
        raise ValueError("every request needs 1 <= query_len <= context_len")
    if block_table.ndim != 2 or block_table.shape[0] < len(query):
        raise ValueError(f"block table of shape {block_table.shape} lacks {len(query)} rows")
    if pages_needed(int(context.max()), page_size) > block_table.shape[1]:
        raise ValueError(
            f"a context of {int(context.max())} tokens needs more than the block table's "
            f"{block_table.shape[1]} pages of {page_size}"
        )
