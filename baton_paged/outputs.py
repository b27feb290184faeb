"""What a caller gets back: vLLM's ``RequestOutput`` / ``CompletionOutput`` shape.

Scripts written against vLLM read ``output.outputs[0].text``, ``.token_ids`` and
``.finish_reason``; these classes keep those names. ``metrics`` adds BATON's per-request timings.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Logprob:
    """One token's log-probability, in vLLM's shape."""

    logprob: float
    rank: int
    """1 + the number of tokens more likely than this one (tied tokens share a rank)."""
    decoded_token: str | None = None
    """The token's text; the sampler has no tokenizer, the output processor fills it in."""


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: tuple[int, ...]
    cumulative_logprob: float | None
    logprobs: tuple[dict[int, Logprob], ...] | None
    finish_reason: str | None
    """"stop" (EOS, stop string or stop token), "length" (max_tokens or context), "abort"."""
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended the request (None for EOS or length)."""

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestMetrics:
    """Monotonic-clock seconds (``time.monotonic``)."""

    arrival_time: float
    first_token_time: float | None
    finished_time: float | None
    token_times: tuple[float, ...]
    num_preemptions: int
    scheduled_time: float | None = None
    """When the request first joined the batch (None while it waits)."""

    @property
    def queue_time(self) -> float | None:
        """Arrival to first joining the batch."""
        if self.scheduled_time is None:
            return None
        return self.scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> tuple[float, ...]:
        times = self.token_times
        return tuple(b - a for a, b in zip(times, times[1:], strict=False))


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: tuple[dict[int, Logprob] | None, ...] | None = None
    """With ``SamplingParams.prompt_logprobs``: None for the first prompt token, then per prompt
    token its log-probability (and the top ones) given the tokens before it."""
    num_cached_tokens: int = 0
    """Prompt tokens whose K/V the prefix cache supplied (vLLM's field)."""
