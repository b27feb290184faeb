"""Request bodies of the OpenAI routes, and their translation into ``SamplingParams``.

Nothing a client asks for is ignored: every field below either does what OpenAI (or vLLM) says
it does, or the request fails with a 400 that names it.

Implemented, with OpenAI's names: ``model``, ``prompt`` (a text or token id list, or a list of
either: choice ``i * n + j`` answers prompt ``i``) / ``messages``, ``max_tokens`` (chat also
``max_completion_tokens``), ``temperature``, ``top_p``, ``n``, ``seed``, ``stop``,
``presence_penalty``, ``frequency_penalty``, ``logit_bias`` (token id -> bias), ``stream``,
``stream_options.include_usage``, ``logprobs`` (completions: how many top tokens; chat:
``logprobs`` + ``top_logprobs``), ``best_of`` (completions), ``echo`` (completions; with
``logprobs`` the prompt's tokens are scored too, and ``max_tokens=0`` returns the scored prompt
alone: what evaluation harnesses such as lm-eval's ``local-completions`` send for
log-likelihoods). vLLM's extensions: ``top_k``, ``min_p``, ``repetition_penalty``,
``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``include_stop_str_in_output``,
``skip_special_tokens``, ``priority``. A null value means the engine's default, as if the field
were absent. The reply's shape: OpenAI's ``response_format`` (text, json_object, json_schema) and
vLLM's ``structured_outputs``, on both routes (``structured.py``; vLLM's removed ``guided_*``
fields are a 400 naming their replacement). Chat's ``tools``, ``tool_choice`` and
``parallel_tool_calls``: ``tools.py``.

vLLM's request extras: ``truncate_prompt_tokens``, ``prompt_logprobs``, ``allowed_token_ids``,
``bad_words`` and ``request_id`` (both routes); ``chat_template_kwargs``,
``add_generation_prompt`` and ``continue_final_message`` (chat). Accepted at any value and
changing no output (current OpenAI SDKs send them): ``store``, ``metadata``,
``reasoning_effort``, ``verbosity``, ``prompt_cache_key``, ``safety_identifier`` (chat).

Accepted at a harmless value only (OpenAI SDKs and frameworks send some of these with their
defaults); any other value is a 400 naming the field (see ``HARMLESS``):
``user`` (any string: OpenAI's end-user id for abuse monitoring; it changes no output),
``suffix`` (null or ""), and for chat the deprecated ``functions`` (null or []) and
``function_call`` (null or "none"), ``modalities`` (null or ["text"]),
``audio``/``prediction``/``web_search_options`` (null), ``service_tier`` (null, "auto" or
"default"), ``best_of`` (null or 1), ``echo`` (null or false).

Any other field is unknown and a 400 naming it. Refused as well: more prompts in one request
than the server's ``--max-prompts``, ``max_tokens=0`` without ``echo``, ``max_tokens`` past the
model's context (vLLM's message, see ``limits``), and ``best_of`` smaller than ``n``
(by ``SamplingParams``).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, Strict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from baton_paged.entrypoints.server.chat import ChatMessage
from baton_paged.entrypoints.server.fields import RequestModel, Text
from baton_paged.entrypoints.server.structured import (
    ResponseFormat,
    StructuredOutputsField,
    refuse_removed_fields,
    structured_spec,
)
from baton_paged.entrypoints.server.tools import Tool, ToolChoice
from baton_paged.sampling_params import FieldError, RequestOutputKind, SamplingParams
from baton_paged.structured_outputs import StructuredOutputsParams

TokenId = Annotated[int, Field(ge=0)]
NonEmptyText = Annotated[Text, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Texts = Annotated[list[NonEmptyText], Field(min_length=1)]
TokenIdLists = Annotated[list[TokenIds], Field(min_length=1)]
"""OpenAI's batch forms: several prompts in one request, as texts or as token id lists."""


class StreamOptions(RequestModel):
    include_usage: bool | None = False
    """Send a last chunk with the token counts."""


