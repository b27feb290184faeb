"""Prometheus metrics for ``/metrics``, named like vLLM's (prefix ``baton:``) plus BATON's own.

Engine state (running, waiting, KV usage, token and preemption counters) is read at scrape time
from the engine's latest ``EngineSnapshot``, never from its live parts (a scrape runs on an HTTP
thread while the step loop mutates them); per-request latencies are histograms observed as each
request finishes.
"""

from __future__ import annotations

import itertools

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from baton_paged.entrypoints.async_engine import AsyncEngine
from baton_paged.outputs import RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ServerMetrics:
    def __init__(self, engine: AsyncEngine):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        histogram = lambda name, doc, buckets: Histogram(  # noqa: E731
            name, doc, buckets=buckets, registry=self.registry
        )
        self.ttft = histogram(
            "baton:time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS
        )
        self.itl = histogram(
            "baton:inter_token_latency_seconds", "Time between tokens.", TOKEN_GAP_BUCKETS
        )
        self.e2e = histogram(
            "baton:e2e_request_latency_seconds", "Arrival to last token.", LATENCY_BUCKETS
        )
        self.success = Counter(
            "baton:request_success",
            "Finished requests by finish reason.",
            ["finished_reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "baton:prompt_tokens", "Prompt tokens of finished requests.", registry=self.registry
        )

    def observe(self, output: RequestOutput) -> None:
        """Record a finished request."""
        metrics, done = output.metrics, output.outputs[0]
        if metrics.time_to_first_token is not None:
            self.ttft.observe(metrics.time_to_first_token)
        for earlier, later in itertools.pairwise(metrics.token_times):
            self.itl.observe(later - earlier)
        if metrics.finished_time is not None:
            self.e2e.observe(metrics.finished_time - metrics.arrival_time)
        self.success.labels(finished_reason=done.finish_reason or "abort").inc()
        self.prompt_tokens.inc(len(output.prompt_token_ids))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector:
    """Gauges and counters read from the engine's snapshot when Prometheus scrapes."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self):
        snap = self.engine.snapshot
        stats = snap.stats
        yield gauge("baton:num_requests_running", "Requests in the batch.", snap.num_running)
        yield gauge("baton:num_requests_waiting", "Requests waiting to join.", snap.num_waiting)
        yield gauge("baton:num_requests_swapped", "Requests swapped to host.", snap.num_swapped)
        usage = snap.kv_cache_usage
        yield gauge("baton:kv_cache_usage_perc", "Device KV pages in use, 0-1.", usage)
        pages = GaugeMetricFamily(
            "baton:kv_pages_in_use", "KV pages owned, by pool.", labels=["pool"]
        )
        pages.add_metric(["device"], snap.device_pages_used)
        pages.add_metric(["host"], snap.host_pages_used)
        yield pages
        yield gauge("baton:slot_efficiency", "Tokens / offered batch slots.", stats.slot_efficiency)
        yield counter("baton:generation_tokens", "Generated tokens.", stats.generated_tokens)
        yield counter("baton:iterations", "Engine iterations.", stats.iterations)
        idle = stats.idle_slot_iterations
        yield counter("baton:idle_slot_iterations", "Offered slots left idle.", idle)
        yield labelled_counter(
            "baton:preemptions",
            "Requests preempted, by how.",
            "mode",
            {"swap": stats.swap_preemptions, "recompute": stats.recompute_preemptions},
        )
        yield labelled_counter(
            "baton:swapped_bytes",
            "KV bytes copied between device and host.",
            "direction",
            {"out": stats.swapped_out_bytes, "in": stats.swapped_in_bytes},
        )
        queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        yield counter("baton:prefix_cache_queries", "Prompt tokens looked up.", queries)
        yield counter("baton:prefix_cache_hits", "Looked-up tokens found cached.", hits)
        evicted = stats.prefix_cache_evictions
        yield counter("baton:prefix_cache_evictions", "Cached pages evicted.", evicted)
        rate = stats.prefix_cache_hit_rate
        yield gauge("baton:prefix_cache_hit_rate", "Prefix-cache hits / queries, 0-1.", rate)
        yield labelled_counter(
            "baton:watermark_crossings",
            "Memory pressure watermark crossings.",
            "watermark",
            {"high": stats.high_watermark_crossings, "low": stats.low_watermark_crossings},
        )


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def labelled_counter(name: str, doc: str, label: str, values: dict) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family
