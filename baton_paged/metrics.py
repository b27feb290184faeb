"""Prometheus metrics for ``/metrics``: vLLM's names (``vllm:``, with a ``model_name`` label), so
the dashboards and alerts written for vLLM read this server unchanged, and BATON's own beside
them (``baton:``, unlabelled: slot efficiency, iterations, preemptions by mode, swap traffic,
pages by pool, watermark crossings).

Engine state (running, waiting, swapped, KV usage, token and preemption counters) is read at
scrape time from the engine's latest ``EngineSnapshot``, never from its live parts (a scrape runs
on an HTTP thread while the step loop mutates them). Per-request histograms are observed as each
request finishes, from its ``RequestMetrics``: queue time (arrival to first admission), prefill
(admission to first token), decode (first to last token), inference (admission to last token),
end to end, time to first token, the gaps between tokens, and the request's sizes.

vLLM's older names that its published Grafana dashboard still reads are served too, as the same
series: ``vllm:gpu_cache_usage_perc`` (= ``kv_cache_usage_perc``) and
``vllm:time_per_output_token_seconds`` (= ``inter_token_latency_seconds``).
"""

from __future__ import annotations

import itertools

import numpy as np
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from baton_paged.bucket_counts import BucketCounts
from baton_paged.entrypoints.async_engine import AsyncEngine
from baton_paged.outputs import RequestOutput

LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TOKEN_GAP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip


