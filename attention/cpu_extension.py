"""The CPU kernels (``csrc/``: paged attention, the decoder's small ops, their Python bindings):
compiled on first use, cached per machine.

``torch.utils.cpp_extension`` builds the sources with the machine's C++ compiler (``-O3
-march=native``, so the build directory's name carries a hash of the source, the CPU's
instruction sets and torch's version: a cache copied to another machine is rebuilt, never run
with instructions its CPU lacks). The first build takes tens of seconds; later processes load
the cached library in milliseconds.

Concurrent first uses must not build twice, and a build killed halfway (Ctrl-C during the first
start) must not stop every later start. torch's own build lock is a plain file that a killed
process leaves behind, and every later load waits on it forever; so builds and loads hold an
``flock`` on the build directory, which the kernel releases when its holder dies, and whoever
holds it removes a torch lock file left there (nobody else can be building).

Where no compiler or build tool is present, or the build fails, ``cpu_kernels()`` logs one line
and answers None, and the engine keeps to the plain ``torch`` backend: never a crash.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import platform
import shutil
from pathlib import Path
from types import ModuleType

import torch

try:
    import fcntl
except ImportError:  # Windows: torch's own build lock alone
    fcntl = None

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("paged_attention.cpp", "decoder_ops.cpp", "bindings.cpp")
HEADERS = ("cpu_common.h",)
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
"""``-fopenmp`` because ``at::parallel_for`` is a header template: compiled without it, its
parallel region is a plain loop. The library then needs ``libgomp.so.1``, which the loader
resolves to the copy torch already loaded, so the kernels share torch's thread pool."""


def cpu_kernels() -> ModuleType | None:
    """The compiled kernels, or None (with one logged line) when they cannot be built here."""
    return _built()[0]


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, or None when they have loaded (builds them if needed)."""
    return _built()[1]


@functools.cache
def _built() -> tuple[ModuleType | None, str | None]:
    """Build or load once per process: the kernels, or None and why not."""
    reason = _build_problem()
    if reason is None:
        try:
            return _load(), None
        except Exception as error:  # a compiler error, a missing header: fall back, say why
            reason = f"building the CPU kernels failed ({_first_error(str(error))})"
    logger.warning("%s; attention uses the plain torch backend", reason)
    return None, reason


def _build_problem() -> str | None:
    from torch.utils import cpp_extension

    if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        return f"no CPU kernels for {platform.machine()}"
    missing = [name for name in (*SOURCES, *HEADERS) if not (CSRC / name).is_file()]
    if missing:
        return f"the CPU kernel sources {', '.join(missing)} are missing from {CSRC}"
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja)"
    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    return None


def _load() -> ModuleType:
    from torch.utils import cpp_extension

    name = f"baton_cpu_kernels_{_build_key()}"
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory):
        if not any(directory.glob("*.so")):
            logger.warning("building the CPU kernels into %s (once per machine)", directory)
        return cpp_extension.load(
            name=name,
            sources=[str(CSRC / name) for name in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )


@contextlib.contextmanager
def _exclusive(directory: Path):
    """Hold the build directory alone (waiting for a live builder); clear a dead one's lock."""
    if fcntl is None:
        yield
        return
    with open(directory / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        stale = directory / "lock"
        if stale.exists():
            logger.warning("removing %s, left by a build that did not finish", stale)
            stale.unlink(missing_ok=True)
        yield


def build_directory() -> Path:
    from baton_paged.model_builder.cache import cache_root

    return cache_root() / "kernels" / f"baton_cpu_kernels_{_build_key()}"


def _first_error(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no message"])[0][:300]


def _build_key() -> str:
    """A hash of everything the compiled library depends on, this loader included: processes
    whose loaders lock differently never share a build directory."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((CSRC / name).read_bytes())
    digest.update(Path(__file__).read_bytes())
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
