"""Request: one query's state from arrival to its last token.

The scheduler and the engine share this object; the runner never sees it (it gets a frozen
``StepPlan``). Token bookkeeping follows one rule: ``num_computed_tokens`` tokens of
``all_token_ids`` have K/V in the cache, and a step computes the rest (a whole prompt, one decode
token, a prefill chunk, or everything again after a recompute preemption). A request swapped to
host memory keeps ``num_computed_tokens``: its K/V comes back by copy.

Under step-ahead scheduling (``engine.py``) a token can be sampled on the device before the host
reads it: ``num_placeholders`` counts such tokens, and ``num_tokens`` includes them, so the
scheduler plans the next step (its pages, its decode row) as if the token were known. The output
side replaces a placeholder by the token when it reads it (``OutputProcessor.accept``).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from baton_paged.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered so that ``status >= FINISHED_STOPPED`` means finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    """Waiting to recompute its K/V from prompt + output (its pages were freed)."""
    SWAPPED = 3
    """Waiting with its K/V in the host swap pool, to be copied back."""
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """vLLM/OpenAI finish_reason: "stop", "length", "abort", or None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    """``params.max_tokens`` capped by the model's context (resolved at admission)."""
    eos_token_ids: tuple[int, ...]
    """Tokens that end the request unless ``ignore_eos`` (see ``model_loading.eos_token_ids``)."""
    priority: int = 0
    """Lower is served first (vLLM's convention); ties are first come, first served."""
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    generator: torch.Generator | None = None
    stop_reason: int | str | None = None
    """The stop token id or stop string that finished the request, if one did."""
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_time: float | None = None
    num_preemptions: int = 0
    scheduled_time: float | None = None
    """When it first joined the batch (its queue time ends there)."""
    num_cached_tokens: int = 0
    """Prompt tokens whose K/V came from the prefix cache when it first joined (vLLM's)."""
    page_keys: list[bytes] = field(default_factory=list)
    """Prefix-cache keys of its full pages so far (``sched/prefix_caching.py``)."""
    grammar: Any = None
    """The matcher of ``params.structured_outputs`` in its start state, compiled when the request
    was prepared (``processing/grammars.py``); the output side advances a copy of it."""
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    """``params.bad_words`` as token sequences (``InputProcessor`` tokenizes them)."""
    num_placeholders: int = 0
    """Tokens sampled on the device whose ids the host has not read yet (0 or 1)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_placeholders

    @property
    def is_complete(self) -> bool:
        """Its last token is sampled, counting one still in flight: no forward may compute past
        it (``max_tokens`` is capped by the model's context, so this covers that limit too)."""
        return len(self.output_token_ids) + self.num_placeholders >= self.max_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose K/V the next forward must compute."""
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens at positions ``[start, end)`` of prompt + output."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        head = self.prompt_token_ids[start:prompt_len] if start < prompt_len else []
        return head + self.output_token_ids[max(start - prompt_len, 0) : end - prompt_len]
