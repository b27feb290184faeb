"""Swap plans: moving a request's pages between the device cache and the host swap pool.

A plan is pure data that the scheduler makes and the model runner executes:

    plan_swap_out(pages, host_pool)            reserve host pages      scheduler, no tensors
    plan_swap_in(host_pages, device_pool)      reserve device pages    scheduler, no tensors
    execute_swap(plan, cache, host)            copy runs of pages      runner, before the forwards
    release_source(plan, device_pool, host_pool)  free the source pages  scheduler, see below

The page-reuse rule. An iteration issues its work in three stages on one stream: every swap-out
(device -> host), then every swap-in (host -> device), then the forwards; each stage runs after
everything issued before it. A source page may go back to its pool, and be handed out again in
the same iteration, as soon as nothing that could write it comes before the copy that reads it:

* a swap-out reads device pages in the first stage, and device pages are written only in later
  ones (swap-ins, forwards): its device pages are released when the swap-out is planned, so the
  room a preemption makes serves a newcomer in the same iteration;
* a swap-in reads host pages in the second stage, after the swap-outs that write host pages: its
  host pages stay owned for the whole iteration, and are released when the engine reports the
  iteration back (``Scheduler.update``), by then long issued.

Host code that reads the host pool directly must synchronize first: copies are ``non_blocking``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch

from baton_paged.allocator.kv_cache import KVCache
from baton_paged.allocator.page_pool import PagePool
from baton_paged.allocator.swap_pool import HostSwapPool


class SwapDirection(str, Enum):
    OUT = "out"
    """Device to host: a preempted request's K/V leaves the device."""
    IN = "in"
    """Host to device: a swapped request comes back."""


class CopyRun(NamedTuple):
    """``length`` consecutive pages copied from ``src_start`` to ``dst_start``: one ``copy_``."""

    src_start: int
    dst_start: int
    length: int


@dataclass(frozen=True)
class SwapPlan:
    """Copy ``device_pages[i]`` <-> ``host_pages[i]`` for every ``i``, in ``direction``."""

    direction: SwapDirection
    device_pages: tuple[int, ...]
    host_pages: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.device_pages) != len(self.host_pages):
            raise ValueError(
                f"a swap plan pairs pages one to one: {len(self.device_pages)} device pages, "
                f"{len(self.host_pages)} host pages"
            )

    @property
    def num_pages(self) -> int:
        return len(self.device_pages)

    @property
    def source_pages(self) -> tuple[int, ...]:
        return self.device_pages if self.direction is SwapDirection.OUT else self.host_pages

    @property
    def destination_pages(self) -> tuple[int, ...]:
        return self.host_pages if self.direction is SwapDirection.OUT else self.device_pages

    def runs(self) -> list[CopyRun]:
        return coalesce_runs(self.source_pages, self.destination_pages)


def coalesce_runs(src: Sequence[int], dst: Sequence[int]) -> list[CopyRun]:
    """Group page pairs into runs that are consecutive on both sides.

    Pairs are independent copies, so they are sorted by source page first: pages [4, 5, 2, 3] going
    to [2, 3, 0, 1] become a single run 2..5 -> 0..3 rather than two.
    """
    runs: list[CopyRun] = []
    src_start = dst_start = length = 0
    for s, d in sorted(zip(src, dst, strict=True)):
        if length and s == src_start + length and d == dst_start + length:
            length += 1
            continue
        if length:
            runs.append(CopyRun(src_start, dst_start, length))
        src_start, dst_start, length = s, d, 1
    if length:
        runs.append(CopyRun(src_start, dst_start, length))
    return runs


def plan_swap_out(device_pages: Sequence[int], host_pool: PagePool) -> SwapPlan:
    """Reserve host pages for ``device_pages``; raises ``OutOfPagesError`` and changes nothing."""
    host_pages = host_pool.allocate(len(device_pages))
    return SwapPlan(SwapDirection.OUT, tuple(device_pages), tuple(host_pages))


def plan_swap_in(host_pages: Sequence[int], device_pool: PagePool) -> SwapPlan:
    """Reserve device pages for ``host_pages``; raises ``OutOfPagesError`` and changes nothing."""
    device_pages = device_pool.allocate(len(host_pages))
    return SwapPlan(SwapDirection.IN, tuple(device_pages), tuple(host_pages))


PageCopier = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``copy(dst, src, dst_pages, src_pages)``: whole pages between two CPU pools in one call (the
attention kernels' ``copy_pages``, which the model runner passes in where they built)."""


def execute_swap(
    plan: SwapPlan, cache: KVCache, host: HostSwapPool, copy_pages: PageCopier | None = None
) -> None:
    """Issue the plan's copies: one ``copy_`` per run of consecutive pages, or, when the pages
    are scattered over several runs and both pools are in CPU memory, one ``copy_pages`` call
    (per-run ``copy_`` calls cost their dispatch each: scattered pages moved at 0.74x a
    contiguous copy's rate)."""
    if cache.spec != host.spec:
        raise ValueError(f"device cache {cache.spec} and host pool {host.spec} differ in geometry")
    if plan.direction is SwapDirection.OUT:
        src, dst = cache.storage, host.storage
    else:
        src, dst = host.storage, cache.storage
    runs = plan.runs()
    if copy_pages is not None and len(runs) > 1 and src.is_cpu and dst.is_cpu:
        pages = (plan.destination_pages, plan.source_pages)
        copy_pages(dst, src, *(torch.tensor(p, dtype=torch.long) for p in pages))
        return
    for run in runs:
        dst[run.dst_start : run.dst_start + run.length].copy_(
            src[run.src_start : run.src_start + run.length], non_blocking=True
        )


def release_source(plan: SwapPlan, device_pool: PagePool, host_pool: PagePool) -> None:
    """Drop the plan's hold on the pages it copies from, when the page-reuse rule allows."""
    pool = device_pool if plan.direction is SwapDirection.OUT else host_pool
    pool.free(plan.source_pages)
