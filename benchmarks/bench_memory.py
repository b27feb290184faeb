"""Memory benchmark: throughput and latency under a tight KV page budget, swap vs recompute, and
time to first token per priority class under saturating load.

    python benchmarks/bench_memory.py [--quick] [--repeats 3] [--batch-size 16]
        [--num-requests 96] [--fractions 0.25,0.5,1] [--modes swap,recompute]
        [--priority-requests 128] [--priority-fraction 0.5] [--overload 1.5] [--threads 2]

Our engine only (policy baton, greedy, ``ignore_eos=True``) on the small random-weight Llama in
float32 on fixed torch threads. The workload is ``bench_policies``'s (seeded random prompts of
16-256 tokens, lognormal budgets of mean 100 clipped to [4, 512]), so the useful tokens are the
sum of the budgets for every system.

Page-budget sweep. All requests arrive at t=0. The workload's need is the peak device pages an
unconstrained run holds (``EngineStats.peak_pages_in_use``, sampled after every iteration; the
schedule is deterministic, so one run measures it). Each system then runs with ``fraction x need``
pages (never fewer than the largest single request needs, which the engine would reject) under
``preemption_mode`` swap or recompute, next to the unconstrained run (a pool twice what a full
batch of the largest requests could hold, so nothing is ever preempted). Per run: useful tokens/s,
p50/p99 end-to-end latency (arrival to last token) and time to first token, and the requests that
did not finish with exactly their budget ("lost").

Priority experiment. Requests of a second seeded workload arrive at fixed iteration counts, at
``overload`` x the request rate the unconstrained run sustained (requests per iteration), so the
queue grows for as long as arrivals last; a seeded 20% are high priority (0), the rest low (1).
The page budget is ``priority_fraction`` x need, preemption by swap. The same arrivals also run
with every request at one priority ("fcfs"), to show what the classes would get without priority.

Runs are interleaved (each repeat runs every system once, the order rotated between repeats) and
record wall time, CPU time / wall and the 1-minute load average. Targets: at 25% of the need no
request lost and throughput >= 0.5x unconstrained (each mode); under saturation high-priority
p50 TTFT <= 0.25x low-priority p50. Results go to ``results/memory-cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import transformers
from bench_policies import BUDGET_CLIP, Clock, Workload, load_hf, make_workload
from common import RESULTS, environment, setup_threads, write_json
from transformers import AutoTokenizer

from baton_paged.allocator import pages_needed
from baton_paged.config import PREEMPTION_MODES, EngineConfig
from baton_paged.engine import Engine
from baton_paged.model_builder import cached_model
from baton_paged.outputs import RequestOutput
from baton_paged.sampling_params import SamplingParams

UNCONSTRAINED = "unconstrained"
PRIORITY, FCFS = "priority", "fcfs"
HIGH, LOW = 0, 1
HIGH_SHARE = 0.2
FRACTIONS = (0.25, 0.5, 1.0)
POLICY = "baton"
MAX_STEPS_PER_TOKEN = 20
"""A run taking more iterations than this x (tokens + requests) is reported as stuck."""
TARGET_FRACTION = 0.25
TARGET_THROUGHPUT_RATIO = 0.5
TARGET_TTFT_RATIO = 0.25
DISTURBED_SHARE = 0.9
"""A run whose CPU time / wall is under this share of the torch threads is flagged: on 2 cores, a
second busy process slows OpenMP-parallel forwards far more than 2x."""


class Arrival(NamedTuple):
    step: int
    """Submitted just before the engine's iteration with this number (0 = at once)."""
    request_id: str
    prompt: list[int]
    budget: int
    priority: int


@dataclass(frozen=True)
class System:
    name: str
    kind: str
    """Which experiment: "sweep", "priority" or "fcfs"."""
    mode: str
    fraction: float | None
    """Share of the need the page budget was asked to be; None = unconstrained."""
    pages: int
    floored: bool = False
    """The fraction asked for fewer pages than the largest request needs; raised to that."""


