"""The workload the engine benchmarks share (``bench_policies``' docstring describes it), and our
engine run over it: the small random-weight Llama in float32 with the KV and prefill budgets
below, through the engine's public API only (``add_request``, ``step``, ``snapshot``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import transformers
from harness import Clock, Default, Timed, environment, median, percentile
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton_paged.allocator import pages_needed
from baton_paged.config import EngineConfig
from baton_paged.engine import Engine
from baton_paged.model.builder import cached_model
from baton_paged.outputs import RequestOutput
from baton_paged.sampling_params import SamplingParams
from baton_paged.snapshot import EngineSnapshot

PROMPT_LENS = (16, 256)
BUDGET_MEAN, BUDGET_SIGMA, BUDGET_CLIP = 100.0, 1.0, (4, 512)
MAX_BUDGET = Default(BUDGET_CLIP[1], 64)
KV_MEMORY = "2GiB"
MAX_PREFILL_TOKENS = 4096
"""Our engine's prefill forward budget (also hf-cb's max_batch_tokens, so both pack alike)."""
MAX_STEPS_PER_TOKEN = 20
"""A run taking more iterations than this x (tokens + requests) is reported as stuck."""


def add_options(parser: argparse.ArgumentParser, num_requests: Default) -> None:
    """The workload's options: ``--num-requests``, and the longest budget (in the args, so the
    results record it)."""
    parser.add_argument("--num-requests", type=int, default=num_requests, help="%(default)s")
    parser.set_defaults(max_budget=MAX_BUDGET)


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    budgets: list[int]

    @property
    def total_budget(self) -> int:
        return sum(self.budgets)

    def largest_request_pages(self, page_size: int) -> int:
        pairs = zip(self.prompts, self.budgets, strict=True)
        return max(pages_needed(len(p) + b, page_size) for p, b in pairs)

    def head(self, n: int, budget: int) -> Workload:
        """The first ``n`` prompts with a small budget each: a warm-up."""
        return Workload(self.prompts[:n], [budget] * n)

    def describe(self, max_budget: int) -> dict:
        lens, budgets = [len(p) for p in self.prompts], self.budgets
        budget = {"min": min(budgets), "max": max(budgets), "mean": statistics.mean(budgets)}
        budget |= {"median": statistics.median(budgets), "total": self.total_budget}
        budget["distribution"] = (
            f"lognormal(mu=ln({BUDGET_MEAN:g}) - sigma^2/2, sigma={BUDGET_SIGMA:g}) rounded, "
            f"clipped to [{BUDGET_CLIP[0]}, {max_budget}]"
        )
        prompt_len = {"min": min(lens), "max": max(lens), "mean": statistics.mean(lens)}
        return {"num_requests": len(self.prompts), "prompt_len": prompt_len, "budget": budget}


def make_workload(num_requests: int, vocab_size: int, max_budget: int, seed: int = 0) -> Workload:
    """Seeded prompts (ids 1..vocab-1, so never the pad id 0) and long-tailed budgets."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(PROMPT_LENS[0], PROMPT_LENS[1] + 1, num_requests)
    prompts = [rng.integers(1, vocab_size, n).tolist() for n in lens]
    mu = math.log(BUDGET_MEAN) - BUDGET_SIGMA**2 / 2  # mean of the unclipped lognormal = 100
    raw = rng.lognormal(mu, BUDGET_SIGMA, num_requests)
    budgets = np.clip(np.rint(raw), BUDGET_CLIP[0], max_budget).astype(int).tolist()
    return Workload(prompts, budgets)


def load_hf(path: Path, attn: str | None = None):
    kwargs = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


