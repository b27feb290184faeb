"""The CPU kernel libraries' build: cached per machine; a missing tool is one logged line, not a
crash; a damaged library is rebuilt, never imported."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from baton_paged.attention import cpu_extension
from baton_paged.attention.cpu_extension import ATTENTION_KERNELS
from baton_paged.disk_cache import MANIFEST_FILE, manifest_problem
from baton_paged.model.decoder_kernels import DECODER_KERNELS

GOOD = b"\x7fELF a whole library"


@pytest.fixture
def fresh_build_state():
    """Forget the process' loaded kernels for the test, and restore them afterwards."""
    cpu_extension._built.cache_clear()
    loaded = dict(cpu_extension._LOADED)
    cpu_extension._LOADED.clear()
    yield
    cpu_extension._built.cache_clear()
    cpu_extension._LOADED.update(loaded)


@pytest.mark.parametrize(
    ("library", "ops"),
    [
        (
            ATTENTION_KERNELS,
            ("paged_attention", "write_kv", "copy_pages")
            + ("paged_attention_address", "write_kv_address")
            + ("use_prompt_tiles", "amx_attention_available", "float_tiles_available"),
        ),
        (
            DECODER_KERNELS,
            ("rms_norm", "add_rms_norm", "rotary_embedding", "silu_and_mul", "group_int8_linear")
            + ("row_argmax", "decoder_layers"),
        ),
    ],
    ids=["attention", "decoder"],
)
def test_each_library_loads_with_its_own_ops_only(library, ops):
    kernels = library.kernels()
    assert kernels is not None, library.unavailable_reason()
    exposed = {name for name in dir(kernels) if not name.startswith("_")}
    # AVX-512 builds, AMX builds
    by_target = {"blocked_linear", "blocked_silu_linear"}
    by_target |= {"amx_linear", "amx_silu_linear", "amx_linear_usable"}
    assert exposed - by_target == set(ops)
    if library is DECODER_KERNELS and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        assert {"blocked_linear", "blocked_silu_linear"} <= exposed
    if library is DECODER_KERNELS and {"amx_tile", "amx_bf16", "avx512_bf16"} <= _cpu_flags():
        # an AMX CPU: the kernel is built and the process gets its tiles (else bfloat16 linears
        # would quietly stay on oneDNN and the AMX tests skip)
        assert {"amx_linear", "amx_silu_linear"} <= exposed and kernels.amx_linear_usable()
    if library is ATTENTION_KERNELS and {"amx_tile", "amx_bf16", "avx512_bf16"} <= _cpu_flags():
        # and bfloat16 prompt tiles run on AMX tiles (else their tests skip)
        assert kernels.amx_attention_available()
    if library is ATTENTION_KERNELS and "avx512f" in _cpu_flags():
        # float32 prompt tiles on AVX-512 registers (else their tests skip)
        assert kernels.float_tiles_available()


