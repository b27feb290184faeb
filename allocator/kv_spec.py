"""KVCacheSpec: the geometry of one KV page, shared by the device cache and the host swap pool."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """What one page holds: K and V of ``page_size`` tokens for every layer and KV head."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int = 16
    """Tokens per page. 16 suits the torch backends; flash-attn's paged kernels need 256."""
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCacheSpec.{name} must be a positive int, got {value!r}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"KVCacheSpec.dtype must be a floating-point dtype, got {self.dtype}")

    @property
    def page_shape(self) -> tuple[int, int, int, int, int]:
        """``(layers, 2, page_size, kv_heads, head_dim)``: K is index 0 and V index 1."""
        return (self.num_layers, 2, self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_page(self) -> int:
        return math.prod(self.page_shape) * self.dtype.itemsize

    @classmethod
    def from_model_config(
        cls, config: Any, page_size: int = 16, dtype: torch.dtype = torch.float32
    ) -> KVCacheSpec:
        """Geometry of an HF causal LM's KV (Llama/Qwen2 GQA, GPT-2 MHA, ...) from its config."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            page_size=page_size,
            dtype=dtype,
        )