class OurModel:
    """The small random-weight Llama and its tokenizer, loaded once and lent to every engine a
    benchmark builds (the engine switches it to paged attention)."""

    def __init__(self):
        transformers.logging.set_verbosity_error()  # not its info lines in every run's output
        self.path = cached_model("llama", "small")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = load_hf(self.path)

    def workload(self, args, num_requests: int | None = None, seed_offset: int = 0) -> Workload:
        """The seeded workload the options ask for (``--num-requests`` unless given, ``--seed``
        plus ``seed_offset``, the longest budget) in this model's vocabulary."""
        n = args.num_requests if num_requests is None else num_requests
        vocab = self.model.config.vocab_size
        return make_workload(n, vocab, args.max_budget, args.seed + seed_offset)

    def environment(self) -> dict:
        """The machine, threads and versions the runs were taken with, and the model."""
        versions = {"transformers": transformers.__version__, "model": str(self.path)}
        return environment(torch.get_num_threads(), torch.device("cpu")) | versions

    @cached_property
    def probe(self) -> EngineSnapshot:
        """A 1 MiB engine's snapshot: the page size, page bytes and attention backend every
        engine of this model gets."""
        return self.engine("baton", 1, kv_memory="1MiB").snapshot

    def engine(self, policy: str, batch_size: int, pages: int | None = None, **options) -> Engine:
        """Our engine in float32 with the shared KV and prefill budgets, or exactly ``pages``
        device pages; ``options``: other ``EngineConfig`` fields."""
        if pages is not None:
            options["kv_memory"] = str(pages * self.probe.stats.page_bytes)
        fields = {"kv_memory": KV_MEMORY, "max_prefill_tokens": MAX_PREFILL_TOKENS} | options
        fields |= {"model": str(self.path), "policy": policy, "dtype": "float32"}
        config = EngineConfig(max_batch_size=batch_size, **fields)
        engine = Engine(config, self.model, self.tokenizer)
        if pages is not None and engine.snapshot.device_pages != pages:
            raise RuntimeError(f"asked for {pages} pages, got {engine.snapshot.device_pages}")
        return engine


@dataclass
class RunResult(Timed):
    """One system's run of a whole workload at t=0."""

    system: str
    batch_size: int
    repeat: int
    ttft_median_s: float | None = None
    exact_budgets: bool = False
    """Every request produced at least its budget (ours and hf-cb: exactly)."""
    extra: dict = field(default_factory=dict)

    def record(self, clock: Clock, produced: list, budgets: list, ttfts: list, exact: bool) -> None:
        """Useful tokens: each request's output up to its own budget, never more."""
        clock.fill(self, sum(min(p, b) for p, b in zip(produced, budgets, strict=True)))
        self.exact_budgets = exact
        self.ttft_median_s = median(ttfts)


class Arrival(NamedTuple):
    step: int
    """Submitted just before the engine's iteration with this number (0 = at once)."""
    request_id: str
    prompt: list[int]
    budget: int
    priority: int = 0


def burst(workload: Workload) -> list[Arrival]:
    """Every request at t=0, one priority."""
    pairs = zip(workload.prompts, workload.budgets, strict=True)
    return [Arrival(0, str(i), p, b) for i, (p, b) in enumerate(pairs)]


CLASSES = ("high", "low")
"""Priority classes of ``steady`` arrivals: priority 0 and 1, ids starting ``h`` and ``l``."""


def by_class(outs: list[RequestOutput]) -> dict[str, list[RequestOutput]]:
    return {cls: [o for o in outs if o.request_id[0] == cls[0]] for cls in CLASSES}


def steady(
    workload: Workload, gap: float, high_share: float, seed: int, one_class: bool
) -> list[Arrival]:
    """Request i arrives before iteration floor(i x gap); a seeded ``high_share`` of them are
    high priority (0), the rest low (1). Under ``one_class`` the engine sees every request at
    priority 1, but the ids keep the class (``h3``, ``l4``) so the same requests can be
    compared."""
    n = len(workload.prompts)
    high = set(np.random.default_rng(seed).permutation(n)[: round(high_share * n)].tolist())
    arrivals = []
    for i, (prompt, budget) in enumerate(zip(workload.prompts, workload.budgets, strict=True)):
        rid = f"{'h' if i in high else 'l'}{i}"
        priority = 0 if i in high and not one_class else 1
        arrivals.append(Arrival(math.floor(i * gap), rid, prompt, budget, priority))
    return arrivals


@dataclass
class EngineRun:
    outputs: dict[str, RequestOutput]
    """Each finished request's final output."""
    queue: list[int]
    """Requests queued (waiting or swapped) before every iteration."""
    clock: Clock
    counters: dict
    """``engine_counters`` after the run, and the prompt tokens computed twice (by recompute)."""

    def exact(self, arrivals: list[Arrival]) -> list[RequestOutput]:
        """Outputs of the requests that finished ("length") with exactly their budget."""
        found = []
        for a in arrivals:
            out = self.outputs.get(a.request_id)
            done = out.outputs[0] if out else None
            if done and done.finish_reason == "length" and len(done.token_ids) == a.budget:
                found.append(out)
        return found


