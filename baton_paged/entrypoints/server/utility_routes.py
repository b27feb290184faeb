"""vLLM's routes beside the OpenAI ones: ``POST /tokenize``, ``POST /detokenize``, ``GET
/version``, in vLLM's shapes, so the tools that call them (token counting, prompt budgeting) work
unchanged. Like vLLM's, they sit outside ``/v1`` and need no API key; tokenizing runs on the
tokenizer threads (``tokenizing.py``), never the event loop, under the same body limits.

``/tokenize`` takes a completion prompt (``prompt``, ``add_special_tokens`` default true) or a
conversation (``messages`` rendered by the chat template, ``add_generation_prompt`` default true,
``continue_final_message``, ``chat_template_kwargs``; ``add_special_tokens`` default false: the
template wrote them) and answers ``{"count", "max_model_len", "tokens", "token_strs"}``
(``token_strs`` with ``return_token_strs``). ``/detokenize`` takes ``tokens`` and answers
``{"prompt"}``. ``GET /tokenizer_info`` (only with ``--enable-tokenizer-info-endpoint``, as in
vLLM, since it shows the chat template) answers the tokenizer's settings: its special tokens,
class, length limit and chat template, which lets lm-eval's ``local-completions`` tokenize
through the server instead of loading the tokenizer itself.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from baton_paged import __version__
from baton_paged.entrypoints.server.chat import ChatMessage
from baton_paged.entrypoints.server.errors import APIError
from baton_paged.entrypoints.server.fields import RequestModel, Text
from baton_paged.entrypoints.server.tools import template_turn
from baton_paged.processing.chat_prompt import conversation_prompt
from baton_paged.processing.prompt_encoding import encode

TokenId = Annotated[int, Field(ge=0)]


class TokenizePrompt(RequestModel):
    model: Text | None = None
    prompt: Text
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(RequestModel):
    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(RequestModel):
    model: Text | None = None
    tokens: list[TokenId]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


class UtilityRoutes:
    def __init__(self, routes):
        """``routes``: the app's ``Routes`` (its engine, model names, template, tokenizing)."""
        self.routes = routes

    async def tokenize(self, body: TokenizePrompt | TokenizeChat) -> TokenizeResponse:
        self.routes.check_model(body.model)
        tokenizer = self.routes.engine.tokenizer
        if isinstance(body, TokenizePrompt):
            size = len(body.prompt)

            def work() -> list[int]:
                return encode(tokenizer, body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            size = sum(len(m.text) for m in body.messages)

            def work() -> list[int]:
                rendered = conversation_prompt(
                    tokenizer,
                    [template_turn(m) for m in body.messages],  # as the chat route renders
                    add_generation_prompt=body.add_generation_prompt
                    and not body.continue_final_message,
                    continue_final_message=body.continue_final_message,
                    chat_template=self.routes.chat_template,
                    **(body.chat_template_kwargs or {}),
                )
                if not body.add_special_tokens:
                    return rendered["prompt_token_ids"]
                return encode(tokenizer, rendered["prompt"], add_special_tokens=True)

        try:
            tokens = await self.routes.tokenizing.run(size, work)
        except (ValueError, TypeError) as error:  # a template that refuses the conversation
            raise APIError(400, f"cannot render the messages: {error}", "messages") from None
        strings = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        max_len = self.routes.engine.inputs.max_model_len
        return TokenizeResponse(
            count=len(tokens), max_model_len=max_len, tokens=tokens, token_strs=strings
        )

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.routes.check_model(body.model)
        tokenizer = self.routes.engine.tokenizer
        vocab = len(tokenizer)
        outside = [t for t in body.tokens if t >= vocab]
        if outside:
            raise APIError(400, f"token ids must be < the vocabulary's {vocab}: {outside[:10]}",
                           "tokens")  # fmt: skip
        text = await self.routes.tokenizing.run(
            len(body.tokens), lambda: tokenizer.decode(body.tokens)
        )
        return DetokenizeResponse(prompt=text)

    async def version(self) -> VersionResponse:
        return VersionResponse(version=__version__)

    async def tokenizer_info(self) -> dict:
        tokenizer = self.routes.engine.tokenizer
        info: dict[str, Any] = {name: _text(getattr(tokenizer, name, None)) for name in SPECIAL}
        info["tokenizer_class"] = type(tokenizer).__name__
        info["model_max_length"] = self.routes.engine.inputs.max_model_len
        info["add_bos_token"] = getattr(tokenizer, "add_bos_token", None)
        template = self.routes.chat_template or getattr(tokenizer, "chat_template", None)
        info["chat_template"] = template if isinstance(template, str) else None
        return info


def _text(token: Any) -> str | None:
    """A special token's text (transformers may hold an ``AddedToken``)."""
    return None if token is None else str(token)
