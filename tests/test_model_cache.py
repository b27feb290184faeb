"""The model cache: entries built aside and renamed in, checked against their manifest on load;
one build at a time per entry, and a killed build's scratch removed by the next use."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from baton_paged import disk_cache
from baton_paged.disk_cache import MANIFEST_FILE, manifest_problem
from baton_paged.model.builder.cache import cached_dir


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


def entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_an_intact_entry_is_built_once(cache):
    calls = []
    first = cached_dir("m", counting_builder(calls))
    assert cached_dir("m", counting_builder(calls)) == first == cache / "models" / "m"
    assert len(calls) == 1 and (first / MANIFEST_FILE).is_file()
    assert entries(first.parent) == [".m.flock", "m"]  # no scratch left behind


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
    assert entries(path.parent) == [".m.flock", "m"]


def test_a_failed_build_leaves_nothing_behind(cache):
    def broken(out_dir):
        (out_dir / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cached_dir("m", broken)
    assert entries(cache / "models") == [".m.flock"]


def test_scratch_left_by_killed_builds_is_removed_by_the_next_use(cache, caplog):
    calls = []
    cached_dir("m", counting_builder(calls))
    for stale in (".m-abcd_123", ".m-broken-x1y2z3w4/m"):
        (cache / "models" / stale).mkdir(parents=True)
        (cache / "models" / stale / "weights.bin").write_bytes(b"half")
    (cache / "models" / ".m-2-abcd_123").mkdir()  # the live scratch of another entry, m-2
    cached_dir("m", counting_builder(calls))
    assert entries(cache / "models") == [".m-2-abcd_123", ".m.flock", "m"] and len(calls) == 1
    removals = [r.getMessage() for r in caplog.records if "interrupted build" in r.getMessage()]
    assert len(removals) == 1 and ".m-broken-x1y2z3w4" in removals[0]


KILLED_BUILD = """
import os, signal
from baton_paged.model.builder.cache import cached_dir

def build(out_dir):
    (out_dir / "weights.bin").write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)  # no finally runs

cached_dir("m", build)
"""


def test_a_build_killed_halfway_is_cleaned_up_and_rebuilt(cache):
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_BUILD)], timeout=300)
    assert killed.returncode == -signal.SIGKILL
    (scratch,) = (cache / "models").glob(".m-*")
    assert (scratch / "weights.bin").read_bytes() == b"half"
    calls = []
    path = cached_dir("m", counting_builder(calls))
    assert len(calls) == 1 and manifest_problem(path) is None
    assert entries(cache / "models") == [".m.flock", "m"]


def wait_for_a_waiter(lock, deadline_s=60.0):
    """Until ``/proc/locks`` shows a caller blocked on ``lock``'s flock: a fact, not a guess."""
    inode = f":{lock.stat().st_ino} "
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        lines = Path("/proc/locks").read_text().splitlines()
        if any("-> FLOCK" in line and inode in line for line in lines):
            return
        time.sleep(0.01)
    pytest.fail(f"nobody waited on {lock} while the first build ran")


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="reads lock waiters from /proc")
def test_concurrent_callers_build_once(cache):
    """The second caller arrives while the first builds: it waits on the entry's lock, then
    finds the entry finished instead of building it again."""
    calls, answers = [], []
    second = threading.Thread(
        target=lambda: answers.append(cached_dir("m", counting_builder(calls)))
    )

    def first_build(out_dir):
        second.start()
        wait_for_a_waiter(cache / "models" / ".m.flock")
        counting_builder(calls)(out_dir)

    path = cached_dir("m", first_build)
    second.join()
    assert answers == [path] and len(calls) == 1


def test_an_intact_entry_is_used_without_taking_its_lock(cache, monkeypatch):
    """A read-only or another user's cache: opening the lock file would fail there."""
    path = cached_dir("m", counting_builder([]))

    def no_lock(target):
        raise PermissionError(f"read-only: {target}")

    monkeypatch.setattr(disk_cache, "_entry_lock", no_lock)
    assert cached_dir("m", counting_builder([])) == path
    (path / "config.json").write_text("damaged")
    with pytest.raises(PermissionError, match="read-only"):  # repairing needs the lock
        cached_dir("m", counting_builder([]))
