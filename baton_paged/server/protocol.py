"""Request bodies of the OpenAI routes, and their translation into ``SamplingParams``.

Field names and defaults follow OpenAI's API (and vLLM's extensions: top_k, min_tokens,
ignore_eos, stop_token_ids, priority). What the engine does not do is refused with a 400 rather
than ignored: more than one choice (``n > 1``), several prompts in one request.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from baton_paged.sampling_params import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, description="default: up to the context")
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_tokens: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = 0
    """Lower is served first; a request may preempt running ones of higher number."""

    def sampling_params(self) -> SamplingParams:
        """Raises ValueError (a 400) for values SamplingParams or this server refuses."""
        if self.n != 1:
            raise ValueError("only n=1 is supported")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_tokens=self.min_tokens,
            max_tokens=self.token_limit(),
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
        )

    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = 16
    """OpenAI's and vLLM's default for completions (chat's is: up to the context)."""

    def engine_prompt(self) -> str | dict:
        if isinstance(self.prompt, str):
            return self.prompt
        if all(isinstance(p, str) for p in self.prompt):
            if len(self.prompt) != 1:
                raise ValueError("send one prompt per request (a list of prompts is not supported)")
            return self.prompt[0]
        return {"prompt_token_ids": list(self.prompt)}


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    """OpenAI's current name for chat's limit; ``max_tokens`` is its deprecated alias."""

    def token_limit(self) -> int | None:
        limits = {self.max_completion_tokens, self.max_tokens} - {None}
        if len(limits) > 1:
            raise ValueError("max_completion_tokens and max_tokens disagree; send one of them")
        return limits.pop() if limits else None
