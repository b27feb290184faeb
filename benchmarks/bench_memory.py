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

import math
import statistics
from dataclasses import asdict, dataclass, field
from functools import partial

import harness
import torch
import workload
from harness import Default, Timed, check, markdown, median, medians, ratio
from workload import CLASSES

from baton_paged.config import PREEMPTION_MODES

UNCONSTRAINED = "unconstrained"
PRIORITY, FCFS = "priority", "fcfs"
HIGH_SHARE = 0.2
FRACTIONS = (0.25, 0.5, 1.0)
POLICY = "baton"
TARGET_FRACTION = 0.25
TARGET_THROUGHPUT_RATIO = 0.5
TARGET_TTFT_RATIO = 0.25
DISTURBED_SHARE = 0.9
"""A run whose CPU time / wall is under this share of the torch threads is flagged: on 2 cores, a
second busy process slows OpenMP-parallel forwards far more than 2x."""


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
class MemoryRun(Timed):
    system: str
    repeat: int
    exact: int = 0
    """Requests that finished ("length") with exactly their budget."""
    lost: int = 0
    latency: dict = field(default_factory=dict)
    classes: dict = field(default_factory=dict)
    """Priority runs: latency per class ("high", "low")."""
    queue: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    per_request: dict = field(default_factory=dict)
    """Priority runs: each request's class and TTFT."""
    disturbed: bool = False
    """CPU time / wall fell below DISTURBED_SHARE x threads: something else took the cores."""

    def fill(self, run: workload.EngineRun, arrivals: list[workload.Arrival]) -> None:
        """Count exact and lost requests; take latencies, queue lengths and engine counters."""
        outs = run.exact(arrivals)
        self.exact, self.lost = len(outs), len(arrivals) - len(outs)
        run.clock.fill(self, sum(len(o.outputs[0].token_ids) for o in outs))  # exact ones only
        self.latency, self.stats = workload.latencies(outs), run.counters
        self.queue = {"max": max(run.queue), "mean": round(statistics.mean(run.queue), 2)}
        if self.system in (PRIORITY, FCFS):
            classes = workload.by_class(outs).items()
            self.classes = {cls: workload.latencies(group) for cls, group in classes}
            ttfts = [round(o.metrics.time_to_first_token, 4) for o in outs]
            self.per_request = {"class": [o.request_id[0] for o in outs], "ttft_s": ttfts}


def run_system(ours: workload.OurModel, batch: int, system: System, arrivals, repeat) -> MemoryRun:
    """One run on an engine with the system's exact page budget."""
    result = MemoryRun(system.name, repeat)

    def run() -> None:
        engine = ours.engine(POLICY, batch, pages=system.pages, preemption_mode=system.mode)
        result.fill(workload.drive(engine, arrivals), arrivals)
        result.disturbed = result.cpu_per_wall < DISTURBED_SHARE * torch.get_num_threads()

    return harness.recorded(result, run)


def measure_need(ours: workload.OurModel, batch: int, sweep: workload.Workload, pages: int) -> dict:
    """One unconstrained run (it also warms the model up): its peak pages are the need, its
    requests per iteration the capacity the priority arrivals overload."""
    system = System(UNCONSTRAINED, "sweep", "recompute", None, pages)
    run = run_system(ours, batch, system, workload.burst(sweep), repeat=-1)
    if run.error or run.lost or run.stats["preemptions"]:
        raise RuntimeError(f"the unconstrained run failed: {run.error or run.stats}")
    need = {"pages": run.stats["peak_pages_in_use"], "iterations": run.stats["iterations"]}
    need["requests_per_iteration"] = round(len(sweep.prompts) / run.stats["iterations"], 4)
    return need | {"wall_s": round(run.wall_s, 2)}


def make_systems(args, need: int, largest: int, free_pages: int) -> list[System]:
    """The sweep ({modes} x {fractions} + unconstrained) and the two priority runs; a budget is
    ``fraction`` x need pages, rounded up, but at least the largest request's pages."""

    def system(name: str, kind: str, mode: str, fraction: float, largest: int) -> System:
        pages = math.ceil(fraction * need)
        return System(name, kind, mode, fraction, max(pages, largest), pages < largest)

    systems = [System(UNCONSTRAINED, "sweep", "recompute", None, free_pages)]
    for mode in args.modes:
        systems += [system(f"{mode}-{f:g}", "sweep", mode, f, largest) for f in args.fractions]
    f = args.priority_fraction
    return systems + [system(k, k, "swap", f, args.priority_largest) for k in (PRIORITY, FCFS)]


