"""Cache slots: where a token's K/V lives in the paged cache.

A slot is ``page * page_size + offset``: token position ``pos`` of a request lives in page
``pages[pos // page_size]`` at offset ``pos % page_size``. Attention kernels write new K/V through
a slot mapping (one slot per new token) and read old K/V through the block table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pages_needed(num_tokens: int, page_size: int) -> int:
    """Pages that hold ``num_tokens`` tokens (ceiling division)."""
    return -(-num_tokens // page_size)


def slot_mapping(pages: Sequence[int], start: int, end: int, page_size: int) -> np.ndarray:
    """Slots of token positions ``[start, end)`` of one request whose K/V lives in ``pages``."""
    if not 0 <= start <= end <= len(pages) * page_size:
        raise ValueError(
            f"positions [{start}, {end}) do not fit in {len(pages)} pages of {page_size} tokens"
        )
    positions = np.arange(start, end, dtype=np.int64)
    page_ids = np.asarray(pages, dtype=np.int64)[positions // page_size]
    return page_ids * page_size + positions % page_size


def decode_slot_mapping(
    block_table: np.ndarray, positions: np.ndarray, page_size: int
) -> np.ndarray:
    """Slots of one new token per row: row ``i`` writes position ``positions[i]``.

    ``block_table`` is the batch's ``(batch, max_pages)`` table and ``positions`` a ``(batch,)``
    integer array; the pages must already be allocated (the scheduler grows them first).
    """
    rows = np.arange(len(positions))
    page_ids = block_table[rows, positions // page_size].astype(np.int64)
    return page_ids * page_size + positions % page_size
