"""What one request may ask of the server: every bound a client could otherwise stretch to hurt
the others, each a ``baton-paged serve`` flag (the field's docstring is its help text).

Defaults are no looser than the engines users come from: TGI's ``--max-best-of`` (2),
``--max-stop-sequences`` (4) and ``--payload-limit`` (2 MB), OpenAI's 300 ``logit_bias`` entries,
vLLM's ``--max-logprobs`` (20, an engine field: ``EngineConfig.max_logprobs``). A request past a
limit is refused before anything is queued, with a message naming the limit and its flag.

Also here: a ``max_tokens`` that cannot fit beside the prompt is a 400 in vLLM's words (the
engine clamps it, which suits offline use, but over HTTP the client asked for something it
cannot get). Values that are wrong whatever the server's limits, such as a ``logit_bias`` for a
token the model lacks, are the engine's to refuse (``InputProcessor``), offline and over HTTP
alike; its ``FieldError`` names the field for the 400.

The module imports nothing heavy: the CLI reads ``ServerLimits``' fields from its source.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from baton_paged.sampling_params import FieldError


@dataclass(frozen=True)
class ServerLimits:
    max_best_of: int = 2
    """Most completions one request may generate (n, and best_of; TGI's name and default)."""
    max_prompts: int = 256
    """Most prompts in one completions request (each is queued as a request of its own)."""
    max_stop_sequences: int = 4
    """Most stop strings per request (OpenAI's and TGI's limit)."""
    max_stop_chars: int = 1024
    """Most characters in a request's stop strings together (every step checks each one)."""
    max_stop_token_ids: int = 32
    """Most stop_token_ids per request."""
    max_logit_bias: int = 300
    """Most logit_bias entries per request (OpenAI's limit)."""
    max_body_bytes: int = 2_000_000
    """Largest request body in bytes; larger bodies get HTTP 413 (TGI's payload limit)."""
    max_header_bytes: int = 16384
    """Largest request line and header block in bytes; larger get HTTP 431."""
    max_headers: int = 100
    """Most header fields in a request; more get HTTP 431."""
    read_timeout: float = 30.0
    """Seconds a client may go silent while sending a request (its headers or body) before
    the server answers HTTP 408 and closes the connection."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{field.name} must be a positive number, got {value!r}")


def over_limit(what: str, limit: int, flag: str, param: str) -> FieldError:
    return FieldError(f"{what} is more than this server allows ({limit}; its --{flag} flag)", param)


def check_sampling(body, limits: ServerLimits, max_logprobs: int) -> None:
    """Refuse a request body whose sampling fields exceed ``limits`` (or the engine's
    ``max_logprobs``); ``body`` is a completion or chat request."""
    for name in ("n", "best_of"):
        asked = getattr(body, name, None)
        if asked is not None and asked > limits.max_best_of:
            raise over_limit(f"{name}={asked}", limits.max_best_of, "max-best-of", name)
    prompts = len(getattr(body, "prompts", ()))
    if prompts > limits.max_prompts:
        raise over_limit(f"{prompts} prompts", limits.max_prompts, "max-prompts", "prompt")
    for name in ("logprobs", "top_logprobs", "prompt_logprobs"):  # chat's logprobs is a bool
        asked = getattr(body, name, None)
        if type(asked) is int and asked > max_logprobs:
            raise over_limit(f"{name}={asked}", max_logprobs, "max-logprobs", name)
    _check_stops(body, limits)
    entries = len(body.logit_bias or {})
    if entries > limits.max_logit_bias:
        what = f"logit_bias with {entries} entries"
        raise over_limit(what, limits.max_logit_bias, "max-logit-bias", "logit_bias")


def _check_stops(body, limits: ServerLimits) -> None:
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > limits.max_stop_sequences:
        what = f"{len(stops)} stop strings"
        raise over_limit(what, limits.max_stop_sequences, "max-stop-sequences", "stop")
    chars = sum(len(stop) for stop in stops)
    if chars > limits.max_stop_chars:
        what = f"{chars} characters of stop strings"
        raise over_limit(what, limits.max_stop_chars, "max-stop-chars", "stop")
    ids = len(body.stop_token_ids or [])
    if ids > limits.max_stop_token_ids:
        what = f"{ids} stop_token_ids"
        raise over_limit(what, limits.max_stop_token_ids, "max-stop-token-ids", "stop_token_ids")


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int, what: str) -> None:
    """Raise a 400 if ``prompt_len + max_tokens`` exceeds ``max_model_len``; ``what`` names the
    prompt ("messages" or "prompt")."""
    if max_tokens is None or prompt_len + max_tokens <= max_model_len:
        return
    raise FieldError(
        f"This model's maximum context length is {max_model_len} tokens. However, you "
        f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} "
        f"in the completion). Please reduce the length of the {what} or completion.",
        "max_tokens",
    )
