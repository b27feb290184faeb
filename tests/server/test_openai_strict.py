"""The routes are strict: every field does what OpenAI or vLLM says, or the request is a 400
naming it, with nothing queued; every error has OpenAI's shape; max_tokens past the context is
vLLM's 400; chat content may be a list of text parts; echo, logprobs and seed work."""

from __future__ import annotations

import httpx
import pytest
from serving import HEADERS, MAX_MODEL_LEN, MODEL, offline

from baton_paged.processing.chat_prompt import conversation_prompt
from baton_paged.sampling_params import SamplingParams

USER_HI = [{"role": "user", "content": "hi"}]


def post(server, route: str, body: dict | bytes, **headers) -> httpx.Response:
    url, headers = f"{server.url}/v1/{route}", {**HEADERS, **headers}
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers=headers, timeout=60)
    return httpx.post(url, json=body, headers=headers, timeout=60)


def assert_refused(reply: httpx.Response, server, status: int, *words: str, param=None) -> dict:
    """OpenAI's error shape, the words in its message, and nothing left in the engine."""
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert all(word in error["message"] for word in words), error["message"]
    assert param is None or error["param"] == param
    assert not server.engine.engine.requests
    return error


@pytest.mark.parametrize(
    ("route", "extra", "field"),
    [
        ("completions", {"prompt": "x", "sufix": "y"}, "sufix"),
        ("completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("completions", {"prompt": "x", "stream_options": {"include_usage": True, "x": 1}}, "x"),
        ("chat/completions", {"messages": USER_HI, "best_of": 2}, "best_of"),
        ("chat/completions", {"messages": USER_HI, "echo": True}, "echo"),
        ("chat/completions", {"messages": USER_HI, "tools": [{"type": "function"}]}, "tools"),
        ("chat/completions", {"messages": USER_HI, "tool_choice": "auto"}, "tool_choice"),
        ("chat/completions", {"messages": USER_HI, "response_format": {"type": "json"}}, "resp"),
        ("completions", {"prompt": "x", "guided_json": {"type": "object"}}, "guided_json"),
        ("chat/completions", {"messages": USER_HI, "guided_choice": ["a"]}, "guided_choice"),
        ("chat/completions", {"messages": USER_HI, "functions": [{"name": "f"}]}, "functions"),
        ("chat/completions", {"messages": [{"role": "user", "content": "a", "n": 1}]}, "n"),
    ],
)
def test_unknown_and_unsupported_fields_are_400_naming_them(server, route, extra, field):
    reply = post(server, route, {"model": MODEL, "max_tokens": 2, **extra})
    error = assert_refused(reply, server, 400, field)
    assert field in error["param"]


def test_fields_clients_send_at_their_defaults_are_accepted(server, client):
    harmless = {"user": "u-1", "suffix": None, "logprobs": False, "tools": [], "store": False}
    harmless |= {"response_format": {"type": "text"}, "tool_choice": "none", "echo": False}
    harmless |= {"structured_outputs": None}
    reply = client.chat.completions.create(
        model=MODEL, messages=USER_HI, max_tokens=3, temperature=0, extra_body=harmless
    )
    plain = client.chat.completions.create(
        model=MODEL, messages=USER_HI, max_tokens=3, temperature=0
    )
    assert reply.choices[0].message.content == plain.choices[0].message.content
    nulls = {"temperature": None, "top_p": None, "seed": None, "n": None, "stop": None}
    reply = client.completions.create(model=MODEL, prompt="x", max_tokens=3, extra_body=nulls)
    assert reply.usage.completion_tokens <= 3


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_max_tokens_past_the_context_is_vllms_400(server, route):
    prompt = {"prompt": "hello world"} if route == "completions" else {"messages": USER_HI}
    reply = post(server, route, {"model": MODEL, "max_tokens": MAX_MODEL_LEN, **prompt})
    what = "prompt" if route == "completions" else "messages"
    error = assert_refused(
        reply, server, 400, f"maximum context length is {MAX_MODEL_LEN} tokens", f"in the {what}"
    )
    assert f"{MAX_MODEL_LEN} in the completion" in error["message"]
    assert error["param"] == "max_tokens"


def test_the_completions_default_max_tokens_still_fits_itself_to_a_long_prompt(server):
    prompt = list(range(3, 3 + MAX_MODEL_LEN - 4))  # room for 4 tokens, the default is 16
    reply = post(server, "completions", {"prompt": prompt, "ignore_eos": True})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"prompt": "\xff\xfe"}', ["parsing the body", "UTF-8"]),
        (b'{"prompt": ', ["not valid JSON"]),
        (b"[1, 2]", ["malformed"]),
    ],
)
def test_unreadable_bodies_get_openai_errors(server, body, words):
    reply = post(server, "completions", body, **{"Content-Type": "application/json"})
    assert_refused(reply, server, 400, *words)


