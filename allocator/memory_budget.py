"""How many pages a memory budget buys.

A budget is either bytes (``"4GiB"``, ``"512MB"``, ``1073741824``) or a fraction of the memory
free right now on the cache's device (``"0.5"``, ``0.5``): on CUDA from ``cudaMemGetInfo``, on the
CPU from the host's available memory (psutil).
"""

from __future__ import annotations

import re

import psutil
import torch

from baton_paged.allocator.kv_spec import KVCacheSpec

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

MemoryBudget = int | float
"""Bytes (int) or a fraction of free memory (float in (0, 1])."""


def parse_memory_budget(text: str | int | float) -> MemoryBudget:
    """``"4GiB"`` -> 4294967296; ``"0.5"`` -> 0.5 (a fraction); ``"1000"`` -> 1000 bytes."""
    if isinstance(text, bool):
        raise ValueError(f"not a memory budget: {text!r}")
    if isinstance(text, int):
        return _check_bytes(text)
    if isinstance(text, float):
        return _check_fraction(text)
    match = _SIZE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"not a memory budget: {text!r} (give bytes like '4GiB' or '512MB', "
            "or a fraction of free memory like '0.5')"
        )
    number, unit = match.groups()
    if "." in number and not unit:
        return _check_fraction(float(number))
    return _check_bytes(int(float(number) * _UNITS[unit.lower()]))


def free_memory_bytes(device: torch.device | str) -> int:
    """Memory free on ``device`` now: CUDA's free bytes, or the host's available bytes."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def budget_bytes(budget: MemoryBudget | str, device: torch.device | str) -> int:
    """The budget in bytes, resolving a fraction against what ``device`` has free now."""
    budget = parse_memory_budget(budget)
    if isinstance(budget, float):
        return int(budget * free_memory_bytes(device))
    return budget


def num_pages_for_budget(
    spec: KVCacheSpec, budget: MemoryBudget | str, device: torch.device | str
) -> int:
    """Whole pages of ``spec`` in ``budget``: at least one, or a ValueError that says why."""
    available = budget_bytes(budget, device)
    pages = available // spec.bytes_per_page
    if pages < 1:
        raise ValueError(
            f"a memory budget of {available} bytes holds no page of {spec.bytes_per_page} bytes "
            f"({spec.page_size} tokens x {spec.num_layers} layers x {spec.num_kv_heads} KV heads "
            f"x {spec.head_dim} dims x K and V in {spec.dtype})"
        )
    return pages


def _check_bytes(value: int) -> int:
    if value < 1:
        raise ValueError(f"a memory budget in bytes must be positive, got {value}")
    return value


def _check_fraction(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"a memory fraction must be in (0, 1], got {value}")
    return value
