"""Where a batch's time goes, baton against vLLM CPU at its default: the decode step at fixed batch
sizes, attention per context token, prefill per prompt token (one interleaved run).

    python benchmarks/bench_step_costs.py [--model smollm2] [--dtype bfloat16] [--repeats 3]

``bench_peers`` gives one figure for a whole workload; this splits it. Each case is B seeded
prompts of L tokens, run as one ``generate`` twice over: generating G = 64 tokens each and
generating 1 (``ignore_eos``), so that

* decode step = (t(64) - t(1)) / 63, at B = 1, 8 and 32 (L = 128): how a step grows with rows;
* attention per context token-row = the B = 32 step's growth from L = 128 to L = 896, over the
  context token-rows added (the K/V one row reads from memory a step);
* prefill per token = t(1) / (B L), at L = 128 and 896 (B = 32).

Each system keeps one engine (vLLM's in its own process, ``vllm_peer.py``, with the cases as
rounds), the cases run in turn, and each figure is the fastest of ``--repeats`` runs after one
uncounted warm-up run.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import harness
import numpy as np
import torch
from bench_peers import MAX_MODEL_LEN, VLLM_PYTHON, VllmPeer, baton_llm, baton_run
from transformers import AutoTokenizer
from workload import Workload

from baton_paged.model.builder import cached_model

BATCHES = (1, 8, 32)
SHORT, LONG = 128, 896
GENERATED = 64
SLOTS = max(BATCHES)  # both engines' batch size, and the B of the long-context case
CASES = [(b, SHORT) for b in BATCHES] + [(SLOTS, LONG)]


def case_workloads(vocab: int, seed: int) -> dict[tuple[int, int, int], Workload]:
    """(batch, prompt length, tokens generated) -> its workload, each with prompts of its own
    (vLLM resets its prefix cache once a run, not between the run's rounds)."""
    rng = np.random.default_rng(seed)
    out = {}
    for batch, length in CASES:
        for budget in (GENERATED, 1):
            prompts = [rng.integers(1, vocab, length).tolist() for _ in range(batch)]
            out[(batch, length, budget)] = Workload(prompts, [budget] * batch)
    return out


def vllm_rounds(works: dict, scratch: Path) -> tuple[Path, list]:
    """One workload file holding every case, each a round (one ``generate``)."""
    prompts, budgets, rounds = [], [], []
    for work in works.values():
        rounds.append(list(range(len(prompts), len(prompts) + len(work.prompts))))
        prompts += work.prompts
        budgets += work.budgets
    path = scratch / "cases.json"
    path.write_text(json.dumps({"prompts": prompts, "budgets": budgets, "rounds": rounds,
                                "max_model_len": MAX_MODEL_LEN}))  # fmt: skip
    return path, list(works)


def measure(args) -> dict[str, dict]:
    model_dir = cached_model("llama", args.model)
    works = case_workloads(len(AutoTokenizer.from_pretrained(model_dir)), args.seed)
    times: dict[str, dict] = {"baton": {}, "vllm": {}}
    llm = baton_llm(model_dir, SLOTS, "baton", args.dtype)
    with tempfile.TemporaryDirectory() as scratch:
        workload_file, keys = vllm_rounds(works, Path(scratch))
        peer = VllmPeer(workload_file, model_dir, SLOTS, args.threads, args.dtype, "default")
        try:
            for repeat in range(args.repeats + 1):
                walls = {"baton": [baton_run(llm, work)[0] for work in works.values()]}
                walls["vllm"] = peer.run_rounds()
                if repeat == 0:  # the warm-up run, not counted
                    continue
                for system, found in walls.items():
                    for key, wall in zip(keys, found, strict=True):
                        times[system][key] = min(wall, times[system].get(key, wall))
        finally:
            peer.close()
            llm.close()
    return {system: costs(found) for system, found in times.items()}


def costs(times: dict[tuple[int, int, int], float]) -> dict:
    """Seconds per case -> the figures the module docstring defines (milliseconds, microseconds)."""

    def step(batch: int, length: int) -> float:
        return (times[(batch, length, GENERATED)] - times[(batch, length, 1)]) / (GENERATED - 1)

    out = {f"decode step B={b} ms": 1e3 * step(b, SHORT) for b in BATCHES}
    out[f"decode step B={SLOTS} L={LONG} ms"] = 1e3 * step(SLOTS, LONG)
    growth = step(SLOTS, LONG) - step(SLOTS, SHORT)
    out["attention us per context token-row"] = 1e6 * growth / (SLOTS * (LONG - SHORT))
    for length in (SHORT, LONG):
        out[f"prefill us per token L={length}"] = 1e6 * times[(SLOTS, length, 1)] / (SLOTS * length)
    return out


def report(saved: dict) -> harness.Report:
    baton, vllm = saved["costs"]["baton"], saved["costs"]["vllm"]
    rows = [
        {"figure": name, "baton": baton[name], "vllm": vllm[name],
         "vllm / baton": round(vllm[name] / baton[name], 3)}
        for name in baton
    ]  # fmt: skip
    env = saved["environment"]
    lines = [
        f"# Step costs, baton vs vLLM CPU default ({saved['args']['model']}, "
        f"{saved['args']['dtype']}, {env['threads']} threads; fastest of "
        f"{saved['args']['repeats']} interleaved runs)",
        "",
        *harness.markdown(rows),
    ]
    panel = [
        {"B": b, "system": system, "ms": saved["costs"][system][f"decode step B={b} ms"]}
        for b in BATCHES
        for system in ("baton", "vllm")
    ]
    panels = {"decode step ms (L = 128)": harness.series(panel, "B", "system", "ms")}
    return lines, "decode step by batch size", panels


def main() -> None:
    parser = harness.options(__doc__, threads=2, repeats=3, results="step-costs-cpu")
    parser.add_argument("--model", choices=("small", "smollm2"), default="smollm2")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    args = harness.start(parser)
    if not VLLM_PYTHON.exists():
        sys.exit(f"{VLLM_PYTHON} is missing: run .ci/vllm-tests once to build the vLLM venv")
    payload = {
        "environment": harness.environment(args.threads, torch.device("cpu")),
        "args": vars(args),
        "costs": measure(args),
        "checks": [],
    }
    harness.publish(args.name, payload, report, [])


if __name__ == "__main__":
    main()