@dataclass
class MemoryRun:
    system: str
    repeat: int
    wall_s: float = float("nan")
    useful_tokens: int = 0
    tokens_per_s: float = float("nan")
    cpu_per_wall: float = float("nan")
    loadavg_1m: tuple[float, float] = (float("nan"), float("nan"))
    """1-minute load average before and after the run."""
    exact: int = 0
    """Requests that finished ("length") with exactly their budget."""
    lost: int = 0
    latency: dict = field(default_factory=dict)
    classes: dict = field(default_factory=dict)
    """Priority runs: latency per class ("high", "low")."""
    queue: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    per_request: dict = field(default_factory=dict)
    """Priority runs: each request's class and TTFT (for the box plot)."""
    disturbed: bool = False
    """CPU time / wall fell below DISTURBED_SHARE x threads: something else took the cores."""
    error: str | None = None


# Workloads -------------------------------------------------------------------------------------


def burst(workload: Workload) -> list[Arrival]:
    """Every request at t=0, one priority: the page-budget sweep."""
    return [
        Arrival(0, str(i), p, b, HIGH)
        for i, (p, b) in enumerate(zip(workload.prompts, workload.budgets, strict=True))
    ]


def stream(workload: Workload, gap: float, seed: int, fcfs: bool) -> list[Arrival]:
    """Request i arrives before iteration floor(i x gap); a seeded HIGH_SHARE of them are high
    priority. Under ``fcfs`` the engine sees one priority, but the ids keep the class (``h``/``l``)
    so the same requests can be compared."""
    n = len(workload.prompts)
    rng = np.random.default_rng(seed)
    high = set(rng.permutation(n)[: round(HIGH_SHARE * n)].tolist())
    arrivals = []
    for i, (prompt, budget) in enumerate(zip(workload.prompts, workload.budgets, strict=True)):
        cls = HIGH if i in high else LOW
        rid = f"{'h' if cls == HIGH else 'l'}{i}"
        arrivals.append(Arrival(math.floor(i * gap), rid, prompt, budget, LOW if fcfs else cls))
    return arrivals


def largest_request_pages(workload: Workload, page_size: int) -> int:
    return max(
        pages_needed(len(p) + b, page_size)
        for p, b in zip(workload.prompts, workload.budgets, strict=True)
    )


# Running ---------------------------------------------------------------------------------------


class Bench:
    """The model, tokenizer and page geometry shared by every engine this benchmark builds."""

    def __init__(self, path: Path, batch_size: int):
        self.path = path
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = load_hf(path)
        probe = self.engine("recompute", pages=None)
        self.page_size = probe.scheduler.page_size
        self.page_bytes = probe.cache.spec.bytes_per_page
        self.backend = probe.runner.backend.name
        self.threads = torch.get_num_threads()

    def engine(self, mode: str, pages: int | None) -> Engine:
        """An engine with exactly ``pages`` device pages (None: a 1 MiB probe)."""
        kv_memory = "1MiB" if pages is None else str(pages * self.page_bytes)
        config = EngineConfig(
            model=str(self.path),
            policy=POLICY,
            dtype="float32",
            max_batch_size=self.batch_size,
            kv_memory=kv_memory,
            preemption_mode=mode,
        )
        engine = Engine(config, self.model, self.tokenizer)
        if pages is not None and engine.cache.num_pages != pages:
            raise RuntimeError(f"asked for {pages} pages, got {engine.cache.num_pages}")
        return engine

    def run(self, system: System, arrivals: list[Arrival], repeat: int) -> MemoryRun:
        """One run; an exception is recorded, never replaced by a made-up number."""
        result = MemoryRun(system.name, repeat)
        try:
            engine = self.engine(system.mode, system.pages)
            finished, queue, clock = drive(engine, arrivals)
            fill(result, clock, arrivals, finished, queue, engine, system.kind)
            result.disturbed = result.cpu_per_wall < DISTURBED_SHARE * self.threads
            del engine
        except Exception as error:
            result.error = f"{type(error).__name__}: {error}"
        gc.collect()
        return result


def drive(
    engine: Engine, arrivals: list[Arrival]
) -> tuple[dict[str, RequestOutput], list[int], Clock]:
    """Submit each request before its iteration and step until all have finished; return the
    final outputs, the waiting-queue length before every iteration and the clock."""
    finished: dict[str, RequestOutput] = {}
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
            queue.append(len(engine.scheduler.waiting))
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
            step += 1
            if engine.stats.iterations > max_steps:
                raise RuntimeError(f"no end after {max_steps} iterations: stuck?")
    return finished, queue, clock


