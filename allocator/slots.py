"""Cache slots: where a token's K/V lives in the paged cache.

A slot is ``page * page_size + offset``: token position ``pos`` of a request lives in page
``pages[pos // page_size]`` at offset ``pos % page_size``. Attention kernels write new K/V through
a slot mapping (one slot per new token) and read old K/V through the block table; both come from
the same table, so they can never disagree.
"""

from __future__ import annotations

import numpy as np


def pages_needed(num_tokens: int, page_size: int) -> int:
    """Pages that hold ``num_tokens`` tokens (ceiling division)."""
    return -(-num_tokens // page_size)


def slot_mapping(
    block_table: np.ndarray, starts: np.ndarray, ends: np.ndarray, page_size: int
) -> np.ndarray:
    """Slots of positions ``[starts[b], ends[b])`` of every row ``b`` of ``block_table``, packed
    in row order: the slots one forward writes its new tokens' K/V to (a decode row has
    ``ends[b] == starts[b] + 1``). The pages must be allocated already (the scheduler grows them
    before it plans the forward; entries past a row's pages are padding, so a position there
    maps to page 0); ValueError if a position lies past the table's width."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    if starts.shape != ends.shape or (starts < 0).any() or (ends < starts).any():
        raise ValueError("every row needs 0 <= start <= end")
    if len(ends) and pages_needed(int(ends.max()), page_size) > block_table.shape[1]:
        raise ValueError(
            f"positions up to {int(ends.max())} do not fit in {block_table.shape[1]} pages of "
            f"{page_size} tokens"
        )
    lengths = ends - starts
    positions = np.repeat(starts, lengths) + offsets_within(lengths)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    pages = block_table[rows, positions // page_size].astype(np.int64)
    return pages * page_size + positions % page_size


def offsets_within(lengths: np.ndarray) -> np.ndarray:
    """Each packed token's index within its own row: ``concat(arange(n) for n in lengths)``
    without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(int(lengths.sum())) - offsets
