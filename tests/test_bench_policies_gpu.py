"""``benchmarks/bench_policies_gpu.py`` on the CPU: its smoke run (tiny Llama, float32, a few
Poisson arrivals) completes every policy's requests with exactly their budgets and reports what
the GPU run reports; a run cut by its time cap says so and counts only what was produced; the
caps shrink so that every policy still runs before the deadline. Its figures are the GPU run's to
judge; here only their accounting is checked."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_policies_gpu as bench  # noqa: E402
import workload  # noqa: E402

POLICIES = ("baton", "orca", "static", "chunked")


@pytest.fixture(scope="module")
def smoke(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    argv = ["--device", "cpu", "--dtype", "float32", "--model-dir", str(tiny_model_dir("llama")),
            "--num-requests", "8", "--out-dir", str(out), "--name", "smoke"]  # fmt: skip
    return bench.main(argv), out


def test_every_policy_serves_every_request_its_exact_budget(smoke):
    payload, _ = smoke
    rows = {row["policy"]: row for row in payload["rows"]}
    assert tuple(rows) == POLICIES
    total = payload["workload"]["budget"]["total"]
    for policy, row in rows.items():
        assert row["tokens_per_s"] > 0 and row["useful_tokens"] == total == row["total_budget"], (
            policy
        )
        assert row["finished"] == row["submitted"] == row["num_requests"] == 8, policy
        assert row["all_finished"] and row["exact_budgets"] and not row["capped"], policy
        assert row["generated_tokens"] == total, policy  # the engine's count over the run alone
        assert 0 < row["slot_efficiency"] <= 1, policy
        assert row["ttft_n"] == 8 and 0 <= row["ttft_p50_s"] <= row["ttft_p99_s"], policy
    assert rows["static"]["slot_efficiency"] < 1  # run-to-completion batches leave slots idle


def test_baton_over_orca_is_reported_beside_the_paper(smoke):
    payload, out = smoke
    rows = {row["policy"]: row for row in payload["rows"]}
    found = payload["baton_over_orca"]
    assert found["value"] == round(rows["baton"]["tokens_per_s"] / rows["orca"]["tokens_per_s"], 3)
    assert found["paper"] == [1.29, 1.75] and found["vs_paper"] in ("below", "within", "above")
    assert rows["orca"]["x_orca"] == 1.0 and rows["baton"]["x_orca"] == found["value"]
    saved = json.loads((out / "smoke.json").read_text())
    assert saved["rows"] == payload["rows"]
    table = (out / "smoke.md").read_text()
    assert all(f"| {policy} |" in table for policy in POLICIES) and "1.29-1.75x" in table


def test_a_capped_run_says_so_and_counts_only_what_was_produced(tiny_model_dir):
    args = bench.parse_args(["--device", "cpu", "--dtype", "float32", "--max-batch", "2"])
    path = tiny_model_dir("llama")
    model = workload.load_hf(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    work = workload.Workload([[5] * 20] * 6, [400] * 6)  # far more than 0.3 s of decoding
    arrivals = bench.poisson_arrivals(work, rate=1000.0, seed=0)
    engine = bench.build_engine(model, tokenizer, "baton", args)
    try:
        run = bench.drive_timed(engine, arrivals, cap_s=0.3, sync=lambda: None)
    finally:
        engine.close()
    row = bench.summary_row("baton", run, arrivals, 0.3)
    assert row["capped"] and not row["all_finished"] and row["finished"] < 6
    assert 0 < row["useful_tokens"] < work.total_budget
    assert row["useful_tokens"] == row["generated_tokens"] == sum(run.produced.values())
    assert 0.3 <= row["wall_s"] < 2.0
    assert row["tokens_per_s"] == round(row["useful_tokens"] / run.wall_s, 1)


def test_caps_shrink_so_every_policy_runs_before_the_deadline():
    now = time.perf_counter()
    roomy = bench.Budget(time_cap=20.0, deadline=100.0, started=now - 10.0)  # 10 s spent
    assert roomy.cap(left=2, engine_overhead_s=3.0) == 20.0  # plenty left: the cap stands
    # 87 s left after the reserve; 3 more engines at 5 s each: (87 - 15) / 4 = 18 s per run,
    budget = bench.Budget(time_cap=20.0, deadline=100.0, started=now - 10.0)
    assert budget.cap(left=4, engine_overhead_s=5.0) == pytest.approx(18.0, abs=0.1)
    assert budget.cap(left=3, engine_overhead_s=5.0) == budget.settled  # and the same for all,
    budget.started -= 60.0  # unless time runs short: 27 s left, (27 - 5) / 2 = 11 s
    assert budget.cap(left=2, engine_overhead_s=5.0) == pytest.approx(11.0, abs=0.1)
    late = bench.Budget(time_cap=20.0, deadline=100.0, started=now - 99.0)
    assert late.cap(left=3, engine_overhead_s=5.0) == bench.MIN_CAP_S


def test_arrivals_are_poisson_from_t0_and_seeded():
    work = workload.make_workload(2000, 500, 64, seed=0)
    arrivals = bench.poisson_arrivals(work, rate=50.0, seed=0)
    offsets = arrivals.offsets
    assert offsets[0] == 0 and all(a <= b for a, b in zip(offsets, offsets[1:], strict=False))
    assert offsets[-1] / (len(offsets) - 1) == pytest.approx(1 / 50, rel=0.1)
    assert (
        bench.poisson_arrivals(work, 50.0, 0) == arrivals != bench.poisson_arrivals(work, 50.0, 1)
    )