def fill(
    result: MemoryRun,
    clock: Clock,
    arrivals: list[Arrival],
    finished: dict[str, RequestOutput],
    queue: list[int],
    engine: Engine,
    kind: str,
) -> None:
    """Count exact and lost requests, and take latencies, queue lengths and engine counters."""
    exact = [a for a in arrivals if is_exact(finished.get(a.request_id), a.budget)]
    result.exact = len(exact)
    result.lost = len(arrivals) - len(exact)
    clock.fill(result, sum(a.budget for a in exact))  # useful: only exactly finished ones
    outs = [finished[a.request_id] for a in exact]
    result.latency = latencies(outs)
    result.queue = {"max": max(queue), "mean": round(statistics.mean(queue), 2)}
    result.stats = engine_stats(engine, sum(len(a.prompt) for a in arrivals))
    if kind != "sweep":
        by_class = {"high": [o for o in outs if o.request_id[0] == "h"]}
        by_class["low"] = [o for o in outs if o.request_id[0] == "l"]
        result.classes = {name: latencies(group) for name, group in by_class.items()}
        result.per_request = {
            "class": [o.request_id[0] for o in outs],
            "ttft_s": [round(o.metrics.time_to_first_token, 4) for o in outs],
        }


def is_exact(out: RequestOutput | None, budget: int) -> bool:
    return (
        out is not None
        and out.outputs[0].finish_reason == "length"
        and len(out.outputs[0].token_ids) == budget
    )


def latencies(outs: list[RequestOutput]) -> dict:
    """p50/p99 time to first token and end-to-end latency (arrival to last token), seconds."""
    ttft = [o.metrics.time_to_first_token for o in outs]
    e2e = [o.metrics.finished_time - o.metrics.arrival_time for o in outs]
    return {
        "n": len(outs),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p99_s": percentile(e2e, 99),
    }


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def engine_stats(engine: Engine, prompt_tokens: int) -> dict:
    """The counters that say what memory pressure cost: preemptions by kind, bytes swapped,
    tokens computed twice (recompute), and how full the pool and batch ran."""
    s = engine.stats
    return {
        "device_pages": engine.cache.num_pages,
        "host_pages": engine.host.num_pages if engine.host else 0,
        "peak_pages_in_use": s.peak_pages_in_use,
        "preemptions": s.preemptions,
        "swap_preemptions": s.swap_preemptions,
        "recompute_preemptions": s.recompute_preemptions,
        "pages_swapped_out": s.pages_swapped_out,
        "pages_swapped_in": s.pages_swapped_in,
        "swapped_out_mib": round(s.swapped_out_bytes / 2**20, 1),
        "recomputed_tokens": s.prompt_tokens - prompt_tokens,
        "high_watermark_crossings": s.high_watermark_crossings,
        "low_watermark_crossings": s.low_watermark_crossings,
        "slot_efficiency": round(s.slot_efficiency, 4),
        "mean_batch_size": round(s.mean_batch_size, 2),
        "iterations": s.iterations,
    }


# Plan ------------------------------------------------------------------------------------------


def measure_need(bench: Bench, workload: Workload, pages: int) -> dict:
    """One unconstrained run (it also warms the model up): its peak pages are the need, its
    requests per iteration the capacity the priority arrivals overload."""
    system = System(UNCONSTRAINED, "sweep", "recompute", None, pages)
    run = bench.run(system, burst(workload), repeat=-1)
    if run.error or run.lost or run.stats["preemptions"]:
        raise RuntimeError(f"the unconstrained run failed: {run.error or run.stats}")
    return {
        "pages": run.stats["peak_pages_in_use"],
        "iterations": run.stats["iterations"],
        "requests_per_iteration": round(len(workload.prompts) / run.stats["iterations"], 4),
        "wall_s": round(run.wall_s, 2),
    }


def budget_pages(fraction: float, need: int, largest: int) -> tuple[int, bool]:
    """``fraction`` x need pages, rounded up, but at least the largest request's pages."""
    pages = math.ceil(fraction * need)
    return max(pages, largest), pages < largest


