"""MemoryMonitor's watermarks and the device-memory readers (NVML, torch.cuda, psutil)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from baton_paged.allocator import PagePool
from baton_paged.sched import device_memory
from baton_paged.sched.device_memory import device_memory_reader, host_memory_used
from baton_paged.sched.memory_monitor import MemoryMonitor


def test_hysteresis_holds_from_a_high_crossing_until_below_low():
    readings = iter([0.5, 0.96, 0.9, 0.86, 0.84, 0.9, 0.97])
    monitor = MemoryMonitor(PagePool(10), 0.95, 0.85, reader=lambda: next(readings))
    states = [(monitor.update(), monitor.holding, monitor.above_high) for _ in range(7)]
    assert [s[1] for s in states] == [False, True, True, True, False, False, True]
    assert [s[2] for s in states] == [False, True, False, False, False, False, True]
    assert (monitor.high_crossings, monitor.low_crossings) == (2, 1)


def test_pressure_is_the_higher_of_pool_occupancy_and_the_device_reading():
    pool = PagePool(10)
    pool.allocate(6)
    assert MemoryMonitor(pool).read() == 0.6
    assert MemoryMonitor(pool, reader=lambda: 0.2).read() == 0.6
    assert MemoryMonitor(pool, reader=lambda: 0.9).read() == 0.9


def test_pool_allows_pages_up_to_the_high_watermark():
    monitor = MemoryMonitor(PagePool(20), 0.9, 0.5)
    assert monitor.pool_allows(18) and not monitor.pool_allows(19)


@pytest.mark.parametrize(
    ("high", "low"), [(0.8, 0.9), (0.9, 0.9), (1.2, 0.5), (0.9, 0.0), (True, 0.5)]
)
def test_bad_watermarks_are_refused(high, low):
    with pytest.raises(ValueError, match="0 < low < high <= 1"):
        MemoryMonitor(PagePool(4), high, low)


def test_cpu_reads_host_memory():
    reader = device_memory_reader("cpu")
    assert reader is host_memory_used and 0.0 < reader() < 1.0


class FakeNvml(types.ModuleType):
    """The slice of pynvml the reader uses; ``uuid_ok`` decides whether lookup by UUID works."""

    class NVMLError(Exception):
        pass

    def __init__(self, uuid_ok=True, init_error=None, prefix="GPU-"):
        super().__init__("pynvml")
        self.uuid_ok, self.init_error, self.looked_up = uuid_ok, init_error, []
        self.prefix = prefix

    def nvmlInit(self):  # noqa: N802 (pynvml's names)
        if self.init_error:
            raise self.init_error

    def nvmlDeviceGetHandleByUUID(self, uuid):  # noqa: N802
        if not self.uuid_ok or not uuid.startswith(self.prefix.encode()):
            raise self.NVMLError("Not Found")
        self.looked_up.append(uuid)
        return "by-uuid"

    def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802
        self.looked_up.append(index)
        return "by-index"

    def nvmlDeviceGetMemoryInfo(self, handle):  # noqa: N802
        return types.SimpleNamespace(used=30, total=120, free=90)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device 1 with a known UUID and 25% of its memory free, on any machine."""
    props = types.SimpleNamespace(uuid="1234-abcd")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (25, 100))


def install(monkeypatch, fake):
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def test_nvml_finds_the_device_by_uuid(monkeypatch, fake_cuda):
    fake = install(monkeypatch, FakeNvml())
    reader = device_memory_reader("cuda:1")
    assert reader() == 0.25 and fake.looked_up == [b"GPU-1234-abcd"]


def test_a_mig_slice_is_found_by_its_mig_uuid(monkeypatch, fake_cuda):
    fake = install(monkeypatch, FakeNvml(prefix="MIG-"))
    assert device_memory_reader("cuda:1")() == 0.25 and fake.looked_up == [b"MIG-1234-abcd"]


def test_an_unknown_uuid_reads_through_torch_never_by_physical_index(monkeypatch, fake_cuda):
    """NVML's index 1 need not be CUDA's device 1 (CUDA_VISIBLE_DEVICES): no index lookup."""
    fake = install(monkeypatch, FakeNvml(uuid_ok=False))
    assert device_memory_reader("cuda:1")() == 0.75 and fake.looked_up == []


def test_pressure_counts_only_memory_taken_after_the_baseline():
    """The engine's own pools (60% here, in use when the reader is made) are not pressure."""
    readings = iter([0.6, 0.6, 0.8, 1.0, 0.5])
    reader = device_memory.beyond_baseline(lambda: next(readings))
    assert [reader() for _ in range(4)] == pytest.approx([0.0, 0.5, 1.0, 0.0])


@pytest.mark.parametrize("broken", ["missing module", "no driver library"])
def test_without_nvml_torch_cuda_answers(monkeypatch, fake_cuda, broken):
    if broken == "missing module":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    else:
        install(monkeypatch, FakeNvml(init_error=OSError("libnvidia-ml.so.1: not found")))
    assert device_memory._nvml_reader(torch.device("cuda:1")) is None
    assert device_memory_reader("cuda:1")() == 0.75  # 1 - free / total from mem_get_info


@pytest.mark.gpu
def test_real_device_reading_is_a_fraction():
    assert 0.0 < device_memory_reader("cuda")() < 1.0


def test_a_cpu_engine_keeps_its_swap_pool_pageable(make_engine, monkeypatch):
    def no_cuda():
        raise AssertionError("a CPU engine must not pin memory through the CUDA runtime")

    monkeypatch.setattr(torch.cuda, "cudart", no_cuda)
    engine = make_engine("llama", preemption_mode="swap")
    assert engine.host is not None and not engine.host.pinned
