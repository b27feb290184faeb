"""The three benchmarks' runs and their reports, in vLLM's figures and wording."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import numpy as np

from baton_paged.bench.client import poisson_offsets, send_all, stats
from baton_paged.bench.datasets import Sample
from baton_paged.sampling_params import SamplingParams

PERCENTILES = (10, 25, 50, 75, 90, 99)


def latency(llm: Any, samples: list[Sample], warmup: int, iterations: int) -> dict:
    """Seconds to generate ``samples`` (one batch) end to end: mean and percentiles over
    ``iterations`` runs after ``warmup`` unmeasured ones."""
    prompts = [{"prompt_token_ids": list(s.prompt)} for s in samples]
    params = [SamplingParams(max_tokens=s.output_len, ignore_eos=True) for s in samples]

    def once() -> float:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    times = [once() for _ in range(iterations)]
    result = {"avg_latency_s": statistics.fmean(times), "latencies_s": times}
    result |= {f"p{q}_s": float(np.percentile(times, q)) for q in PERCENTILES}
    return result


def throughput(llm: Any, samples: list[Sample]) -> dict:
    """Requests and tokens per second over the whole dataset in one ``generate``."""
    prompts = [s.prompt if isinstance(s.prompt, str) else {"prompt_token_ids": s.prompt}
               for s in samples]  # fmt: skip
    params = [SamplingParams(max_tokens=s.output_len, ignore_eos=True) for s in samples]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompted = sum(len(o.prompt_token_ids) for o in outputs)
    return {
        "elapsed_s": elapsed,
        "num_requests": len(outputs),
        "total_num_tokens": prompted + generated,
        "requests_per_s": len(outputs) / elapsed,
        "tokens_per_s": (prompted + generated) / elapsed,
        "output_tokens_per_s": generated / elapsed,
    }


def serve(
    url: str,
    model: str,
    samples: list[Sample],
    request_rate: float | None,
    max_concurrency: int | None,
    seed: int,
    api_key: str | None = None,
    timeout_s: float = 600.0,
) -> dict:
    """Stream every sample from ``url``'s ``/v1/completions`` at ``request_rate`` (Poisson; None:
    all at once) with at most ``max_concurrency`` in flight; vLLM's serving figures."""
    bodies = [
        {"model": model, "prompt": s.prompt, "max_tokens": s.output_len, "temperature": 0,
         "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        for s in samples
    ]  # fmt: skip
    offsets = poisson_offsets(len(samples), request_rate, seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    endpoint = f"{url.rstrip('/')}/v1/completions"
    records, duration = asyncio.run(
        send_all(endpoint, bodies, offsets, timeout_s, max_concurrency, headers)
    )
    done = [(r, s) for r, s in zip(records, samples, strict=True) if r.error is None]
    output_tokens = sum(r.output_tokens for r, _ in done)
    input_tokens = sum(s.prompt_len for _, s in done)
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_s": stats([r.ttft for r, _ in done]),
        "tpot_s": stats([r.tpot for r, _ in done if r.tpot is not None]),
        "itl_s": stats([gap for r, _ in done for gap in np.diff(r.times).tolist()]),
        "e2e_s": stats([r.latency for r, _ in done]),
    }


def report(title: str, result: dict) -> str:
    """The result as vLLM's console block: one figure per line, latencies in milliseconds (the
    raw measurements go to the JSON only)."""
    lines = [f"{f' {title} ':=^50}"]
    for key, value in result.items():
        if isinstance(value, dict):
            name = key.removesuffix("_s").upper()
            for stat in ("mean", "p50", "p99"):
                if stat in value:
                    label = f"{stat.capitalize()} {name} (ms):"
                    lines.append(f"{label:<40}{value[stat] * 1e3:>10.2f}")
        elif isinstance(value, float):
            lines.append(f"{key + ':':<40}{value:>10.4f}")
        elif isinstance(value, int):
            lines.append(f"{key + ':':<40}{value:>10}")
        elif value and isinstance(value, list) and isinstance(value[0], str):
            lines.append(f"{key + ':':<40}{value}")
    return "\n".join([*lines, "=" * 50])
