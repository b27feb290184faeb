"""HostSwapPool: host memory shaped like the device cache, where preempted requests' K/V waits."""

from __future__ import annotations

from baton_paged.allocator.kv_spec import KVCacheSpec
from baton_paged.allocator.memory_budget import MemoryBudget, num_pages_for_budget
from baton_paged.allocator.paged_kv import PagedKV


class HostSwapPool(PagedKV):
    """``num_pages`` host pages of the device cache's geometry, with a PagePool of their own.

    ``pin_memory`` for a CUDA cache: its swap copies then run asynchronously on the stream
    (pageable memory would make every device-to-host copy synchronous), and the pool is locked at
    its exact size (``pinned.py``). A CPU cache's pool stays pageable: pinning it would lock RAM
    and create a CUDA context for nothing.
    """

    def __init__(self, spec: KVCacheSpec, num_pages: int, *, pin_memory: bool = False):
        super().__init__(spec, num_pages, "cpu", pin_memory=pin_memory, name="host swap pool")

    @classmethod
    def from_budget(
        cls, spec: KVCacheSpec, budget: MemoryBudget | str, *, pin_memory: bool = False
    ) -> HostSwapPool:
        """As many host pages as ``budget`` holds (bytes, or a fraction of available memory)."""
        return cls(spec, num_pages_for_budget(spec, budget, "cpu"), pin_memory=pin_memory)

    @property
    def pinned(self) -> bool:
        return self.storage.is_pinned()
