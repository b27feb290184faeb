"""Model-free scheduler fixtures: requests, schedulers, and an engine stand-in that runs plans."""

from __future__ import annotations

from baton_paged.allocator import PagePool
from baton_paged.request import Request, RequestStatus
from baton_paged.sampling_params import SamplingParams
from baton_paged.sched.memory_monitor import MemoryMonitor
from baton_paged.sched.plan import StepResult
from baton_paged.sched.policies import make_policy
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


def scheduler(
    num_pages=64,
    max_batch=4,
    host_pages=0,
    watermarks=None,
    reader=None,
    policy="baton",
    chunk_budget=512,
):
    """A scheduler over ``num_pages`` pages of PAGE tokens under ``policy`` (prefill budget
    4096, ``chunk_budget`` tokens per forward under chunked); with ``host_pages`` a swap pool,
    with ``watermarks=(high, low)`` a memory monitor (``reader`` injects external pressure)."""
    pool = PagePool(num_pages)
    host = PagePool(host_pages) if host_pages else None
    monitor = MemoryMonitor(pool, *watermarks, reader) if watermarks else None
    chosen = make_policy(policy, 4096, chunk_budget)
    return Scheduler(pool, PAGE, max_batch, 32, chosen, host_pool=host, monitor=monitor)


def run_plan(sched, plan):
    """What the engine does with a plan: issue swaps, run the forwards, append a token per
    sampling row, report requests that reach max_tokens as finished."""
    finished = []
    for forward in plan.forwards:
        for row in forward.rows:
            req = sched.batch[row.request_id]
            if row.sample:
                req.output_token_ids.append(0)
                if len(req.output_token_ids) == req.max_tokens:
                    finished.append((row.request_id, RequestStatus.FINISHED_LENGTH))
    sched.update(plan, StepResult(len(plan.forwards), tuple(finished)))
    sched.check_integrity()
