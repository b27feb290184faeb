"""Prefix caching on multi-turn chat: caching on vs off in our engine, beside vLLM CPU (its prefix
caching on, its default).

    python benchmarks/bench_prefix.py [--conversations 16] [--turns 4] [--system-tokens 512]
        [--repeats 2] [--threads 2] [--quick]

Workload: every conversation starts with the same ``--system-tokens`` system prompt; each turn
adds a user message (32-64 tokens) and asks for a 32-token reply, and the next turn re-sends the
whole history (system, every user message, every reply so far), as chat clients do. Token ids are
seeded random ids of the small random Llama's vocabulary, so the run needs no download; replies
in the history are fixed ids too, so every system sees exactly the same prompts. Turns run as
rounds: all conversations' turn k in one ``generate``, then turn k + 1. Each repeat starts from a
reset cache, so a repeat's hits are its own.

Per system: wall time, output tokens/s, TTFT p50 over every request (ours: from each request's
metrics; vLLM's offline outputs carry none here), and ours: prompt tokens the model computed.
Targets (ratios from one interleaved run): computed prefill tokens reduced by >= 80%, TTFT p50
>= 3x better, throughput >= 1.5x with caching on vs off. Results: ``results/prefix-cpu.*``.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import harness
import torch
from bench_peers import VLLM_PYTHON, VllmPeer
from harness import Clock, Default, check, median, ratio

from baton_paged import LLM, SamplingParams
from baton_paged.model.builder import cached_model

REPLY_TOKENS = 32
MAX_MODEL_LEN = 2048
SYSTEMS = {"caching on": True, "caching off": False}


def conversations(args, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """Every request's prompt, and the rounds (request indices) that run together."""
    rng = random.Random(args.seed)
    system = [rng.randrange(vocab) for _ in range(args.system_tokens)]
    histories = [list(system) for _ in range(args.conversations)]
    prompts, rounds = [], []
    for _ in range(args.turns):
        batch = []
        for history in histories:
            history += [rng.randrange(vocab) for _ in range(rng.randint(32, 64))]
            batch.append(len(prompts))
            prompts.append(list(history))
            history += [rng.randrange(vocab) for _ in range(REPLY_TOKENS)]  # the reply, re-sent
        rounds.append(batch)
    return prompts, rounds


def baton_run(llm: LLM, prompts, rounds) -> dict:
    llm.reset_prefix_cache()
    computed_before = llm.engine.snapshot.stats.prompt_tokens
    params = SamplingParams(temperature=0, max_tokens=REPLY_TOKENS, ignore_eos=True)
    ttfts, tokens = [], [None] * len(prompts)
    with Clock() as clock:
        for batch in rounds:
            outs = llm.generate([{"prompt_token_ids": prompts[i]} for i in batch], params,
                                use_tqdm=False)  # fmt: skip
            for i, out in zip(batch, outs, strict=True):
                tokens[i] = list(out.outputs[0].token_ids)
                ttfts.append(out.metrics.time_to_first_token)
    computed = llm.engine.snapshot.stats.prompt_tokens - computed_before
    return {"wall_s": clock.wall, "ttft_p50_s": median(ttfts), "prefill_computed": computed,
            "tokens": tokens}  # fmt: skip


