"""CPU kernel libraries, each compiled from its C++ sources on first use and cached per machine:
the attention kernels (``attention/csrc/``: paged attention, the write of new K/V), defined
here, and any other ``KernelLibrary`` (the executor's decoder ops, defined on the model side).

``torch.utils.cpp_extension`` builds the sources with the machine's C++ compiler (``-O3
-march=native``, so the build directory's name carries a hash of the sources, the CPU's
instruction sets and torch's version: a cache copied to another machine is rebuilt, never run
with instructions its CPU lacks). The first build takes tens of seconds; later processes load
the cached library in milliseconds.

A damaged library must not crash every later start: ninja compares timestamps only, so a ``.so``
cut short by a killed link (or damaged later) reads as up to date, and importing it dies with a
bus error. So ninja never runs where the library is loaded from. The build runs in a child
process, in a scratch directory beside the final one; only the library stays there, a manifest of
its size and SHA-256 is written beside it, and the directory is renamed into place. A load checks
the manifest, then imports the library directly; a directory that fails the check is deleted and
rebuilt. The directory is a cache entry (``baton_paged/disk_cache.py``): concurrent first uses
build once under an ``flock`` beside it, which the kernel releases when its holder dies, and the
next holder removes the scratch a killed build left.

Where no compiler or build tool is present, or the build fails, a library logs one line and
answers None, and its user keeps to the plain torch path: never a crash.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import torch

from baton_paged import disk_cache

logger = logging.getLogger(__name__)

T = TypeVar("T")

CFLAGS = ["-O3", "-march=native", "-fopenmp"]
"""``-fopenmp`` because ``at::parallel_for`` is a header template: compiled without it, its
parallel region is a plain loop. The library then needs ``libgomp.so.1``, which the loader
resolves to the copy torch already loaded, so the kernels share torch's thread pool."""


@dataclass(frozen=True)
class KernelLibrary:
    """One compiled library: ``name`` prefixes its cache directory, ``sources`` compile into it
    (one of them holds its ``PYBIND11_MODULE``), ``headers`` are what they include, found in
    the headers' folders. ``fallback`` is what runs without it, for the one logged line."""

    name: str
    sources: tuple[Path, ...]
    headers: tuple[Path, ...]
    fallback: str

    def kernels(self) -> ModuleType | None:
        """The compiled library, or None (with one logged line) when it cannot be built here."""
        return _built(self)[0]

    def unavailable_reason(self) -> str | None:
        """Why the library cannot run here, or None once it has loaded (builds it if needed)."""
        return _built(self)[1]

    def loaded(self) -> ModuleType | None:
        """The library if this process has already loaded it, else None: never builds (for
        callers on a request's path, which must not wait for a compiler)."""
        return _LOADED.get(self.name)

    def include_dirs(self) -> list[str]:
        return sorted({str(header.parent) for header in self.headers})


CSRC = Path(__file__).with_name("csrc")
ATTENTION_KERNELS = KernelLibrary(
    name="baton_attention_kernels",
    sources=(CSRC / "paged_attention.cpp", CSRC / "page_copy.cpp", CSRC / "bindings.cpp"),
    headers=(
        CSRC / "amx_attention.h",
        CSRC / "amx_tiles.h",
        CSRC / "claimed_items.h",
        CSRC / "cpu_common.h",
        CSRC / "float_tiles.h",
        CSRC / "key_pairs.h",
        CSRC / "paged_inputs.h",
        CSRC / "wide_math.h",
    ),
    fallback="attention uses the plain torch backend",
)


def cpu_kernels() -> ModuleType | None:
    """The attention kernels, or None (with one logged line) when they cannot be built here."""
    return ATTENTION_KERNELS.kernels()


def unavailable_reason() -> str | None:
    """Why the attention kernels cannot run here, or None when they have loaded."""
    return ATTENTION_KERNELS.unavailable_reason()