def summarize(runs: list[MemoryRun], systems: list[System], need: int) -> dict:
    """Per system: medians over the runs without error, the most lost requests of any run, and
    the throughput relative to the unconstrained run."""
    out = {s.name: summary_row(s, [r for r in runs if r.system == s.name], need) for s in systems}
    base = out[UNCONSTRAINED].get("tokens_per_s")
    for row in out.values():
        if base and row.get("tokens_per_s"):
            row["x_unconstrained"] = ratio(row["tokens_per_s"], base, 4)
    return out


def summary_row(s: System, group: list[MemoryRun], need: int) -> dict:
    counts, ok = harness.outcome(group)
    row = {"mode": s.mode, "fraction": s.fraction, "pages": s.pages, "floored": s.floored}
    row |= {"share_of_need": round(s.pages / need, 4)} | counts
    row["disturbed_runs"] = sum(r.disturbed for r in group)
    if not ok:
        return row
    row |= medians([vars(r) for r in ok], 4, ("tokens_per_s", "wall_s"))
    row["lost"] = max(r.lost for r in ok)
    row |= medians([r.latency for r in ok], 4) | medians([r.stats for r in ok], 4)
    row["queue_max"] = median((r.queue["max"] for r in ok), 4)
    row |= {cls: medians([r.classes[cls] for r in ok], 4) for cls in ok[0].classes}
    return row


def checks(summary: dict, args) -> list[dict]:
    """The targets (each mode at 25% of the need; priority under saturation), plus swap
    vs recompute at every budget for information."""
    found = []
    for mode in args.modes:
        row, name = summary[f"{mode}-{TARGET_FRACTION:g}"], f"{mode} at 25% of need"
        lost, x = (None, None) if row["errors"] else (row.get("lost"), row.get("x_unconstrained"))
        found.append(check(f"{name}: lost requests", lost, 0, "=="))
        found.append(check(f"{name}: x unconstrained tokens/s", x, TARGET_THROUGHPUT_RATIO))
    high, low = (summary[PRIORITY].get(c, {}).get("ttft_p50_s") for c in CLASSES)
    ttft = ratio(high, low, 4)
    found.append(check("priority: high / low p50 TTFT", ttft, TARGET_TTFT_RATIO, "<="))
    for f in args.fractions if {"swap", "recompute"} <= set(args.modes) else ():
        swap, recompute = (summary[f"{m}-{f:g}"].get("tokens_per_s") for m in ("swap", "recompute"))
        x = ratio(swap, recompute, 4)
        found.append(check(f"swap / recompute tokens/s at {f:g} of need", x, None))
    return found


def problems(runs: list[MemoryRun]):
    for r in runs:
        if r.error or r.lost:
            yield f"problem: {r.system} rep {r.repeat}: {r.error or r.lost} lost"
        if r.disturbed:
            yield f"disturbed: {r.system} rep {r.repeat}: cpu/wall {r.cpu_per_wall:.2f}"


SHOWN = ("pages", "share_of_need", "floored", "tokens_per_s", "x_unconstrained", "lost")
SHOWN += ("e2e_p50_s", "e2e_p99_s", "ttft_p50_s", "ttft_p99_s", "swap_preemptions")
SHOWN += ("recompute_preemptions", "swapped_out_mib", "recomputed_tokens", "queue_max")
SHOWN += ("slot_efficiency", "disturbed_runs")
"""The summary's columns in the Markdown (the JSON has every engine counter)."""


def report(saved: dict) -> tuple[list[str], str, harness.Panels]:
    """Every system's medians, then each priority run's per class; the figure: throughput and
    latency against the page budget, and TTFT per class under saturation."""
    summary, args = saved["summary"], saved["args"]
    names = [s["name"] for s in saved["systems"]]
    loaded = [n for n in names if n in (PRIORITY, FCFS)]
    classes = [{"run": n, "class": c} | summary[n].get(c, {}) for n in loaded for c in CLASSES]
    setup = {k: v for k, v in saved["priority_setup"].items() if k != "workload"}
    lines = [f"need: {saved['need']['pages']} pages (unconstrained peak); priority: {setup}", ""]
    lines += markdown([{"system": n} | summary[n] for n in names], ["system", *SHOWN])
    lines += ["", *markdown(classes)]
    fractions = args["fractions"]
    sweep = [summary[f"{m}-{f:g}"] for m in args["modes"] for f in fractions]
    sweep += [summary[UNCONSTRAINED] | {"mode": UNCONSTRAINED, "fraction": f} for f in fractions]
    by_mode = partial(harness.series, sweep, "fraction", "mode")
    panels = {"useful tokens/s against the page budget (x need)": by_mode("tokens_per_s")}
    panels["end-to-end latency s, p50 and p99"] = by_mode("e2e_p50_s", "e2e_p99_s")
    ttft = harness.series(classes, "class", "run", "ttft_p50_s", "ttft_p99_s")
    panels["time to first token s per class, saturated"] = ttft
    title = f"Small Llama, float32, CPU, {args['threads']} threads, max batch {args['batch_size']}"
    return lines, title, panels


