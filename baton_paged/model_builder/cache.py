"""Models (and compiled kernels) cached on disk, so each is built or fetched once per machine.

Every entry is built in a scratch sibling directory, gets its manifest last, and is renamed into
place: an interrupted or concurrent build never leaves a half-written entry where a loader looks,
and an entry whose files no longer match their manifest is rebuilt rather than loaded.

Check and build happen under an ``flock`` on a file beside the entry, so concurrent first uses
build once, and the kernel releases it when its holder dies. A killed build (``kill -9`` runs no
``finally``) leaves its scratch directory behind; whoever next holds the lock removes it, since
nobody else can be building.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from baton_paged.model_builder.build import build_model
from baton_paged.model_builder.manifest import manifest_problem, write_manifest

try:
    import fcntl
except ImportError:  # Windows: no lock; concurrent builds race, and the rename settles them
    fcntl = None

CACHE_ENV = "BATON_PAGED_CACHE"

SCRATCH_SUFFIX = r"(broken-)?[a-z0-9_]{8}"
"""What ``tempfile.mkdtemp`` appends to an entry's scratch prefixes: matched exactly, so the
cleanup of entry ``m`` never takes ``.m-2-xxxxxxxx``, the live scratch of an entry ``m-2``."""

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
    return cached_entry(cache_root() / "models" / name, build)


def cached_entry(target: Path, build: Callable[[Path], object]) -> Path:
    """``target``, made by ``build(scratch directory)`` unless it is intact. An intact entry with
    no scratch beside it is used without the lock (entries are replaced by rename, so a reader
    sees a whole one, and a read-only or shared cache needs no write access); otherwise it is
    checked again, cleaned, repaired or built once the lock is held: a process that waited may
    find it finished by the one it waited for."""
    if target.exists() and not _scratch_of(target) and manifest_problem(target) is None:
        return target  # no lock taken: a read-only cache works
    target.parent.mkdir(parents=True, exist_ok=True)
    with _entry_lock(target) as alone:
        if alone:
            _remove_scratch(target)
        if not _intact(target):
            _build_into_place(target, build)
    return target


@contextlib.contextmanager
def _entry_lock(target: Path) -> Iterator[bool]:
    """Hold ``target``'s lock, waiting for a live holder; yields whether it is held (False
    where there is no ``flock``). The lock file lives beside the entry, which gets replaced."""
    if fcntl is None:
        yield False
        return
    with open(target.parent / f".{target.name}.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield True


def _remove_scratch(target: Path) -> None:
    """Delete the scratch that killed builds of ``target`` left (only under its lock)."""
    stale = _scratch_of(target)
    if stale:
        names = ", ".join(path.name for path in stale)
        logger.warning("removing %s, left by an interrupted build of %s", names, target)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


def _scratch_of(target: Path) -> list[Path]:
    """The scratch directories of ``target``'s builds: live ones only while its lock is held."""
    if not target.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{target.name}-") + SCRATCH_SUFFIX)
    return sorted(path for path in target.parent.iterdir() if pattern.fullmatch(path.name))


def _intact(target: Path) -> bool:
    """Whether ``target`` passes its manifest check; a damaged entry is logged and discarded."""
    if not target.exists():
        return False
    problem = manifest_problem(target)
    if problem is None:
        return True
    logger.warning("rebuilding %s: %s", target, problem)
    _discard(target)
    return False


def _build_into_place(target: Path, build: Callable[[Path], object]) -> None:
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(scratch)
        write_manifest(scratch)
        _move_into_place(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _move_into_place(scratch: Path, target: Path) -> None:
    try:
        scratch.rename(target)
    except OSError:  # without a lock, another process may finish first; keep its copy if intact
        if manifest_problem(target) is not None:
            raise


def _discard(target: Path) -> None:
    """Move a broken entry aside (atomic), then delete it, so no loader sees it half-deleted; a
    kill halfway leaves scratch that the next holder of the lock removes."""
    doomed = Path(tempfile.mkdtemp(prefix=f".{target.name}-broken-", dir=target.parent))
    try:
        target.rename(doomed / target.name)
    except FileNotFoundError:  # without a lock, another process may have moved it first
        pass
    shutil.rmtree(doomed, ignore_errors=True)
