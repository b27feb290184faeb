"""How full the engine's device memory is, as a fraction in [0, 1].

On NVIDIA GPUs NVML (``pynvml`` from nvidia-ml-py) reads the memory every process uses on the
device without creating a CUDA context; without NVML (no driver library, no package) torch's
``cudaMemGetInfo`` answers instead. On the CPU the "device" is host memory, read with psutil.
An absent NVML is never an error: the next reader in line takes over.

NVML finds the device by its UUID (``GPU-...``, or ``MIG-...`` for a MIG slice), never by index:
NVML numbers GPUs physically and ignores CUDA_VISIBLE_DEVICES, so an index could read another
GPU. A device NVML cannot match is read through torch instead.

The engine reads pressure relative to what it found once its own pools were allocated
(``beyond_baseline``): the KV pools, weights and allocator reserve are in use from the start, and
counting them would hold a batch with a large ``kv_memory`` above the watermarks for good.
"""

from __future__ import annotations

from collections.abc import Callable

import psutil
import torch

MemoryReader = Callable[[], float]
"""A zero-argument function returning the fraction of memory in use now."""


def device_memory_reader(device: torch.device | str) -> MemoryReader:
    """The best available reader for ``device``: NVML, then torch.cuda, or psutil on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return host_memory_used
    return _nvml_reader(device) or _torch_cuda_reader(device)


def host_memory_used() -> float:
    return psutil.virtual_memory().percent / 100.0


def _nvml_reader(device: torch.device) -> MemoryReader | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = _nvml_handle(pynvml, device)
    except Exception:  # ImportError, OSError, pynvml.NVMLError: fall back to torch
        return None

    def used() -> float:
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return info.used / info.total

    return used


def beyond_baseline(reader: MemoryReader) -> MemoryReader:
    """``reader`` measured against what is in use now: ``(used - base) / (total - base)``."""
    base = reader()
    if base >= 1.0:
        return reader

    def used() -> float:
        return max(0.0, (reader() - base) / (1.0 - base))

    return used


def _nvml_handle(pynvml, device: torch.device):
    """The device's NVML handle by UUID (whole GPU, else MIG slice); raises if neither matches."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(torch.cuda.get_device_properties(index).uuid).removeprefix("GPU-")
    for prefix in ("GPU-", "MIG-"):
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"{prefix}{uuid}".encode())
        except (pynvml.NVMLError, TypeError):
            continue
    raise LookupError(f"NVML knows no device with UUID {uuid}")


def _torch_cuda_reader(device: torch.device) -> MemoryReader:
    def used() -> float:
        free, total = torch.cuda.mem_get_info(device)
        return 1.0 - free / total

    return used
