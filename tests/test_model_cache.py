"""The model cache: entries built aside and renamed in, checked against their manifest on load."""

import os

import pytest

from baton_paged.model_builder.cache import cached_dir
from baton_paged.model_builder.manifest import MANIFEST_FILE


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_PAGED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def counting_builder(calls):
    def build(out_dir):
        calls.append(out_dir)
        (out_dir / "weights.bin").write_bytes(os.urandom(64))
        (out_dir / "config.json").write_text("{}")

    return build


def test_an_intact_entry_is_built_once(cache):
    calls = []
    first = cached_dir("m", counting_builder(calls))
    assert cached_dir("m", counting_builder(calls)) == first == cache / "models" / "m"
    assert len(calls) == 1 and (first / MANIFEST_FILE).is_file()
    assert [p.name for p in first.parent.iterdir()] == ["m"]  # no scratch left behind


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "weights.bin").write_bytes(os.urandom(64)),  # same size, other bytes
        lambda d: (d / "weights.bin").write_bytes(b"short"),
        lambda d: (d / "config.json").unlink(),
        lambda d: (d / MANIFEST_FILE).unlink(),  # what an interrupted build leaves
        lambda d: (d / MANIFEST_FILE).write_text("{"),
    ],
)
def test_a_damaged_entry_is_rebuilt_not_loaded(cache, damage):
    calls = []
    path = cached_dir("m", counting_builder(calls))
    damage(path)
    assert cached_dir("m", counting_builder(calls)) == path and len(calls) == 2
    assert cached_dir("m", counting_builder(calls)) == path and len(calls) == 2
    assert [p.name for p in path.parent.iterdir()] == ["m"]


def test_a_failed_build_leaves_nothing_behind(cache):
    def broken(out_dir):
        (out_dir / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cached_dir("m", broken)
    assert list((cache / "models").iterdir()) == []
