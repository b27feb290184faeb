"""vLLM's side of ``bench_peers``: one vLLM engine kept alive, running the workload on request.

Runs in the vLLM environment (``.venv-vllm``, built by ``.ci/vllm-tests``), never in ours: vLLM
pins its own torch and transformers. ``bench_peers`` starts it as

    .venv-vllm/bin/python benchmarks/vllm_peer.py WORKLOAD.json MODEL_DIR MAX_NUM_SEQS \
        [DTYPE [eager|default]]

(dtype float32 unless given; ``eager`` sets ``enforce_eager``, ``default`` leaves vLLM's own
choice, its compiled graphs) and talks over stdin/stdout, one JSON object per line: it prints
``{"ready": seconds}`` once the engine is built (seconds from process start to the first token of
a one-request warm-up), then answers each ``run`` line with the workload's wall time (each
round's in ``round_s``) and every request's token ids, ``warmup N BUDGET`` by generating the first
N prompts with at most BUDGET tokens each (``{"warm": seconds}``), ``single [IDS] BUDGET`` with
the wall time of that one prompt (a JSON list, no spaces) generating BUDGET tokens alone
(``{"wall_s": seconds}``), and stops at ``quit`` or end of input. Everything else vLLM prints
goes to stderr. A workload with ``"rounds"`` (lists of request indices) runs them one
``generate`` after another, as multi-turn chat does (``bench_prefix``), and each ``run`` starts
from a reset prefix cache.
"""

from __future__ import annotations

import json
import sys
import time

STARTED = time.perf_counter()


def main() -> None:
    workload_path, model_dir, max_num_seqs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dtype = sys.argv[4] if len(sys.argv) > 4 else "float32"
    eager = (sys.argv[5] if len(sys.argv) > 5 else "eager") == "eager"
    workload = json.loads(open(workload_path).read())
    reply = sys.stdout
    sys.stdout = sys.stderr  # vLLM's own prints must not break the protocol

    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(
        model=model_dir,
        dtype=dtype,
        max_num_seqs=max_num_seqs,
        max_model_len=workload["max_model_len"],
        enforce_eager=eager,
        seed=0,
    )
    prompts = [TokensPrompt(prompt_token_ids=p) for p in workload["prompts"]]
    rounds = workload.get("rounds", [list(range(len(prompts)))])
    params = [
        SamplingParams(temperature=0, max_tokens=b, ignore_eos=True) for b in workload["budgets"]
    ]
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts[:1], first, use_tqdm=False)
    answer(reply, {"ready": time.perf_counter() - STARTED})
    for line in sys.stdin:
        if line.startswith("warmup"):
            _, count, budget = line.split()
            start = time.perf_counter()
            few = [SamplingParams(temperature=0, max_tokens=min(b, int(budget)), ignore_eos=True)
                   for b in workload["budgets"][: int(count)]]  # fmt: skip
            llm.generate(prompts[: int(count)], few, use_tqdm=False)
            answer(reply, {"warm": time.perf_counter() - start})
            continue
        if line.startswith("single"):
            _, ids, budget = line.split()
            alone = SamplingParams(temperature=0, max_tokens=int(budget), ignore_eos=True)
            llm.reset_prefix_cache()  # the prompt was in the runs before it
            start = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=json.loads(ids))], alone, use_tqdm=False)
            answer(reply, {"wall_s": time.perf_counter() - start})
            continue
        if line.strip() != "run":
            break
        llm.reset_prefix_cache()
        tokens: list = [None] * len(prompts)
        start = time.perf_counter()
        round_s = []
        for batch in rounds:
            began = time.perf_counter()
            outs = llm.generate([prompts[i] for i in batch], [params[i] for i in batch],
                                use_tqdm=False)  # fmt: skip
            round_s.append(time.perf_counter() - began)
            for i, out in zip(batch, outs, strict=True):
                tokens[i] = list(out.outputs[0].token_ids)
        wall = time.perf_counter() - start
        answer(reply, {"wall_s": wall, "round_s": round_s, "tokens": tokens})


def answer(stream, message: dict) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


if __name__ == "__main__":
    main()
