"""Request limits the server checks against the model: a ``max_tokens`` that cannot fit beside
the prompt is a 400 in vLLM's words, and so is a ``logit_bias`` for tokens it does not have.

The engine clamps such a limit to the context, which suits offline use; over HTTP the client
asked for something it cannot get and, unclamped in its mind, may wait minutes for it. Only a
limit the client sent is checked: the completions default (16) and chat's "up to the context"
still adapt to the prompt.
"""

from __future__ import annotations

from baton_paged.server.errors import APIError


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int, what: str) -> None:
    """Raise a 400 if ``prompt_len + max_tokens`` exceeds ``max_model_len``; ``what`` names the
    prompt ("messages" or "prompt")."""
    if max_tokens is None or prompt_len + max_tokens <= max_model_len:
        return
    raise APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, you "
        f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} "
        f"in the completion). Please reduce the length of the {what} or completion.",
        param="max_tokens",
    )


def check_logit_bias(bias: dict[int, float] | None, vocab_size: int) -> None:
    """A bias for a token the model does not have is a 400, not an index error mid-step."""
    unknown = sorted(token for token in bias or {} if not 0 <= token < vocab_size)
    if unknown:
        raise APIError(
            400, f"logit_bias has token ids outside [0, {vocab_size}): {unknown}", "logit_bias"
        )
