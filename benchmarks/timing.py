"""Timing on a shared, noisy machine: pinned threads, interleaved medians, and the wall, CPU and
load figures that tell a clean run from a disturbed one."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def setup_threads(threads: int) -> int:
    """Pin torch's intra-op threads: CPU timings here swing wildly when threads oversubscribe."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_once(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(
    cases: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None], warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each case, the cases run in turn so drift hits them all alike."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            samples[name].append(time_once(fn, sync))
    return {name: statistics.median(times) for name, times in samples.items()}


def environment(threads: int, device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy (every process, plus time the hypervisor
    stole). Its change over a run minus our own processes' CPU time is what others took from the
    cores: on 2 cores one other busy process slows OpenMP forwards far more than 2x."""
    import psutil

    t = psutil.cpu_times()
    fields = ("user", "nice", "system", "irq", "softirq", "steal")
    return sum(getattr(t, name, 0.0) for name in fields)


@dataclass(kw_only=True)
class Timed:
    """The figures a ``Clock`` takes of one run; each benchmark's run record extends it."""

    wall_s: float = float("nan")
    useful_tokens: int = 0
    tokens_per_s: float = float("nan")
    cpu_per_wall: float = float("nan")
    """About the torch thread count when nothing else competed for the cores."""
    loadavg_1m: tuple[float, float] = (float("nan"), float("nan"))
    """1-minute load average before and after the run."""
    error: str | None = None
    """Why the run failed; it then has no figures."""


class Clock:
    """Wall time, process CPU time and the 1-minute load average around one run."""

    def __enter__(self) -> Clock:
        self.load_before = os.getloadavg()[0]
        self.cpu = sum(os.times()[:2])
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.start
        self.cpu = sum(os.times()[:2]) - self.cpu
        self.load_after = os.getloadavg()[0]

    def fill(self, result: Timed, useful: int) -> None:
        result.wall_s = self.wall
        result.useful_tokens = useful
        result.tokens_per_s = useful / self.wall
        result.cpu_per_wall = self.cpu / self.wall
        result.loadavg_1m = (round(self.load_before, 2), round(self.load_after, 2))
