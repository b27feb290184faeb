"""A real uvicorn server on 127.0.0.1 (random port), driven by the official ``openai`` client:
the routes answer what the offline ``LLM`` answers, streams stream, errors keep OpenAI's shape
and status, and a client that goes away frees its pages."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from serving import KEY, MODEL, offline

from baton_paged.entrypoints.server import build_app
from baton_paged.processing.chat_prompt import conversation_prompt


def test_completion_equals_the_offline_llm(server, client):
    reply = client.completions.create(
        model=MODEL, prompt="def main():", max_tokens=12, temperature=0
    )
    expected = offline(server, "def main():", 12)
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.object == "text_completion" and reply.model == MODEL


def test_token_id_prompt(server, client):
    reply = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=5, temperature=0)
    assert reply.choices[0].text == offline(server, {"prompt_token_ids": [5, 6, 7]}, 5).text


def test_chat_uses_the_chat_template_and_equals_the_offline_llm(server, client):
    messages = [{"role": "user", "content": "hello"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0
    )
    tokenizer = server.engine.engine.tokenizer
    prompt = conversation_prompt(tokenizer, messages)
    assert "<|im_start|>user" in prompt["prompt"]  # the tiny Llama's ChatML template
    assert reply.choices[0].message.content == offline(server, prompt, 10).text
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"


def test_chat_takes_max_completion_tokens_and_refuses_a_contradicting_max_tokens(server, client):
    messages = [{"role": "user", "content": "hello"}]
    args = {"model": MODEL, "messages": messages, "temperature": 0}
    extra = {"ignore_eos": True}
    reply = client.chat.completions.create(**args, max_completion_tokens=3, extra_body=extra)
    assert reply.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError, match="disagree"):
        client.chat.completions.create(**args, max_completion_tokens=3, max_tokens=4)


def test_streams_add_up_to_the_whole_reply(server, client):
    args = {"model": MODEL, "prompt": "import os", "max_tokens": 16, "temperature": 0}
    whole = client.completions.create(**args)
    chunks = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) <= {None}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_stream(server, client):
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x " * 400, "max_tokens": 4}, 400, "context"),
        ({"model": MODEL, "prompt": "", "max_tokens": 4}, 400, "empty"),
        ({"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "'suffix' is not supported"),
        ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
        ({"model": MODEL, "prompt": {"not": "a prompt"}}, 400, "malformed"),
        ({"model": MODEL}, 400, "malformed"),
    ],
)
def test_errors_have_openai_shape_and_change_nothing(server, body, status, message):
    headers = {"Authorization": f"Bearer {KEY}"}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert message in error["message"] and error["code"] == status
    assert not server.engine.engine.requests
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_bad_or_missing_api_key_is_401(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


def test_full_queue_is_503(server, client, monkeypatch):
    monkeypatch.setattr(server.engine, "max_waiting", 0)
    with pytest.raises(openai.InternalServerError) as raised:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert raised.value.status_code == 503


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_client_that_disconnects_mid_stream_frees_its_pages(server):
    engine = server.engine.engine
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert engine.cache.pool.num_used > 0
    wait_until(lambda: not engine.requests and engine.cache.pool.num_used == 0)
    assert engine.stats.aborted >= 1


def test_a_non_streaming_client_that_disconnects_aborts_its_request(server, monkeypatch):
    engine = server.engine.engine
    real_step = engine.step_unbuilt

    def slow_step():  # 200 tokens now take ~4 s, far past the client's patience
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(engine, "step_unbuilt", slow_step)
    aborted = engine.stats.aborted
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=0.5)
    wait_until(lambda: engine.stats.aborted == aborted + 1, timeout=2)
    wait_until(lambda: not engine.requests and engine.cache.pool.num_used == 0)


def test_a_client_that_leaves_before_its_first_token_is_never_prefilled(server, monkeypatch):
    """It left while queued behind a long iteration: its abort follows its add through the
    inbox, so no iteration ever holds it."""
    engine = server.engine.engine
    real_step, gate, entered = engine.step_unbuilt, threading.Event(), threading.Event()
    held: list[set[str]] = []

    def gated_step():
        held.append(set(engine.requests))
        entered.set()
        assert gate.wait(timeout=30)
        return real_step()

    monkeypatch.setattr(engine, "step_unbuilt", gated_step)
    aborted = engine.stats.aborted
    url, headers = f"{server.url}/v1/completions", {"Authorization": f"Bearer {KEY}"}
    blocker = threading.Thread(
        target=httpx.post,
        args=(url,),
        kwargs={"json": {"prompt": "a", "max_tokens": 2}, "headers": headers, "timeout": 60},
    )
    blocker.start()
    assert entered.wait(timeout=10)
    for stream in (False, True):
        body = {"prompt": "x", "max_tokens": 50, "stream": stream}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body, headers=headers, timeout=0.5)
    time.sleep(0.3)  # the server notices the disconnects
    gate.set()
    blocker.join(timeout=30)
    wait_until(lambda: engine.stats.aborted == aborted + 2 and not engine.requests)
    assert len(set().union(*held)) == 1, "only the blocker ever entered an iteration"


def test_a_server_whose_receive_fails_still_answers_instead_of_guessing_a_disconnect(server):
    """An ASGI server's ``receive`` raising (a proxy hiccup) says nothing about the client: the
    request runs to its end."""
    body = json.dumps({"prompt": "x", "max_tokens": 5, "ignore_eos": True}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(0.01)
        raise RuntimeError("proxy hiccup")

    sent = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "scheme": "http",
        "query_string": b"",
        "headers": [
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {KEY}".encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    app = build_app(server.engine, MODEL, KEY)
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"])["usage"]["completion_tokens"] == 5


def test_64_concurrent_streaming_clients_all_complete(server):
    async def one(client, i):
        stream = await client.completions.create(
            model=MODEL, prompt=f"request {i}", max_tokens=8, temperature=0, stream=True
        )
        return [chunk async for chunk in stream]

    async def run_all():
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=KEY, max_retries=0
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(run_all())
    assert all(chunks[-1].choices[0].finish_reason in ("stop", "length") for chunks in results)
    wait_until(lambda: server.engine.engine.cache.pool.num_used == 0)


def test_a_failing_iteration_fails_its_requests_and_the_server_keeps_serving(
    server, client, monkeypatch
):
    engine = server.engine.engine
    real_step = engine.step_unbuilt
    calls = {"n": 0}

    def step_failing_once():
        calls["n"] += 1
        if calls["n"] == 2:  # the request is in the batch by now (the first step admitted it)
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(engine, "step_unbuilt", step_failing_once)
    with pytest.raises(openai.InternalServerError) as raised:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4)
    assert raised.value.status_code == 500 and "boom" in str(raised.value)
    assert engine.cache.pool.num_used == 0 and not engine.requests
    reply = client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_metrics_parse_and_count_what_was_served(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:generation_tokens",
        "vllm:prompt_tokens",
        "vllm:request_success",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "baton:slot_efficiency",
        "baton:idle_slot_iterations",
        "baton:preemptions",
        "baton:swapped_bytes",
        "baton:prefix_cache_evictions",
        "baton:prefix_cache_hit_rate",
    }
    assert expected <= set(families)

    def value(name, suffix="", **labels):
        family = families[name]
        return sum(
            s.value
            for s in family.samples
            if s.name == name + suffix and labels.items() <= s.labels.items()
        )

    stats = server.engine.engine.stats
    assert value("vllm:generation_tokens", "_total") == stats.generated_tokens > 0
    assert value("vllm:request_success", "_total") >= 1
    queries = value("vllm:prefix_cache_queries", "_total")
    assert queries == stats.prefix_cache_queries > 0
    finished = value("vllm:request_success", "_total")
    not_aborted = finished - value("vllm:request_success", "_total", finished_reason="abort")
    assert not_aborted <= value("vllm:time_to_first_token_seconds", "_count") <= finished
