"""What evaluation harnesses send to /v1/completions, checked against the offline engine: a list
of prompts in one request, ``echo`` with ``logprobs`` (the prompt's tokens scored), the
score-only ``max_tokens=0``, and vLLM's ``prompt_logprobs`` field on both routes."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from serving import HEADERS, MODEL, offline
from test_openai_strict import assert_refused, post

from baton_paged.entrypoints.server.routes import all_or_none
from baton_paged.sampling_params import SamplingParams

PROMPTS = ["def main():", "import os", "The quick brown fox"]


def scored_prompt(server, prompt: str, top_n: int):
    """The offline engine's scoring of ``prompt``: its ids and per-token logprobs."""
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=top_n, prompt_logprobs=top_n)
    return server.offline.generate([prompt], params)[0]


def stream_events(server, body: dict) -> list[dict]:
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**body, "stream": True},
        headers=HEADERS, timeout=60,
    ) as reply:  # fmt: skip
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_a_list_of_prompts_answers_each_in_order_of_index(server, client):
    reply = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=4, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [offline(server, p, 4).text for p in PROMPTS]
    tokenize = server.engine.tokenizer.encode
    assert reply.usage.prompt_tokens == sum(len(tokenize(p)) for p in PROMPTS)
    assert reply.usage.completion_tokens == 12
    ids = [tokenize(p) for p in PROMPTS]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in reply.choices]


def test_several_prompts_with_n_number_choices_prompt_by_prompt(server):
    body = {"model": MODEL, "prompt": PROMPTS[:2], "max_tokens": 3, "n": 2, "seed": 7}
    reply = post(server, "completions", body).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    chunks = stream_events(server, body)
    for choice in reply["choices"]:
        streamed = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in streamed) == choice["text"]
        assert [c["finish_reason"] for c in streamed][-1] == choice["finish_reason"]


def test_echo_with_logprobs_scores_the_prompt_then_the_new_tokens(server, client):
    reply = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    expected = scored_prompt(server, PROMPTS[0], 2)
    ids, decode = expected.prompt_token_ids, server.engine.tokenizer.decode
    assert logprobs.tokens[: len(ids)] == [decode([token]) for token in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    scored = zip(ids[1:], expected.prompt_logprobs[1:], strict=True)
    wanted = [step[token].logprob for token, step in scored]
    assert logprobs.token_logprobs[1 : len(ids)] == pytest.approx(wanted, abs=1e-9)
    assert len(logprobs.tokens) == len(ids) + 3
    assert logprobs.text_offset[: len(ids)] == [
        len("".join(logprobs.tokens[:i])) for i in range(len(ids))
    ]
    assert reply.choices[0].text.startswith(PROMPTS[0])
    assert reply.choices[0].text == PROMPTS[0] + offline(server, PROMPTS[0], 3).text
    assert logprobs.text_offset[len(ids)] == len(PROMPTS[0])


def test_score_only_returns_the_scored_prompt_alone(server):
    body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 0, "echo": True, "logprobs": 1}
    reply = post(server, "completions", body).json()
    for prompt, choice in zip(PROMPTS, reply["choices"], strict=True):
        expected = scored_prompt(server, prompt, 1)
        assert choice["text"] == prompt
        steps = choice["logprobs"]["token_logprobs"]
        assert len(steps) == len(expected.prompt_token_ids) and steps[0] is None
        scored = list(zip(expected.prompt_token_ids[1:], expected.prompt_logprobs[1:], strict=True))
        assert steps[1:] == pytest.approx([step[t].logprob for t, step in scored], abs=1e-9)
        tops = choice["logprobs"]["top_logprobs"][1:]
        greedy = [max(top.values()) == lp for lp, top in zip(steps[1:], tops, strict=True)]
        assert greedy == [step[t].rank == 1 for t, step in scored]  # lm-eval's is_greedy
    assert reply["usage"]["completion_tokens"] == 0
    chunks = stream_events(server, body)
    texts = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == dict(enumerate(PROMPTS))
    assert not server.engine.engine.requests


def test_max_tokens_zero_without_echo_is_refused(server):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 0}
    assert_refused(post(server, "completions", body), server, 400, "echo", param="max_tokens")


def test_more_prompts_than_the_limit_are_refused_naming_the_flag(server):
    body = {"model": MODEL, "prompt": ["x"] * 257, "max_tokens": 1}
    assert_refused(post(server, "completions", body), server, 400, "--max-prompts")


def test_one_prompt_too_long_refuses_the_whole_request(server):
    body = {"model": MODEL, "prompt": ["x", "y " * 300], "max_tokens": 1}
    assert_refused(post(server, "completions", body), server, 400, "context")


def test_prompt_logprobs_field_on_both_routes(server):
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 1, "prompt_logprobs": 2}
    choice = post(server, "completions", body).json()["choices"][0]
    expected = scored_prompt(server, PROMPTS[1], 2)
    assert choice["prompt_logprobs"][0] is None
    pairs = zip(choice["prompt_logprobs"][1:], expected.prompt_logprobs[1:], strict=True)
    for got, step in pairs:
        assert {int(t): v["logprob"] for t, v in got.items()} == pytest.approx(
            {t: lp.logprob for t, lp in step.items()}, abs=1e-9
        )
    assert choice["logprobs"] is None  # the field, not echo's scoring
    messages = [{"role": "user", "content": "hi"}]
    chat = {"model": MODEL, "messages": messages, "max_tokens": 1, "prompt_logprobs": 0}
    reply = post(server, "chat/completions", chat).json()
    assert reply["prompt_logprobs"][0] is None and len(reply["prompt_logprobs"]) > 2
    plain = post(server, "completions", {**body, "prompt_logprobs": None}).json()
    assert plain["choices"][0]["prompt_logprobs"] is None


def test_all_or_none_closes_every_stream_when_one_fails():
    closed = []

    async def stream(i: int):
        try:
            if i == 1:
                raise ValueError("refused")
            await asyncio.sleep(10)
            yield i
        finally:
            closed.append(i)

    async def run():
        streams = [stream(i) for i in range(3)]
        with pytest.raises(ValueError, match="refused"):
            await all_or_none(map(anext, streams), streams)

    asyncio.run(run())
    assert sorted(closed) == [0, 1, 2]
