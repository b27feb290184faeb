"""The benchmark workloads of ``vllm bench``: random token prompts of set lengths, or the first
turn of each ShareGPT-style conversation with the length of its answer."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Sample:
    prompt: str | list[int]
    """A text, or token ids sent as they are."""
    prompt_len: int
    output_len: int
    """Tokens to generate (exactly: the benchmarks ignore EOS)."""


def random_samples(
    vocab_size: int,
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
) -> list[Sample]:
    """``num`` prompts of random token ids; each length drawn uniformly within ``range_ratio``
    of the given one (vLLM's random dataset)."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)

    def length(mean: int) -> int:
        low, high = max(1, round(mean * (1 - range_ratio))), round(mean * (1 + range_ratio))
        return rng.randint(low, max(low, high))

    samples = []
    for _ in range(num):
        prompt = [rng.randrange(vocab_size) for _ in range(length(input_len))]
        samples.append(Sample(prompt, len(prompt), length(output_len)))
    return samples


def sharegpt_samples(
    path: str | Path, tokenizer: Any, num: int, output_len: int | None = None, seed: int = 0
) -> list[Sample]:
    """``num`` conversations' first human turn and their answer's length in tokens (or
    ``output_len``), shuffled by ``seed``; pairs too short to time (under 4 tokens), or too
    long for a benchmark (prompt over 1024 tokens, both over 2048), are skipped as vLLM does."""
    conversations = json.loads(Path(path).read_text())
    random.Random(seed).shuffle(conversations)
    samples = []
    for entry in conversations:
        turns = entry.get("conversations") or []
        if len(turns) < 2:
            continue
        prompt, answer = turns[0]["value"], turns[1]["value"]
        prompt_len = len(tokenizer(prompt).input_ids)
        wanted = output_len or len(tokenizer(answer).input_ids)
        if prompt_len < 4 or wanted < 4 or prompt_len > 1024 or prompt_len + wanted > 2048:
            continue
        samples.append(Sample(prompt, prompt_len, wanted))
        if len(samples) == num:
            break
    if len(samples) < num:
        raise ValueError(f"{path} has {len(samples)} usable conversations, fewer than {num}")
    return samples
