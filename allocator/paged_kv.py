"""PagedKV: page-major K/V tensors plus the PagePool that hands their pages out.

    storage[page, layer, k_or_v, token, kv_head, dim]      (num_pages, *spec.page_shape)

Why page-major: all of one page's K and V, for every layer, is one contiguous block, so moving a
run of consecutive pages between device and host is a single ``copy_`` whatever the model depth
(a layer-major layout would need 2 x num_layers copies per run). Each layer's K and V are still
the ``[num_pages, page_size, num_kv_heads, head_dim]`` tensors paged kernels take: strided views
whose last dimension is contiguous; flash-attn reads the page stride from the tensor. Within a
page, what a layer's ``[token, kv_head, dim]`` block holds is its backend's: token by token for
all but ``cpu_paged``'s bfloat16 keys, which lie in pairs of dims per head
(``attention/csrc/key_pairs.h``). Nothing here reads inside a page; pages move whole.
"""

from __future__ import annotations

import torch

from baton_paged.allocator.kv_spec import KVCacheSpec
from baton_paged.allocator.page_pool import PagePool
from baton_paged.allocator.pinned import pinned_zeros


class PagedKV:
    """``num_pages`` pages of ``spec`` on ``device``; a page id indexes ``storage`` and ``pool``."""

    def __init__(
        self,
        spec: KVCacheSpec,
        num_pages: int,
        device: torch.device | str,
        *,
        pin_memory: bool = False,
        name: str = "page pool",
        scratch_pages: int = 0,
    ):
        """``scratch_pages`` extra pages follow the pool's, ids ``num_pages ..``: no request ever
        owns them, so padding rows (CUDA-graph decode) can write and read there harmlessly."""
        self.spec = spec
        self.pool = PagePool(num_pages, name=name)
        # Zeroed, not empty: the padded backend reads whole pages and must never meet NaN garbage.
        shape = (num_pages + scratch_pages, *spec.page_shape)
        if pin_memory:
            self.storage = pinned_zeros(shape, spec.dtype)
        else:
            self.storage = torch.zeros(shape, dtype=spec.dtype, device=device)

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    def check_integrity(self) -> None:
        self.pool.check_integrity()
