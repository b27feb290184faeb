"""``benchmarks/bench_overhead.py``'s phase clock: the phases of each decode step it keeps are
disjoint and add up to the step's wall time, and only decode steps are kept. (Its timings are
the benchmark's to judge; here only the accounting is checked.)"""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_overhead  # noqa: E402


@pytest.mark.parametrize(
    ("output_kind", "temperature"), [("final_only", 0.0), ("cumulative", 0.0), ("final_only", 0.8)]
)
def test_phases_are_disjoint_and_add_up_to_the_step(tiny_model_dir, output_kind, temperature):
    sampling = {"temperature": temperature, "top_p": 0.9 if temperature else 1.0, "top_k": -1}
    args = Namespace(output_tokens=6, output_kind=output_kind, **sampling)
    row = bench_overhead.measure(str(tiny_model_dir()), 4, args, torch.device("cpu"))
    phases = [row[f"{phase}_ms"] for phase in bench_overhead.PHASES]
    assert row["steps"] == 4  # tokens 3-6: the prefill samples the first, the first decode warms
    assert all(ms >= 0 for ms in phases) and row["forward_ms"] > 0 and row["outputs_ms"] > 0
    assert abs(sum(phases) - row["wall_ms"]) < 0.01
    assert abs(row["host_ms"] - (row["wall_ms"] - row["forward_ms"])) < 0.002
    # a stream's outputs are built by its reader, off the step; the offline path builds few
    assert (row["reader_build_ms"] > 0) == (output_kind == "cumulative")
