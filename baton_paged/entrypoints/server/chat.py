"""Chat messages as the server receives them (rendered by ``processing/chat_prompt.py``).

A message's ``content`` is a string or a list of parts, the form the OpenAI SDK, LangChain and
vLLM send. Text parts are joined with a newline, as vLLM joins them; any other part (images,
audio, files) is a 400 saying so, since the served models read text only. ``content`` may be
null only for an assistant message (OpenAI allows it beside ``tool_calls``): it renders as an
empty turn. An assistant message may carry ``tool_calls``, a ``tool`` message the
``tool_call_id`` it answers, and any message a ``name`` (``server/tools.py``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from baton_paged.entrypoints.server.fields import RequestModel, Text
from baton_paged.entrypoints.server.tools import ToolCallIn


class TextPart(RequestModel):
    type: Literal["text"]
    text: Text


class ChatMessage(RequestModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[TextPart] | None = Field(
        default=None,
        description="Text, or a list of text parts (joined with newlines); null or absent only "
        "for assistant.",
    )
    tool_calls: list[ToolCallIn] | None = Field(
        default=None, description="An assistant message's calls."
    )
    tool_call_id: Text | None = Field(default=None, description="The call a tool message answers.")
    name: Text | None = Field(default=None, description="The participant's name.")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """Name the kind of part refused, instead of pydantic's list of union failures."""
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" and isinstance(kind, str):
                raise ValueError(f"content parts of type {kind!r} are not supported (text only)")
        return content

    @model_validator(mode="after")
    def _null_content_for_assistant_only(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (null only for assistant)")
        return self

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""
