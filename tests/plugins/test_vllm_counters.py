"""The vLLM plugin's counters and their Prometheus collector (no vLLM needed)."""

from __future__ import annotations

import gc
import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from baton_paged.plugins.vllm_counters import BatonCollector, BatonCounters, publish


class Engine:
    """Stands in for a BatonScheduler: anything with ``baton_counters``."""

    def __init__(self, **counts):
        self.baton_counters = BatonCounters(**counts)


def scrape(collector: BatonCollector) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {
        (sample.name, sample.labels["engine"]): sample.value
        for metric in registry.collect()
        for sample in metric.samples
    }


def test_slot_efficiency_and_idle_slots_follow_the_counts():
    counters = BatonCounters(sampled_tokens=30, offered_slots=40)
    assert counters.idle_slots == 10 and counters.slot_efficiency == 0.75
    assert BatonCounters().slot_efficiency == 1.0  # nothing offered, nothing idle


def test_the_collector_reads_each_live_engine_at_scrape_time():
    collector = BatonCollector()
    first, second = Engine(sampled_tokens=3, offered_slots=4), Engine(pressure_sheds=2)
    a, b = collector.track(first), collector.track(second)
    first.baton_counters.sampled_tokens += 1  # counted after tracking: read when scraped
    values = scrape(collector)
    assert values[("vllm:baton_sampled_tokens_total", a)] == 4
    assert values[("vllm:baton_idle_slots_total", a)] == 0
    assert values[("vllm:baton_slot_efficiency", a)] == 1.0
    assert values[("vllm:baton_pressure_sheds_total", b)] == 2
    del second
    gc.collect()
    assert all(label == a for _, label in scrape(collector))  # a shut-down engine leaves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_publish_serves_the_counters_on_the_metrics_port():
    engine, port = Engine(resumed=5, resumed_via_connector=3), free_port()
    label = publish(engine, metrics_port=port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert f'vllm:baton_resumed_total{{engine="{label}"}} 5.0' in body
    assert f'vllm:baton_resumed_via_connector_total{{engine="{label}"}} 3.0' in body
    publish(Engine(), metrics_port=port)  # a second engine on the same port: served once
    assert "vllm:baton_resumed_total" in generate_latest().decode()


@pytest.mark.parametrize("port", [0, 70000, "9100", True])
def test_a_bad_metrics_port_is_refused(port):
    from baton_paged.plugins.vllm_pressure import PressureSettings

    with pytest.raises(ValueError, match="metrics_port"):
        PressureSettings(metrics_port=port)
