"""What every benchmark script shares, so that each keeps only its experiment.

* ``options``/``start``: the common command line (``--quick``, ``--repeats``, ``--threads``,
  ``--seed``, ``--name``); a ``Default(full, quick)`` default follows ``--quick``.
* ``rotations``: the order of interleaved runs. CPU timings here drift by tens of percent over
  minutes, so every repeat runs each system once, the order rotated, and drift hits all alike.
* ``median``, ``percentile``, ``ratio``, ``check``: figures over repeats and the issue's targets,
  each check met, not met, not measured, or for information.
* ``table``, ``fmt``, ``publish``: results as ``results/<name>.{json,md,png}`` (tables and figure
  from ``reports``) and a console report.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import operator
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from timing import setup_threads

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
    doc: str,
    *,
    threads: int,
    repeats: int | Default,
    quick: str | None = None,
    results: str | None = None,
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
    setup_threads(args.threads)
    return args


def comma_list(kind: Callable[[str], T], choices: Iterable[T] | None = None):
    """An option type: ``"a,b"`` -> ``[kind("a"), kind("b")]``, each among ``choices``."""
    allowed = None if choices is None else list(choices)

    def convert(text: str) -> list[T]:
        values = [kind(part) for part in text.split(",")]
        unknown = [v for v in values if allowed is not None and v not in allowed]
        if unknown:
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


def percentile(values: Sequence[float], q: float, digits: int = 4) -> float | None:
    return round(float(np.percentile(values, q)), digits) if len(values) else None


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


def fmt(*values: float | None, spec: str = ".2f", scale: float = 1.0) -> str:
    """Values in ``spec`` after ``scale``, joined as "a / b"; "-" for one not measured."""
    return " / ".join("-" if v is None else format(v * scale, spec) for v in values)


def table(headers: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """Markdown table lines; a shorter row (an error) leaves its last cells out."""
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def publish(
    name: str,
    payload: dict,
    markdown: Callable[[dict], str],
    figure: Callable[[dict, Path], None],
    problems: Iterable[str],
) -> None:
    """Write ``results/<name>.json`` (with ``markdown``'s tables as "table_markdown"), ``.md``
    and ``.png`` (``figure``), both drawn from the payload as saved, then print the tables,
    every check and each problem a run had."""
    payload = payload | {"total_seconds": round(time.perf_counter() - STARTED, 1)}
    saved = json.loads(json.dumps(payload))  # string keys, lists: what a reader of the file gets
    saved["table_markdown"] = markdown(saved)
    path = write_json(name, saved)
    (RESULTS / f"{name}.md").write_text(saved["table_markdown"])
    figure(saved, RESULTS / f"{name}.png")
    print(f"\n{saved['table_markdown']}checks:")
    for c in saved["checks"]:
        target = f" (target {c['op']} {c['target']})" if c["target"] is not None else ""
        print(f"  [{c['status']}] {c['check']}: {c['value']}{target}")
    for problem in problems:
        print(f"  {problem}")
    print(f"\nwrote {path} (+ .md, .png) in {saved['total_seconds']} s")