def test_unknown_routes_and_methods_get_openai_errors(server):
    for reply, status in (
        (httpx.get(f"{server.url}/v1/nothing"), 404),
        (httpx.get(f"{server.url}/v1/completions", headers=HEADERS), 405),
    ):
        assert reply.status_code == status and reply.json()["error"]["code"] == status


def test_chat_content_parts_are_joined_with_newlines(server, client):
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=6, temperature=0
    )
    prompt = conversation_prompt(
        server.engine.tokenizer, [{"role": "user", "content": "hello\nworld"}]
    )
    assert reply.choices[0].message.content == offline(server, prompt, 6).text


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "image"),
        ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "audio"),
        ({"role": "user", "content": None}, "needs content"),
        ({"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}, "tool_calls"),
    ],
)
def test_non_text_content_is_refused_saying_so(server, message, words):
    reply = post(server, "chat/completions", {"messages": [message], "max_tokens": 2})
    assert_refused(reply, server, 400, words)


def test_an_assistant_message_without_content_is_an_empty_turn(server, client):
    messages = [*USER_HI, {"role": "assistant", "content": None}, *USER_HI]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_echo_prepends_the_prompt_streaming_or_not(server, client):
    args = {"model": MODEL, "max_tokens": 5, "temperature": 0, "echo": True}
    whole = client.completions.create(prompt="def main():", **args)
    assert whole.choices[0].text == "def main():" + offline(server, "def main():", 5).text
    chunks = client.completions.create(prompt="def main():", stream=True, **args)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    ids = server.engine.tokenizer.encode("import os")
    by_ids = client.completions.create(prompt=ids, **args)
    assert by_ids.choices[0].text.startswith("import os")