_LOADED: dict[str, ModuleType] = {}
"""Each library this process has loaded, by name."""


@functools.cache
def _built(library: KernelLibrary) -> tuple[ModuleType | None, str | None]:
    """Build or load once per process: the library, or None and why not."""
    reason = _build_problem(library)
    if reason is None:
        try:
            _LOADED[library.name] = _load(library)
            return _LOADED[library.name], None
        except Exception as error:  # a compiler error, a missing header: fall back, say why
            reason = f"building {library.name} failed ({_first_error(str(error))})"
    logger.warning("%s; %s", reason, library.fallback)
    return None, reason


def _build_problem(library: KernelLibrary) -> str | None:
    from torch.utils import cpp_extension

    if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        return f"no CPU kernels for {platform.machine()}"
    missing = [str(path) for path in (*library.sources, *library.headers) if not path.is_file()]
    if missing:
        return f"the kernel sources {', '.join(missing)} are missing"
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja)"
    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    return None


def _load(library: KernelLibrary) -> ModuleType:
    directory = build_directory(library)
    name = directory.name
    so = directory / f"{name}{importlib.machinery.EXTENSION_SUFFIXES[-1]}"
    compile_ = functools.partial(_compile, library, name)
    return load_verified(so, compile_, functools.partial(_import, name))


def load_verified(library: Path, build: Callable[[Path], Path], load: Callable[[Path], T]) -> T:
    """``load(library)`` once ``library``'s directory passes its manifest check. A directory that
    is missing or fails it is rebuilt first: ``build(scratch directory)`` answers the file it
    made, which alone stays there, renamed ``library.name``, before the directory moves in."""
    disk_cache.cached_entry(
        library.parent, lambda scratch: _keep_only(build(scratch), library.name)
    )
    return load(library)


def _keep_only(built: Path, name: str) -> None:
    """Leave ``built``, renamed ``name``, alone in its directory: no object files or build
    state in the cache, and nothing a later build could take as up to date."""
    for path in built.parent.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        elif path != built:
            path.unlink()
    built.rename(built.with_name(name))


def _compile(library: KernelLibrary, name: str, scratch: Path) -> Path:
    """Build ``library`` as module ``name`` into ``scratch`` in a child process, which imports it
    once (a library that does not load is a failed build): this process imports only the
    checked copy."""
    logger.warning("building %s into %s (once per machine)", library.name, scratch)
    arguments = {
        "name": name,
        "sources": [str(source) for source in library.sources],
        "extra_include_paths": library.include_dirs(),
        "extra_cflags": CFLAGS,
        "extra_ldflags": ["-fopenmp"],
        "build_directory": str(scratch),
    }
    command = [sys.executable, "-c", _BUILD_SCRIPT, json.dumps(arguments)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr or f"the build exited with status {done.returncode}")
    return Path(done.stdout.splitlines()[-1])


_BUILD_SCRIPT = """
import json, sys
from torch.utils import cpp_extension
try:
    module = cpp_extension.load(verbose=False, **json.loads(sys.argv[1]))
except Exception as error:
    sys.exit(str(error))
print(module.__file__)
"""


def _import(name: str, library: Path) -> ModuleType:
    """The extension module in ``library``; ``name`` is the one it was compiled with
    (``TORCH_EXTENSION_NAME``), which names its ``PyInit_`` function."""
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_directory(library: KernelLibrary) -> Path:
    return disk_cache.cache_root() / "kernels" / f"{library.name}_{_build_key(library)}"


def _first_error(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no message"])[0][:300]


def _build_key(library: KernelLibrary) -> str:
    """A hash of everything the compiled library depends on, its loader (this module and the
    cache's entries) included: processes whose loaders lock differently never share a build
    directory."""
    digest = hashlib.sha256()
    for path in (*library.sources, *library.headers, Path(__file__), Path(disk_cache.__file__)):
        digest.update(path.read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    digest.update(torch.__version__.encode())
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()
