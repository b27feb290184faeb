"""``benchmarks/bench_attention.py``'s CUDA sweep, run by its ``--smoke`` option on the CPU on tiny
shapes: every shape is set against the right bound, every backend that runs here has a time or
the reason it has none, and a backend that is wrong or raises is recorded as such, never timed.
(The sweep's timings are the benchmark's to judge; here only what it records is checked.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_attention  # noqa: E402

from baton_paged.attention.padded_backend import PaddedBackend  # noqa: E402
from baton_paged.attention.torch_backend import TorchBackend  # noqa: E402

BATCHES, CONTEXTS = (1, 2), (16, 40)
MIXED = {"requests": 5, "tokens": 2 * 24 + 3, "contexts": 2 * 24 + 3 * 40}
"""The smoke run's mixed step: 2 prompts of 24 tokens and 3 decode rows at context 40."""
QUERY_HEADS, KV_HEADS, HEAD_DIM, FLOAT32 = 32, 8, 64, 4
CPU_BACKENDS = ("cpu_paged", "torch", "padded")


def smoke(monkeypatch, out: Path, *options: str) -> dict:
    """The smoke run, in this process, as its command line would start it; its JSON."""
    sizes = ["--batches", ",".join(map(str, BATCHES)), "--contexts", ",".join(map(str, CONTEXTS))]
    argv = ["bench_attention.py", "--device", "cpu", "--smoke", "--out", str(out), *sizes]
    monkeypatch.setattr(sys, "argv", [*argv, *options])
    threads = torch.get_num_threads()
    try:
        bench_attention.main()
    finally:
        torch.set_num_threads(threads)  # the harness pins it for the benchmark
    return json.loads((out / "attention-cpu-smoke.json").read_text())


def expected_bytes(contexts: int, tokens: int) -> int:
    """K and V of every context token once, the query read and the output written (float32)."""
    return (contexts * KV_HEADS * 2 + 2 * tokens * QUERY_HEADS) * HEAD_DIM * FLOAT32


def expected_shapes() -> dict[str, int]:
    decode = {f"decode B={b} ctx={c}": expected_bytes(b * c, b) for b in BATCHES for c in CONTEXTS}
    return decode | {"mixed": expected_bytes(MIXED["contexts"], MIXED["tokens"])}


def by_shape(result: dict) -> dict[str, dict]:
    """Rows by shape name, the mixed one as ``mixed``."""
    return {"mixed" if r["shape"].startswith("mixed") else r["shape"]: r for r in result["shapes"]}


def test_every_shape_is_timed_against_its_bound(monkeypatch, tmp_path):
    result = smoke(monkeypatch, tmp_path)
    rows, bandwidth = by_shape(result), result["bandwidth"]["measured_Bps"]
    assert bandwidth > 0 and result["bandwidth"]["datasheet_Bps"] is None  # no datasheet for a CPU
    assert set(rows) == set(expected_shapes())
    assert rows["mixed"]["batch"] == MIXED["requests"]
    assert rows["mixed"]["tokens"] == MIXED["tokens"]
    for name, nbytes in expected_shapes().items():
        row = rows[name]
        assert row["read_bytes"] == nbytes, name
        assert row["bound_us"] == pytest.approx(nbytes / bandwidth * 1e6, rel=1e-3), name
        cases = row["cases"]
        for backend in ("dense", *CPU_BACKENDS):
            if backend == "cpu_paged" and backend in result["not_runnable"]:
                continue  # no compiler here: the reason is recorded instead of a case
            case = cases[backend]
            assert case["us"] > 0, (name, backend, case)
            ratio = case["us"] / row["bound_us"]
            assert case["x_bound"] == pytest.approx(ratio, rel=1e-2), (name, backend)
    table = (tmp_path / "attention-cpu-smoke.md").read_text()
    assert all(row["shape"] in table for row in result["shapes"])
    assert "bound us" in table and "torch us" in table and "padded x" in table


def test_a_wrong_or_failing_backend_is_recorded_not_timed(monkeypatch, tmp_path):
    def wrong(self, query, *rest):
        return torch.zeros_like(query)

    def failing(self, *args):
        raise RuntimeError("boom: unsupported shape")

    monkeypatch.setattr(TorchBackend, "attend", wrong)
    monkeypatch.setattr(PaddedBackend, "attend", failing)
    rows = by_shape(smoke(monkeypatch, tmp_path))
    assert set(rows) == set(expected_shapes())  # the run went on past every failure
    for name, row in rows.items():
        torch_case, padded = row["cases"]["torch"], row["cases"]["padded"]
        assert "us" not in torch_case and "max error" in torch_case["wrong"], name
        assert "us" not in padded and "boom" in padded["error"], name
        assert row["cases"]["dense"]["us"] > 0
    text = (tmp_path / "attention-cpu-smoke.md").read_text()
    assert "torch: wrong" in text and "padded: error" in text


def test_a_backend_over_the_memory_cap_is_skipped_with_the_reason(monkeypatch, tmp_path):
    rows = by_shape(smoke(monkeypatch, tmp_path, "--memory-cap-gib", "0"))
    for row in rows.values():
        for gathering in ("torch", "padded"):  # they copy K/V out; cpu_paged reads it in place
            assert "GiB cap" in row["cases"][gathering]["skipped"]
        assert row["cases"]["dense"]["us"] > 0
