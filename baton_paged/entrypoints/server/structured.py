"""The request fields that constrain a reply's shape, turned into ``StructuredOutputsParams``.

OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``
(some JSON object) or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict",
"description"}}`` (JSON valid against ``schema``; ``strict`` is accepted either way: the grammar
always enforces the whole schema). vLLM's ``structured_outputs`` extra field takes its
``StructuredOutputsParams`` directly (``json``, ``regex``, ``choice``, ``grammar``,
``json_object``, ``disable_any_whitespace``, ``whitespace_pattern``). Both are on the completions
and the chat route; sending both is a 400. vLLM's older ``guided_*`` fields were removed there and
are refused here with a 400 naming the ``structured_outputs`` field that replaces each.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic_core import PydanticCustomError

from baton_paged.entrypoints.server.fields import RequestModel, Text
from baton_paged.sampling_params import FieldError
from baton_paged.structured_outputs import StructuredOutputsParams

REMOVED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "guided_json_object": "json_object",
    "guided_whitespace_pattern": "whitespace_pattern",
    "guided_decoding_backend": None,
}
"""vLLM's removed field -> the ``structured_outputs`` key that replaces it."""


class JsonSchemaFormat(RequestModel):
    name: Text = Field(description="The schema's name (OpenAI requires one).")
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="The JSON schema the reply must satisfy."
    )
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(RequestModel):
    """vLLM's ``structured_outputs``: exactly one of the constraints."""

    json_: dict[str, Any] | Text | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None
    whitespace_pattern: Text | None = None


def refuse_removed_fields(data: dict) -> None:
    """A 400 for vLLM's removed ``guided_*`` fields, naming what replaces each."""
    for name, key in REMOVED.items():
        if name in data:
            instead = f'"structured_outputs": {{"{key}": ...}}' if key else "structured_outputs"
            raise PydanticCustomError(
                "removed_field",
                "'{field}' was removed (as in vLLM); send {instead}",
                {"field": name, "instead": instead},
            )


def structured_spec(
    response_format: ResponseFormat | None, structured: StructuredOutputsField | None
) -> StructuredOutputsParams | None:
    """The constraint the request asks for, if any; ValueError (a 400 naming the field) for a
    malformed one."""
    if structured is not None and response_format is not None:
        if response_format.type != "text":
            raise FieldError(
                "send response_format or structured_outputs, not both", "structured_outputs"
            )
    if structured is not None:
        fields = structured.model_dump(by_alias=True, exclude_none=True)
        return _params(fields, "structured_outputs")
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise FieldError(
            'response_format of type "json_schema" needs json_schema.schema', "response_format"
        )
    return _params({"json": response_format.json_schema.schema_}, "response_format")


def _params(fields: dict, param: str) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except ValueError as error:
        raise FieldError(str(error), param) from None
