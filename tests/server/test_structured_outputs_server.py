"""The reply's shape over HTTP, through the official ``openai`` client: ``response_format``
(``json_object``, ``json_schema`` strict and not) and vLLM's ``structured_outputs`` on both
routes, plain and streamed; a spec that cannot compile, or two at once, is a 400 naming the
field with nothing queued."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from serving import MODEL
from test_openai_strict import USER_HI, assert_refused, post

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "rank": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["city", "rank"],
    "additionalProperties": False,
}
COMPACT = {"disable_any_whitespace": True}


@pytest.mark.parametrize("strict", [True, False, None])
def test_chat_json_schema_replies_validate_and_parse(client, strict):
    json_schema = {"name": "place", "schema": SCHEMA}
    if strict is not None:
        json_schema["strict"] = strict
    reply = client.chat.completions.create(
        model=MODEL,
        messages=USER_HI,
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": json_schema},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_openai_client_parse_returns_the_typed_object(client):
    """``client.chat.completions.parse`` with a pydantic model: the SDK builds the strict
    json_schema itself and parses the reply into the model."""
    from pydantic import BaseModel, Field

    class Place(BaseModel):
        city: str = Field(max_length=8)
        rank: int

    reply = client.chat.completions.parse(
        model=MODEL, messages=USER_HI, max_tokens=120, temperature=0, response_format=Place
    )
    message = reply.choices[0].message
    assert isinstance(message.parsed, Place), message.content


def test_structured_outputs_on_completions_plain_and_streamed(client):
    cases = {
        "choice": ({"choice": ["alpha", "beta"]}, lambda text: text in ("alpha", "beta")),
        "regex": ({"regex": "[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
        "json": ({"json": SCHEMA, **COMPACT}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)
                 is None),
    }  # fmt: skip
    for name, (spec, valid) in cases.items():
        body = {"structured_outputs": spec}
        plain = client.completions.create(
            model=MODEL, prompt="x", max_tokens=80, temperature=0, extra_body=body
        )
        assert plain.choices[0].finish_reason == "stop" and valid(plain.choices[0].text), name
        chunks = client.completions.create(
            model=MODEL, prompt="x", max_tokens=80, temperature=0, extra_body=body, stream=True
        )
        streamed = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
        assert streamed == plain.choices[0].text, name


def test_json_object_on_chat_streamed(client):
    chunks = client.chat.completions.create(
        model=MODEL,
        messages=USER_HI,
        max_tokens=200,
        temperature=0,
        stream=True,
        response_format={"type": "json_object"},
        extra_body={"n": 1},
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("{")


@pytest.mark.parametrize(
    ("route", "extra", "param", "words"),
    [
        ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "frob"}}}}}},
         "structured_outputs", ["structured_outputs.json", "frob"]),
        ("completions", {"structured_outputs": {"regex": "([a-"}}, "structured_outputs",
         ["structured_outputs.regex"]),
        ("completions", {"structured_outputs": {"choice": []}}, "structured_outputs",
         ["must not be empty"]),
        ("completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}},
         "structured_outputs", ["exactly one"]),
        ("chat/completions", {"structured_outputs": {"regex": "a"},
                              "response_format": {"type": "json_object"}},
         "structured_outputs", ["not both"]),
        ("chat/completions", {"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "x"}}},
         "response_format", ["json_schema.schema"]),
    ],
)  # fmt: skip
def test_bad_specs_are_400_naming_the_field(server, route, extra, param, words):
    body = {"model": MODEL, "max_tokens": 4, **extra}
    body |= {"messages": USER_HI} if route.startswith("chat") else {"prompt": "x"}
    assert_refused(post(server, route, body), server, 400, *words, param=param)
