"""What a vLLM operator reads: vLLM's metric names with the ``model_name`` label, enough that
every panel of vLLM's published Grafana dashboard has its series (the metric names parsed from
its queries, checked against /metrics), and the log lines (one per request, and the periodic
stats line)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import HEADERS, MODEL, serving

from baton_paged.entrypoints.server.logs import StatsLog

QUERIES = Path(__file__).parent / "data" / "vllm_grafana_queries.txt"
SERIES = re.compile(r"vllm:[a-zA-Z0-9_:]+")


def dashboard_panels() -> dict[str, set[str]]:
    """Panel title -> the series its queries read: from a full dashboard JSON when
    ``VLLM_GRAFANA_JSON`` names one, else from the queries recorded in ``QUERIES``."""
    panels: dict[str, set[str]] = {}
    if path := os.environ.get("VLLM_GRAFANA_JSON"):
        for panel in json.loads(Path(path).read_text())["panels"]:
            exprs = [target.get("expr", "") for target in panel.get("targets", [])]
            panels[panel["title"]] = {name for e in exprs for name in SERIES.findall(e)}
        return panels
    for line in QUERIES.read_text().splitlines():
        if line and not line.startswith("#"):
            title, expr = line.split("\t")
            panels.setdefault(title, set()).update(SERIES.findall(expr))
    return panels


ISSUE_SERIES = [
    "vllm:kv_cache_usage_perc", "vllm:inter_token_latency_seconds_sum",
    "vllm:request_time_per_output_token_seconds_sum", "vllm:request_inference_time_seconds_sum",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:num_requests_swapped", "vllm:num_preemptions_total", "vllm:request_params_n_sum",
]  # fmt: skip
GROWING = {
    "vllm:e2e_request_latency_seconds_sum", "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total", "vllm:time_per_output_token_seconds_count",
    "vllm:time_to_first_token_seconds_count", "vllm:request_success_total",
    "vllm:request_prefill_time_seconds_sum", "vllm:request_decode_time_seconds_sum",
    "vllm:request_max_num_generation_tokens_sum", "vllm:request_queue_time_seconds_sum",
    "vllm:prefix_cache_hits_total",
}  # fmt: skip
"""Series the requests below must move (the queue time, too: nobody joins at arrival)."""


def scrape(url: str) -> dict[str, float]:
    """Every ``vllm:`` sample's value summed by name (over buckets and reasons), checking that
    each carries the served model's name."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("vllm:"):
                assert sample.labels.get("model_name") == MODEL, sample
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def test_every_dashboard_panel_has_its_series(server):
    before = scrape(server.url)
    prompt = "the same long prompt, long enough to fill a whole page of the cache " * 2
    for _ in range(2):  # the second is served from the prefix cache
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "ignore_eos": True}
        assert httpx.post(f"{server.url}/v1/completions", json=body, headers=HEADERS).is_success
    after = scrape(server.url)
    panels = dashboard_panels()
    assert len(panels) >= 12 and all(panels.values())
    empty = {title: sorted(s - set(after)) for title, s in panels.items() if s - set(after)}
    assert not empty, f"panels without their series: {empty}"
    assert not [series for series in ISSUE_SERIES if series not in after]
    assert not [series for series in GROWING if not after[series] > before.get(series, 0)]
    grew = after["vllm:request_max_num_generation_tokens_sum"] - before.get(
        "vllm:request_max_num_generation_tokens_sum", 0
    )
    assert grew == 8  # two requests of four tokens


def test_each_request_gets_one_log_line(tiny_model_dir, caplog):
    with serving(tiny_model_dir("llama"), log_requests=True) as running:
        caplog.set_level(logging.INFO, logger="baton_paged.requests")
        body = {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2, "request_id": "mine"}
        assert httpx.post(f"{running.url}/v1/completions", json=body, headers=HEADERS).is_success
    lines = [r.getMessage() for r in caplog.records if r.name == "baton_paged.requests"]
    assert sorted(line.split(":")[0] for line in lines) == [
        "Finished request cmpl-mine-0",
        "Finished request cmpl-mine-1",
    ]
    assert all("generated 2 in 1 choice(s)" in line for line in lines), lines


@pytest.fixture
def engine_counts():
    snapshot = SimpleNamespace(
        num_running=0, num_swapped=0, num_waiting=0, num_queued=0, kv_cache_usage=0.0,
        stats=SimpleNamespace(prompt_tokens=0, generated_tokens=0, prefix_cache_hit_rate=0.0),
    )  # fmt: skip
    return SimpleNamespace(snapshot=snapshot)


def test_the_stats_line_reports_the_interval_and_quiets_when_idle(engine_counts, caplog):
    caplog.set_level(logging.DEBUG, logger="baton_paged.stats")
    stats_line = StatsLog(engine_counts)
    start = stats_line.last[0]
    snap = engine_counts.snapshot
    snap.stats.prompt_tokens, snap.stats.generated_tokens = 200, 50
    snap.num_running, snap.kv_cache_usage, snap.stats.prefix_cache_hit_rate = 3, 0.25, 0.5
    stats_line.emit(start + 10)
    snap.num_running = 0
    stats_line.emit(start + 20)  # the interval after a busy one: still INFO
    stats_line.emit(start + 30)  # idle twice: DEBUG
    first, second, third = (r for r in caplog.records if r.name == "baton_paged.stats")
    assert first.getMessage().startswith(
        "Avg prompt throughput: 20.0 tokens/s, Avg generation throughput: 5.0 tokens/s, "
        "Running: 3 reqs, Swapped: 0 reqs, Waiting: 0 reqs, KV cache usage: 25.0%, "
        "Prefix cache hit rate: 50.0%"
    )
    assert "Avg prompt throughput: 0.0 tokens/s" in second.getMessage()
    levels = [r.levelno for r in (first, second, third)]
    assert levels == [logging.INFO, logging.INFO, logging.DEBUG]


def test_bucket_counts_equal_prometheus_clients_histogram():
    import numpy as np
    from prometheus_client import CollectorRegistry, Histogram

    from baton_paged.bucket_counts import BucketCounts

    bounds = (0.001, 0.01, 0.1, 1.0, 10.0)
    values = np.random.default_rng(0).lognormal(-3, 2, 2000).tolist() + [0.01, 1.0, 10.0]
    theirs = Histogram("h", "doc", ["model_name"], buckets=bounds, registry=CollectorRegistry())
    ours = BucketCounts("h", "doc", bounds)
    for value in values:
        theirs.labels(model_name="m").observe(value)
    ours.observe_many(values[:1000])
    for value in values[1000:]:
        ours.observe(value)
    (expected,) = theirs.collect()
    got = ours.family({"model_name": "m"})
    pick = lambda family: [(s.name, s.labels, round(s.value, 9)) for s in family.samples  # noqa: E731
                           if not s.name.endswith("_created")]  # fmt: skip
    assert pick(got) == pick(expected)
