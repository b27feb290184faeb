"""What every benchmark script shares, so that each keeps only its experiment.

* ``options``/``start``: the common command line (``--quick``, ``--repeats``, ``--threads``,
  ``--seed``, ``--name``); a ``Default(full, quick)`` default follows ``--quick``.
* ``rotations``, ``interleaved``: runs in turn, as CPU timings here drift by tens of percent over
  minutes; ``Clock``, ``Timed``: the wall, CPU and load figures that flag a disturbed run.
* ``median``, ``percentile``, ``ratio``, ``check``: figures over repeats and the targets,
  each check met, not met, not measured, or for information.
* ``publish``, ``render``, ``markdown``, ``figure``: results as ``results/<name>.{json,md,png}``,
  the tables and figure drawn from the JSON as saved by each script's ``report``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import operator
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
STARTED = time.perf_counter()
"""A benchmark's clock starts when its script imports the harness; its results record the total."""
T = TypeVar("T")

# Command line ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Default:
    """An option's default for a full run and for ``--quick``; ``start`` picks one."""

    full: Any
    quick: Any

    def __str__(self) -> str:
        return f"{_listed(self.full)} (quick: {_listed(self.quick)})"


def _listed(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def options(
    doc: str, *, threads: int, repeats: int | Default, quick: str = "", results: str = ""
) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes; the script adds its own. ``quick`` (its
    help text) adds ``--quick``; ``results`` (the file stem) adds ``--name``."""
    parser = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    if quick:
        parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--repeats", type=int, default=repeats, help="default %(default)s")
    parser.add_argument("--threads", type=int, default=threads, help="torch threads (%(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    if results:
        stems = Default(results, f"{results}-quick")
        parser.add_argument("--name", default=stems, help="results file stem; %(default)s")
    return parser


def start(parser: argparse.ArgumentParser, must_include: dict | None = None) -> argparse.Namespace:
    """The parsed options, each ``Default`` replaced by its full or quick value (a list option
    named in ``must_include`` must hold its value: a target is checked on that run), with
    torch's threads pinned to ``--threads``."""
    args = parser.parse_args()
    quick = getattr(args, "quick", False)
    for key, value in list(vars(args).items()):
        if isinstance(value, Default):
            setattr(args, key, value.quick if quick else value.full)
    for key, value in (must_include or {}).items():
        if value not in getattr(args, key):
            parser.error(f"--{key.replace('_', '-')} must include {value}")
    torch.set_num_threads(args.threads)  # CPU timings swing wildly when threads oversubscribe
    return args


def comma_list(kind: Callable[[str], T], choices: Iterable[T] | None = None):
    """An option type: ``"a,b"`` -> ``[kind("a"), kind("b")]``, each among ``choices``."""
    allowed = None if choices is None else list(choices)

    def convert(text: str) -> list[T]:
        values = [kind(part) for part in text.split(",")]
        if allowed is not None and (unknown := [v for v in values if v not in allowed]):
            choose = ", ".join(map(str, allowed))
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {choose}")
        return values

    return convert


# Runs ------------------------------------------------------------------------------------------


def rotations(items: Sequence[T], rounds: int, spread: bool = False) -> list[tuple[int, T]]:
    """(round, item): each round runs every item once, the order rotated between rounds so that
    no item always runs first or right after the same neighbour: by one place per round, or
    (``spread``) by an even share of the list, so that few rounds still move every item from
    early to late."""
    order = []
    for r in range(rounds):
        shift = (round(r * len(items) / rounds) if spread else r) % len(items)
        order += [(r, item) for item in [*items[shift:], *items[:shift]]]
    return order


def recorded(result: T, run: Callable[[], object]) -> T:
    """``result`` after ``run()``, which fills it; an exception is recorded as ``result.error``,
    never replaced by a made-up number. Garbage is collected after each run so that one run's
    engine does not hold memory during the next."""
    try:
        run()
    except Exception as error:
        result.error = f"{type(error).__name__}: {error}"
    gc.collect()
    return result


def announce(label: str, result: Any, *details: Any) -> None:
    """One console line per run: its throughput, wall time, CPU time / wall and load average
    (where a disturbed run shows), then ``details``; or its error."""
    note = result.error or (
        f"{result.tokens_per_s:8.1f} tok/s {result.wall_s:7.2f} s cpu/wall "
        f"{result.cpu_per_wall:.2f} load {result.loadavg_1m} " + " ".join(map(str, details))
    )
    print(f"{label} {note}", flush=True)


# Timing ----------------------------------------------------------------------------------------


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
    """The versions, machine and device the figures were taken on."""
    info = {"torch": torch.__version__, "threads": threads, "cpu_count": os.cpu_count()}
    info |= {"machine": platform.machine(), "python": platform.python_version()}
    info["device"] = str(device)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def block_table(pages: Sequence[Sequence[int]]) -> np.ndarray:
    """Each request's page ids as a row of a block table, padded with page 0."""
    table = np.zeros((len(pages), max(map(len, pages))), dtype=np.int32)
    for row, ids in enumerate(pages):
        table[row, : len(ids)] = ids
    return table


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


# Figures and targets ---------------------------------------------------------------------------


def outcome(group: Sequence) -> tuple[dict, list]:
    """A summary row's run and error counts, and the runs without error, whose figures count."""
    errors = [r.error for r in group if r.error is not None]
    return {"runs": len(group), "errors": errors}, [r for r in group if r.error is None]


def median(values: Iterable, digits: int | None = None) -> Any:
    """The median of the measured values (None and NaN skipped); None when there are none."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return None
    middle = statistics.median(kept)
    return middle if digits is None else round(middle, digits)


def medians(records: Sequence[dict], digits: int | None = None, keys: Iterable[str] = ()) -> dict:
    """The median over ``records`` of each of ``keys`` (default: the first record's keys)."""
    return {key: median((r.get(key) for r in records), digits) for key in keys or records[0]}


def percentile(values: Sequence[float], q: float, digits: int = 4) -> float | None:
    return round(float(np.percentile(values, q)), digits) if len(values) else None


def summary(values: list[float]) -> dict:
    """Count, mean, p50 / p90 / p99 and max of ``values`` (latencies, say); ``{"n": 0}`` if none."""
    if not values:
        return {"n": 0}
    quantiles = {f"p{q}": percentile(values, q) for q in (50, 90, 99)}
    mean, top = round(statistics.fmean(values), 4), round(max(values), 4)
    return {"n": len(values), "mean": mean} | quantiles | {"max": top}


def ratio(value: float | None, base: float | None, digits: int) -> float | None:
    """``value / base`` rounded; None when either was not measured (or the base is 0)."""
    return None if value is None or not base else round(value / base, digits)


COMPARE = {">=": operator.ge, "<=": operator.le, "==": operator.eq}


def check(name: str, value: Any, target: float | None, op: str = ">=") -> dict:
    """One target: ``value op target`` met or not; ``target`` None: reported for information."""
    if target is None:
        status = "info"
    elif value is None:
        status = "not measured"
    else:
        status = "met" if COMPARE[op](value, target) else "NOT met"
    return {"check": name, "value": value, "target": target, "op": op, "status": status}


# Output ----------------------------------------------------------------------------------------


def markdown(rows: Sequence[dict], columns: Sequence[str] | None = None) -> list[str]:
    """A Markdown table, one line per row dict: ``columns``, or every key in the order first seen;
    floats to 5 significant digits, lists joined, a missing value "-"."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    return lines + ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}" if abs(value) < 1e5 else f"{value:.0f}"
    if isinstance(value, list | tuple):
        return ", ".join(map(cell, value))
    return "-" if value is None else str(value)


def series(rows: Sequence[dict], x: str, by: str, *ys: str) -> tuple[list, dict]:
    """A panel from long-format rows: the values of ``row[x]`` in the order first seen, and a line
    per value of ``row[by]`` (per (value, y) where several ys) through the rows' ``row[y]``."""
    xs = list(dict.fromkeys(row[x] for row in rows))
    found = {(str(row[by]), row[x], y): row.get(y) for row in rows for y in ys}
    groups = dict.fromkeys(str(row[by]) for row in rows)
    return xs, {
        (b, y) if len(ys) > 1 else b: [found.get((b, v, y)) for v in xs] for y in ys for b in groups
    }


Panels = dict[str, tuple[Sequence, dict]]
"""A figure's panels: title -> (x values, {line: a y per x value, None if not measured}); a line
named (group, kind) gets its group's colour and its kind's dashes."""


def figure(path: Path, title: str, panels: Panels) -> None:
    """A row of line charts saved as PNG, the x values evenly spaced and labelled as they are
    (slanted when long); a panel whose values span more than two decades has a log y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(1 + 5 * len(panels), 4.5), squeeze=False)
    for ax, (name, (xs, lines)) in zip(axes[0], panels.items(), strict=True):
        drawn, colors, dashes = [], {}, {}
        for label, ys in lines.items():
            group, kind = label if isinstance(label, tuple) else (label, "")
            color = colors.setdefault(group, f"C{len(colors) % 10}")
            dash = dashes.setdefault(kind, ("-", "--", ":", "-.")[len(dashes) % 4])
            points = [(i, y) for i, y in enumerate(ys) if y is not None]
            drawn += [y for _, y in points]
            if points:
                label = f"{group} {kind}".strip()
                ax.plot(*zip(*points, strict=True), ls=dash, color=color, marker="o", label=label)
        if drawn and min(drawn) > 0 and max(drawn) > 100 * min(drawn):
            ax.set_yscale("log")
        labels = [str(x) for x in xs]
        if sum(map(len, labels)) > 40:  # names that would run into each other: slant them
            ax.set_xticks(range(len(xs)), labels, rotation=30, ha="right", fontsize=8)
        else:
            ax.set_xticks(range(len(xs)), labels)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


Report = Callable[[dict], tuple[list[str], str, Panels]]


def render(name: str, saved: dict, report: Report) -> str:
    """``results/<name>.md`` and ``.png`` drawn from a results payload as saved (or read back
    from its JSON) by a script's ``report``: its Markdown lines (the checks' table follows), the
    figure's title and panels. Returns the Markdown."""
    lines, title, panels = report(saved)
    checks = markdown(saved["checks"], ["check", "value", "op", "target", "status"])
    text = "\n".join([*lines, "", *checks]) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    figure(RESULTS / f"{name}.png", title, panels)
    return text


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def publish(name: str, payload: dict, report: Report, problems: Iterable[str]) -> None:
    """Write ``results/<name>.json`` (with the Markdown as "table_markdown"), ``.md`` and
    ``.png``, all from the payload as saved; print the Markdown and each problem a run had."""
    payload = payload | {"total_seconds": round(time.perf_counter() - STARTED, 1)}
    saved = json.loads(json.dumps(payload))  # string keys, lists: what a reader of the file gets
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved["table_markdown"] = render(name, saved, report)
    path = write_json(name, saved)
    print(f"\n{saved['table_markdown']}", *problems, sep="\n")
    print(f"\nwrote {path} (+ .md, .png) in {saved['total_seconds']} s")