def test_completion_logprobs_are_the_engines_and_follow_the_stream(server, client):
    args = {"model": MODEL, "prompt": "import os", "max_tokens": 6, "temperature": 0}
    reply = client.completions.create(**args, logprobs=2)
    logprobs = reply.choices[0].logprobs
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2)
    expected = server.offline.generate(["import os"], params)[0].outputs[0]
    decode = server.engine.tokenizer.decode
    assert logprobs.tokens == [decode([token]) for token in expected.token_ids]
    steps = [
        step[token].logprob
        for step, token in zip(expected.logprobs, expected.token_ids, strict=True)
    ]
    assert logprobs.token_logprobs == steps
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(6)]
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)  # texts may coincide
    chunks = list(client.completions.create(**args, logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == logprobs.tokens


def test_chat_logprobs_and_top_logprobs(server, client):
    args = {"model": MODEL, "messages": USER_HI, "max_tokens": 4, "temperature": 0}
    reply = client.chat.completions.create(**args, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for step in content:
        assert [top.logprob for top in step.top_logprobs] == sorted(
            (top.logprob for top in step.top_logprobs), reverse=True
        )
        assert len(step.top_logprobs) == 3 and step.top_logprobs[0].logprob == step.logprob
        assert bytes(step.bytes).decode() == step.token
    assert client.chat.completions.create(**args).choices[0].logprobs is None
    bare = client.chat.completions.create(**args, logprobs=True).choices[0].logprobs.content
    assert all(step.top_logprobs == [] for step in bare)
    refused = post(server, "chat/completions", {**args, "top_logprobs": 2})
    assert_refused(refused, server, 400, "top_logprobs needs logprobs")


def test_a_seed_makes_sampling_repeatable(server, client):
    args = {"model": MODEL, "prompt": "x", "max_tokens": 12, "temperature": 1.0}
    args["extra_body"] = {"ignore_eos": True}
    first, again = (client.completions.create(**args, seed=7) for _ in range(2))
    other = client.completions.create(**args, seed=8)
    assert first.choices[0].text == again.choices[0].text != other.choices[0].text


def test_a_seed_outside_torchs_range_is_400_naming_it(server):
    reply = post(server, "completions", {"prompt": "x", "seed": 2**64})
    assert_refused(reply, server, 400, "seed", param="seed")


def test_openapi_documents_bodies_replies_and_errors(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    for route, reply in (
        ("completions", "CompletionResponse"),
        ("chat/completions", "ChatCompletionResponse"),
    ):
        operation = spec["paths"][f"/v1/{route}"]["post"]
        assert operation["requestBody"]["required"]
        responses = operation["responses"]
        assert set(responses) == {"200", "400", "401", "404", "408", "413", "431", "500", "503"}
        assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith(reply)
        assert "text/event-stream" in responses["200"]["content"]
        error = responses["400"]["content"]["application/json"]["schema"]["$ref"]
        assert error.endswith("ErrorResponse")
    assert spec["components"]["schemas"]["CompletionRequest"]["additionalProperties"] is False
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(spec["paths"]["/health"]["get"]["responses"]) == {"200", "408", "413", "431", "503"}


def test_a_logit_bias_for_a_token_the_model_lacks_is_400(server):
    vocab = len(server.engine.tokenizer)
    body = {"prompt": "x", "logit_bias": {str(vocab): 5}}
    assert_refused(post(server, "completions", body), server, 400, str(vocab), param="logit_bias")
    body = {"prompt": "x", "logit_bias": {"-1": 5}}
    assert_refused(post(server, "completions", body), server, 400, ">= 0", param="logit_bias")
    body = {"prompt": "x", "logit_bias": {"the": 5}}
    assert_refused(post(server, "completions", body), server, 400, param="logit_bias.the")


def test_each_request_is_prepared_once(server, monkeypatch):
    """One tokenization and one request id per HTTP request, streaming or not."""
    inputs, made = server.engine.inputs, []
    prepare = inputs.prepare
    monkeypatch.setattr(
        inputs, "prepare", lambda *a, **kw: made.append(prepare(*a, **kw)) or made[-1]
    )
    for route, body in (
        ("completions", {"prompt": "x"}),
        ("chat/completions", {"messages": USER_HI}),
    ):
        for stream in (False, True):
            reply = post(server, route, body | {"max_tokens": 2, "stream": stream})
            assert reply.status_code == 200, reply.text
    assert len(made) == 4 and len({request.request_id for request in made}) == 4


def test_n_choices_greedy_are_each_the_offline_answer(server, client):
    args = {"model": MODEL, "prompt": "def main():", "max_tokens": 5, "temperature": 0}
    reply = client.completions.create(**args, n=2)
    expected = offline(server, "def main():", 5)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.text == expected.text for c in reply.choices)
    assert reply.usage.completion_tokens == 2 * len(expected.token_ids)
    chat = client.chat.completions.create(
        model=MODEL, messages=USER_HI, max_tokens=3, n=3, stream=True
    )
    finished = [c.choices[0].index for c in chat if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1, 2]


def test_a_large_logit_bias_forces_its_token(server, client):
    reply = client.completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=5,
        logit_bias={"77": 100},
        extra_body={"ignore_eos": True},
    )
    decode = server.engine.tokenizer.decode
    assert reply.choices[0].text == decode([77] * 5)


@pytest.mark.parametrize(
    "penalty",
    [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 2.0}],
)
def test_penalties_change_a_greedy_reply(server, client, penalty):
    args = {"model": MODEL, "prompt": "x", "max_tokens": 64, "temperature": 0}
    args["extra_body"] = {"ignore_eos": True}
    plain = client.completions.create(**args).choices[0]
    greedy = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    ids = server.offline.generate(["x"], greedy)[0].outputs[0].token_ids
    assert len(set(ids)) < len(ids), "the greedy reply repeats tokens, so a penalty matters"
    args["extra_body"] = {**args["extra_body"], **penalty}
    assert client.completions.create(**args).choices[0].text != plain.text


def test_min_p_of_one_samples_greedily(server, client):
    args = {"model": MODEL, "prompt": "import os", "max_tokens": 8}
    greedy = client.completions.create(**args, temperature=0).choices[0].text
    strict = client.completions.create(**args, temperature=1, extra_body={"min_p": 1.0})
    assert strict.choices[0].text == greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [("presence_penalty", 3), ("frequency_penalty", -3), ("repetition_penalty", 0), ("n", 0)],
)
def test_out_of_range_sampling_values_are_400_naming_them(server, field, value):
    reply = post(server, "completions", {"prompt": "x", field: value})
    assert_refused(reply, server, 400, field)
