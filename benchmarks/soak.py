"""Soak: one request must never hurt the others. ``baton-paged serve`` under closed-loop normal
clients, first alone (phase A, the baseline), then beside every kind of abusive client the
server has a limit for (phase B); errors, the normal clients' latency B against A, the server's
RSS growth and the KV pages left in use once it is idle.

    python benchmarks/soak.py [--minutes 20] [--baseline-minutes 5] [--quick]
        [--model random|PATH] [--threads 1] [--clients 4] [--read-timeout 5] [--out STEM]

Server: the real CLI in a subprocess (``serving_http.Server``: a launcher that pins torch's
threads, /health to know it is up, SIGINT to stop), ``--max-model-len 1024 --read-timeout 5``
and every other flag at its default (so the limits under test are the shipped ones); the
random-weight small Llama by default (``--model random``, built locally). One server runs
the whole soak: an unmeasured warm-up of normal traffic (oneDNN builds its kernels for new
shapes on first use, which would otherwise land in phase A's tail), phase A, then phase B. One
process for both phases keeps everything but the abuse equal between them: the same warmed
caches, heap and page placement; a fresh server per phase would add process-to-process
variation to the latency ratio, and RSS growth is judged inside phase B anyway (after its own
warm-up, when the large prompts' buffers have been allocated once), where it shows whether
abuse leaks. After each phase the server is brought to idle and checked to hold no request and
no page, so B also starts clean.

Normal clients (both phases, the same seeded request sequence in each): ``--clients`` closed
loops (each sends its next request when the last one ended) over ``httpx.AsyncClient``, a mix
of /v1/completions and /v1/chat/completions, streamed or not, greedy or sampled (temperature
0.8, top_p 0.95), prompts of 4-40 words, 16-64 new tokens with ``ignore_eos`` so every request
costs exactly its budget. A reply counts only if it is a 200 of the right shape: the right
object, one choice finished by length, ``usage.completion_tokens`` equal to the budget; a stream
also has only ``data:`` events, no error event, a usage chunk, and ends with ``data: [DONE]``.
Latency is end to end (send to last byte) and, for streams, TTFT (send to first event). A probe
GETs /health every 0.5 s in both phases (its latency is the client's view: it shares the
client's event loop, so it reads high if anything).

Abusive clients (phase B only), threads on raw sockets (one connection per attempt, ``Connection:
close``, sent in pieces with a stop as soon as the server answers, as a refused upload must):
  * refusals, one every 0.5 s in turn: logprobs=49152, top_logprobs=100, n=64, best_of=64, 100
    stop strings, a 5,000-character stop string, a lone surrogate in a prompt and in a chat
    message, temperature Infinity and NaN, ``"prompt": [false]``, ``"n": "2"``, 301 logit_bias
    entries (each a 400), a 3 MB body (413), 150 header fields, a 20 KB header sent at once and
    trickled in 1 KB pieces (431: the app's guard, or the connection layer before parsing), GET
    /v1/completions (405 with ``Allow``); each reply must be the status and OpenAI's error object
    ``{"error": {"message", "type", "param", "code"}}``;
  * a 1.9 MB prompt every 20 s (inside the body limit; tokenized off the event loop, then a 400:
    longer than the context), the one abuse that costs real server CPU (0.5-1.5 s); the first
    time 4 at once, at least as many as the server tokenizes at a time (see ``large_prompts``:
    that is the most memory large prompts take, so the RSS warm-up includes it);
  * slowloris: 4 connections always open, each sending a partial request line, partial headers
    or a partial body and then nothing; each must get a JSON 408 after ``--read-timeout``;
  * a disconnect mid-stream every 3 s (a 256-token prompt, 700 new tokens, streamed; 3 events
    read, then the socket closed, with FIN or with RST in turn) and an abort every 5 s (the same
    request not streamed; the client gives up after 0.5 s): each must abort its request and free
    its pages.
Anything else is counted: a 5xx, a refused or reset connection to a normal client, a normal reply
of the wrong shape, a /health that is not 200, the server dying or logging a traceback are
server errors; an abusive reply that is not its expected refusal is a wrong refusal.

Rates: the machine has 2 cores that client and server share. The normal clients keep the
engine busy (about 4 requests in flight, 12 requests/s on the small model) while this client
uses under a tenth of a core; the refusals at 2/s cost the server a few ms each and the
slowloris connections nothing but a timer, together under 2% of a core; the 1.9 MB prompt every
20 s 3-6% of one; the disconnects and aborts add one request to the batch for a fraction of the
time, as real users who leave do. The abuse is meant to be constant and broad, not a flood: a
flood of valid requests is a capacity question (503 past ``--max-waiting``), not abuse. The
server gets 1 torch thread by default (``--threads``), so that its forward has a core and the
other one serves the event loops, the tokenizer threads and this client: with 2, the forward's
OpenMP threads need both cores, any other busy thread stalls it, and phase B would measure that
oversubscription more than whether abuse hurts the others.

After each phase: traffic stops, the abusive threads finish their last attempt (a slowloris
its 408), then /metrics is polled until no request is running, waiting or swapped and
``baton:kv_pages_in_use`` is 0 in both pools, for at most 30 s; what remains is leaked. RSS
is sampled every 2 s throughout; growth is from the end of phase B's warm-up (its first 2
minutes, or a quarter of it if shorter) to its end, each the median of the samples in the 20 s
before (so one large prompt's transient buffer does not decide it). Reported beside it: the same
over phase A after its first minute and over B's second half, with the slope of each (a leak
keeps its slope; an allocator settling, as each thread's heap reaches the high-water mark of the
largest prompt it served, flattens). CPU per wall second of this
client, the server and everything else is recorded per phase; a phase in which other processes
took more than a quarter core is flagged disturbed.

Verdict: pass iff 0 server errors and 0 wrong refusals, every abusive
kind answered as expected at least once, 0 pages and 0 requests left after each phase, RSS growth
after warm-up <= 5%, and the normal clients' p99 latency B / A <= 1.5. /health p99 during B is
reported beside a 100 ms target. Results: ``results/soak-cpu.json`` and ``.md`` (``--quick``:
``soak-cpu-quick``; ``--out STEM``: STEM.json and STEM.md, a bare name inside ``results/``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import harness
import httpx
import numpy as np
import psutil
import torch
from harness import RESULTS, check, markdown, percentile, ratio, summary
from prometheus_client.parser import text_string_to_metric_families
from serving_http import DISTURBED_CPU, Server, busy_cpu_seconds
from soak_abuse import (
    ABORT_AFTER_S,
    ABORT_PERIOD_S,
    BIG_PROMPT_BURST,
    BIG_PROMPT_PERIOD_S,
    DISCONNECT_PERIOD_S,
    REFUSAL_PERIOD_S,
    SLOWLORIS_OPEN,
    start_abuse,
)
from soak_normal import Call, Probe, normal_traffic

MAX_MODEL_LEN = 1024
TARGETS = {"rss_growth_pct": 5.0, "p99_ratio": 1.5, "health_p99_s": 0.1}
"""The targets: RSS growth after warm-up, normal p99 latency B / A, /health (reported)."""
RSS_PERIOD_S = 2.0
RSS_WINDOW_S = 20.0
RSS_WARMUP_S = 120.0
"""Phase B's warm-up for RSS: this long, or a quarter of the phase if that is shorter."""
IDLE_WAIT_S = 30.0
"""How long the engine gets after a phase to finish and abort what is left."""


