"""A manifest of a cached model's files, written last and checked on every load.

A cache directory counts as complete only when its manifest exists and every file it lists has the
recorded size and SHA-256. The manifest is written after everything else, so a build cut short
(a full disk, a killed process) or a file damaged later reads as incomplete and is rebuilt, never
loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_FILE = "baton_paged_manifest.json"
_CHUNK = 1 << 20


def write_manifest(model_dir: Path) -> None:
    """Record every file now in ``model_dir`` (sizes and SHA-256)."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    entries = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    (model_dir / MANIFEST_FILE).write_text(json.dumps({"files": entries}, indent=2) + "\n")


def manifest_problem(model_dir: Path) -> str | None:
    """Why ``model_dir`` is not a complete, intact cache entry, or None when it is."""
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        return "no manifest (an interrupted build?)"
    try:
        entries = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    for name, entry in entries.items():
        problem = _file_problem(model_dir / name, entry)
        if problem:
            return f"{name}: {problem}"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _file_problem(path: Path, entry: dict) -> str | None:
    if not path.is_file():
        return "missing"
    if path.stat().st_size != entry["size"]:  # cheap, and catches truncation before hashing
        return "size differs from the manifest"
    if file_sha256(path) != entry["sha256"]:
        return "SHA-256 differs from the manifest"
    return None
