"""A short soak (``benchmarks/soak.py``) in the default run: the tiny model, a 6 s baseline and
18 s of normal traffic beside every abusive kind, run as a user runs the benchmark (a
subprocess, its results read back from JSON).

Asserted: no server error, every abusive kind answered with its expected refusal at least once
and never otherwise, and nothing left in the server (requests, KV pages) after either phase.
Latency B / A and RSS growth are timed targets, so only the benchmark's verdict judges them
(an 18 s run on a shared machine says little about either)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
SHORT = ("--baseline-minutes", "0.1", "--minutes", "0.3", "--warmup-seconds", "3")
SHORT += ("--read-timeout", "2")
"""A 2 s read timeout so that each slowloris connection cycles several times in 18 s; each cheap
refusal comes round every 9 s (``soak_abuse.py``), so twice."""


def run_soak(model_dir: Path, out: Path) -> dict:
    command = [sys.executable, str(SOAK), "--model", str(model_dir), *SHORT, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)  # liveness bound
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text())


def test_short_soak_has_no_errors_and_leaves_nothing_behind(tiny_model_dir, tmp_path):
    results = run_soak(tiny_model_dir("llama"), tmp_path / "soak")
    errors, phases = results["errors"], results["phases"]
    details = {name: (p["errors"], p["health_errors"]) for name, p in phases.items()}
    assert errors["server_errors"] == 0, (errors, details, results["server_log_tracebacks"])
    abuse = phases["B"]["abuse"]
    wrong = {kind: row["examples"] for kind, row in abuse.items() if row["unexpected"]}
    assert errors["wrong_refusals"] == 0 and not wrong, wrong
    never = [kind for kind, row in abuse.items() if row["expected"] == 0]
    assert not never, f"abusive kinds not exercised: {never}"
    for name, phase in phases.items():
        assert phase["completed"] > 0, name
        idle = phase["idle_after"]
        left = {key: idle[key] for key in ("running", "waiting", "swapped")}
        assert not any(left.values()), (name, idle)
        assert idle["device_pages"] == idle["host_pages"] == 0, (name, idle)
