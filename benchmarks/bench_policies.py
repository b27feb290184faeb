"""Policy benchmark: useful output tokens/s of BATON against its baselines and two HF peers.

    python benchmarks/bench_policies.py [--quick] [--repeats 1] [--batch-sizes 4,8,16,32]
        [--systems baton,orca,static,chunked,hf-generate,hf-cb] [--num-requests 128] [--threads 2]

The workload: 128 requests, all arriving at t=0, prompts of random token ids with
lengths uniform in [16, 256], output budgets long-tailed (lognormal with sigma 1 and the mean of
the unclipped distribution at 100, clipped to [4, 512]). Every system must produce exactly each
request's budget, so the useful tokens are the same for all and throughput = total budget / wall
time of the whole workload. Systems, on the small random-weight Llama in float32 on fixed threads:

* ``baton`` / ``orca`` / ``static`` / ``chunked``: our engine under each batching policy
  (``ignore_eos=True``, greedy), max batch = the batch size;
* ``hf-generate``: plain ``model.generate`` on left-padded chunks of B requests in arrival order,
  each chunk run to the largest budget in it (``min_new_tokens = max_new_tokens``); only each
  request's own budget counts as useful, the rest is the waste static batching pays;
* ``hf-cb``: transformers' own continuous batching (``ContinuousBatchingManager``, sdpa attention,
  per-request ``max_new_tokens``, EOS disabled with ``eos_token_id=-1``), ``max_requests_per_batch``
  = B. Its batch limit counts requests per forward (decoders first, then prompts), ours counts
  requests holding a batch slot: close, not identical.

Runs are interleaved (each repeat runs every (system, batch size) once, systems alternating) so
drift hits all alike. Each run records wall time, process CPU time / wall (about ``threads`` when
nothing else competed for the cores) and the 1-minute load average, to flag disturbed runs.

The ideal throughput of this machine is measured with our own forward and no scheduling: prefill
of all prompts (packed into forwards of <= 4096 tokens), then the decode steps a scheduler with no
overhead of its own runs (requests join first come, first served whenever a slot is free:
``peers.fcfs_decode_steps``), each timed at its own batch size at a representative context (mean
prompt + half the mean budget, every row). The long tail keeps the batch partly empty at the end
whatever the scheduler (at B=32 the longest budget alone is 512 steps, more than
ceil(total / 32)), so the older bound of ceil(total budget / B) full-batch steps is reported
beside it as ``full_batch_tokens_per_s`` but no schedule can reach it. The ideal is measured
at the start of every round, beside that round's runs, and each run is set against its own
round's (this machine drifts by several percent between minutes). Targets at max batch 32:
baton >= 3x hf-generate, >= 1.5x hf-cb, slot efficiency >= 0.98 and >= 90% of the ideal.
Results go to ``results/policies-cpu.{json,png,md}``.
"""

from __future__ import annotations

from dataclasses import asdict

import harness
import workload
from harness import Default, check, markdown, median, ratio
from peers import CB_SETUP, PEERS, measure_ideal

from baton_paged.sched.policies import POLICIES

SYSTEMS = (*POLICIES, *PEERS)
TARGET_BATCH = 32
TARGETS = {"hf-generate": 3.0, "hf-cb": 1.5}
TARGET_SLOT_EFFICIENCY = 0.98
TARGET_IDEAL_SHARE = 0.9
ENGINE_COUNTERS = ("slot_efficiency", "mean_batch_size", "preemptions", "iterations")
ENGINE_COUNTERS += ("forward_share", "prefill_forwards", "prefill_forward_s", "decode_forward_s")


class Runner:
    """Our model (switched to paged attention by each engine) and a second instance for the
    peers, which keep sdpa; runs one (system, batch size) at a time."""

    def __init__(self):
        self.ours = workload.OurModel()
        self.peer = workload.load_hf(self.ours.path, attn="sdpa")

    def run(self, system: str, batch: int, requests: workload.Workload, repeat: int):
        result = workload.RunResult(system, batch, repeat)

        def fill() -> None:
            if system in POLICIES:
                workload.run_engine(self.ours.engine(system, batch), requests, result)
            else:
                PEERS[system](self.peer, requests, batch, result)

        return harness.recorded(result, fill)


def summarize(runs: list[workload.RunResult]) -> dict:
    """Per (system, batch size): the median over repeats of tokens/s and the other metrics."""
    out: dict = {}
    for r in runs:
        out.setdefault(r.system, {}).setdefault(r.batch_size, []).append(r)
    for system, by_batch in out.items():
        out[system] = {b: summary_row(group) for b, group in sorted(by_batch.items())}
    return out


def summary_row(group: list[workload.RunResult]) -> dict:
    row, ok = harness.outcome(group)
    if not ok:
        return row
    row["tokens_per_s"] = median((r.tokens_per_s for r in ok), 2)
    row["wall_s"] = median((r.wall_s for r in ok), 3)
    row["ttft_median_s"] = median((r.ttft_median_s for r in ok), 3)
    row["exact_budgets"] = all(r.exact_budgets for r in ok)
    row |= {k: median(r.extra[k] for r in ok) for k in ENGINE_COUNTERS if k in ok[0].extra}
    shares = [
        r.tokens_per_s / r.extra["ideal_tokens_per_s"]
        for r in ok
        if r.extra.get("ideal_tokens_per_s")
    ]
    if shares:  # each run against the ideal measured in its own round
        row["share_of_ideal"] = median(shares, 4)
    return row