# The server: state, RSS, CPU ----------------------------------------------------------------------


def server_state(url: str) -> dict:
    """Requests running / waiting / swapped, KV pages in use per pool, requests aborted."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {
        (s.name, tuple(v for k, v in sorted(s.labels.items()) if k != "model_name")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    state = {
        key: values.get((f"vllm:num_requests_{key}", ()), float("nan"))
        for key in ("running", "waiting", "swapped")
    }
    for pool in ("device", "host"):
        state[f"{pool}_pages"] = values.get(("baton:kv_pages_in_use", (pool,)), float("nan"))
    state["aborted"] = values.get(("vllm:request_success_total", ("abort",)), 0.0)
    return state


def wait_idle(url: str, timeout: float = IDLE_WAIT_S) -> dict | None:
    """Poll /metrics until nothing runs, waits or is swapped and no page is in use, or
    ``timeout``; the last state read and how long it took (None: the server did not answer)."""
    begun = time.perf_counter()
    while True:
        try:
            state = server_state(url)
        except httpx.HTTPError:
            return None
        busy = sum(
            state[k] for k in ("running", "waiting", "swapped", "device_pages", "host_pages")
        )
        if busy == 0 or time.perf_counter() - begun > timeout:
            return state | {"seconds": round(time.perf_counter() - begun, 2)}
        time.sleep(0.5)


class Watch(threading.Thread):
    """Samples the server's RSS every ``RSS_PERIOD_S``; if the server exits, records its exit
    code and sets the running phase's stop event so that clients stop at once."""

    def __init__(self, server: Server, origin: float):
        super().__init__(daemon=True, name="watch")
        self.server, self.origin = server, origin
        self.samples: list[tuple[float, float]] = []
        """(seconds since ``origin``, RSS MiB)."""
        self.exit_code: int | None = None
        self.phase_stop = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(RSS_PERIOD_S):
            if (code := self.server.proc.poll()) is not None:
                self.exit_code = code
                self.phase_stop.set()
                return
            try:
                rss = self.server.ps.memory_info().rss / 2**20
            except psutil.Error:  # it exited since the poll: the next poll says how
                continue
            self.samples.append((round(time.perf_counter() - self.origin, 2), round(rss, 1)))


