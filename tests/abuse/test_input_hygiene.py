"""Input a tokenizer or the sampler cannot take is a 400 naming the parameter, never a 500:
invalid Unicode, non-finite numbers, JSON of the wrong type. The OpenAPI schema says what the
server enforces."""

from __future__ import annotations

import httpx
import pytest
from real_server import refused

USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("completions", b'{"prompt": "\\ud800"}', "prompt"),
        ("completions", b'{"prompt": ["abc\\udfff"]}', "prompt"),
        ("completions", b'{"prompt": "x", "stop": "\\ud800"}', "stop"),
        ("chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
        (
            "chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
            None,
        ),
    ],
)
def test_a_lone_surrogate_is_400_naming_where(server, route, body, param):
    error = refused(server.post(route, body), 400, "surrogate", param=param)
    assert error["param"]


@pytest.mark.parametrize("number", [b"Infinity", b"-Infinity", b"NaN", b"1e999"])
@pytest.mark.parametrize("field", [b"temperature", b"top_p", b"presence_penalty"])
def test_non_finite_numbers_are_400_naming_the_field(server, number, field):
    body = b'{"prompt": "x", "' + field + b'": ' + number + b"}"
    refused(server.post("completions", body), 400, "finite", param=field.decode())


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [False]}, "prompt"),
        ({"prompt": [1.5]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": "x", "n": "2"}, "n"),
        ({"prompt": "x", "max_tokens": 4.0}, "max_tokens"),
        ({"prompt": "x", "stream": "true"}, "stream"),
        ({"prompt": "x", "stop": 5}, "stop"),
        ({"prompt": "x", "logit_bias": {"7": "high"}}, "logit_bias.7"),
        ({"prompt": "x", "priority": True}, "priority"),
    ],
)
def test_json_of_the_wrong_type_is_400_naming_the_field(server, body, param):
    refused(server.post("completions", body), 400, param=param)


def test_chat_messages_of_the_wrong_type_are_400(server):
    body = {"messages": [{"role": "user", "content": 5}]}
    refused(server.post("chat/completions", body), 400, param="messages.0.content")


def test_the_schema_declares_the_limits_types_and_the_bearer_scheme(server):
    spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models"):
        operation = next(iter(spec["paths"][path].values()))
        assert operation["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/health"]["get"]
    completion = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert integer_form(completion["n"]) == {"type": "integer", "minimum": 1, "maximum": 2}
    assert integer_form(completion["logprobs"])["maximum"] == 20
    forms = completion["prompt"]["anyOf"]
    token_ids = next(f for f in forms if f.get("items", {}).get("type") == "integer")
    assert token_ids["items"]["minimum"] == 0
    assert completion["temperature"]["anyOf"][0]["minimum"] == 0
    stops = next(f for f in completion["stop"]["anyOf"] if f.get("type") == "array")
    assert stops["maxItems"] == 4
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert integer_form(chat["top_logprobs"])["maximum"] == 20


def integer_form(field: dict) -> dict:
    form = next(f for f in field["anyOf"] if f.get("type") == "integer")
    return {k: v for k, v in form.items() if k in ("type", "minimum", "maximum")}
