"""Each benchmark's Markdown tables and PNG figure, drawn from its results payload in JSON form
(string keys, lists for tuples), the form ``results/<name>.json`` keeps: what is shown is exactly
what is saved. The scripts measure; this module only presents.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from harness import fmt, table
from workload import CLASSES

# bench_policies --------------------------------------------------------------------------------


def policies_markdown(payload: dict) -> str:
    summary, per_batch = payload["summary"], payload["ideal"]["per_batch"]
    systems, sizes = payload["args"]["systems"], [str(b) for b in payload["args"]["batch_sizes"]]

    def cell(system: str, b: str) -> str:
        row = summary.get(system, {}).get(b, {})
        rate = row.get("tokens_per_s")
        base = summary.get("hf-generate", {}).get(b, {}).get("tokens_per_s")
        if rate is None:
            return "error" if row.get("errors") else "-"
        return f"{rate:.0f}" + (f" ({rate / base:.2f}x)" if base else "")

    rates = [[s, *(cell(s, b) for b in sizes)] for s in systems]
    ideal = [f"{per_batch[b]['ideal_tokens_per_s']:.0f}" for b in sizes]
    rates.append(["ideal (our forward, no scheduling)", *ideal])
    counters = []
    for s in systems:
        for b in sizes:
            r = summary.get(s, {}).get(b, {})
            if "slot_efficiency" in r:  # our engine's policies
                counters.append(
                    [s, b, f"{r['slot_efficiency']:.3f}", f"{r['mean_batch_size']:.1f}"]
                )
                counters[-1] += [r["preemptions"], r["iterations"], f"{r['ttft_median_s']:.2f}"]
    lines = [
        "Useful output tokens/s (median over repeats); in brackets: x hf-generate at that B.",
        "",
        *table(["system", *(f"B={b}" for b in sizes)], rates),
        "",
        *table(
            ["policy", "B", "slot eff.", "mean batch", "preemptions", "iterations", "TTFT med s"],
            counters,
        ),
    ]
    return "\n".join(lines) + "\n"


def policies_figure(payload: dict, path: Path) -> None:
    args, summary, per_batch = payload["args"], payload["summary"], payload["ideal"]["per_batch"]
    sizes = args["batch_sizes"]
    with figure(path) as (ax,):
        for s in args["systems"]:
            rates = [summary.get(s, {}).get(str(b), {}).get("tokens_per_s") for b in sizes]
            ax.plot(*measured(sizes, rates), marker="o", label=s)
        ideal = [per_batch[str(b)]["ideal_tokens_per_s"] for b in sizes]
        ax.plot(sizes, ideal, "k--", label="ideal (forward only)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        title = (
            f"Small Llama, float32, CPU, {args['threads']} threads: {args['num_requests']} "
            f"requests at t=0, budgets <= {args['max_budget']}"
        )
        label(ax, title, "max batch size", "useful output tokens/s", legend=8)


# bench_memory ----------------------------------------------------------------------------------


def memory_markdown(payload: dict) -> str:
    summary, need, prio = payload["summary"], payload["need"], payload["priority_setup"]
    sweep = [s for s in payload["systems"] if s["kind"] == "sweep"]
    loaded = [s["name"] for s in payload["systems"] if s["kind"] != "sweep"]
    lines = [
        f"Page-budget sweep: {payload['workload']['num_requests']} requests at t=0, max batch "
        f"{payload['args']['batch_size']}, need = {need['pages']} pages of "
        f"{payload['page']['bytes'] // 1024} KiB (peak of the unconstrained run); medians over "
        f"{payload['args']['repeats']} repeats.",
        "",
        *sweep_table(summary, sweep),
        "",
        f"Priority under saturation: {prio['num_requests']} requests, {prio['high_share']:.0%} "
        f"high, one every {prio['gap_iterations']:.2f} iterations ({prio['overload']:g}x the "
        f"unconstrained rate), {summary[loaded[0]]['pages']} pages "
        f"({prio['fraction']:g} of need), swap.",
        "",
        *priority_table(summary, loaded),
        "",
    ]
    for name in loaded:
        r = summary[name]
        if "queue_max" in r:
            lines.append(
                f"{name}: waiting queue up to {r['queue_max']:.0f}, {r['preemptions']:.0f} "
                f"preemptions ({r['swap_preemptions']:.0f} swapped), {r['tokens_per_s']:.0f} tok/s."
            )
    disturbed = [f"{r['system']} rep {r['repeat']}" for r in payload["runs"] if r["disturbed"]]
    if disturbed:
        share = payload["targets"]["disturbed_share"]
        lines.append(
            f"Disturbed runs (CPU / wall < {share:g} x threads, another process took the cores): "
            f"{', '.join(disturbed)}."
        )
    return "\n".join(lines) + "\n"


def sweep_table(summary: dict, systems: list[dict]) -> list[str]:
    rows = []
    for s in systems:
        r = summary[s["name"]]
        if "tokens_per_s" not in r:
            rows.append([s["name"], s["pages"], f"error: {r['errors'][0]}"])
            continue
        pages = f"{s['pages']} ({r['share_of_need']:.2f})" + (" (floored)" if s["floored"] else "")
        cells = [s["name"], pages, fmt(r["tokens_per_s"], spec=".0f")]
        cells += [fmt(r.get("x_unconstrained")), r["lost"], fmt(r["e2e_p50_s"], r["e2e_p99_s"])]
        cells += [fmt(r["ttft_p50_s"], r["ttft_p99_s"])]
        cells += [fmt(r["swap_preemptions"], r["recompute_preemptions"], spec=".0f")]
        cells += [fmt(r["swapped_out_mib"], spec=".0f"), fmt(r["recomputed_tokens"], spec=".0f")]
        rows.append(cells)
    headers = ["system", "pages (x need)", "tok/s", "x unconstr.", "lost", "e2e p50 / p99 s"]
    headers += ["TTFT p50 / p99 s", "preempt. swap / recomp.", "swapped MiB", "recomputed tok"]
    return table(headers, rows)


def priority_table(summary: dict, names: list[str]) -> list[str]:
    rows = []
    for name in names:
        for cls in CLASSES:
            c = summary.get(name, {}).get(cls)
            if c is None:
                rows.append([name, cls, "error", "", "", "", ""])
                continue
            cells = [name, cls, f"{c['n']:.0f}", fmt(c["ttft_p50_s"], spec=".3f")]
            cells += [fmt(c["ttft_p99_s"], spec=".3f"), fmt(c["e2e_p50_s"]), fmt(c["e2e_p99_s"])]
            rows.append(cells)
    headers = ["run", "class", "n", "TTFT p50 s", "TTFT p99 s", "e2e p50 s", "e2e p99 s"]
    return table(headers, rows)


def memory_figure(payload: dict, path: Path) -> None:
    """Throughput and latency against the page budget, and every request's TTFT per priority
    class."""
    summary, args, env = payload["summary"], payload["args"], payload["environment"]
    base = next(summary[s["name"]] for s in payload["systems"] if s["fraction"] is None)
    title = (
        f"Small Llama, float32, CPU, {env['threads']} threads, max batch {args['batch_size']}, "
        f"policy {payload['policy']}"
    )
    with figure(path, ncols=3, size=(15, 4.5), dpi=110, title=title) as (rate, latency, boxes):
        for mode, marker, color in zip(args["modes"], "os", ("C0", "C1"), strict=False):
            rows = [summary[f"{mode}-{f:g}"] for f in args["fractions"]]
            rows = [r for r in rows if "tokens_per_s" in r]
            x, style = [100 * r["share_of_need"] for r in rows], {"marker": marker, "color": color}
            rate.plot(x, [r["tokens_per_s"] for r in rows], label=mode, **style)
            latency.plot(x, [r["e2e_p99_s"] for r in rows], label=f"{mode} p99", **style)
            latency.plot(x, [r["e2e_p50_s"] for r in rows], ls=":", label=f"{mode} p50", **style)
        if "tokens_per_s" in base:
            target = payload["targets"]["throughput_ratio"]
            rate.axhline(base["tokens_per_s"], color="k", ls="--", label="unconstrained")
            rate.axhline(
                target * base["tokens_per_s"], color="r", ls=":", label=f"target {target:g}x"
            )
            latency.axhline(base["e2e_p99_s"], color="k", ls="--", label="unconstrained p99")
        pages = "device pages, % of need"
        for ax in (rate, latency):
            ax.set_ylim(0, None)
        label(rate, "throughput vs page budget", pages, "useful tokens/s", legend=7)
        label(latency, "end-to-end latency vs page budget", pages, "latency, s", legend=7)
        ttfts = class_ttfts(payload)
        if ttfts:
            boxes.boxplot(
                list(ttfts.values()), tick_labels=list(ttfts), whis=(1, 99), showfliers=False
            )
            boxes.set_yscale("log")
        title = "TTFT per class under saturation (whiskers p1-p99)"
        label(boxes, title, "", "time to first token, s")


def class_ttfts(payload: dict) -> dict[str, list[float]]:
    """Every request's TTFT over all repeats, per (priority run, class)."""
    boxes = {}
    for name in (s["name"] for s in payload["systems"] if s["kind"] != "sweep"):
        runs = [r["per_request"] for r in payload["runs"] if r["system"] == name and not r["error"]]
        for cls in CLASSES:
            values = [
                t for r in runs for c, t in zip(r["class"], r["ttft_s"], strict=True) if c == cls[0]
            ]
            if values:
                boxes[f"{name}\n{cls}"] = values
    return boxes


