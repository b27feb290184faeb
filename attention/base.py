"""The one interface every attention backend implements, and what a backend is asked to support.

A backend's ``forward`` writes the step's new K/V into the paged cache through the slot mapping,
then attends every packed query token to its own request's context (bottom-right causal: query
``i`` of a request with ``q`` new tokens and context ``c`` sees keys ``<= c - q + i``). Inputs
and output are packed: query ``[T, Hq, D]``, key/value ``[T, Hkv, D]``, output ``[T, Hq, D]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from baton_paged.allocator.kv_cache import KVCache
from baton_paged.attention.metadata import AttentionMetadata


class BackendUnavailableError(RuntimeError):
    """An explicitly chosen backend cannot run here; the message says why."""


@dataclass(frozen=True)
class AttentionRequirements:
    """What the engine will ask of a backend; capability checks answer from this alone."""

    device: torch.device
    dtype: torch.dtype
    page_size: int
    head_dim: int
    num_query_heads: int
    num_kv_heads: int


class AttentionBackend(ABC):
    """Paged attention over a ``KVCache`` for one step described by ``AttentionMetadata``."""

    name: ClassVar[str]
    preferred_page_size: ClassVar[int] = 16
    graph_safe: ClassVar[bool] = False
    """Whether a CUDA graph can capture ``forward``: it reads every per-request length from the
    metadata's device tensors and takes the host lengths only as upper bounds (grid sizes,
    ``max_seqlen_k``), so a replay with other lengths in the same buffers stays right."""

    @classmethod
    def unsupported_reason(cls, req: AttentionRequirements) -> str | None:
        """Why this backend cannot serve ``req`` (missing package, device, dtype...), or None.
        The default suits backends built from plain PyTorch ops, which run wherever torch does."""
        return None

    @classmethod
    def create(cls, req: AttentionRequirements) -> AttentionBackend:
        """A ready backend for ``req`` (which ``unsupported_reason`` accepted); a backend with
        several forms returns the one that fits."""
        return cls()

    @classmethod
    def page_size_for(cls, req: AttentionRequirements) -> int:
        """The page size to build the cache with when the user chose none."""
        return cls.preferred_page_size

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cache: KVCache,
        layer: int,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        self.write(cache, layer, meta, key, value)
        return self.attend(query, cache.key(layer), cache.value(layer), meta, scale)

    def write(
        self,
        cache: KVCache,
        layer: int,
        meta: AttentionMetadata,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> None:
        """Store the step's new K/V at ``meta.slot_mapping``."""
        self.write_slots(cache, layer, meta.slot_mapping, key, value)

    def write_slots(
        self,
        cache: KVCache,
        layer: int,
        slot_mapping: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> None:
        """Store K/V ``[T, kv_heads, head_dim]`` at slots ``[T]`` as this backend's ``attend``
        reads its pages: ``KVCache.write``'s token by token, unless the backend lays its pages out
        otherwise (``cpu_paged``'s bfloat16 keys lie in pairs of dims). A backend with its own
        cache-write kernel overrides this alone."""
        cache.write(layer, slot_mapping, key, value)

    @abstractmethod
    def attend(
        self,
        query: torch.Tensor,
        key_pages: torch.Tensor,
        value_pages: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Packed ``[T, Hq, D]`` output from the pages ``[P, page_size, Hkv, D]`` of one layer."""
