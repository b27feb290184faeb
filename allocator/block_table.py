"""BlockTable: the running batch's page table, one int32 row per request.

    request  row  table (int32, max_rows x max_pages)   pages
    "r7"     0    [ 12   3  40   0   0 ]                 3
    "r2"     1    [  5   6   0   0   0 ]                 2
    "r9"     2    [ 41   0   0   0   0 ]                 1

Rows ``[0, len(table))`` are the batch, in the order the model runner packs it. Entries past a
row's page count are padding (0): kernels read a row only up to the request's context length, so
padding is never dereferenced. The table is the single record of which pages a batched request
owns; ``pages(request_id)`` reads it back.

BATON's insertion is ``insert``: a prefilled request's page list becomes a new last row.
Removal moves the last row into the hole. Neither touches K/V, only page ids, so both cost
O(max_pages) integer writes whatever the context length.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from baton_paged.allocator.errors import IntegrityError


class BlockTable:
    """Page ids of up to ``max_rows`` requests, at most ``max_pages`` pages each."""

    def __init__(self, max_rows: int, max_pages: int):
        if max_rows < 1 or max_pages < 1:
            raise ValueError(
                f"a block table needs max_rows, max_pages >= 1, got {max_rows}, {max_pages}"
            )
        self.max_rows = max_rows
        self.max_pages = max_pages
        self._table = np.zeros((max_rows, max_pages), dtype=np.int32)
        self._num_pages = np.zeros(max_rows, dtype=np.int64)
        self._request_ids: list[Hashable] = []
        self._row_of: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._request_ids)

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._row_of

    @property
    def request_ids(self) -> list[Hashable]:
        """Request ids in row order (a copy)."""
        return list(self._request_ids)

    def row_of(self, request_id: Hashable) -> int:
        return self._row_of[self._known(request_id)]

    def num_pages(self, request_id: Hashable) -> int:
        return int(self._num_pages[self.row_of(request_id)])

    def pages(self, request_id: Hashable) -> list[int]:
        row = self.row_of(request_id)
        return self._table[row, : self._num_pages[row]].tolist()

    def insert(self, request_id: Hashable, pages: Sequence[int]) -> int:
        """Add ``request_id`` as the last row holding ``pages``; return its row."""
        if request_id in self._row_of:
            raise ValueError(f"request {request_id!r} is already in the block table")
        if len(self._request_ids) == self.max_rows:
            raise ValueError(f"block table is full ({self.max_rows} rows)")
        self._check_width(request_id, len(pages))
        row = len(self._request_ids)
        self._table[row, : len(pages)] = pages
        self._num_pages[row] = len(pages)
        self._request_ids.append(request_id)
        self._row_of[request_id] = row
        return row

    def append(self, request_id: Hashable, pages: Sequence[int]) -> None:
        """Add ``pages`` after the request's last page (its context grew past a page boundary)."""
        row = self.row_of(request_id)
        start = int(self._num_pages[row])
        self._check_width(request_id, start + len(pages))
        self._table[row, start : start + len(pages)] = pages
        self._num_pages[row] = start + len(pages)

    def remove(self, request_id: Hashable) -> list[int]:
        """Drop the request's row and return its pages; the last row moves into the hole."""
        row = self.row_of(request_id)
        pages = self._table[row, : self._num_pages[row]].tolist()
        last = len(self._request_ids) - 1
        if row != last:
            moved = self._request_ids[last]
            self._table[row] = self._table[last]
            self._num_pages[row] = self._num_pages[last]
            self._request_ids[row] = moved
            self._row_of[moved] = row
        self._table[last] = 0
        self._num_pages[last] = 0
        self._request_ids.pop()
        del self._row_of[request_id]
        return pages

    def as_numpy(self) -> np.ndarray:
        """The ``(len(self), max_pages)`` int32 table; a view that later mutations change."""
        return self._table[: len(self._request_ids)]

    def check_integrity(self) -> None:
        """Raise ``IntegrityError`` unless rows, ids and padding agree."""
        n = len(self._request_ids)
        if self._row_of != {rid: row for row, rid in enumerate(self._request_ids)}:
            raise IntegrityError("block table: request ids and rows disagree")
        for row in range(self.max_rows):
            used = int(self._num_pages[row]) if row < n else 0
            if row >= n and self._num_pages[row] != 0:
                raise IntegrityError(f"block table: unused row {row} records pages")
            if self._table[row, used:].any():
                raise IntegrityError(f"block table: row {row} has non-zero padding")

    def _known(self, request_id: Hashable) -> Hashable:
        if request_id not in self._row_of:
            raise KeyError(f"request {request_id!r} is not in the block table")
        return request_id

    def _check_width(self, request_id: Hashable, num_pages: int) -> None:
        if num_pages > self.max_pages:
            raise ValueError(
                f"request {request_id!r} needs {num_pages} pages; a row holds {self.max_pages}"
            )
