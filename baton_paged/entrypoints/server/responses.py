"""Response bodies of the OpenAI routes, as pydantic models: the shapes module builds every
reply through them and ``/openapi.json`` declares them, so the schema is what is sent."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    """Summed over the choices."""
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy per-token logprobs: parallel lists, one entry per token of the choice's
    text (with ``echo``, the prompt's tokens first: the very first is unscored, null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    """The sampled (or prompt) token and the top N, by their text."""
    text_offset: list[int]
    """Where each token's text starts in the choice's text."""


class PromptLogprob(BaseModel):
    """vLLM's ``prompt_logprobs`` entries, by token id."""

    logprob: float
    rank: int
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None] | None
"""Per prompt token (None for the first, which nothing precedes): its logprob and the top N's."""


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    """"stop", "length", or null while a stream goes on."""
    stop_reason: int | str | None = None
    """vLLM's: the stop string or stop token id that ended the choice."""
    prompt_logprobs: PromptLogprobs = None
    """vLLM's, when the request asks for ``prompt_logprobs`` (a stream: in the first chunk)."""


class CompletionResponse(BaseModel):
    """A ``/v1/completions`` reply, and each of its stream's chunks."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CalledFunction(BaseModel):
    name: str
    arguments: str
    """JSON text."""


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class DeltaToolCall(ToolCall):
    index: int
    """Which call of the choice this is (a stream's calls arrive whole, one delta each)."""


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs = None
    """vLLM's, when the request asks for ``prompt_logprobs``."""


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    """Only in each choice's first chunk."""
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs = None
    """In the first chunk, when the request asks for ``prompt_logprobs``."""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "baton-paged"
    root: str | None = None
    """vLLM's: the served model's first id (every alias's card points at it)."""
    parent: str | None = None
    max_model_len: int | None = None
    """vLLM's: the longest prompt + output the server takes."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