def parse_args():
    quick, repeats = "24+32 requests, B 8, budgets <= 64", Default(3, 1)
    parser = harness.options(__doc__, threads=2, repeats=repeats, quick=quick, results="memory-cpu")
    parser.add_argument("--batch-size", type=int, default=Default(16, 8), help="%(default)s")
    fractions = harness.comma_list(float)
    parser.add_argument("--fractions", type=fractions, default=list(FRACTIONS), help="of the need")
    modes = harness.comma_list(str, PREEMPTION_MODES)
    parser.add_argument("--modes", type=modes, default=list(PREEMPTION_MODES), help="all")
    requests = Default(128, 32)
    parser.add_argument("--priority-requests", type=int, default=requests, help="%(default)s")
    parser.add_argument("--priority-fraction", type=float, default=0.5, help="of the need")
    parser.add_argument("--overload", type=float, default=1.5, help="x the sustained rate")
    workload.add_options(parser, num_requests=Default(96, 24))
    return harness.start(parser, must_include={"fractions": TARGET_FRACTION})


def main() -> None:
    args, ours = parse_args(), workload.OurModel()
    page_size, page_bytes = ours.probe.page_size, ours.probe.stats.page_bytes
    sweep, prio = ours.workload(args), ours.workload(args, args.priority_requests, seed_offset=1)
    largest = sweep.largest_request_pages(page_size)
    args.priority_largest = prio.largest_request_pages(page_size)
    free_pages = 2 * args.batch_size * max(largest, args.priority_largest)
    need = measure_need(ours, args.batch_size, sweep, free_pages)
    print(f"workload: {sweep.describe(args.max_budget)}")
    print(f"need: {need}; largest request {largest} pages; page {page_bytes} B", flush=True)

    gap = 1 / (args.overload * need["requests_per_iteration"])
    steady = partial(workload.steady, prio, gap, HIGH_SHARE, args.seed + 2)
    arrivals = {PRIORITY: steady(one_class=False), FCFS: steady(one_class=True)}
    arrivals["sweep"] = workload.burst(sweep)
    systems = make_systems(args, need["pages"], largest, free_pages)
    runs = []
    for repeat, system in harness.rotations(systems, args.repeats, spread=True):
        result = run_system(ours, args.batch_size, system, arrivals[system.kind], repeat)
        runs.append(result)
        label = f"[rep {repeat}] {system.name:>14} pages {system.pages:<5}"
        details = (result.latency, result.classes or "", result.stats)
        harness.announce(label, result, "lost", result.lost, *details)

    summary = summarize(runs, systems, need["pages"])
    setup = {"num_requests": args.priority_requests, "high_share": HIGH_SHARE}
    setup |= {"overload": args.overload, "gap_iterations": round(gap, 4)}
    setup |= {"fraction": args.priority_fraction, "largest_request_pages": args.priority_largest}
    targets = {"throughput_ratio": TARGET_THROUGHPUT_RATIO, "disturbed_share": DISTURBED_SHARE}
    payload = {
        "environment": ours.environment() | {"interop_threads": torch.get_num_interop_threads()},
        "args": vars(args),
        "workload": sweep.describe(args.max_budget),
        "page": {"size_tokens": page_size, "bytes": page_bytes},
        "attention_backend": ours.probe.attention_backend,
        "policy": POLICY,
        "targets": targets,
        "need": need | {"largest_request_pages": largest, "unconstrained_pages": free_pages},
        "priority_setup": setup | {"workload": prio.describe(args.max_budget)},
        "systems": [asdict(s) for s in systems],
        "summary": summary,
        "checks": checks(summary, args),
        "runs": [asdict(r) for r in runs],
    }
    harness.publish(args.name, payload, report, problems(runs))


if __name__ == "__main__":
    main()