class SamplingFields(RequestModel):
    """Fields shared by completions and chat completions. Ranges the engine enforces are
    declared here, so the schema says them; limits the operator sets (``ServerLimits``) are
    checked by the app and written into the schema it serves."""

    HARMLESS: ClassVar[dict[str, tuple]] = {"suffix": (None, "")}
    """Field -> the values it is accepted at (then dropped); any other value is a 400."""
    PASSED_THROUGH: ClassVar[tuple[str, ...]] = (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "min_tokens",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "n",
        "include_stop_str_in_output",
        "skip_special_tokens",
        "truncate_prompt_tokens",
        "prompt_logprobs",
        "allowed_token_ids",
        "bad_words",
    )
    """Fields that reach ``SamplingParams`` under their own name, when the client sends them."""
    DEFAULT_MAX_TOKENS: ClassVar[int | None] = None
    """Without a limit from the client: chat generates up to the context."""

    model: Text | None = Field(default=None, description="The served model's id; others are 404.")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Tokens to generate at most; prompt + max_tokens must fit."
    )
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(
        default=None, ge=-1, description="vLLM: keep the top_k tokens; -1: all."
    )
    min_p: float | None = Field(
        default=None, ge=0, le=1, description="vLLM: drop tokens below min_p x top."
    )
    n: int | None = Field(default=None, ge=1, description="Choices to generate for the prompt.")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1, description="torch's range.")
    stop: NonEmptyText | list[NonEmptyText] | None = Field(
        default=None, description="Strings that end a choice (the app writes its limits here)."
    )
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(
        default=None, gt=0, description="vLLM: > 1 repeats less."
    )
    logit_bias: dict[Annotated[int, Strict(False)], float] | None = Field(
        default=None, description="Token id -> bias added to its logit, clamped to [-100, 100]."
    )
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(default=None, description="Accepted; it changes no output.")
    priority: int = Field(default=0, description="Lower is served first; may preempt.")
    truncate_prompt_tokens: int | None = Field(
        default=None, ge=1, description="vLLM: keep only the prompt's last N tokens."
    )
    prompt_logprobs: int | None = Field(
        default=None, ge=0, description="vLLM: also score each prompt token, with the top N."
    )
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = Field(
        default=None, description="vLLM: sample only these tokens."
    )
    bad_words: list[NonEmptyText] | None = Field(
        default=None, description="vLLM: words never to generate."
    )
    request_id: Annotated[Text, Field(min_length=1, max_length=128)] | None = Field(
        default=None, description="vLLM: the request's id (replies carry it in theirs)."
    )
    response_format: ResponseFormat | None = Field(
        default=None, description="text, json_object or json_schema: the reply's shape."
    )
    structured_outputs: StructuredOutputsField | None = Field(
        default=None, description="vLLM: json, regex, choice, grammar or json_object."
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        """Drop the ``HARMLESS`` fields sent at a harmless value; refuse them at any other."""
        if not isinstance(data, dict):
            return data
        refuse_removed_fields(data)
        data = dict(data)
        for name, harmless in cls.HARMLESS.items():
            if name in data and not _one_of(data.pop(name), harmless):
                allowed = " or ".join(repr(value) for value in harmless) or "absent"
                raise PydanticCustomError(
                    "unsupported_field",
                    "'{field}' is not supported by this server (send it as {allowed} or not at "
                    "all)",
                    {"field": name, "allowed": allowed},
                )
        return data

    def sampling_params(
        self, calls: StructuredOutputsParams | None = None, defaults: dict | None = None
    ) -> SamplingParams:
        """Raises ValueError (a 400) for values SamplingParams refuses. Fields the client left
        out or sent as null take ``defaults`` (the model's generation config), else
        SamplingParams' own. ``calls``: the grammar of a reply that must call tools (then the
        body may not ask for another shape)."""
        defaults = dict(defaults or {})
        sent = self.model_dump(include=set(self.PASSED_THROUGH), exclude_none=True)
        sent.update(self.extra_params())
        spec = structured_spec(self.response_format, self.structured_outputs)
        if calls is not None and spec is not None:
            message = "a reply that must call a tool cannot also follow response_format"
            raise FieldError(message + " or structured_outputs", "tool_choice")
        if spec or calls:
            sent["structured_outputs"] = spec or calls
        limit = self.token_limit()
        if limit is None:
            limit = defaults.pop("max_tokens", self.DEFAULT_MAX_TOKENS)
        # a stream reads an output every step; a plain reply only the last, so only that is built
        kind = RequestOutputKind.CUMULATIVE if self.stream else RequestOutputKind.FINAL_ONLY
        defaults.pop("max_tokens", None)
        return SamplingParams(**(defaults | sent), max_tokens=limit, output_kind=kind)

    def extra_params(self) -> dict:
        """Route-specific fields for ``SamplingParams``."""
        return {}

    def token_limit(self) -> int | None:
        """The limit on new tokens the client sent, if it sent one."""
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def choices(self) -> int:
        return self.n or 1


def _one_of(value: Any, harmless: tuple) -> bool:
    """``value in harmless``, but ``False`` is not ``0`` and ``True`` is not ``1``."""
    return any(value == ok and type(value) is type(ok) for ok in harmless)


class CompletionRequest(SamplingFields):
    DEFAULT_MAX_TOKENS: ClassVar[int | None] = 16
    """OpenAI's and vLLM's default for completions."""

    prompt: NonEmptyText | TokenIds | Texts | TokenIdLists = Field(
        description="A prompt (text or token ids), or a list of them: one choice set each."
    )
    max_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Tokens to generate at most; 0 (with echo) scores the prompt only.",
    )
    echo: bool | None = Field(default=False, description="Prepend the prompt to each choice.")
    logprobs: int | None = Field(
        default=None,
        ge=0,
        description="Also return the top N tokens' logprobs per token (with echo: the prompt's).",
    )
    best_of: int | None = Field(
        default=None, ge=1, description="Generate best_of sequences, return the n most likely."
    )

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_prompt_shape(cls, prompt: Any, check) -> Any:
        """One message for a prompt of the wrong shape, not one per union member; a prompt
        of the right shape with bad text keeps the text's own message."""
        try:
            return check(prompt)
        except ValidationError as error:
            bad_text = [e["msg"] for e in error.errors() if e["type"] == "value_error"]
            if bad_text:
                raise ValueError(bad_text[0].removeprefix("Value error, ")) from None
            raise ValueError(
                "the prompt must be a non-empty string, a non-empty list of token ids (integers "
                ">= 0), or a non-empty list of either"
            ) from None

    @property
    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, one or several."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    @property
    def prompt_size(self) -> int:
        """Characters (or token ids) to tokenize (or check), over every prompt."""
        return sum(len(prompt) for prompt in self.prompts)

    def engine_prompts(self) -> list[str | dict]:
        return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in self.prompts]

    @property
    def score_only(self) -> bool:
        """``echo`` with ``max_tokens=0``: the reply is the prompt (and its logprobs) alone."""
        return self.max_tokens == 0

    def token_limit(self) -> int | None:
        """A score-only request draws one token, as vLLM's, which its reply leaves out."""
        if self.score_only and not self.echo:
            message = "max_tokens=0 returns nothing without echo (with echo it scores the prompt)"
            raise FieldError(message, "max_tokens")
        return 1 if self.score_only else self.max_tokens

    def extra_params(self) -> dict:
        scored = self.prompt_logprobs if self.prompt_logprobs is not None else self.logprobs
        wanted = {
            "logprobs": self.logprobs,
            "best_of": self.best_of,
            "prompt_logprobs": scored if self.echo else self.prompt_logprobs,
        }
        return {name: value for name, value in wanted.items() if value is not None}


