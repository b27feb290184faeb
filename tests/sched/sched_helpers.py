"""Model-free scheduler fixtures: requests, schedulers, and an engine stand-in that runs plans."""

from __future__ import annotations

from baton_paged.allocator import PagePool
from baton_paged.memory_monitor import MemoryMonitor
from baton_paged.request import Request, RequestStatus
from baton_paged.sampling_params import SamplingParams
from baton_paged.sched.scheduler import Scheduler

PAGE = 4


def request(rid, prompt_len=6, max_tokens=3, priority=0):
    return Request(
        request_id=rid,
        prompt_token_ids=list(range(1, prompt_len + 1)),
        params=SamplingParams(temperature=0, max_tokens=max_tokens),
        max_tokens=max_tokens,
        eos_token_ids=(),
        priority=priority,
    )


def scheduler(num_pages=64, max_batch=4, host_pages=0, watermarks=None, reader=None):
    """A scheduler over ``num_pages`` pages of PAGE tokens; with ``host_pages`` a swap pool, with
    ``watermarks=(high, low)`` a memory monitor (``reader`` injects external pressure)."""
    pool = PagePool(num_pages)
    host = PagePool(host_pages) if host_pages else None
    monitor = MemoryMonitor(pool, *watermarks, reader) if watermarks else None
    return Scheduler(pool, PAGE, max_batch, 32, host_pool=host, monitor=monitor)


def run_plan(sched, plan):
    """What the engine does with a plan: issue swaps, record computed K/V, append a token per
    sampling row, finish requests at max_tokens."""
    sched.swaps_issued(plan)
    for forward in plan.forwards:
        sched.forward_done(forward)
        for row in forward.rows:
            req = sched.running[row.request_id]
            if row.sample:
                req.output_token_ids.append(0)
                if len(req.output_token_ids) == req.max_tokens:
                    sched.finish(req, RequestStatus.FINISHED_LENGTH)
    sched.check_integrity()
