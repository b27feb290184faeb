"""``LLM.get_metrics()``'s values, in the shapes of vLLM's ``vllm.v1.metrics.reader``: the same
series ``/metrics`` serves (``baton_paged/metrics.py``), read from the registry as plain frozen
dataclasses, so a script that inspects vLLM's offline metrics runs unchanged."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry


@dataclass(frozen=True)
class Metric:
    name: str
    labels: dict[str, str]


@dataclass(frozen=True)
class Counter(Metric):
    value: int


@dataclass(frozen=True)
class Gauge(Metric):
    value: float


@dataclass(frozen=True)
class Histogram(Metric):
    count: int
    sum: float
    buckets: dict[str, int]
    """Upper bound (as Prometheus writes it, ``"+Inf"`` last) -> observations up to it."""


def read(registry: CollectorRegistry) -> list[Metric]:
    """Every series of ``registry``: counters, gauges and histograms, one entry per label set."""
    metrics: list[Metric] = []
    for family in registry.collect():
        if family.type == "histogram":
            metrics += _histograms(family)
            continue
        kind = Counter if family.type == "counter" else Gauge
        for sample in family.samples:
            if family.type == "counter" and not sample.name.endswith("_total"):
                continue  # prometheus_client's _created timestamps
            value = int(sample.value) if kind is Counter else sample.value
            metrics.append(kind(sample.name, dict(sample.labels), value))
    return metrics


def _histograms(family) -> list[Histogram]:
    series: dict[tuple, dict] = {}
    for sample in family.samples:
        labels = {k: v for k, v in sample.labels.items() if k != "le"}
        entry = series.setdefault(tuple(sorted(labels.items())), {"buckets": {}, "labels": labels})
        if sample.name.endswith("_bucket"):
            entry["buckets"][sample.labels["le"]] = int(sample.value)
        elif sample.name.endswith("_count"):
            entry["count"] = int(sample.value)
        elif sample.name.endswith("_sum"):
            entry["sum"] = sample.value
    return [
        Histogram(family.name, e["labels"], e.get("count", 0), e.get("sum", 0.0), e["buckets"])
        for e in series.values()
    ]