def make_systems(args: argparse.Namespace, need: int, largest: int, free_pages: int) -> list:
    """The sweep ({modes} x {fractions} + unconstrained) and the two priority runs."""
    systems = [System(UNCONSTRAINED, "sweep", "recompute", None, free_pages)]
    for mode in args.modes:
        for f in args.fractions:
            pages, floored = budget_pages(f, need, largest)
            systems.append(System(f"{mode}-{f:g}", "sweep", mode, f, pages, floored))
    pages, floored = budget_pages(args.priority_fraction, need, args.priority_largest)
    f = args.priority_fraction
    systems += [
        System(PRIORITY, PRIORITY, "swap", f, pages, floored),
        System(FCFS, FCFS, "swap", f, pages, floored),
    ]
    return systems


def schedule(systems: list[System], repeats: int) -> list[tuple[int, System]]:
    """(repeat, system): every repeat runs each system once, the order rotated by an even share
    of the list per repeat so each system takes its turn early and late."""
    order = []
    for repeat in range(repeats):
        shift = round(repeat * len(systems) / repeats) % len(systems)
        order += [(repeat, s) for s in systems[shift:] + systems[:shift]]
    return order


# Summary and checks ----------------------------------------------------------------------------


def median_of(runs: list[MemoryRun], get) -> float | None:
    values = [v for v in (get(r) for r in runs) if v is not None]
    return round(statistics.median(values), 4) if values else None


def summarize(runs: list[MemoryRun], systems: list[System], need: int) -> dict:
    """Per system: medians over the runs without error, the most lost requests of any run, and
    the throughput and latency relative to the unconstrained run."""
    out = {}
    for s in systems:
        group = [r for r in runs if r.system == s.name]
        ok = [r for r in group if r.error is None]
        row = {"mode": s.mode, "fraction": s.fraction, "pages": s.pages, "floored": s.floored}
        row |= {"share_of_need": round(s.pages / need, 4), "runs": len(group)}
        row["errors"] = [r.error for r in group if r.error]
        row["disturbed_runs"] = sum(r.disturbed for r in group)
        if ok:
            row["tokens_per_s"] = median_of(ok, lambda r: r.tokens_per_s)
            row["wall_s"] = median_of(ok, lambda r: r.wall_s)
            row["lost"] = max(r.lost for r in ok)
            for key in ok[0].latency:
                row[key] = median_of(ok, lambda r, k=key: r.latency[k])
            for key in ok[0].stats:
                row[key] = median_of(ok, lambda r, k=key: r.stats[k])
            row["queue_max"] = median_of(ok, lambda r: r.queue["max"])
            for cls in ok[0].classes:
                keys = ok[0].classes[cls]
                row[cls] = {k: median_of(ok, lambda r, c=cls, k=k: r.classes[c][k]) for k in keys}
        out[s.name] = row
    base = out[UNCONSTRAINED].get("tokens_per_s")
    for row in out.values():
        if base and row.get("tokens_per_s"):
            row["x_unconstrained"] = round(row["tokens_per_s"] / base, 4)
    return out


def check(name: str, value, target: float | None, op: str = ">=") -> dict:
    if target is None:
        status = "info"
    elif value is None:
        status = "not measured"
    else:
        ok = {">=": value >= target, "<=": value <= target, "==": value == target}[op]
        status = "met" if ok else "NOT met"
    return {"check": name, "value": value, "target": target, "op": op, "status": status}


def checks(summary: dict, args: argparse.Namespace) -> list[dict]:
    """The issue's targets (each mode at 25% of the need; priority under saturation), plus swap
    vs recompute at every budget for information."""
    found = []
    for mode in args.modes:
        row = summary.get(f"{mode}-{TARGET_FRACTION:g}", {})
        lost = None if row.get("errors") else row.get("lost")
        found.append(check(f"{mode} at 25% of need: lost requests", lost, 0, "=="))
        ratio = None if row.get("errors") else row.get("x_unconstrained")
        found.append(
            check(
                f"{mode} at 25% of need: x unconstrained tokens/s", ratio, TARGET_THROUGHPUT_RATIO
            )
        )
    prio = summary.get(PRIORITY, {})
    high, low = prio.get("high", {}).get("ttft_p50_s"), prio.get("low", {}).get("ttft_p50_s")
    ratio = round(high / low, 4) if high is not None and low else None
    found.append(check("priority: high / low p50 TTFT", ratio, TARGET_TTFT_RATIO, "<="))
    if "swap" in args.modes and "recompute" in args.modes:
        for f in args.fractions:
            a = summary.get(f"swap-{f:g}", {}).get("tokens_per_s")
            b = summary.get(f"recompute-{f:g}", {}).get("tokens_per_s")
            value = round(a / b, 4) if a and b else None
            found.append(check(f"swap / recompute tokens/s at {f:g} of need", value, None))
    return found


