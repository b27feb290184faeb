"""GatherWorkspace: copy a batch's pages out of the paged cache into reused buffers.

The torch, padded and xformers backends read K/V as ``[rows, pages * page_size, Hkv, D]``; they
gather it here. A fresh multi-MiB tensor per layer costs page faults that, measured on CPU, took
longer than the gather itself; layers run one after another, so one pair of buffers serves them
all (the caller is done with a layer's gathered K/V before the next layer gathers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch

from baton_paged.attention.base import AttentionBackend
from baton_paged.attention.metadata import AttentionMetadata

T = TypeVar("T")


class GatherWorkspace:
    """Two growing buffers, one for K and one for V, overwritten by every ``gather``."""

    def __init__(self) -> None:
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def gather(
        self, key_pages: torch.Tensor, value_pages: torch.Tensor, table: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[rows, pages * page_size, Hkv, D]`` of the pages listed in ``table``."""
        rows, num_pages = table.shape
        flat = table.reshape(-1).long()  # index_select is ~3x slower with an int32 index (CPU)
        page_shape = key_pages.shape[1:]
        if self._keys is None or not self._fits(key_pages, flat.numel()):
            self._keys = key_pages.new_empty((flat.numel(), *page_shape))
            self._values = value_pages.new_empty((flat.numel(), *page_shape))
        keys = torch.index_select(key_pages, 0, flat, out=self._keys[: flat.numel()])
        values = torch.index_select(value_pages, 0, flat, out=self._values[: flat.numel()])
        shape = (rows, num_pages * page_shape[0], *page_shape[1:])
        return keys.view(shape), values.view(shape)

    def _fits(self, pages: torch.Tensor, count: int) -> bool:
        buffer = self._keys
        return (
            buffer.shape[0] >= count
            and buffer.shape[1:] == pages.shape[1:]
            and buffer.dtype == pages.dtype
            and buffer.device == pages.device
        )


class GatheringBackend(AttentionBackend):
    """A backend that reads K/V gathered out of the pages rather than from the pages in place."""

    def __init__(self) -> None:
        self._workspace = GatherWorkspace()


class StepMemo(Generic[T]):
    """One value per step, built by the step's first layer and reused by the others (a step is
    one ``AttentionMetadata`` object, shared by every layer of a forward)."""

    def __init__(self) -> None:
        self._step: tuple[AttentionMetadata, T] | None = None

    def get(self, meta: AttentionMetadata, build: Callable[[], T]) -> T:
        if self._step is None or self._step[0] is not meta:
            self._step = (meta, build())
        return self._step[1]
