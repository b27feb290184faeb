"""The CPU kernels' build: cached per machine; a missing tool is one logged line, not a crash."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from torch.utils import cpp_extension

from baton_paged.attention import cpu_extension


@pytest.fixture
def fresh_build_state():
    """Forget the process' loaded kernels for the test, and restore them afterwards."""
    cpu_extension._built.cache_clear()
    yield
    cpu_extension._built.cache_clear()


def test_kernels_load_and_expose_every_op():
    kernels = cpu_extension.cpu_kernels()
    assert kernels is not None, cpu_extension.unavailable_reason()
    for op in (
        "paged_attention",
        "write_kv",
        "rms_norm",
        "add_rms_norm",
        "rotary_embedding",
        "silu_and_mul",
    ):
        assert callable(getattr(kernels, op))


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
    def broken():
        raise RuntimeError("ninja: build stopped\nfoo.cpp:1:1: error: expected ';'\nmore")

    monkeypatch.setattr(cpu_extension, "_load", broken)
    assert cpu_extension.cpu_kernels() is None
    assert "foo.cpp:1:1: error: expected ';'" in cpu_extension.unavailable_reason()


def test_the_build_key_changes_with_the_source_and_the_cpu(monkeypatch):
    key = cpu_extension._build_key()
    monkeypatch.setattr(cpu_extension, "_cpu_flags", lambda: "flags : sse2")
    assert cpu_extension._build_key() != key


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_start():
    """torch's build lock is a plain file: a build killed halfway leaves it, and torch alone
    would wait on it forever. The next process finds it under our flock and removes it."""
    assert cpu_extension.cpu_kernels() is not None  # built and cached
    stale = cpu_extension.build_directory() / "lock"
    stale.touch()
    try:
        load = "from baton_paged.attention.cpu_extension import cpu_kernels; assert cpu_kernels()"
        subprocess.run([sys.executable, "-c", load], check=True, timeout=120)
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)
