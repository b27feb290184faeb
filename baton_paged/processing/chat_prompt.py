"""A conversation to one prompt: the tokenizer's chat template, or a plain default without one.

Messages are OpenAI's: ``{"role": ..., "content": ...}`` where content is text or a list of
parts; text parts are joined with newlines (as vLLM does) and any other part (images, audio) is
refused, since no model here takes them. The rendered text is tokenized without special tokens:
the template already wrote them, and a tokenizer that adds BOS would double it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from baton_paged.processing.prompt_encoding import encode

Message = Mapping[str, Any]


def message_text(content: Any) -> str:
    """A message's content as text; ValueError for parts that are not text."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text":
            raise ValueError(
                f"message content parts of type {kind!r} are not supported (text only)"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def conversation_prompt(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template: str | None = None,
    **template_kwargs: Any,
) -> dict[str, Any]:
    """``{"prompt": text, "prompt_token_ids": ids}`` asking for the assistant's next message
    (or, with ``continue_final_message``, for more of the last one)."""
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message exclude each other")
    turns = [{**m, "content": message_text(m.get("content"))} for m in _checked(messages)]
    if chat_template or getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            turns,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template=chat_template,
            **template_kwargs,
        )
    else:
        text = "\n".join(f"{t['role']}: {t['content']}" for t in turns)
        text += "\nassistant:" if add_generation_prompt else ""
    return {"prompt": text, "prompt_token_ids": encode(tokenizer, text, add_special_tokens=False)}


def _checked(messages: Sequence[Message]) -> Sequence[Message]:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"each message needs a 'role' and 'content', got {message!r}")
    return messages