# bench_serving ---------------------------------------------------------------------------------


def serving_markdown(payload: dict) -> str:
    """The rate table (policy x rate), then the saturation table against the offline engine."""
    summary, factors = payload["summary"], payload["args"]["rates"]
    mean_budget = payload["workload"]["budget"]["mean"]
    rates = [
        rate_row(policy, f, row["rates"].get(f, {}), mean_budget)
        for policy, row in summary.items()
        for f in factors
    ]
    saturation = []
    for policy, row in summary.items():
        inf = row["rates"].get("inf", {})
        offline = fmt(row["offline_tokens_per_s"], spec=".0f")
        offline += " *" if row["offline_disturbed"] else ""
        http = fmt(inf.get("output_tokens_per_s"), spec=".0f") + mark(inf)
        saturation.append([policy, offline, http, fmt(row["saturation_ratio"], spec=".3f")])
    lines = [
        f"Rates are multiples of the offline baton engine's sustainable rate "
        f"({payload['sustainable_rate']:.3f} req/s); inf = all requests at t=0; offered = rate x "
        "mean budget; tok/iter = the server's generated tokens per engine iteration; silence = "
        "the longest time no chunk reached any client while a request was in flight (max over "
        "repeats; an engine iteration is the floor). Medians over repeats.",
        "",
        *table(
            ["policy", "rate", "req/s", "offered tok/s", "out tok/s", "TTFT p50 / p99 s"]
            + ["TPOT p50 / p99 ms", "ITL p50 / p99 ms", "e2e p50 / p99 s", "tok/iter"]
            + ["silence s"],
            rates,
        ),
        "",
        *table(["policy", "offline tok/s", "HTTP tok/s at inf", "HTTP / offline"], saturation),
        "",
        f"\\* disturbed: other processes kept more than {payload['targets']['disturbed_cpu']} of "
        "a core busy during the run (see other_cpu_per_wall in the JSON).",
    ]
    return "\n".join(lines) + "\n"