def measure(args) -> tuple[list[dict], dict]:
    model_dir = cached_model("llama", "small")
    llms = {name: LLM(str(model_dir), dtype="float32", max_batch_size=args.conversations,
                      kv_memory="1GiB", max_model_len=MAX_MODEL_LEN, enable_prefix_caching=on)
            for name, on in SYSTEMS.items()}  # fmt: skip
    prompts, rounds = conversations(args, len(llms["caching on"].get_tokenizer()))
    systems, runs, tokens = list(SYSTEMS), [], {}
    with tempfile.TemporaryDirectory() as scratch:
        peer = None
        if VLLM_PYTHON.exists():
            workload = {"prompts": prompts, "rounds": rounds, "max_model_len": MAX_MODEL_LEN,
                        "budgets": [REPLY_TOKENS] * len(prompts)}  # fmt: skip
            (Path(scratch) / "workload.json").write_text(json.dumps(workload))
            peer = VllmPeer(Path(scratch) / "workload.json", model_dir, args.conversations,
                            args.threads)  # fmt: skip
            systems.append("vllm")
        for llm in llms.values():
            baton_run(llm, prompts[:2], [[0, 1]])  # warm-up
        for repeat, system in harness.rotations(systems, args.repeats):
            if system == "vllm":
                wall, toks = peer.run()
                result = {"wall_s": wall, "tokens": toks}
            else:
                result = baton_run(llms[system], prompts, rounds)
            tokens[system] = result.pop("tokens")
            result |= {"system": system, "repeat": repeat,
                       "tokens_per_s": REPLY_TOKENS * len(prompts) / result["wall_s"]}  # fmt: skip
            runs.append(result)
            print(f"{system} repeat {repeat}: {result['tokens_per_s']:.1f} tok/s", flush=True)
        if peer is not None:
            peer.close()
    for llm in llms.values():
        llm.close()
    agree = {f"caching on = {s}": sum(a == b for a, b in zip(tokens["caching on"], tokens[s],
                                                             strict=True)) / len(prompts)
             for s in systems[1:]}  # fmt: skip
    total_prompt = sum(map(len, prompts))
    return runs, {"same_tokens": agree, "prompt_tokens_sent": total_prompt,
                  "requests": len(prompts)}  # fmt: skip


def summarise(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    keys = ("wall_s", "tokens_per_s", "ttft_p50_s", "prefill_computed")
    rows = [{"system": s} | harness.medians([r for r in runs if r["system"] == s], 4, keys)
            for s in dict.fromkeys(r["system"] for r in runs)]  # fmt: skip
    on, off = rows[0], rows[1]
    reduction = 1 - on["prefill_computed"] / off["prefill_computed"]
    checks = [
        check("prefill tokens computed, reduction with caching", round(reduction, 3), 0.8),
        check("TTFT p50 off / on", ratio(off["ttft_p50_s"], on["ttft_p50_s"], 2), 3.0),
        check("throughput on / off", ratio(on["tokens_per_s"], off["tokens_per_s"], 2), 1.5),
    ]
    if len(rows) > 2:
        vllm = ratio(on["tokens_per_s"], rows[2]["tokens_per_s"], 2)
        checks.append(check("throughput caching on / vLLM (prefix caching on)", vllm, None))
    return rows, checks


def report(saved: dict) -> tuple[list[str], str, harness.Panels]:
    rows = saved["summary"]
    lines = [f"# Prefix caching, multi-turn chat ({saved['args']['system_tokens']}-token system "
             f"prompt, {saved['args']['turns']} turns)", "", *harness.markdown(rows),
             "", f"same tokens: {saved['same_tokens']}"]  # fmt: skip
    names = [r["system"] for r in rows]
    panels = {"output tokens/s": (names, {"tok/s": [r["tokens_per_s"] for r in rows]})}
    return lines, "bench_prefix", panels


def main() -> None:
    parser = harness.options(__doc__, threads=2, repeats=Default(2, 1), quick="4 conversations, "
                             "2 turns, 1 repeat", results="prefix-cpu")  # fmt: skip
    parser.add_argument("--conversations", type=int, default=Default(16, 4))
    parser.add_argument("--turns", type=int, default=Default(4, 2))
    parser.add_argument("--system-tokens", type=int, default=512)
    args = harness.start(parser)
    runs, extra = measure(args)
    rows, checks = summarise(runs)
    environment = harness.environment(args.threads, torch.device("cpu"))
    payload = {"environment": environment, "args": vars(args), "runs": runs, "summary": rows,
               "checks": checks} | extra  # fmt: skip
    harness.publish(args.name, payload, report, [])


if __name__ == "__main__":
    main()
