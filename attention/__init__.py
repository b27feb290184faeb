"""Attention over the paged KV cache: step metadata, backends, and the transformers bridge.

Installed as ``baton_paged.attention``. Optional kernels (flash-attn, xformers) are imported only
when their backend is created, so importing this package never needs them.
"""

from baton_paged.attention.base import (
    AttentionBackend,
    AttentionRequirements,
    BackendUnavailableError,
)
from baton_paged.attention.hf_bridge import (
    ATTN_IMPLEMENTATION,
    PagedStep,
    UnsupportedModelError,
    attach,
    detach,
    paged_attention,
    unsupported_model_reason,
)
from baton_paged.attention.metadata import AttentionMetadata
from baton_paged.attention.registry import (
    AUTO,
    BACKENDS,
    available_backends,
    create_backend,
    resolve_backend_name,
    suggested_page_size,
    unsupported_reasons,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AUTO",
    "BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "AttentionRequirements",
    "BackendUnavailableError",
    "PagedStep",
    "UnsupportedModelError",
    "attach",
    "detach",
    "available_backends",
    "create_backend",
    "paged_attention",
    "resolve_backend_name",
    "suggested_page_size",
    "unsupported_model_reason",
    "unsupported_reasons",
]
