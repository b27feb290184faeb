"""Models cached on disk, so benchmarks and the server build (or fetch) each one once per machine.

Every entry is built in a temporary sibling directory, gets its manifest last, and is renamed into
place: an interrupted or concurrent build never leaves a half-written model where a loader looks,
and an entry whose files no longer match their manifest is rebuilt rather than loaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from baton_paged.model_builder.build import build_model
from baton_paged.model_builder.manifest import manifest_problem, write_manifest

CACHE_ENV = "BATON_PAGED_CACHE"

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$BATON_PAGED_CACHE``, else ``$XDG_CACHE_HOME/baton-paged``, else ``~/.cache/...``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "baton-paged"


def cached_model(arch: str = "llama", size: str = "small", seed: int = 0) -> Path:
    """The directory of a built random-weight model, building it first if this machine has not."""
    name = f"{arch}-{size}-seed{seed}"
    return cached_dir(name, lambda out: build_model(out, arch=arch, size=size, seed=seed))


def cached_dir(name: str, build: Callable[[Path], object]) -> Path:
    """``models/<name>`` under the cache root, made by ``build(directory)`` unless intact."""
    target = cache_root() / "models" / name
    problem = manifest_problem(target) if target.exists() else "not built yet"
    if problem is None:
        return target
    if target.exists():
        logger.warning("rebuilding the cached model %s: %s", target, problem)
        _discard(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(scratch)
        write_manifest(scratch)
        _move_into_place(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _move_into_place(scratch: Path, target: Path) -> None:
    try:
        scratch.rename(target)
    except OSError:  # another process finished first; keep its copy if it is intact
        if manifest_problem(target) is not None:
            raise


def _discard(target: Path) -> None:
    """Move a broken entry aside (atomic), then delete it, so no loader sees it half-deleted."""
    doomed = Path(tempfile.mkdtemp(prefix=f".{target.name}-broken-", dir=target.parent))
    try:
        target.rename(doomed / target.name)
    except FileNotFoundError:  # another process moved it first
        pass
    shutil.rmtree(doomed, ignore_errors=True)
