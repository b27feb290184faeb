"""Chat messages to one prompt: the tokenizer's chat template, or a plain default without one."""

from __future__ import annotations

from typing import Any

from baton_paged.server.protocol import ChatMessage


def render_chat(tokenizer: Any, messages: list[ChatMessage]) -> str:
    """The prompt text that asks the model for the assistant's next message."""
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    lines = [f"{turn['role']}: {turn['content']}" for turn in turns]
    return "\n".join([*lines, "assistant:"])
