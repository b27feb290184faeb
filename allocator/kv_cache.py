"""KVCache: the device-side paged K/V of every layer, written through a slot mapping."""

from __future__ import annotations

import torch

from baton_paged.allocator.kv_spec import KVCacheSpec
from baton_paged.allocator.memory_budget import MemoryBudget, num_pages_for_budget
from baton_paged.allocator.paged_kv import PagedKV


class KVCache(PagedKV):
    """Per-layer K and V views ``[num_pages, page_size, kv_heads, head_dim]`` over one buffer."""

    def __init__(
        self,
        spec: KVCacheSpec,
        num_pages: int,
        device: torch.device | str = "cpu",
        scratch_pages: int = 0,
    ):
        super().__init__(
            spec, num_pages, device, name="device page pool", scratch_pages=scratch_pages
        )
        self._keys = [self.storage[:, layer, 0] for layer in range(spec.num_layers)]
        self._values = [self.storage[:, layer, 1] for layer in range(spec.num_layers)]

    @classmethod
    def from_budget(
        cls,
        spec: KVCacheSpec,
        budget: MemoryBudget | str,
        device: torch.device | str = "cpu",
        scratch_pages: int = 0,
    ) -> KVCache:
        """As many pages as ``budget`` (bytes, or a fraction of free memory) holds on ``device``,
        less the scratch pages."""
        num_pages = num_pages_for_budget(spec, budget, device) - scratch_pages
        if num_pages < 1:
            raise ValueError(f"KV budget {budget!r} leaves no pages beside the scratch page")
        return cls(spec, num_pages, device, scratch_pages)

    def key(self, layer: int) -> torch.Tensor:
        return self._keys[layer]

    @property
    def layer_keys(self) -> list[torch.Tensor]:
        """Every layer's K pages (``key(layer)`` for each), for a kernel that runs all layers."""
        return self._keys

    @property
    def layer_values(self) -> list[torch.Tensor]:
        return self._values

    def value(self, layer: int) -> torch.Tensor:
        return self._values[layer]

    def write(
        self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Store new tokens' ``key``/``value`` ``[T, kv_heads, head_dim]`` at slots ``[T]``."""
        pages = torch.div(slot_mapping, self.spec.page_size, rounding_mode="floor")
        offsets = slot_mapping - pages * self.spec.page_size
        self._keys[layer][pages, offsets] = key
        self._values[layer][pages, offsets] = value