# Output ----------------------------------------------------------------------------------------


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def sweep_table(summary: dict, systems: list[System]) -> list[str]:
    lines = [
        "| system | pages (x need) | tok/s | x unconstr. | lost | e2e p50 / p99 s "
        "| TTFT p50 / p99 s | preempt. swap / recomp. | swapped MiB | recomputed tok |",
        "|---" * 10 + "|",
    ]
    for s in (s for s in systems if s.kind == "sweep"):
        r = summary[s.name]
        if "tokens_per_s" not in r:
            lines.append(f"| {s.name} | {s.pages} | error: {r['errors'][0]} |")
            continue
        floor = " (floored)" if s.floored else ""
        lines.append(
            f"| {s.name} | {s.pages} ({r['share_of_need']:.2f}){floor} | {r['tokens_per_s']:.0f} "
            f"| {fmt(r.get('x_unconstrained'))} | {r['lost']} "
            f"| {fmt(r['e2e_p50_s'])} / {fmt(r['e2e_p99_s'])} "
            f"| {fmt(r['ttft_p50_s'])} / {fmt(r['ttft_p99_s'])} "
            f"| {r['swap_preemptions']:.0f} / {r['recompute_preemptions']:.0f} "
            f"| {r['swapped_out_mib']:.0f} | {r['recomputed_tokens']:.0f} |"
        )
    return lines


def priority_table(summary: dict) -> list[str]:
    lines = [
        "| run | class | n | TTFT p50 s | TTFT p99 s | e2e p50 s | e2e p99 s |",
        "|---" * 7 + "|",
    ]
    for name in (PRIORITY, FCFS):
        r = summary.get(name, {})
        for cls in ("high", "low"):
            c = r.get(cls)
            if c is None:
                lines.append(f"| {name} | {cls} | error | | | | |")
                continue
            lines.append(
                f"| {name} | {cls} | {c['n']:.0f} | {fmt(c['ttft_p50_s'], '.3f')} "
                f"| {fmt(c['ttft_p99_s'], '.3f')} | {fmt(c['e2e_p50_s'])} | {fmt(c['e2e_p99_s'])} |"
            )
    return lines


def markdown(payload: dict, systems: list[System]) -> str:
    summary, need = payload["summary"], payload["need"]
    prio = payload["priority_setup"]
    lines = [
        f"Page-budget sweep: {payload['workload']['num_requests']} requests at t=0, max batch "
        f"{payload['args']['batch_size']}, need = {need['pages']} pages of "
        f"{payload['page']['bytes'] // 1024} KiB (peak of the unconstrained run); medians over "
        f"{payload['args']['repeats']} repeats.",
        "",
        *sweep_table(summary, systems),
        "",
        f"Priority under saturation: {prio['num_requests']} requests, {HIGH_SHARE:.0%} high, "
        f"one every {prio['gap_iterations']:.2f} iterations ({prio['overload']:g}x the "
        f"unconstrained rate), {summary[PRIORITY]['pages']} pages "
        f"({prio['fraction']:g} of need), swap.",
        "",
        *priority_table(summary),
        "",
    ]
    for name in (PRIORITY, FCFS):
        r = summary[name]
        if "queue_max" in r:
            lines.append(
                f"{name}: waiting queue up to {r['queue_max']:.0f}, {r['preemptions']:.0f} "
                f"preemptions ({r['swap_preemptions']:.0f} swapped), {r['tokens_per_s']:.0f} tok/s."
            )
    disturbed = [f"{r['system']} rep {r['repeat']}" for r in payload["runs"] if r["disturbed"]]
    if disturbed:
        lines.append(
            f"Disturbed runs (CPU / wall < {DISTURBED_SHARE:g} x threads, another process took "
            f"the cores): {', '.join(disturbed)}."
        )
    return "\n".join(lines) + "\n"


