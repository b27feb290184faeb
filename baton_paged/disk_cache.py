"""The on-disk cache that models and compiled kernels share: entries built once per machine.

Every entry is built in a scratch sibling directory, gets its manifest (each file's size and
SHA-256) last, and is renamed into place: an interrupted or concurrent build never leaves a
half-written entry where a loader looks, and an entry whose files no longer match their manifest
(a build cut short, a file damaged later) is rebuilt rather than loaded.

Check and build happen under an ``flock`` on a file beside the entry, so concurrent first uses
build once, and the kernel releases it when its holder dies. A killed build (``kill -9`` runs no
``finally``) leaves its scratch directory behind; whoever next holds the lock removes it, since
nobody else can be building.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no lock; concurrent builds race, and the rename settles them
    fcntl = None

CACHE_ENV = "BATON_PAGED_CACHE"
MANIFEST_FILE = "baton_paged_manifest.json"
_CHUNK = 1 << 20

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


def write_manifest(entry: Path) -> None:
    """Record every file now in ``entry`` (sizes and SHA-256)."""
    files = sorted(p for p in entry.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    entries = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    (entry / MANIFEST_FILE).write_text(json.dumps({"files": entries}, indent=2) + "\n")


def manifest_problem(entry: Path) -> str | None:
    """Why ``entry`` is not a complete, intact cache entry, or None when it is."""
    path = entry / MANIFEST_FILE
    if not path.is_file():
        return "no manifest (an interrupted build?)"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    for name, recorded in files.items():
        problem = _file_problem(entry / name, recorded)
        if problem:
            return f"{name}: {problem}"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _file_problem(path: Path, recorded: dict) -> str | None:
    if not path.is_file():
        return "missing"
    if path.stat().st_size != recorded["size"]:  # cheap, and catches truncation before hashing
        return "size differs from the manifest"
    if file_sha256(path) != recorded["sha256"]:
        return "SHA-256 differs from the manifest"
    return None


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
