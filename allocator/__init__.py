"""Paged KV allocation: page pool, block tables, KV tensors, host swap pool and swap plans.

Installed as ``baton_paged.allocator``. The scheduler uses the bookkeeping half (``PagePool``,
``BlockTable``, slot helpers, swap planning) and never touches tensors; the model runner uses the
storage half (``KVCache``, ``HostSwapPool``, ``execute_swap``).
"""

from baton_paged.allocator.block_table import BlockTable
from baton_paged.allocator.errors import (
    AllocatorError,
    IntegrityError,
    OutOfPagesError,
    PageOwnershipError,
)
from baton_paged.allocator.kv_cache import KVCache
from baton_paged.allocator.kv_spec import KVCacheSpec
from baton_paged.allocator.memory_budget import (
    MemoryBudget,
    budget_bytes,
    free_memory_bytes,
    num_pages_for_budget,
    parse_memory_budget,
)
from baton_paged.allocator.page_pool import PagePool
from baton_paged.allocator.paged_kv import PagedKV
from baton_paged.allocator.slots import offsets_within, pages_needed, slot_mapping
from baton_paged.allocator.swap import (
    CopyRun,
    SwapDirection,
    SwapPlan,
    coalesce_runs,
    execute_swap,
    plan_swap_in,
    plan_swap_out,
    release_source,
)
from baton_paged.allocator.swap_pool import HostSwapPool

__all__ = [
    "AllocatorError",
    "BlockTable",
    "CopyRun",
    "HostSwapPool",
    "IntegrityError",
    "KVCache",
    "KVCacheSpec",
    "MemoryBudget",
    "OutOfPagesError",
    "PageOwnershipError",
    "PagePool",
    "PagedKV",
    "SwapDirection",
    "SwapPlan",
    "budget_bytes",
    "coalesce_runs",
    "execute_swap",
    "free_memory_bytes",
    "num_pages_for_budget",
    "offsets_within",
    "pages_needed",
    "parse_memory_budget",
    "plan_swap_in",
    "plan_swap_out",
    "release_source",
    "slot_mapping",
]
