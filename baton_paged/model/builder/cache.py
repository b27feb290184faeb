"""Models cached on disk (``baton_paged/disk_cache.py``), so each is built or fetched once per
machine: entries under ``models/`` in the cache root."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from baton_paged.disk_cache import cache_root, cached_entry
from baton_paged.model.builder.build import build_model


def cached_model(arch: str = "llama", size: str = "small", seed: int = 0) -> Path:
    """The directory of a built random-weight model, building it first if this machine has not."""
    name = f"{arch}-{size}-seed{seed}"
    return cached_dir(name, lambda out: build_model(out, arch=arch, size=size, seed=seed))


def cached_dir(name: str, build: Callable[[Path], object]) -> Path:
    """``models/<name>`` under the cache root, made by ``build(directory)`` unless intact."""
    return cached_entry(cache_root() / "models" / name, build)