def plot(payload: dict, runs: list[MemoryRun], path: Path) -> None:
    """Throughput and p99 latency against the page budget, and TTFT per priority class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, args = payload["summary"], payload["args"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    base = summary[UNCONSTRAINED]
    for mode, marker, color in zip(args["modes"], "os", ("C0", "C1"), strict=False):
        rows = [summary[f"{mode}-{f:g}"] for f in args["fractions"]]
        rows = [r for r in rows if "tokens_per_s" in r]
        x = [100 * r["share_of_need"] for r in rows]
        axes[0].plot(x, [r["tokens_per_s"] for r in rows], marker=marker, color=color, label=mode)
        axes[1].plot(
            x, [r["e2e_p99_s"] for r in rows], marker=marker, color=color, label=f"{mode} p99"
        )
        p50 = [r["e2e_p50_s"] for r in rows]
        axes[1].plot(x, p50, marker=marker, color=color, ls=":", label=f"{mode} p50")
    if "tokens_per_s" in base:
        axes[0].axhline(base["tokens_per_s"], color="k", ls="--", label=UNCONSTRAINED)
        target = TARGET_THROUGHPUT_RATIO * base["tokens_per_s"]
        axes[0].axhline(target, color="r", ls=":", label=f"target {TARGET_THROUGHPUT_RATIO:g}x")
        axes[1].axhline(base["e2e_p99_s"], color="k", ls="--", label=f"{UNCONSTRAINED} p99")
    axes[0].set(xlabel="device pages, % of need", ylabel="useful tokens/s", ylim=(0, None))
    axes[1].set(xlabel="device pages, % of need", ylabel="latency, s", ylim=(0, None))
    axes[0].set_title("throughput vs page budget", fontsize=10)
    axes[1].set_title("end-to-end latency vs page budget", fontsize=10)
    ttft_boxes(axes[2], runs)
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    env = payload["environment"]
    fig.suptitle(
        f"Small Llama, float32, CPU, {env['threads']} threads, max batch {args['batch_size']}, "
        f"policy {POLICY}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ttft_boxes(ax, runs: list[MemoryRun]) -> None:
    """Every request's TTFT over all repeats, per (run, class), log scale."""
    data, labels = [], []
    for name in (PRIORITY, FCFS):
        for cls, tag in (("high", "h"), ("low", "l")):
            values = [
                t
                for r in runs
                if r.system == name and r.error is None
                for c, t in zip(r.per_request["class"], r.per_request["ttft_s"], strict=True)
                if c == tag
            ]
            if values:
                data.append(values)
                labels.append(f"{name}\n{cls}")
    if data:
        ax.boxplot(data, tick_labels=labels, whis=(1, 99), showfliers=False)
        ax.set_yscale("log")
    ax.set(ylabel="time to first token, s")
    ax.set_title("TTFT per class under saturation (whiskers p1-p99)", fontsize=10)


def print_report(payload: dict) -> None:
    print()
    print(payload["table_markdown"])
    print("checks:")
    for c in payload["checks"]:
        target = f" (target {c['op']} {c['target']})" if c["target"] is not None else ""
        print(f"  [{c['status']}] {c['check']}: {c['value']}{target}")
    for r in payload["runs"]:
        if r["error"] or r["lost"]:
            print(f"  problem: {r['system']} rep {r['repeat']}: {r['error'] or r['lost']} lost")
        if r["disturbed"]:
            print(f"  disturbed: {r['system']} rep {r['repeat']}: cpu/wall {r['cpu_per_wall']:.2f}")


