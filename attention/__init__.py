"""Attention over the paged KV cache: step metadata and backends.

Installed as ``baton_paged.attention``. Optional kernels (flash-attn, xformers) are imported only
when their backend is created, so importing this package never needs them.
"""

from baton_paged.attention.base import (
    AttentionBackend,
    AttentionRequirements,
    BackendUnavailableError,
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
    "AUTO",
    "BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "AttentionRequirements",
    "BackendUnavailableError",
    "available_backends",
    "create_backend",
    "resolve_backend_name",
    "suggested_page_size",
    "unsupported_reasons",
]
