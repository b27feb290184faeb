"""Perplexity of a text as llama.cpp's ``llama-perplexity`` measures it, through ``LLM.generate``.

The text's tokens are cut into windows of ``context`` tokens (a tail shorter than one is
dropped); each window runs as one prompt, and only its second half is scored (tokens at positions
``context // 2 + 1`` to ``context - 1``, each given every token before it in the window), so every
scored token has at least half a window of context. The perplexity is ``exp`` of the mean negative
log-probability over all scored tokens. Same windows, same scored positions as
``llama-perplexity -c context`` on a vocabulary that adds no BOS (the default model's; measured:
every window's running figure within 0.8% of llama.cpp's, the final one within 0.001%); where the
vocabulary adds one, llama.cpp also puts BOS first in every window, which this does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from baton_paged.sampling_params import SamplingParams


def perplexity(llm: Any, token_ids: Sequence[int], context: int = 512) -> float:
    """``llm`` (an ``LLM``) over ``token_ids`` in windows of ``context`` tokens."""
    windows = [
        list(token_ids[start : start + context])
        for start in range(0, len(token_ids) - context + 1, context)
    ]
    if not windows:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one window ({context})")
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    surprises = [
        -output.prompt_logprobs[position][window[position]].logprob
        for window, output in zip(windows, outputs, strict=True)
        for position in range(context // 2 + 1, context)
    ]
    return math.exp(sum(surprises) / len(surprises))