# Main ------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="24+32 requests, B 8, budgets <= 64")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (quick: 8)")
    parser.add_argument("--num-requests", type=int, default=None, help="default 96 (quick: 24)")
    parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS))
    parser.add_argument("--modes", default=",".join(PREEMPTION_MODES))
    parser.add_argument("--priority-requests", type=int, default=None, help="128 (quick: 32)")
    parser.add_argument("--priority-fraction", type=float, default=0.5)
    parser.add_argument("--overload", type=float, default=1.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file stem (default memory-cpu)")
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.batch_size = args.batch_size or (8 if args.quick else 16)
    args.num_requests = args.num_requests or (24 if args.quick else 96)
    args.priority_requests = args.priority_requests or (32 if args.quick else 128)
    args.max_budget = 64 if args.quick else BUDGET_CLIP[1]
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.modes = args.modes.split(",")
    if set(args.modes) - set(PREEMPTION_MODES) or TARGET_FRACTION not in args.fractions:
        parser.error(f"modes from {PREEMPTION_MODES}; fractions must include {TARGET_FRACTION}")
    args.name = args.name or ("memory-cpu-quick" if args.quick else "memory-cpu")
    return args


def main() -> None:
    args = parse_args()
    threads = setup_threads(args.threads)
    transformers.logging.set_verbosity_error()
    path = cached_model("llama", "small")
    started = time.perf_counter()
    bench = Bench(path, args.batch_size)
    vocab = bench.model.config.vocab_size
    workload = make_workload(args.num_requests, vocab, args.max_budget, args.seed)
    prio_workload = make_workload(args.priority_requests, vocab, args.max_budget, args.seed + 1)
    largest = largest_request_pages(workload, bench.page_size)
    args.priority_largest = largest_request_pages(prio_workload, bench.page_size)
    free_pages = 2 * args.batch_size * max(largest, args.priority_largest)
    need = measure_need(bench, workload, free_pages)
    print(f"workload: {workload.describe(args.max_budget)}")
    print(f"need: {need}; largest request {largest} pages; page {bench.page_bytes} B", flush=True)

    gap = 1 / (args.overload * need["requests_per_iteration"])
    arrivals = {
        "sweep": burst(workload),
        PRIORITY: stream(prio_workload, gap, args.seed + 2, fcfs=False),
        FCFS: stream(prio_workload, gap, args.seed + 2, fcfs=True),
    }
    systems = make_systems(args, need["pages"], largest, free_pages)
    runs = []
    for repeat, system in schedule(systems, args.repeats):
        result = bench.run(system, arrivals[system.kind], repeat)
        runs.append(result)
        note = result.error or (
            f"{result.tokens_per_s:7.1f} tok/s {result.wall_s:6.2f} s lost {result.lost} "
            f"cpu/wall {result.cpu_per_wall:.2f} load {result.loadavg_1m} {result.latency} "
            f"{result.classes or ''} {result.stats}"
        )
        print(f"[rep {repeat}] {system.name:>14} pages {system.pages:<5} {note}", flush=True)

    summary = summarize(runs, systems, need["pages"])
    payload = {
        "environment": environment(threads, torch.device("cpu"))
        | {
            "interop_threads": torch.get_num_interop_threads(),
            "transformers": transformers.__version__,
            "model": str(path),
        },
        "args": vars(args),
        "workload": workload.describe(args.max_budget),
        "page": {"size_tokens": bench.page_size, "bytes": bench.page_bytes},
        "attention_backend": bench.backend,
        "policy": POLICY,
        "need": need | {"largest_request_pages": largest, "unconstrained_pages": free_pages},
        "priority_setup": {
            "num_requests": args.priority_requests,
            "high_share": HIGH_SHARE,
            "overload": args.overload,
            "gap_iterations": round(gap, 4),
            "fraction": args.priority_fraction,
            "largest_request_pages": args.priority_largest,
            "workload": prio_workload.describe(args.max_budget),
        },
        "systems": [asdict(s) for s in systems],
        "total_seconds": round(time.perf_counter() - started, 1),
        "summary": summary,
        "checks": checks(summary, args),
        "runs": [asdict(r) for r in runs],
    }
    payload["table_markdown"] = markdown(payload, systems)
    path_json = write_json(args.name, payload)
    (RESULTS / f"{args.name}.md").write_text(payload["table_markdown"])
    plot(payload, runs, RESULTS / f"{args.name}.png")
    print_report(payload)
    print(f"\nwrote {path_json} (+ .md, .png) in {payload['total_seconds']} s")


if __name__ == "__main__":
    main()
