"""Built models cached on disk, so benchmarks and the server build each one once per machine."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from baton_paged.model_builder.build import MARKER_FILE, build_model

CACHE_ENV = "BATON_PAGED_CACHE"


def cache_root() -> Path:
    """``$BATON_PAGED_CACHE``, else ``$XDG_CACHE_HOME/baton-paged``, else ``~/.cache/...``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "baton-paged"


def cached_model(arch: str = "llama", size: str = "small", seed: int = 0) -> Path:
    """The directory of a built model, building it first if this machine has not yet.

    The build goes to a temporary sibling that is renamed into place when complete, so an
    interrupted or concurrent build never leaves a half-written model behind.
    """
    target = cache_root() / "models" / f"{arch}-{size}-seed{seed}"
    if (target / MARKER_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_model(scratch, arch=arch, size=size, seed=seed)
        try:
            scratch.rename(target)
        except OSError:  # another process finished first; its copy is identical
            if not (target / MARKER_FILE).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