def rate_row(policy: str, factor: str, r: dict, mean_budget: float) -> list[str]:
    rate = "inf" if factor == "inf" else f"{factor}x"
    if "output_tokens_per_s" not in r:
        return [policy, rate, "-", "-", "error", *[""] * 6]
    req_s = r["request_rate"]
    cells = [policy, rate, fmt(req_s, spec=".3f") if req_s else "inf"]
    cells += [fmt(req_s * mean_budget, spec=".0f") if req_s else "-"]
    cells += [f"{r['output_tokens_per_s']:.0f}{mark(r)}", percentiles(r["ttft_s"], 1, ".2f")]
    cells += [percentiles(r["tpot_s"], 1e3, ".1f"), percentiles(r["itl_s"], 1e3, ".1f")]
    cells += [percentiles(r["e2e_s"], 1, ".2f"), fmt(r["tokens_per_iteration"], spec=".1f")]
    return cells + [fmt(r["longest_silence_s"])]


def percentiles(stats: dict, scale: float, spec: str) -> str:
    """'p50 / p99' of a stats dict."""
    return fmt(stats.get("p50"), stats.get("p99"), spec=spec, scale=scale)


def mark(rate_row: dict) -> str:
    return " *" if rate_row.get("disturbed") else ""


def serving_figure(payload: dict, path: Path) -> None:
    """Throughput, TTFT and TPOT against the request rate, per policy; inf drawn at the right
    edge, the offline engine's throughput as an x there."""
    summary, factors, args = payload["summary"], payload["args"]["rates"], payload["args"]
    finite = [float(f) * payload["sustainable_rate"] for f in factors if f != "inf"]
    inf_x = 2 * max(finite) if finite else 1.0
    xs = {f: inf_x if f == "inf" else float(f) * payload["sustainable_rate"] for f in factors}
    title = (
        f"baton-paged serve, small Llama float32, CPU {args['threads']} threads, max batch "
        f"{args['batch_size']}: {args['num_requests']} streamed requests, Poisson arrivals"
    )
    with figure(path, ncols=3, size=(15, 4.5), title=title) as axes:
        for k, (policy, row) in enumerate(summary.items()):
            color = f"C{k}"
            ok = [f for f in factors if "output_tokens_per_s" in row["rates"].get(f, {})]
            x, rates = [xs[f] for f in ok], [row["rates"][f] for f in ok]
            y = [r["output_tokens_per_s"] for r in rates]
            axes[0].plot(x, y, "o-", color=color, label=policy)
            if row["offline_tokens_per_s"] and "inf" in xs:
                axes[0].plot([inf_x], [row["offline_tokens_per_s"]], "x", color=color, ms=10)
            for ax, metric, scale in ((axes[1], "ttft_s", 1.0), (axes[2], "tpot_s", 1e3)):
                for q, style, alpha in (("p50", "o-", 1.0), ("p99", "s--", 0.6)):
                    y = [None if r[metric].get(q) is None else r[metric][q] * scale for r in rates]
                    ax.plot(*measured(x, y), style, color=color, alpha=alpha)
        mean_budget = payload["workload"]["budget"]["mean"]
        axes[0].plot(finite, [r * mean_budget for r in finite], "k:", label="offered load")
        axes[0].plot([], [], "kx", label="offline engine (all at t=0)")
        titles = ("output tokens/s (x: offline engine)", "TTFT s (solid p50, dashed p99)")
        titles += ("TPOT ms (solid p50, dashed p99)",)
        ticks = [f"{x:.2f}" if f != "inf" else "inf" for f, x in xs.items()]
        for ax, title in zip(axes, titles, strict=True):
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(list(xs.values()), ticks)
            label(ax, title, "request rate (req/s), log scale")
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=8)


# Drawing ---------------------------------------------------------------------------------------


@contextmanager
def figure(path: Path, ncols: int = 1, size=(7, 4.5), dpi: int = 120, title: str | None = None):
    """A row of ``ncols`` axes to draw on, saved to ``path`` as PNG when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size, squeeze=False)
    try:
        yield axes[0]
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def label(ax, title: str, xlabel: str, ylabel: str = "", legend: int | None = None) -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=legend)


def measured(x: list, y: list) -> tuple[list, list]:
    """The points whose y was measured (not None)."""
    kept = [(a, b) for a, b in zip(x, y, strict=True) if b is not None]
    return [a for a, _ in kept], [b for _, b in kept]