def checks(summary: dict, batch: int) -> list[dict]:
    """The targets at ``batch``, each met or not, plus baton vs orca and static."""
    baton = summary.get("baton", {}).get(batch, {})
    rate = baton.get("tokens_per_s")

    def versus(peer: str) -> float | None:
        return ratio(rate, summary.get(peer, {}).get(batch, {}).get("tokens_per_s"), 3)

    found = [check(f"baton / {peer} tokens/s", versus(peer), t) for peer, t in TARGETS.items()]
    slot = baton.get("slot_efficiency")
    found.append(check("baton slot efficiency", slot, TARGET_SLOT_EFFICIENCY))
    found.append(check("baton / ideal tokens/s", baton.get("share_of_ideal"), TARGET_IDEAL_SHARE))
    forward_share = baton.get("forward_share")
    found.append(check("baton's time in the forward / its wall time", forward_share, 0.9))
    for peer in ("orca", "static", "chunked"):
        found.append(check(f"baton / {peer} tokens/s", versus(peer), None))
    return found


def report(saved: dict) -> tuple[list[str], str, harness.Panels]:
    """Every (system, batch size)'s medians, its tokens/s also as a multiple of hf-generate's at
    that batch size, then the ideal's; the figure: tokens/s against the batch size."""
    args, per_batch = saved["args"], saved["ideal"]["per_batch"]
    ideal = {b: {"tokens_per_s": r["ideal_tokens_per_s"]} for b, r in per_batch.items()}
    full = {b: {"tokens_per_s": r.get("full_batch_tokens_per_s")} for b, r in per_batch.items()}
    systems = saved["summary"] | {"ideal (our forward, no scheduling)": ideal}
    systems["full-batch bound (unreachable)"] = full

    def rate(system: str, b: str) -> float | None:
        return systems.get(system, {}).get(b, {}).get("tokens_per_s")

    rows = [
        {"system": s, "B": b, "tokens_per_s": rate(s, b)}
        | {"x_hf_generate": ratio(rate(s, b), rate("hf-generate", b), 2)}
        | row
        for s, by_batch in systems.items()
        for b, row in by_batch.items()
    ]
    title = (
        f"Small Llama, float32, CPU, {args['threads']} threads: {args['num_requests']} "
        f"requests at t=0, budgets <= {args['max_budget']}"
    )
    panel = harness.series(rows, "B", "system", "tokens_per_s")
    lines = ["Useful output tokens/s, medians over repeats.", "", *markdown(rows)]
    return lines, title, {"useful output tokens/s against max batch size": panel}


def parse_args():
    quick = "24 requests, B 4,8, budgets <= 64"
    parser = harness.options(__doc__, threads=2, repeats=1, quick=quick, results="policies-cpu")
    batches = Default([4, 8, 16, 32], [4, 8])
    sizes = harness.comma_list(int)
    parser.add_argument("--batch-sizes", type=sizes, default=batches, help="%(default)s")
    systems = harness.comma_list(str, SYSTEMS)
    parser.add_argument("--systems", type=systems, default=list(SYSTEMS), help=",".join(SYSTEMS))
    workload.add_options(parser, num_requests=Default(128, 24))
    return harness.start(parser)


def ideal_summary(per_round: dict[int, dict], batch_sizes: list[int]) -> dict:
    """Each figure of the ideal at each batch size, the median over the rounds that measured
    it, and every round's measurement."""
    per_batch = {}
    for b in batch_sizes:
        measured = [
            ideal["per_batch"][b] for ideal in per_round.values() if b in ideal["per_batch"]
        ]
        per_batch[b] = {key: median(m[key] for m in measured) for key in measured[0]}
    return {"per_batch": per_batch, "rounds": per_round}


def main() -> None:
    args, runner = parse_args(), Runner()
    requests = runner.ours.workload(args)
    info = requests.describe(args.max_budget)
    print(f"workload: {info}")

    for system in args.systems:  # first-call costs (allocator, kernels) stay out of the runs
        runner.run(system, min(args.batch_sizes), requests.head(2, budget=2), repeat=-1)
    runs, per_repeat, ideals = [], len(args.batch_sizes), {}
    # A round runs every system at one batch size, the systems rotated one place per round, and
    # measures the ideal at that batch size first: drift on this machine moves it as it moves
    # the runs, so each run is set against the ideal of its own round.
    for round_, system in harness.rotations(args.systems, args.repeats * per_repeat):
        repeat, b = round_ // per_repeat, args.batch_sizes[round_ % per_repeat]
        if round_ not in ideals:
            ideals[round_] = measure_ideal(runner.ours.model, requests, [b])
            print(f"[rep {repeat}] ideal B={b}: {ideals[round_]['per_batch'][b]}", flush=True)
        result = runner.run(system, b, requests, repeat)
        result.extra["ideal_tokens_per_s"] = ideals[round_]["per_batch"][b]["ideal_tokens_per_s"]
        runs.append(result)
        harness.announce(f"[rep {repeat}] {system:>11} B={b:<3}", result, result.extra)
    best = ideal_summary(ideals, args.batch_sizes)

    summary = summarize(runs)
    ours = {"kv_memory": workload.KV_MEMORY, "max_prefill_tokens": workload.MAX_PREFILL_TOKENS}
    batch = TARGET_BATCH if TARGET_BATCH in args.batch_sizes else max(args.batch_sizes)
    payload = {
        "environment": runner.ours.environment(),
        "args": vars(args),
        "workload": info,
        "setup": {"ours": ours, "hf-cb": CB_SETUP},
        "ideal": best,
        "summary": summary,
        "checks_batch": batch,
        "checks": checks(summary, batch),
        "runs": [asdict(r) for r in runs],
    }
    bad = [r for r in runs if r.error or not r.exact_budgets]
    problems = [f"problem: {r.system} B={r.batch_size}: {r.error or 'budget missed'}" for r in bad]
    harness.publish(args.name, payload, report, problems)


if __name__ == "__main__":
    main()