def window_median(samples: list[tuple[float, float]], at: float) -> float | None:
    """The median RSS of the samples in the ``RSS_WINDOW_S`` before ``at`` (the last one
    before it if the window is empty)."""
    inside = [rss for t, rss in samples if at - RSS_WINDOW_S <= t <= at]
    before = [rss for t, rss in samples if t <= at]
    return statistics.median(inside) if inside else (before[-1] if before else None)


def growth(samples: list[tuple[float, float]], start: float, end: float) -> dict:
    """RSS from ``start`` to ``end`` (each a ``window_median``): MiB, percent, and the slope of
    a line through the samples between them (MiB per minute)."""
    first, last = window_median(samples, start), window_median(samples, end)
    figures = {"from_mib": first, "to_mib": last, "mib": None, "pct": None}
    figures["slope_mib_per_min"] = None
    if first is not None and last is not None:
        figures["mib"] = round(last - first, 1)
        figures["pct"] = round(100 * (last - first) / first, 3)
    between = [(t, rss) for t, rss in samples if start <= t <= end]
    if len(between) >= 3:
        times, values = zip(*between, strict=True)
        figures["slope_mib_per_min"] = round(60 * np.polyfit(times, values, 1)[0], 3)
    return figures


def rss_figures(samples: list[tuple[float, float]], a: Phase, b: Phase) -> dict:
    """The verdict's RSS growth in phase B after its warm-up; to tell an allocator settling
    from a leak, the same over phase A after its first minute (normal traffic only) and over
    B's second half (a leak keeps its slope, settling flattens); the start and the peak."""
    warm = min(RSS_WARMUP_S, (b.end - b.start) / 4)
    return {
        "start_mib": samples[0][1] if samples else None,
        "peak_mib": max((rss for _, rss in samples), default=None),
        "warmup_s": round(warm, 1),
        "after_warmup": growth(samples, b.start + warm, b.end),
        "phase_a": growth(samples, a.start + min(60.0, (a.end - a.start) / 4), a.end),
        "second_half_of_b": growth(samples, (b.start + b.end) / 2, b.end),
    }


CPU_USERS = ("client", "server", "other")


def cpu_mark(server: Server) -> tuple[float, float, float, float]:
    """CPU seconds of this client, the server and the whole machine, and the wall clock."""
    try:
        served = server.cpu_seconds()
    except psutil.Error:  # the server is gone: its CPU is unknown
        served = float("nan")
    return sum(os.times()[:2]), served, busy_cpu_seconds(), time.perf_counter()


