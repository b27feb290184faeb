"""The vLLM plugin's counters, and the Prometheus collector that publishes them.

``BatonScheduler`` keeps one ``BatonCounters`` and bumps it as it decides; the collector reads
every live scheduler's counters when Prometheus scrapes, so nothing is counted twice and an
engine that shuts down simply disappears from the output. Names start with ``vllm:`` so that
vLLM's in-process reader (``LLM.get_metrics()``) returns them beside vLLM's own.

Where they can be scraped: in-process engines (``LLM`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
tests, benchmarks) through the process's default registry; ``vllm serve`` runs its engine core
in a process of its own, whose registry vLLM's ``/metrics`` never reads, so there the plugin's
``metrics_port`` setting serves them from the engine-core process.

This module imports nothing from vLLM, so it is tested in the main environment too.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


@dataclass
class BatonCounters:
    """What BATON did inside one vLLM engine, counted since it started."""

    priority_preemptions: int = 0
    """Requests preempted so that a higher-priority waiting request could be admitted."""
    pressure_sheds: int = 0
    """Requests shed because KV usage was above the high watermark."""
    held_steps: int = 0
    """Steps taken while admission was held by memory pressure."""
    sampled_tokens: int = 0
    """Scheduled requests that sample a token (not a partial prefill chunk), over all steps."""
    offered_slots: int = 0
    """Batch slots work could have filled, over all steps: min(max_num_seqs, requests running
    or waiting) before each step, as the engine's own slot efficiency counts them."""
    resumed: int = 0
    """Requests BATON preempted (either reason) that were scheduled again."""
    resume_kept_tokens: int = 0
    """Of those requests' tokens computed when preempted, the ones not computed again on
    resuming: found in vLLM's prefix cache or loaded through a KV connector (host memory)."""
    resume_recomputed_tokens: int = 0
    """Of those tokens, the ones computed again."""
    resumed_via_connector: int = 0
    """Resumed requests whose K/V came back through the KV connector (offloaded blocks)."""

    @property
    def idle_slots(self) -> int:
        return self.offered_slots - self.sampled_tokens

    @property
    def slot_efficiency(self) -> float:
        """Sampled tokens / offered slots: the paper's idle computation, seen from vLLM."""
        return self.sampled_tokens / self.offered_slots if self.offered_slots else 1.0


COUNTER_HELP = {
    "priority_preemptions": "Requests preempted for a higher-priority waiting request.",
    "pressure_sheds": "Requests shed above the KV-usage high watermark.",
    "held_steps": "Scheduler steps with admission held by memory pressure.",
    "sampled_tokens": "Scheduled requests that sampled a token.",
    "offered_slots": "Batch slots work could have filled (min(max_num_seqs, unfinished)).",
    "idle_slots": "Offered slots that sampled nothing (the paper's idle computation).",
    "resumed": "Requests preempted by BATON that were scheduled again.",
    "resume_kept_tokens": "Tokens of resumed requests found cached or loaded, not recomputed.",
    "resume_recomputed_tokens": "Tokens of resumed requests computed again.",
    "resumed_via_connector": "Resumed requests whose K/V came back through the KV connector.",
}
PREFIX = "vllm:baton_"


class BatonCollector:
    """Publishes the counters of every live ``BatonScheduler`` in this process, one ``engine``
    label value per scheduler (numbered in creation order)."""

    def __init__(self) -> None:
        self._engines: weakref.WeakValueDictionary[str, object] = weakref.WeakValueDictionary()
        self._numbers = itertools.count()

    def track(self, owner: object) -> str:
        """Publish ``owner.baton_counters`` while ``owner`` lives; returns its label value."""
        label = str(next(self._numbers))
        self._engines[label] = owner
        return label

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        engines = [(label, owner.baton_counters) for label, owner in self._engines.items()]
        for name, help_text in COUNTER_HELP.items():
            family = CounterMetricFamily(PREFIX + name, help_text, labels=["engine"])
            for label, counters in engines:
                family.add_metric([label], getattr(counters, name))
            yield family
        gauge = GaugeMetricFamily(
            PREFIX + "slot_efficiency", "Sampled tokens / offered slots.", labels=["engine"]
        )
        for label, counters in engines:
            gauge.add_metric([label], counters.slot_efficiency)
        yield gauge


_lock = threading.Lock()
_collector: BatonCollector | None = None
_served_ports: set[int] = set()


def publish(owner: object, metrics_port: int | None = None) -> str:
    """Register the process's collector on first use, track ``owner``, and serve the default
    registry on ``metrics_port`` if given (once per port per process)."""
    global _collector
    with _lock:
        if _collector is None:
            _collector = BatonCollector()
            REGISTRY.register(_collector)
        if metrics_port is not None and metrics_port not in _served_ports:
            start_http_server(metrics_port)
            _served_ports.add(metrics_port)
        return _collector.track(owner)
