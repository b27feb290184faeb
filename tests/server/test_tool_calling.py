"""Tool calling on the chat route, through the official ``openai`` client: ``tool_choice``
"required" and a named function decode under the calls' grammar, so even a random-weight model's
reply parses as calls whose arguments validate against the tool's schema (``finish_reason``
"tool_calls"), plain and streamed; "auto" reads the model's own format with the server's
``--tool-call-parser``; a conversation carrying the calls and the tools' answers round-trips;
what cannot work is a 400 naming the field. The parsers are checked on their own at the end."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from serving import KEY, MODEL, serving
from test_openai_strict import USER_HI, assert_refused, post

from baton_paged.processing.tool_calls import parse_hermes, parse_llama3_json

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}}},
]  # fmt: skip
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


def check_calls(calls, names=None):
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_replies_are_valid_calls(client, parallel):
    reply = client.chat.completions.create(
        model=MODEL, messages=USER_HI, max_tokens=200, temperature=0, tools=TOOLS,
        tool_choice="required", parallel_tool_calls=parallel,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message.tool_calls)
    if not parallel:
        assert len(choice.message.tool_calls) == 1


def test_a_named_function_is_called_with_valid_arguments(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    reply = client.chat.completions.create(
        model=MODEL, messages=USER_HI, max_tokens=60, temperature=0.8, seed=3, tools=TOOLS,
        tool_choice=named,
    )  # fmt: skip
    (call,) = reply.choices[0].message.tool_calls
    check_calls([call], {"get_time"})
    assert reply.choices[0].finish_reason == "tool_calls"


def test_streamed_calls_arrive_in_openais_chunk_shape(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=USER_HI, max_tokens=200, temperature=0, tools=TOOLS,
        tool_choice="required", stream=True,
    )  # fmt: skip
    chunks = [chunk for chunk in stream if chunk.choices]
    deltas = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or ()]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [delta.index for delta in deltas] == list(range(len(deltas)))
    check_calls(deltas)
    plain = client.chat.completions.create(
        model=MODEL, messages=USER_HI, max_tokens=200, temperature=0, tools=TOOLS,
        tool_choice="required",
    )  # fmt: skip
    assert [(d.function.name, d.function.arguments) for d in deltas] == [
        (c.function.name, c.function.arguments) for c in plain.choices[0].message.tool_calls
    ]


def test_a_tool_conversation_round_trips(client):
    first = client.chat.completions.create(
        model=MODEL, messages=USER_HI, max_tokens=200, temperature=0, tools=TOOLS,
        tool_choice="required", parallel_tool_calls=False,
    )  # fmt: skip
    message = first.choices[0].message
    answer = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "12 C, rain"}
    conversation = [*USER_HI, message.model_dump(exclude_none=True), answer]
    second = client.chat.completions.create(
        model=MODEL, messages=conversation, max_tokens=5, temperature=0, tools=TOOLS,
        tool_choice="none",
    )  # fmt: skip
    assert second.choices[0].message.content is not None
    assert second.choices[0].message.tool_calls is None


def test_auto_reads_the_models_own_format(tiny_model_dir):
    """The server's hermes parser finds the call a reply writes (forced here with a regex, as a
    random model writes no calls of its own) and keeps the text before it as content."""
    written = 'Sure. <tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    regex = written.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")
    with serving(tiny_model_dir("llama"), tool_parser="hermes") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        reply = client.chat.completions.create(
            model=MODEL, messages=USER_HI, max_tokens=80, temperature=0, tools=TOOLS,
            extra_body={"structured_outputs": {"regex": regex}},
        )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_time",
        {"zone": "UTC"},
    )


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"tools": TOOLS}, ['"auto" tool choice requires --enable-auto-tool-choice']),
        ({"tool_choice": "required"}, ["needs tools"]),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         ["'nope'", "not in tools"]),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         ["cannot also follow response_format"]),
    ],
)  # fmt: skip
def test_tool_requests_that_cannot_work_are_400(server, extra, words):
    body = {"model": MODEL, "messages": USER_HI, "max_tokens": 4, **extra}
    assert_refused(post(server, "chat/completions", body), server, 400, *words, param="tool_choice")


def test_hermes_parser():
    text = 'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
    text += '<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    content, calls = parse_hermes(text)
    assert content == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("a", {"x": 1}),
        ("b", {}),
    ]
    assert parse_hermes("no calls here") == ("no calls here", [])
    assert parse_hermes("<tool_call>{not json</tool_call>")[1] == []  # stays content


def test_llama3_json_parser():
    content, calls = parse_llama3_json(
        '<|python_tag|>{"name": "a", "parameters": {"x": 2}}; {"name": "b", "parameters": {}}'
    )
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("a", {"x": 2}),
        ("b", {}),
    ]
    assert parse_llama3_json("Hello {there}") == ("Hello {there}", [])
    assert parse_llama3_json('{"no_name": 1}')[1] == []