def cpu_use(server: Server, mark: tuple[float, float, float, float]) -> dict:
    """Cores kept busy since ``mark`` by this client, the server and everything else."""
    client, served, busy, wall = (
        now - then for now, then in zip(cpu_mark(server), mark, strict=True)
    )
    other = (busy - client - served) / wall
    return {
        "client_cpu_per_wall": round(client / wall, 3),
        "server_cpu_per_wall": round(served / wall, 3),
        "other_cpu_per_wall": round(other, 3),
        "disturbed": bool(other > DISTURBED_CPU),
    }


# Phases ------------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    start: float = 0.0
    """Seconds since the soak began, as the RSS samples."""
    end: float = 0.0
    calls: list[Call] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    cpu: dict = field(default_factory=dict)
    idle: dict | None = None
    """The server's state once idle after the phase; None if it could not be read."""
    abuse: dict | None = None
    aborted: float | None = None
    """Requests the engine finished as aborted during the phase (/metrics)."""


def run_phase(server: Server, args, watch: Watch, name: str, seconds: float, abused: bool) -> Phase:
    """Normal traffic (and abuse if ``abused``) for ``seconds``, then wait for the server to be
    idle and read what is left in it."""
    phase = Phase(name, start=time.perf_counter() - watch.origin)
    stop = watch.phase_stop = threading.Event()
    if watch.exit_code is not None:  # the server died in an earlier phase: nothing to measure
        stop.set()
    timer = threading.Timer(seconds, stop.set)
    before, mark = wait_idle(server.url, timeout=0), cpu_mark(server)
    port = int(server.url.rsplit(":", 1)[1])
    tally, threads = start_abuse(port, args.read_timeout, args.seed, stop) if abused else (None, [])
    timer.start()
    phase.calls, phase.probes = asyncio.run(
        normal_traffic(server.url, args.clients, args.seed, stop)
    )
    timer.cancel()
    for thread in threads:
        thread.join(args.read_timeout + 60)
    phase.end, phase.cpu = time.perf_counter() - watch.origin, cpu_use(server, mark)
    phase.abuse = tally.summary() if tally else None
    print(f"{name}: {phase.end - phase.start:.0f} s, {len(phase.calls)} requests", flush=True)
    phase.idle = wait_idle(server.url)
    if phase.idle and before:
        phase.aborted = phase.idle["aborted"] - before["aborted"]
    return phase