RESERVED_TEMPLATE_KWARGS = {
    "messages", "conversation", "tools", "documents", "chat_template", "tokenize",
    "add_generation_prompt", "continue_final_message", "return_dict",
}  # fmt: skip
"""Template arguments the server sets itself (send the fields for them instead)."""


class ChatCompletionRequest(SamplingFields):
    HARMLESS: ClassVar[dict[str, tuple]] = {
        **SamplingFields.HARMLESS,
        "functions": (None, []),
        "function_call": (None, "none"),
        "modalities": (None, ["text"]),
        "audio": (None,),
        "prediction": (None,),
        "web_search_options": (None,),
        "service_tier": (None, "auto", "default"),
        "best_of": (None, 1),
        "echo": (None, False),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        default=None,
        ge=1,
        description="OpenAI's current name for max_tokens (its deprecated alias).",
    )
    logprobs: bool | None = Field(default=False, description="Return the chosen tokens' logprobs.")
    top_logprobs: int | None = Field(
        default=None, ge=0, description="With logprobs: also the N most likely tokens at each step."
    )
    add_generation_prompt: bool = Field(
        default=True, description="vLLM: end the prompt with the assistant's turn opening."
    )
    continue_final_message: bool = Field(
        default=False, description="vLLM: continue the last (assistant) message instead."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="vLLM: extra variables for the chat template."
    )
    store: bool | None = Field(default=None, description="Accepted; nothing is stored.")
    metadata: dict[str, Text] | None = Field(default=None, description="Accepted; ignored.")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        default=None,
        description="Accepted; ignored (no reasoning parser).",
    )
    verbosity: Literal["low", "medium", "high"] | None = Field(
        default=None, description="Accepted; ignored."
    )
    prompt_cache_key: Text | None = Field(
        default=None, description="Accepted; prefix caching is automatic."
    )
    safety_identifier: Text | None = Field(default=None, description="Accepted; ignored.")
    tools: list[Tool] | None = Field(default=None, description="Functions the reply may call.")
    tool_choice: ToolChoice | None = Field(
        default=None, description="none, auto (the default with tools), required, or a function."
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="Whether a required reply may make several calls (default yes)."
    )

    @property
    def prompt_size(self) -> int:
        """Characters of the messages (the template adds a few)."""
        return sum(len(message.text) for message in self.messages)

    def extra_params(self) -> dict:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return {"logprobs": self.top_logprobs or 0} if self.logprobs else {}

    def template_options(self) -> dict:
        """``conversation_prompt``'s options: where the prompt ends, and the template's extra
        variables (which may not replace what the server passes itself)."""
        extra = dict(self.chat_template_kwargs or {})
        taken = sorted(set(extra) & RESERVED_TEMPLATE_KWARGS)
        if taken:
            raise FieldError(f"chat_template_kwargs may not set {taken}", "chat_template_kwargs")
        return extra | {
            "add_generation_prompt": self.add_generation_prompt and not self.continue_final_message,
            "continue_final_message": self.continue_final_message,
        }

    def token_limit(self) -> int | None:
        limits = {self.max_completion_tokens, self.max_tokens} - {None}
        if len(limits) > 1:
            raise ValueError("max_completion_tokens and max_tokens disagree; send one of them")
        return limits.pop() if limits else None
