"""SamplingParams: how one request turns logits into tokens and when it stops.

Field names, defaults and meanings follow vLLM's ``SamplingParams`` so a vLLM script that uses this
subset runs unchanged. Every value is checked once, here, when the request is made: the sampler and
the engine's stop checks then trust them, and a bad request fails with a message naming the field
instead of deep inside a step. Stop strings and ids are normalised to tuples, so the params are
hashable and the engine never tests for None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from numbers import Real
from typing import Any

from baton_paged.structured_outputs import StructuredOutputsParams

__all__ = [
    "BeamSearchParams",
    "FieldError",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutputsParams",
]

GREEDY_TEMPERATURE = 1e-5
"""Below this temperature sampling is greedy (argmax), as in vLLM: dividing by ~0 only overflows."""


class FieldError(ValueError):
    """A value refused, and the request field it is in (``param``), which a server's 400 names."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class RequestOutputKind(IntEnum):
    """Which outputs a request reports (vLLM's names and values). ``CUMULATIVE``: after every
    step that gave it a token, everything so far (what a stream reads); ``FINAL_ONLY``: only once
    it finishes, so no step builds an output nobody reads (the offline ``LLM`` asks for this, as
    vLLM's does). vLLM's ``DELTA`` (only what is new) is not supported: refused when asked for."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping settings of one request (a vLLM-compatible subset)."""

    temperature: float = 1.0
    """Softmax temperature; below 1e-5 decoding is greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the fewest most likely tokens whose probability sums to at least
    top_p, in (0, 1]; 1 keeps every token."""
    top_k: int = 0
    """Keep only the top_k most likely tokens; 0 or -1 keeps every token."""
    seed: int | None = None
    """Seed of this request's own random generator, so its tokens do not depend on the rest of the
    batch; None draws from the engine's shared generator."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's context length."""
    min_tokens: int = 0
    """Tokens to generate before EOS or a stop token id may end the request."""
    stop: str | list[str] | None = None
    """String or strings that end generation when they appear in the output text; the text is
    cut before the stop string."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (besides EOS); they stay in the output token ids."""
    ignore_eos: bool = False
    """Keep generating after EOS (for benchmarks that need exactly max_tokens tokens)."""
    logprobs: int | None = None
    """Number of most likely tokens whose log-probabilities are returned per generated token,
    besides the sampled token's own; None returns none."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""
    skip_special_tokens: bool = True
    """Leave special tokens (EOS, chat markers) out of the output text."""
    n: int = 1
    """Completions returned for the prompt (each sampled on its own; with ``seed``, completion
    ``i`` uses ``seed + i``, as vLLM)."""
    best_of: int | None = None
    """Completions generated, of which the ``n`` with the highest cumulative log-probability are
    returned; None means ``n``."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token the output already contains, in [-2, 2]
    (OpenAI's definition; > 0 favours new tokens)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time the output already contains it, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """Divides positive logits and multiplies negative ones of every token in the prompt or the
    output (transformers' and vLLM's definition); 1 is off, > 1 discourages repeats."""
    min_p: float = 0.0
    """Drop tokens whose probability (after temperature) is below ``min_p`` times the most likely
    token's, in [0, 1]; 0 keeps every token."""
    logit_bias: Any = None
    """``{token_id: bias}`` added to the logits before anything else (greedy included); biases are
    clamped to [-100, 100] as OpenAI does. Stored as sorted ``(token_id, bias)`` pairs."""
    prompt_logprobs: int | None = None
    """Return, for every prompt token after the first, its log-probability and those of the
    ``prompt_logprobs`` most likely tokens at that position; None returns none."""
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    """When the request reports an output: see ``RequestOutputKind``."""
    truncate_prompt_tokens: int | None = None
    """Keep only the prompt's last ``truncate_prompt_tokens`` tokens (vLLM's left truncation);
    None keeps the whole prompt."""
    structured_outputs: StructuredOutputsParams | None = None
    """The grammar every sampled token must follow (a JSON schema, regex, choice or grammar);
    None leaves the output free."""
    allowed_token_ids: list[int] | None = None
    """Only these token ids may be sampled (vLLM's); None allows every token."""
    bad_words: list[str] | None = None
    """Words never to generate (vLLM's): each word's last token is forbidden wherever the
    tokens before it were just generated, the word as written and with a leading space."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalise_stop_token_ids(self.stop_token_ids))
        object.__setattr__(self, "allowed_token_ids", _normalise_allowed(self.allowed_token_ids))
        object.__setattr__(self, "bad_words", _normalise_bad_words(self.bad_words))
        _check_temperature(self.temperature)
        _check_top_p(self.top_p)
        _check_top_k(self.top_k)
        _check_optional_int("seed", self.seed, minimum=None)
        _check_token_counts(self.max_tokens, self.min_tokens)
        _check_optional_int("logprobs", self.logprobs, minimum=0)
        _check_optional_int("prompt_logprobs", self.prompt_logprobs, minimum=0)
        _check_optional_int("truncate_prompt_tokens", self.truncate_prompt_tokens, minimum=1)
        _check_samples(self.n, self.best_of)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_range(name, getattr(self, name), -2.0, 2.0)
        _check_number("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        object.__setattr__(self, "logit_bias", _normalise_logit_bias(self.logit_bias))
        object.__setattr__(self, "output_kind", _check_output_kind(self.output_kind))
        spec = self.structured_outputs
        if spec is not None and not isinstance(spec, StructuredOutputsParams):
            message = f"structured_outputs must be StructuredOutputsParams, got {spec!r}"
            raise FieldError(message, "structured_outputs")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def top_k_disabled(self) -> bool:
        return self.top_k in (0, -1)

    @property
    def num_samples(self) -> int:
        """Completions generated: ``best_of``, else ``n``."""
        return self.best_of or self.n

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )


@dataclass(frozen=True)
class BeamSearchParams:
    """``LLM.beam_search``'s settings (``beam_search.py``), with vLLM's names and defaults."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    """Keep extending beams past end-of-sequence tokens."""
    temperature: float = 0.0
    """Only 0: beams are ranked by the model's own log-probabilities."""
    length_penalty: float = 1.0
    """A beam's score is its cumulative log-probability / (its length ** length_penalty)."""
    include_stop_str_in_output: bool = False
    """Accepted for vLLM's scripts; beam search stops on end-of-sequence tokens only."""

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FieldError(f"{name} must be an int >= 1, got {value!r}", name)
        if self.temperature != 0:
            message = "beam search ranks by the model's log-probabilities: temperature must be 0"
            raise FieldError(message, "temperature")


def _is_int(value: object) -> bool:
    """True for ints but not bools: ``top_k=True`` is a bug in the caller, not a 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_output_kind(kind: object) -> RequestOutputKind:
    supported = (RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY)
    if not _is_int(kind) or kind not in supported:
        names = " or ".join(f"RequestOutputKind.{k.name}" for k in supported)
        raise ValueError(f"output_kind must be {names}, got {kind!r}")
    return RequestOutputKind(kind)


def _normalise_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
    for string in strings:
        if not isinstance(string, str):
            raise ValueError(f"stop must be a string or a list of strings, got {string!r} in it")
        if not string:
            # "" occurs at every position: it would end every request before its first token.
            raise ValueError(f"stop strings must be non-empty, got stop={list(strings)!r}")
    return strings


def _normalise_stop_token_ids(ids: Sequence[int] | None) -> tuple[int, ...]:
    ids = tuple(ids or ())
    for token_id in ids:
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(
                f"stop_token_ids must be token ids >= 0, got {token_id!r} in {list(ids)!r}"
            )
    return ids


def _normalise_allowed(ids: Sequence[int] | None) -> tuple[int, ...] | None:
    if ids is None:
        return None
    ids = tuple(ids)
    if not ids:
        raise FieldError("allowed_token_ids may not be empty (nothing could be sampled)",
                         "allowed_token_ids")  # fmt: skip
    if not all(_is_int(token_id) and token_id >= 0 for token_id in ids):
        message = f"allowed_token_ids must be token ids >= 0, got {list(ids)[:10]!r}"
        raise FieldError(message, "allowed_token_ids")
    return tuple(sorted(set(ids)))


def _normalise_bad_words(words: Sequence[str] | None) -> tuple[str, ...]:
    words = (words,) if isinstance(words, str) else tuple(words or ())
    if not all(isinstance(word, str) and word.strip() for word in words):
        message = f"bad_words must be non-empty strings, got {list(words)!r}"
        raise FieldError(message, "bad_words")
    return words


def _check_number(name: str, value: object) -> None:
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {name}={value!r}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    _check_number(name, value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {name}={value}")


def _check_samples(n: int, best_of: int | None) -> None:
    _check_optional_int("n", n, minimum=1)
    if n is None:
        raise ValueError("n must be an int >= 1, got n=None")
    _check_optional_int("best_of", best_of, minimum=1)
    if best_of is not None and best_of < n:
        raise ValueError(f"best_of must be >= n, got best_of={best_of} < n={n}")


def _normalise_logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
    if bias is None:
        return ()
    pairs = bias.items() if isinstance(bias, dict) else bias
    try:
        pairs = [(token_id, value) for token_id, value in pairs]
    except (TypeError, ValueError):
        message = f"logit_bias must map token ids to numbers, got {bias!r}"
        raise FieldError(message, "logit_bias") from None
    for token_id, value in pairs:
        if not _is_int(token_id) or token_id < 0:
            message = f"logit_bias keys must be token ids >= 0, got {token_id!r}"
            raise FieldError(message, "logit_bias")
        _check_number(f"logit_bias[{token_id}]", value)
    return tuple(sorted((token_id, min(max(float(v), -100.0), 100.0)) for token_id, v in pairs))


def _check_temperature(temperature: float) -> None:
    if not isinstance(temperature, Real) or isinstance(temperature, bool):
        raise ValueError(f"temperature must be a number, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got temperature={temperature}")


def _check_top_p(top_p: float) -> None:
    if not isinstance(top_p, Real) or isinstance(top_p, bool):
        raise ValueError(f"top_p must be a number, got {top_p!r}")
    if not 0 < top_p <= 1:  # also rejects NaN
        raise ValueError(f"top_p must be in (0, 1], got top_p={top_p}")


def _check_top_k(top_k: int) -> None:
    if not _is_int(top_k):
        raise ValueError(f"top_k must be an int, got top_k={top_k!r}")
    if top_k < -1:
        raise ValueError(f"top_k must be -1 or 0 (disabled) or at least 1, got top_k={top_k}")


def _check_optional_int(name: str, value: int | None, minimum: int | None) -> None:
    if value is None:
        return
    if not _is_int(value):
        raise ValueError(f"{name} must be an int or None, got {name}={value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")


def _check_token_counts(max_tokens: int | None, min_tokens: int) -> None:
    _check_optional_int("max_tokens", max_tokens, minimum=1)
    _check_optional_int("min_tokens", min_tokens, minimum=0)
    if min_tokens is None:
        raise ValueError("min_tokens must be an int >= 0, got min_tokens=None")
    if max_tokens is not None and min_tokens > max_tokens:
        raise ValueError(
            f"min_tokens must be <= max_tokens, got min_tokens={min_tokens} > "
            f"max_tokens={max_tokens}"
        )
