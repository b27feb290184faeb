"""Tool calling on the chat route: the request's ``tools`` / ``tool_choice`` /
``parallel_tool_calls``, and what they make of the reply (``processing/tool_calls.py``).

The tools are rendered into the prompt by the model's chat template (``tools=``), as vLLM does; a
template that ignores them shows the model nothing. ``tool_choice``: ``"none"`` (no calls; the
default without tools), ``"auto"`` (the default with tools: the model decides, and the server's
``--tool-call-parser`` reads its calls; refused with vLLM's message unless the server runs with
``--enable-auto-tool-choice``), ``"required"`` and a named function (decoded under a grammar, so
the reply always parses as calls with arguments valid against each tool's schema). With any of
those, ``response_format`` and ``structured_outputs`` are refused: the calls' grammar is the
reply's. Conversations may carry assistant messages with ``tool_calls`` and ``tool`` messages
answering them; arguments given as JSON text reach the template as objects, which is what
tool-aware templates (Hermes, Qwen2.5, Llama 3) iterate over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from baton_paged.entrypoints.server.fields import RequestModel, Text
from baton_paged.processing import tool_calls
from baton_paged.processing.tool_calls import ToolCall
from baton_paged.sampling_params import FieldError
from baton_paged.structured_outputs import StructuredOutputsParams

FunctionName = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="OpenAI's function names.")


class FunctionDefinition(RequestModel):
    name: Text = FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="The arguments' JSON schema."
    )
    strict: bool | None = None


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(RequestModel):
    name: Text


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: ChosenFunction


class CalledFunction(RequestModel):
    name: Text
    arguments: Text


class ToolCallIn(RequestModel):
    """A call in an earlier assistant message of the conversation."""

    id: Text
    type: Literal["function"]
    function: CalledFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass(frozen=True)
class ToolUse:
    """How the reply may call tools: ``mode`` is none, auto, required or named."""

    mode: str
    tools: tuple[dict, ...] = ()
    name: str | None = None
    """The named function (mode "named")."""
    parallel: bool = True
    parser: str | None = None
    """The server's ``--tool-call-parser`` (mode "auto")."""

    def spec(self) -> StructuredOutputsParams | None:
        """The grammar the reply is decoded under (required and named calls)."""
        if self.mode == "required":
            return tool_calls.required_spec(self.tools, self.parallel)
        if self.mode == "named":
            tool = next(t for t in self.tools if t["function"]["name"] == self.name)
            return tool_calls.named_spec(tool)
        return None

    def read(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The reply's content and the calls it makes."""
        if self.mode == "required":
            return None, tool_calls.calls_from_required(text)
        if self.mode == "named":
            return None, tool_calls.calls_from_named(self.name, text)
        if self.mode == "auto":
            return tool_calls.PARSERS[self.parser](text)
        return text, []


def tool_use(
    tools: list[Tool] | None,
    choice: ToolChoice | None,
    parallel: bool | None,
    parser: str | None,
) -> ToolUse:
    """The request's tool use, checked against its tools and the server's parser."""
    tools = tuple(tool.model_dump(exclude_none=True) for tool in tools or ())
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return ToolUse("none", tools)
    if not tools:
        raise FieldError("tool_choice needs tools to choose from", "tool_choice")
    parallel = parallel is not False
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in {tool["function"]["name"] for tool in tools}:
            raise FieldError(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
        return ToolUse("named", tools, name, parallel)
    if choice == "auto" and parser is None:
        raise FieldError(
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
            'set (send tool_choice "required", a named function, or "none")',
            "tool_choice",
        )
    return ToolUse(choice, tools, None, parallel, parser)


def template_turn(message) -> dict:
    """A ``ChatMessage`` as the chat template reads it: its text, its calls with arguments as
    objects where they are JSON, and the id of the call it answers."""
    turn: dict[str, Any] = {"role": message.role, "content": message.text}
    if message.tool_calls:
        turn["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": _as_object(call.function.arguments)}}
            for call in message.tool_calls
        ]  # fmt: skip
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        turn["name"] = message.name
    return turn


def _as_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