def token_buckets(max_model_len: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50... up to the model's context, as vLLM buckets token counts."""
    steps = (mantissa * 10**exponent for exponent in itertools.count() for mantissa in (1, 2, 5))
    return tuple(itertools.takewhile(lambda bucket: bucket <= max_model_len, steps))


class EngineMetrics:
    def __init__(self, engine: AsyncEngine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))
        self.model_name = model_name
        self.histograms: list[BucketCounts] = []
        self.registry.register(self)  # collect(): the histograms
        tokens = token_buckets(engine.inputs.max_model_len)
        self.ttft = self.histogram("time_to_first_token_seconds", "Time to first token.")
        self.itl = self.histogram(
            "inter_token_latency_seconds", "Time between tokens.", TOKEN_GAP_BUCKETS
        )
        self.tpot = self.histogram(
            "time_per_output_token_seconds",
            "Time between tokens (vLLM's older name, which its dashboard reads).",
            TOKEN_GAP_BUCKETS,
        )
        self.request_tpot = self.histogram(
            "request_time_per_output_token_seconds",
            "Per request: decode time / (generated tokens - 1).",
            TOKEN_GAP_BUCKETS,
        )
        self.e2e = self.histogram("e2e_request_latency_seconds", "Arrival to last token.")
        self.queue = self.histogram("request_queue_time_seconds", "Arrival to first admission.")
        self.inference = self.histogram(
            "request_inference_time_seconds", "First admission to last token."
        )
        self.prefill = self.histogram(
            "request_prefill_time_seconds", "First admission to first token."
        )
        self.decode = self.histogram("request_decode_time_seconds", "First to last token.")
        self.prompt_len = self.histogram("request_prompt_tokens", "Prompt tokens.", tokens)
        self.generation_len = self.histogram(
            "request_generation_tokens", "Generated tokens, over the choices.", tokens
        )
        self.max_generation_len = self.histogram(
            "request_max_num_generation_tokens", "The longest choice's tokens.", tokens
        )
        self.n = self.histogram("request_params_n", "The request's n.", (1, 2, 5, 10, 20))
        success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.success = {
            reason: success.labels(model_name=model_name, finished_reason=reason)
            for reason in ("stop", "length", "abort")
        }

    def histogram(self, name: str, doc: str, buckets=LATENCY_BUCKETS) -> BucketCounts:
        histogram = BucketCounts(f"vllm:{name}", doc, buckets)
        self.histograms.append(histogram)
        return histogram

    def collect(self):
        labels = {"model_name": self.model_name}
        return [histogram.family(labels) for histogram in self.histograms]

    def observe(self, output: RequestOutput) -> None:
        """Record a finished request."""
        lengths = [len(choice.token_ids) for choice in output.outputs]
        reason = output.outputs[0].finish_reason or "abort"
        self.success.get(reason, self.success["abort"]).inc()
        self.prompt_len.observe(len(output.prompt_token_ids))
        self.generation_len.observe(sum(lengths))
        self.max_generation_len.observe(max(lengths))
        self.n.observe(len(output.outputs))
        self.observe_times(output)

    def observe_times(self, output: RequestOutput) -> None:
        m = output.metrics
        gaps = np.diff(m.token_times)
        self.itl.observe_many(gaps)
        self.tpot.observe_many(gaps)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        if m.queue_time is not None:
            self.queue.observe(m.queue_time)
        if m.first_token_time is None:
            return
        self.ttft.observe(m.time_to_first_token)
        if m.scheduled_time is not None:
            self.prefill.observe(m.first_token_time - m.scheduled_time)
        if m.finished_time is None:
            return
        decode = m.finished_time - m.first_token_time
        self.decode.observe(decode)
        if m.scheduled_time is not None:
            self.inference.observe(m.finished_time - m.scheduled_time)
        if len(m.token_times) > 1:
            self.request_tpot.observe(decode / (len(m.token_times) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector:
    """Gauges and counters read from the engine's snapshot when Prometheus scrapes."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        yield from self.vllm_series()
        yield from self.baton_series()

    def vllm_series(self):
        snap = self.engine.snapshot
        stats, usage = snap.stats, snap.kv_cache_usage
        gauges = {
            "num_requests_running": ("Requests in the batch.", snap.num_running),
            "num_requests_waiting": ("Requests waiting to join.", snap.num_waiting),
            "num_requests_swapped": ("Requests swapped to host.", snap.num_swapped),
            "kv_cache_usage_perc": ("Device KV pages in use, 0-1.", usage),
            "gpu_cache_usage_perc": ("kv_cache_usage_perc's older name.", usage),
        }
        counters = {
            "prompt_tokens": ("Prefill tokens computed.", stats.prompt_tokens),
            "generation_tokens": ("Generated tokens.", stats.generated_tokens),
            "num_preemptions": ("Requests preempted.", stats.preemptions),
            "prefix_cache_queries": ("Prompt tokens looked up.", stats.prefix_cache_queries),
            "prefix_cache_hits": ("Looked-up tokens found cached.", stats.prefix_cache_hits),
        }
        for kind, series in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
            for name, (doc, value) in series.items():
                family = kind(f"vllm:{name}", doc, labels=["model_name"])
                family.add_metric([self.model_name], value)
                yield family

    def baton_series(self):
        snap = self.engine.snapshot
        stats = snap.stats
        pages = GaugeMetricFamily(
            "baton:kv_pages_in_use", "KV pages owned, by pool.", labels=["pool"]
        )
        pages.add_metric(["device"], snap.device_pages_used)
        pages.add_metric(["host"], snap.host_pages_used)
        yield pages
        yield gauge("baton:slot_efficiency", "Tokens / offered batch slots.", stats.slot_efficiency)
        yield counter("baton:iterations", "Engine iterations.", stats.iterations)
        idle = stats.idle_slot_iterations
        yield counter("baton:idle_slot_iterations", "Offered slots left idle.", idle)
        evicted = stats.prefix_cache_evictions
        yield counter("baton:prefix_cache_evictions", "Cached pages evicted.", evicted)
        rate = stats.prefix_cache_hit_rate
        yield gauge("baton:prefix_cache_hit_rate", "Prefix-cache hits / queries, 0-1.", rate)
        by_label = {
            "preemptions": ("Requests preempted, by how.", "mode", {
                "swap": stats.swap_preemptions, "recompute": stats.recompute_preemptions}),
            "swapped_bytes": ("KV bytes copied between device and host.", "direction", {
                "out": stats.swapped_out_bytes, "in": stats.swapped_in_bytes}),
            "watermark_crossings": ("Memory pressure watermark crossings.", "watermark", {
                "high": stats.high_watermark_crossings, "low": stats.low_watermark_crossings}),
        }  # fmt: skip
        for name, (doc, label, values) in by_label.items():
            yield labelled_counter(f"baton:{name}", doc, label, values)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def labelled_counter(name: str, doc: str, label: str, values: dict) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family
