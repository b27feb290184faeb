"""The sampler's time per step against the plain way of doing the same thing.

    python benchmarks/bench_sampler.py [--repeats 20] [--threads 2] [--device cpu|cuda] [--quick]

One step's logits of B rows over the vocabulary (4,096: the tiny model's; 49,152:
SmolLM2-135M's) are sampled by ``model/sampler.sample`` and by ``plain``: what the sampler did
before it was made batch work, kept here as the reference it is measured against (a
``multinomial`` draw per row, which draws one random number per vocabulary entry; top-k/top-p by
a stable sort of the whole vocabulary; penalties row by row with a vocabulary-sized count per
row). Logits are "peaked" like a real model's (a few dozen likely tokens and a long flat tail),
so a nucleus is a few dozen tokens, as in chat. Cases: temperature 1; temperature 0.8 with
top-p 0.95; top-k 50; greedy with a frequency penalty 0.5 over 100 earlier tokens; and top-p on
flat logits, the worst case (``FLAT``). Both run
interleaved on the same logits; ms per step are medians. Results: ``results/sampler-<device>.*``.
"""

from __future__ import annotations

import harness
import torch
from harness import Default, interleaved, synchronizer

from baton_paged.model.sampler import SamplingRow, sample
from baton_paged.sampling_params import SamplingParams

CASES = {
    "temperature 1": SamplingParams(temperature=1.0),
    "t 0.8, top-p 0.95": SamplingParams(temperature=0.8, top_p=0.95),
    "top-k 50": SamplingParams(temperature=0.8, top_k=50),
    "frequency penalty": SamplingParams(temperature=0.0, frequency_penalty=0.5),
    "top-p 0.95, flat logits": SamplingParams(temperature=0.8, top_p=0.95),
}
FLAT = ("top-p 0.95, flat logits",)
"""Cases on flat logits (a random-weight model's): every nucleus reaches past the best 1,024
scores, so the sampler tries its shortcut and then sorts the whole row: its worst case."""
EARLIER_TOKENS = 100


def peaked_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator)
    logits[:, :40] += torch.linspace(14, 6, 40)
    return logits[:, torch.randperm(vocab, generator=generator)]


def plain(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """The reference: the same rule, done the plain way, row by row."""
    scores = logits.to(torch.float32, copy=True)
    device = scores.device
    for i, row in enumerate(rows):
        p = row.params
        if p.frequency_penalty and row.output_token_ids:
            output = torch.tensor(row.output_token_ids, device=device)
            counts = torch.bincount(output, minlength=scores.shape[1])
            scores[i] -= p.frequency_penalty * counts.to(scores.dtype)
    if rows[0].params.is_greedy:
        return scores.argmax(dim=-1).tolist()
    scores /= torch.tensor([row.params.temperature for row in rows], device=device)[:, None]
    params = rows[0].params
    if not params.top_k_disabled or params.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
        positions = torch.arange(scores.shape[1], device=device)
        top_k = scores.shape[1] if params.top_k_disabled else params.top_k
        sorted_scores = sorted_scores.masked_fill(positions >= top_k, float("-inf"))
        probs = sorted_scores.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs
        top_p = params.top_p if params.top_p < 1 else float("inf")
        sorted_scores = sorted_scores.masked_fill(before >= top_p, float("-inf"))
        scores = torch.empty_like(scores).scatter_(-1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    draws = [torch.multinomial(probs[i], 1, generator=row.generator) for i, row in enumerate(rows)]
    return torch.cat(draws).tolist()


def measure(vocab: int, batch: int, case: str, repeats: int, device: torch.device) -> dict:
    generator = torch.Generator(device).manual_seed(0)
    if case in FLAT:
        logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)).to(device)
    else:
        logits = peaked_logits(batch, vocab, seed=0).to(device)
    earlier = torch.randint(0, vocab, (batch, EARLIER_TOKENS)).tolist()
    rows = [SamplingRow(CASES[case], generator, (), (), earlier[i]) for i in range(batch)]
    sync = synchronizer(device)
    times = interleaved(
        {"ours": lambda: sample(logits, rows), "plain": lambda: plain(logits, rows)},
        repeats=repeats,
        sync=sync,
        warmup=2,
    )
    ours, reference = times["ours"] * 1e3, times["plain"] * 1e3
    return {
        "vocab": vocab,
        "batch": batch,
        "case": case,
        "ours_ms": round(ours, 3),
        "plain_ms": round(reference, 3),
        "speedup": round(reference / ours, 2),
    }


def report(saved: dict) -> tuple[list[str], str, harness.Panels]:
    rows = saved["rows"]
    lines = ["# Sampler: ms per step, ours against the plain way", "", *harness.markdown(rows)]
    panel = harness.series(
        [r | {"what": f"{r['case']}, V={r['vocab']}"} for r in rows], "batch", "what", "speedup"
    )
    return lines, "Sampler speed-up over the plain way", {"speed-up against the batch": panel}


def main() -> None:
    parser = harness.options(
        __doc__, threads=2, repeats=Default(20, 3), quick="fewer repeats", results="sampler-cpu"
    )
    parser.add_argument("--device", default="cpu")
    args = harness.start(parser)
    device = torch.device(args.device)
    rows = [
        measure(vocab, batch, case, args.repeats, device)
        for vocab in (4096, 49152)
        for batch in (1, 32, 128)
        for case in CASES
    ]
    for row in rows:
        print(row, flush=True)
    payload = {
        "environment": harness.environment(args.threads, device),
        "rows": rows,
        "checks": [],
    }
    harness.publish(args.name.replace("-cpu", f"-{device.type}"), payload, report, [])


if __name__ == "__main__":
    main()