def latencies(outs: list[RequestOutput]) -> dict:
    """p50/p99 time to first token and end-to-end latency (arrival to last token), seconds."""
    ttft = [o.metrics.time_to_first_token for o in outs]
    e2e = [o.metrics.finished_time - o.metrics.arrival_time for o in outs]
    found = {"n": len(outs)}
    for name, values in (("ttft", ttft), ("e2e", e2e)):
        found |= {f"{name}_p{q}_s": percentile(values, q) for q in (50, 99)}
    return found


def engine_counters(snapshot: EngineSnapshot) -> dict:
    """The engine's counters after a run (all of ``EngineStats`` and its derived figures: slot
    efficiency, batch occupancy, preemptions by kind, MiB swapped) and its pool sizes."""
    s = snapshot.stats
    derived = {"recompute_preemptions": s.recompute_preemptions, "iterations": s.iterations}
    derived |= {"swapped_out_mib": round(s.swapped_out_bytes / 2**20, 1)}
    derived |= {"slot_efficiency": round(s.slot_efficiency, 4)}
    derived |= {"mean_batch_size": round(s.mean_batch_size, 2)}
    pools = {"device_pages": snapshot.device_pages, "host_pages": snapshot.host_pages}
    return pools | asdict(s) | derived


class ForwardClock:
    """Seconds inside ``runner.execute`` (the forward and its input preparation), split into
    decode-only forwards and those with prompt tokens: what the run spent in the model, so the
    rest of its wall time is the engine's own host work (on the CPU the forward is synchronous)."""

    def __init__(self, engine: Engine):
        self.seconds = {"decode": 0.0, "prefill": 0.0}
        self.forwards = {"decode": 0, "prefill": 0}
        inner = engine.runner.execute

        def timed(forward, *args, **kwargs):
            kind = "decode" if all(row.decode for row in forward.rows) else "prefill"
            start = time.perf_counter()
            try:
                return inner(forward, *args, **kwargs)
            finally:
                self.seconds[kind] += time.perf_counter() - start
                self.forwards[kind] += 1

        engine.runner.execute = timed

    def counters(self, wall_s: float) -> dict:
        total = sum(self.seconds.values())
        found = {f"{kind}_forward_s": round(s, 3) for kind, s in self.seconds.items()}
        found |= {f"{kind}_forwards": n for kind, n in self.forwards.items()}
        return found | {"forward_share": round(total / wall_s, 4)}


def drive(engine: Engine, arrivals: list[Arrival]) -> EngineRun:
    """Submit each request before its iteration and step until all have finished."""
    outputs: dict[str, RequestOutput] = {}
    forwards = ForwardClock(engine)
    queue: list[int] = []
    pending = deque(arrivals)
    max_steps = MAX_STEPS_PER_TOKEN * sum(a.budget + 1 for a in arrivals)
    step = 0
    with Clock() as clock:
        while pending or engine.has_unfinished_requests():
            if not engine.has_unfinished_requests():
                step = max(step, pending[0].step)  # idle engine: the next arrival comes now
            while pending and pending[0].step <= step:
                a = pending.popleft()
                params = SamplingParams(temperature=0, max_tokens=a.budget, ignore_eos=True)
                prompt = {"prompt_token_ids": a.prompt}
                engine.add_request(prompt, params, request_id=a.request_id, priority=a.priority)
            queue.append(engine.snapshot.num_queued)
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
            step += 1
            if engine.snapshot.stats.iterations > max_steps:
                raise RuntimeError(f"no end after {max_steps} iterations: stuck?")
    recomputed = engine.snapshot.stats.prompt_tokens - sum(len(a.prompt) for a in arrivals)
    counters = engine_counters(engine.snapshot) | {"recomputed_tokens": recomputed}
    counters |= forwards.counters(clock.wall)
    return EngineRun(outputs, queue, clock, counters)


def run_engine(engine: Engine, workload: Workload, result: RunResult) -> None:
    """Every request at t=0, stepped until all have finished; the engine's counters go to
    ``result.extra``."""
    run = drive(engine, burst(workload))
    outs = [run.outputs[str(i)] for i in range(len(workload.budgets))]
    produced = [len(out.outputs[0].token_ids) for out in outs]
    ttfts = [out.metrics.time_to_first_token for out in outs]
    result.record(run.clock, produced, workload.budgets, ttfts, produced == workload.budgets)
    snapshot = engine.snapshot
    result.extra = run.counters | {"attention_backend": snapshot.attention_backend}
    result.extra["page_size"] = snapshot.page_size
