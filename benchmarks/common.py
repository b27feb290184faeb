"""Helpers every benchmark shares: pinned threads, interleaved repeated timing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy (every process, plus time the hypervisor
    stole). Its change over a run minus our own processes' CPU time is what others took from the
    cores: on 2 cores one other busy process slows OpenMP forwards far more than 2x."""
    import psutil

    t = psutil.cpu_times()
    fields = ("user", "nice", "system", "irq", "softirq", "steal")
    return sum(getattr(t, name, 0.0) for name in fields)