def _cpu_flags() -> set[str]:
    """The instruction sets /proc/cpuinfo lists (none where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()}


def test_no_compiler_means_one_warning_and_none(fresh_build_state, monkeypatch, caplog):
    monkeypatch.setattr(cpp_extension, "get_cxx_compiler", lambda: "no-such-c++")
    with caplog.at_level(logging.WARNING):
        assert cpu_extension.cpu_kernels() is None
        assert cpu_extension.cpu_kernels() is None
    assert cpu_extension.unavailable_reason() == "no C++ compiler (no-such-c++) on PATH"
    warnings = [r for r in caplog.records if r.name == cpu_extension.__name__]
    assert len(warnings) == 1 and "plain torch backend" in warnings[0].getMessage()


def test_no_ninja_names_the_package_to_install(fresh_build_state, monkeypatch):
    def missing():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", missing)
    assert cpu_extension.cpu_kernels() is None
    assert "pip install ninja" in cpu_extension.unavailable_reason()


def test_a_failing_build_falls_back_with_the_compiler_error(fresh_build_state, monkeypatch):
    def broken(library):
        raise RuntimeError("ninja: build stopped\nfoo.cpp:1:1: error: expected ';'\nmore")

    monkeypatch.setattr(cpu_extension, "_load", broken)
    assert cpu_extension.cpu_kernels() is None
    assert "foo.cpp:1:1: error: expected ';'" in cpu_extension.unavailable_reason()


def test_each_library_has_its_own_build_directory_keyed_by_the_cpu(monkeypatch):
    directories = {
        cpu_extension.build_directory(lib) for lib in (ATTENTION_KERNELS, DECODER_KERNELS)
    }
    monkeypatch.setattr(cpu_extension, "_cpu_flags", lambda: "flags : sse2")
    assert len(directories) == 2
    assert cpu_extension.build_directory(ATTENTION_KERNELS) not in directories


def fake_build(builds, content=GOOD):
    """A build that leaves what ninja leaves beside its library, and counts its calls."""

    def build(scratch):
        builds.append(scratch)
        (scratch / "build.ninja").write_text("rule cxx\n")
        (scratch / "lock").touch()  # torch's build lock
        (scratch / "k.o").write_bytes(b"object")
        (scratch / "built.so").write_bytes(content)
        return scratch / "built.so"

    return build


def recording_load(loaded):
    """An import that records the bytes it was given."""

    def load(path):
        loaded.append(path.read_bytes())
        return path.read_bytes()

    return load


@pytest.fixture
def library(tmp_path):
    return tmp_path / "kernels" / "k" / "k.so"


def test_a_good_build_is_built_once_then_loaded_from_its_place(library):
    builds, loaded = [], []
    for _ in range(2):
        assert cpu_extension.load_verified(library, fake_build(builds), recording_load(loaded))
    assert len(builds) == 1 and loaded == [GOOD, GOOD]
    assert sorted(p.name for p in library.parent.iterdir()) == [MANIFEST_FILE, "k.so"]
    assert sorted(p.name for p in library.parent.parent.iterdir()) == [".k.flock", "k"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda so: so.write_bytes(GOOD[: len(GOOD) // 2]),  # a link killed halfway
        lambda so: so.write_bytes(GOOD.upper()),  # same size, other bytes
        lambda so: (so.parent / MANIFEST_FILE).unlink(),  # an old-style or interrupted build
    ],
    ids=["truncated", "corrupted", "no-manifest"],
)
def test_a_damaged_library_is_rebuilt_and_never_imported(library, damage, caplog):
    builds, loaded = [], []
    cpu_extension.load_verified(library, fake_build(builds), recording_load(loaded))
    damage(library)
    with caplog.at_level(logging.WARNING):
        cpu_extension.load_verified(library, fake_build(builds), recording_load(loaded))
    assert len(builds) == 2 and loaded == [GOOD, GOOD]
    assert manifest_problem(library.parent) is None
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in library.parent.parent.iterdir()) == [".k.flock", "k"]


def test_scratch_left_by_a_killed_build_is_removed_once_logged(library, caplog):
    kernels = library.parent.parent
    for stale in (".k-abcd_123", ".k-broken-x1y2z3w4"):
        (kernels / stale).mkdir(parents=True)
        (kernels / stale / "lock").touch()
        (kernels / stale / "k.so").write_bytes(GOOD[:3])
    (kernels / ".k-2-abcd_123").mkdir()  # the live scratch of another library, k-2
    builds = []
    with caplog.at_level(logging.WARNING):
        cpu_extension.load_verified(library, fake_build(builds), recording_load([]))
    names = sorted(p.name for p in kernels.iterdir())
    assert names == [".k-2-abcd_123", ".k.flock", "k"] and len(builds) == 1
    removals = [r.getMessage() for r in caplog.records if "interrupted build" in r.getMessage()]
    assert len(removals) == 1 and ".k-abcd_123" in removals[0]


def test_a_failing_build_leaves_no_scratch_and_no_library(library):
    def broken(scratch):
        fake_build([])(scratch)
        raise RuntimeError("foo.cpp:1:1: error: expected ';'")

    loaded = []
    with pytest.raises(RuntimeError, match="expected ';'"):
        cpu_extension.load_verified(library, broken, recording_load(loaded))
    assert [p.name for p in library.parent.parent.iterdir()] == [".k.flock"] and loaded == []


@pytest.fixture
def copied_build(tmp_path, monkeypatch):
    """The real kernel build, copied into a cache of its own (``BATON_PAGED_CACHE``), with its
    library truncated to half: what a link killed halfway leaves."""
    assert cpu_extension.cpu_kernels() is not None, cpu_extension.unavailable_reason()
    real = cpu_extension.build_directory(ATTENTION_KERNELS)
    monkeypatch.setenv("BATON_PAGED_CACHE", str(tmp_path / "cache"))
    copy = cpu_extension.build_directory(ATTENTION_KERNELS)
    shutil.copytree(real, copy)
    (library,) = copy.glob("*.so")
    with library.open("r+b") as stream:
        stream.truncate(library.stat().st_size // 2)
    return copy


def test_the_real_loader_rebuilds_a_truncated_library_instead_of_importing_it(
    copied_build, fresh_build_state, monkeypatch
):
    compiles, imports = [], []

    def compile_requested(library, name, scratch):
        compiles.append(name)
        raise RuntimeError("error: compile requested")

    monkeypatch.setattr(cpu_extension, "_compile", compile_requested)
    monkeypatch.setattr(cpu_extension, "_import", lambda name, path: imports.append(path))
    assert cpu_extension.cpu_kernels() is None
    assert "compile requested" in cpu_extension.unavailable_reason()
    assert compiles == [copied_build.name] and imports == []
    assert not copied_build.exists()


@pytest.mark.stress
def test_a_truncated_library_is_rebuilt_by_the_next_start(copied_build):
    """End to end: a start finds the truncated library, rebuilds it (tens of seconds) and runs
    an op, where importing it would die with a bus error."""
    start = textwrap.dedent(
        """
        import torch
        from baton_paged.attention.cpu_extension import cpu_kernels, unavailable_reason
        kernels = cpu_kernels()
        assert kernels is not None, unavailable_reason()
        pages, new = torch.zeros(2, 2, 4, 1, 8), torch.ones(2, 1, 8)
        kernels.write_kv(pages[0], pages[1], torch.tensor([0, 5]), new, new)
        assert pages.sum().item() == 32
        """
    )
    done = subprocess.run([sys.executable, "-c", start], timeout=600)  # inherits the cache
    assert done.returncode == 0, f"exit status {done.returncode} (-7: a bus error)"
    assert manifest_problem(copied_build) is None
