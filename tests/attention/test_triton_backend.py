"""The Triton kernel checked without a GPU: Triton's interpreter runs it on CPU tensors.

TRITON_INTERPRET must be set before triton is imported, so the parity tests run in a child
pytest with it set; the CUDA run of the same checks is ``pytest -m gpu``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_triton_kernel_matches_naive_attention_in_the_interpreter():
    parity = Path(__file__).with_name("test_backend_parity.py")
    env = os.environ | {"TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(parity)]
    result = subprocess.run(
        [*command, "-k", "triton_kernel_under_the_interpreter"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.split("\n")[-2]