def per_minute(phase: Phase, origin: float) -> list[dict]:
    """p50 / p99 latency of the calls sent in each minute of the phase: drift shows here."""
    minutes: dict[int, list[float]] = {}
    for call in phase.calls:
        minute = int((call.sent - origin - phase.start) // 60)
        if call.error is None:
            minutes.setdefault(minute, []).append(call.latency)
    return [
        {"minute": m, "n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)}
        for m, v in sorted(minutes.items())
    ]


def phase_figures(phase: Phase, origin: float) -> dict:
    """A phase's requests, errors and latencies, /health, CPU and what was left after it."""
    ok = [call for call in phase.calls if call.error is None]
    failed = [call for call in phase.calls if call.error is not None]
    wall = phase.end - phase.start
    slowest = sorted(ok, key=lambda call: call.latency, reverse=True)[:10]
    return {
        "seconds": round(wall, 1),
        "requests": len(phase.calls),
        "completed": len(ok),
        "failed": len(failed),
        "errors": sorted({call.error for call in failed})[:5],
        "requests_per_s": round(len(ok) / wall, 3),
        "e2e_s": summary([call.latency for call in ok]),
        "ttft_s": summary([call.ttft for call in ok if call.ttft is not None]),
        "health_s": summary([probe.latency for probe in phase.probes if probe.error is None]),
        "health_failed": sum(probe.error is not None for probe in phase.probes),
        "health_errors": sorted({p.error for p in phase.probes if p.error})[:5],
        "health_slowest": [
            [round(probe.sent - origin - phase.start, 2), round(probe.latency, 4)]
            for probe in sorted(phase.probes, key=lambda probe: probe.latency)[-5:]
        ],
        "per_minute": per_minute(phase, origin),
        "slowest": [
            asdict(call) | {"sent": round(call.sent - origin - phase.start, 2)} for call in slowest
        ],
        "idle_after": phase.idle,
        "aborted_by_engine": phase.aborted,
        "abuse": phase.abuse,
    } | phase.cpu


def log_tracebacks(text: str) -> list[str]:
    """For each traceback in the server's log, the line before it (what it was about): an
    exception the server logged is an error even when no client saw it."""
    lines = text.splitlines()
    return [
        lines[k - 1] if k else "" for k, line in enumerate(lines) if line.startswith("Traceback")
    ]


# Verdict and output ------------------------------------------------------------------------------


def error_counts(a: dict, b: dict, tracebacks: int, exit_code: int | None) -> dict:
    """Server errors by where they showed, and the wrong refusals."""
    abuse = b["abuse"] or {}
    counts = {
        "normal_requests_failed": a["failed"] + b["failed"],
        "health_failed": a["health_failed"] + b["health_failed"],
        "abusive_5xx_or_refused": sum(row["server_errors"] for row in abuse.values()),
        "server_log_tracebacks": tracebacks,
        "server_died": int(exit_code is not None),
    }
    counts["server_errors"] = sum(counts.values())
    unexpected = sum(row["unexpected"] for row in abuse.values())
    counts["wrong_refusals"] = unexpected - counts["abusive_5xx_or_refused"]
    return counts


def leftovers(phase: dict) -> tuple[float | None, float | None]:
    """(KV pages, requests) still in the server once idle after the phase; None if unknown."""
    idle = phase["idle_after"]
    if idle is None:
        return None, None
    pages = idle["device_pages"] + idle["host_pages"]
    return pages, idle["running"] + idle["waiting"] + idle["swapped"]


def checks(a: dict, b: dict, errors: dict, rss: dict) -> list[dict]:
    """The verdict's checks (``gate``), then for information /health beside its 100 ms target
    and the phases other processes disturbed."""
    never = [kind for kind, row in (b["abuse"] or {}).items() if row["expected"] == 0]
    p99_ratio = ratio(b["e2e_s"].get("p99"), a["e2e_s"].get("p99"), 3)
    gates = [
        ("server errors (see errors in the JSON)", errors["server_errors"], 0, "=="),
        ("wrong refusals to abusive requests", errors["wrong_refusals"], 0, "=="),
        ("abusive kinds never answered as expected", len(never), 0, "=="),
    ]
    for name, phase in (("A", a), ("B", b)):
        pages, requests = leftovers(phase)
        gates += [(f"KV pages left after phase {name}", pages, 0, "==")]
        gates += [(f"requests left after phase {name}", requests, 0, "==")]
    after_warmup = ("RSS growth % in phase B after warm-up", rss["after_warmup"]["pct"])
    gates += [(*after_warmup, TARGETS["rss_growth_pct"], "<=")]
    gates += [("normal p99 latency B / A", p99_ratio, TARGETS["p99_ratio"], "<=")]
    health = check(
        "/health p99 s in phase B", b["health_s"].get("p99"), TARGETS["health_p99_s"], "<="
    )
    second_half = check(
        "RSS growth % over phase B's second half", rss["second_half_of_b"]["pct"], None
    )
    disturbed = [name for name, phase in (("A", a), ("B", b)) if phase["disturbed"]]
    noted = check("phases other processes disturbed", ", ".join(disturbed) or "none", None)
    info = [health, second_half, noted]
    return [check(*gate) | {"gate": True} for gate in gates] + [
        row | {"gate": False} for row in info
    ]


def report(payload: dict) -> str:
    """The Markdown: phases, abusive kinds, RSS, checks and the verdict."""
    rows = []
    for name, p in payload["phases"].items():
        row = {
            "phase": name,
            "seconds": p["seconds"],
            "requests": p["completed"],
            "failed": p["failed"],
            "req/s": p["requests_per_s"],
        }
        row |= {f"e2e {q}": p["e2e_s"].get(q) for q in ("p50", "p99")}
        row |= {f"TTFT {q}": p["ttft_s"].get(q) for q in ("p50", "p99")}
        row |= {f"/health {q}": p["health_s"].get(q) for q in ("p50", "p99", "max")}
        row |= {
            "client cpu": p["client_cpu_per_wall"],
            "server cpu": p["server_cpu_per_wall"],
            "other cpu": p["other_cpu_per_wall"],
        }
        row["pages left"], row["requests left"] = leftovers(p)
        rows.append(row)
    abuse = payload["phases"]["B"]["abuse"] or {}
    counts = ("sent", "expected", "unexpected", "server_errors", "finished_first")
    kinds = [
        {"kind": kind}
        | {key: row.get(key) for key in counts}
        | {f"{q} s": row.get("seconds", {}).get(q) for q in ("p50", "max")}
        for kind, row in abuse.items()
    ]
    rss, setup = payload["rss"], payload["setup"]
    spans = {"after_warmup": f"B after its {rss['warmup_s']} s warm-up (verdict)"}
    spans |= {"phase_a": "A after its first minute", "second_half_of_b": "B's second half"}
    growths = [{"RSS over": label} | rss[key] for key, label in spans.items()]
    lines = [
        f"# Soak: {setup['model']} model, {setup['torch_threads']} torch thread(s), "
        f"{setup['clients']} normal clients; verdict: **{payload['verdict']}**",
        "",
        *markdown(rows),
        "",
        f"Server RSS: {rss['start_mib']} MiB at the start, peak {rss['peak_mib']} MiB.",
        "",
        *markdown(growths),
        "",
        *markdown(kinds),
        "",
        *markdown(payload["checks"], ["check", "value", "op", "target", "status", "gate"]),
    ]
    return "\n".join(lines) + "\n"


def results_stem(out: str) -> Path:
    """``--out``: a bare name lands in ``results/``; anything with a folder where it says."""
    path = Path(out)
    return RESULTS / out if path.parent == Path(".") else path


def write(stem: Path, payload: dict) -> str:
    stem.parent.mkdir(parents=True, exist_ok=True)
    text = report(payload)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    return text


def console(payload: dict) -> str:
    """The summary printed at the end of a run."""
    a, b = payload["phases"]["A"], payload["phases"]["B"]
    errors, rss = payload["errors"], payload["rss"]
    both = lambda f: f"A {f(a)} B {f(b)}"  # noqa: E731
    found = {key: count for key, count in errors.items() if count}
    return "\n".join(
        [
            f"verdict: {payload['verdict']}",
            f"server errors {errors['server_errors']}, wrong refusals {errors['wrong_refusals']}"
            f" {found or ''}",
            f"KV pages left {both(lambda p: leftovers(p)[0])}, requests left "
            f"{both(lambda p: leftovers(p)[1])}",
            f"e2e p50 {both(lambda p: p['e2e_s'].get('p50'))}; p99 "
            f"{both(lambda p: p['e2e_s'].get('p99'))}, B / A {payload['p99_ratio']}",
            f"requests {both(lambda p: p['completed'])}; /health p99 "
            f"{both(lambda p: p['health_s'].get('p99'))} s",
            f"RSS growth after warm-up {rss['after_warmup']['pct']}% "
            f"({rss['after_warmup']['mib']} MiB), over B's second half "
            f"{rss['second_half_of_b']['pct']}%; peak {rss['peak_mib']} MiB",
            "cores busy (client / server / other) "
            + both(lambda p: "/".join(str(p[f"{who}_cpu_per_wall"]) for who in CPU_USERS)),
        ]
    )


# Command line ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", default="random", help="random (default) or a checkpoint")
    parser.add_argument("--minutes", type=float, help="phase B (default 20; quick 2)")
    parser.add_argument("--baseline-minutes", type=float, help="phase A (default 5; quick 1)")
    parser.add_argument("--warmup-seconds", type=float, help="before A (default 30; quick 10)")
    parser.add_argument("--quick", action="store_true", help="short phases: a check it runs")
    parser.add_argument("--threads", type=int, default=1, help="server torch threads (1)")
    parser.add_argument("--clients", type=int, default=4, help="normal clients (4)")
    parser.add_argument("--read-timeout", type=float, default=5.0, help="server's, s (5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="results stem (soak-cpu, quick: soak-cpu-quick)")
    args = parser.parse_args(argv)
    defaults = {"minutes": (20, 2), "baseline_minutes": (5, 1), "warmup_seconds": (30, 10)}
    defaults["out"] = ("soak-cpu", "soak-cpu-quick")
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def serve_args(args) -> list[str]:
    flags = ["--model", args.model, "--max-model-len", str(MAX_MODEL_LEN)]
    return flags + ["--read-timeout", f"{args.read_timeout:g}"]


def source_digest() -> str:
    """A digest of the server's Python source: the tree may differ from every commit (and
    change between runs), so the results say which code they measured."""
    package = Path(__file__).resolve().parent.parent / "baton_paged"
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def git_state() -> str:
    """The commit and whether the tree differs from it (read only: no index refresh written)."""
    root = Path(__file__).resolve().parent.parent
    env = os.environ | {"GIT_OPTIONAL_LOCKS": "0"}
    command = ["git", "describe", "--always", "--dirty"]
    found = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
    return found.stdout.strip() or "unknown"


def soak(server: Server, args) -> dict:
    """Warm-up, phase A, phase B on one server; every figure the results hold."""
    measured = {"git": git_state(), "source_digest": source_digest()}  # what the server loads
    startup = server.wait_ready()
    origin = time.perf_counter()
    watch = Watch(server, origin)
    watch.start()
    warm = run_phase(server, args, watch, "warm-up", args.warmup_seconds, abused=False)
    a = run_phase(server, args, watch, "A", args.baseline_minutes * 60, abused=False)
    b = run_phase(server, args, watch, "B", args.minutes * 60, abused=True)
    watch.done.set()
    log = Path(server.log.name).read_text()
    phases = {p.name: phase_figures(p, origin) for p in (a, b)}
    rss = rss_figures(watch.samples, a, b)
    tracebacks = log_tracebacks(log)
    errors = error_counts(phases["A"], phases["B"], len(tracebacks), watch.exit_code)
    found = checks(phases["A"], phases["B"], errors, rss)
    setup = {
        "model": args.model,
        "serve_flags": serve_args(args),
        "clients": args.clients,
        "torch_threads": server.torch_threads(),
        "startup_s": round(startup, 2),
        "warmup": {
            "seconds": round(warm.end - warm.start, 1),
            "requests": len(warm.calls),
            "idle_after": warm.idle,
        },
    } | measured
    rates = {
        "refusal_period_s": REFUSAL_PERIOD_S,
        "big_prompt_period_s": BIG_PROMPT_PERIOD_S,
        "slowloris_open": SLOWLORIS_OPEN,
        "disconnect_period_s": DISCONNECT_PERIOD_S,
        "abort_period_s": ABORT_PERIOD_S,
        "abort_after_s": ABORT_AFTER_S,
        "big_prompt_burst": BIG_PROMPT_BURST,
    }
    return {
        "verdict": "pass" if all(r["status"] == "met" for r in found if r["gate"]) else "FAIL",
        "environment": harness.environment(args.threads, torch.device("cpu"))
        | {"httpx": httpx.__version__},
        "args": vars(args),
        "setup": setup | {"abuse_rates": rates},
        "targets": TARGETS,
        "checks": found,
        "errors": errors,
        "p99_ratio": ratio(phases["B"]["e2e_s"].get("p99"), phases["A"]["e2e_s"].get("p99"), 3),
        "phases": phases,
        "rss": rss,
        "rss_samples": watch.samples,
        "server_exit_code": watch.exit_code,
        "server_log_tracebacks": tracebacks[:5],
        "server_log_tail": log[-3000:] if tracebacks or watch.exit_code is not None else None,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    server = Server(serve_args(args), args.threads, log_prefix="soak")
    try:
        payload = soak(server, args)
    finally:
        server.stop()
    payload["total_seconds"] = round(time.perf_counter() - harness.STARTED, 1)
    stem = results_stem(args.out)
    write(stem, payload)
    print(console(payload), f"wrote {stem}.json and .md", sep="\n", flush=True)


if __name__ == "__main__":
    main()
