"""The tree is ruff-clean (settings in pyproject.toml), so style stays checked by the test run."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.fail("ruff is missing: install the test extra, pip install -e '.[test]'")
    command = [sys.executable, "-m", "ruff", "check", "."]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
