"""Tool calls: the grammars that make a reply a call, and the parsers that find calls in free text.

OpenAI's ``tool_choice`` decides how a reply may call the request's ``tools``:

* ``"required"``: the reply must call one or more of them. Decoding follows a JSON schema (an
  array of ``{"name": <a tool's name>, "parameters": <that tool's arguments>}``, one item unless
  ``parallel_tool_calls``), so the reply always parses as calls whose arguments are valid against
  the tool's own schema (``required_spec``, read back by ``calls_from_required``).
* a named function: the reply is that function's arguments, decoded under its parameters'
  schema (``named_spec``).
* ``"auto"``: the model decides, in its own format, which a parser reads back (``PARSERS``):
  ``hermes`` (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, as Hermes, Qwen2.5
  and SmolLM2 models write them) or ``llama3_json`` (a JSON object ``{"name": ..., "parameters":
  {...}}``, several joined by ``;``, optionally after ``<|python_tag|>``, as Llama 3.1+ writes
  them). Text that does not parse as calls is the reply's content.
* ``"none"``: no calls.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from baton_paged.structured_outputs import StructuredOutputsParams


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str
    """The arguments as JSON text (OpenAI's form)."""
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def function_of(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """A tool's ``function`` object (``{"name", "description", "parameters"}``)."""
    return tool["function"]


def parameters_schema(tool: Mapping[str, Any]) -> dict:
    """The tool's arguments schema; a tool without one takes any object."""
    return dict(function_of(tool).get("parameters") or {"type": "object"})


def required_spec(tools: Sequence[Mapping[str, Any]], parallel: bool) -> StructuredOutputsParams:
    """The grammar of a reply that calls at least one tool (exactly one unless ``parallel``)."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": function_of(tool)["name"]},
                "parameters": parameters_schema(tool),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def named_spec(tool: Mapping[str, Any]) -> StructuredOutputsParams:
    """The grammar of a reply that is ``tool``'s arguments."""
    return StructuredOutputsParams(json=parameters_schema(tool))


def calls_from_required(text: str) -> list[ToolCall]:
    """The calls of a reply decoded under ``required_spec`` (none if it was cut short)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [ToolCall(item["name"], json.dumps(item["parameters"])) for item in items]


def calls_from_named(name: str, text: str) -> list[ToolCall]:
    """The call of a reply decoded under ``named_spec`` (none if it was cut short)."""
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return []
    return [ToolCall(name, text)]


Parser = Callable[[str], tuple[str | None, list[ToolCall]]]
"""Reply text -> (its content, None if empty; the calls it makes)."""

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks; the text before the
    first is the content. A block that is not such a JSON object leaves the whole text content."""
    start = text.find("<tool_call>")
    if start < 0:
        return text or None, []
    calls = []
    for body in HERMES_CALL.findall(text[start:]):
        call = _json_call(body, "arguments")
        if call is None:
            return text or None, []
        calls.append(call)
    return text[:start].strip() or None, calls


def parse_llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    """A reply that is one or more ``{"name": ..., "parameters": {...}}`` objects joined by
    ``;`` (``<|python_tag|>`` first, or not); anything else is content."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text or None, []
    calls = []
    for part in _json_objects(body):
        call = _json_call(part, "parameters", "arguments")
        if call is None:
            return text or None, []
        calls.append(call)
    return None, calls


PARSERS: dict[str, Parser] = {"hermes": parse_hermes, "llama3_json": parse_llama3_json}


def _json_call(text: str, *argument_keys: str) -> ToolCall | None:
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = next((call[key] for key in argument_keys if key in call), {})
    return ToolCall(call["name"], json.dumps(arguments))


def _json_objects(text: str) -> list[str]:
    """``text`` split into consecutive JSON values separated by ``;`` or whitespace."""
    decoder, parts, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            _, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return [text]  # not JSON: the caller finds no call in it
        parts.append(text[at:end])
        at = end
        while at < len(text) and text[at] in "; \n\t\r":
            at += 1
    return parts
