"""Streams of several choices, from hand-made engine outputs (no model): each choice streams on
its own index, finishes once, and its text and logprobs add up to the whole reply's."""

from __future__ import annotations

import asyncio
import json

from baton_paged.entrypoints.server.shapes import ChatShape, CompletionShape
from baton_paged.entrypoints.server.streaming import sse, sse_events
from baton_paged.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput

METRICS = RequestMetrics(0.0, None, None, (), 0)


def choice(index: int, tokens: list[int], finish: str | None) -> CompletionOutput:
    logprobs = tuple({t: Logprob(-0.5 * t, 1)} for t in tokens)
    text = "".join(chr(ord("a") + t) for t in tokens)
    return CompletionOutput(index, text, tuple(tokens), None, logprobs, finish)


def outputs() -> list[RequestOutput]:
    """Choice 1 finishes after two steps, choice 0 after three."""
    steps = [
        (choice(0, [0], None), choice(1, [1], None)),
        (choice(0, [0, 2], None), choice(1, [1, 3], "stop")),
        (choice(0, [0, 2, 4], "length"), choice(1, [1, 3], "stop")),
    ]
    return [
        RequestOutput("r", "p", (9, 9), step, i == len(steps) - 1, METRICS)
        for i, step in enumerate(steps)
    ]


def stream(shape) -> list[dict]:
    async def run():
        items = outputs()

        async def rest():
            for item in items[1:]:
                yield item

        opened = [(items[0], rest())]
        return [event async for event in sse_events(opened, shape, usage=True)]

    events = asyncio.run(run())
    assert events[-1] == "data: [DONE]\n\n"
    return [json.loads(event.removeprefix("data: ")) for event in events[:-1]]


def decode(token: int) -> str:
    return chr(ord("a") + token)


def test_completion_choices_stream_on_their_own_index():
    chunks = stream(CompletionShape("m", 2, decode, echoes=["P"]))
    *chunks, usage = chunks
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    for index, text, finish in ((0, "Pace", "length"), (1, "Pbd", "stop")):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == text
        assert [c["finish_reason"] for c in mine][-1] == finish
        assert sum(c["finish_reason"] is not None for c in mine) == 1
        tokens = [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]]
        assert "P" + "".join(tokens) == text
    whole = CompletionShape("m", 2, decode).whole(outputs()[-1:]).model_dump()
    assert [c["text"] for c in whole["choices"]] == ["ace", "bd"]


def test_chat_choices_each_open_with_the_role():
    chunks = stream(ChatShape("m", 2, decode))[:-1]
    opening = [c["choices"][0] for c in chunks[:2]]
    assert [(c["index"], c["delta"]["role"]) for c in opening] == [
        (0, "assistant"),
        (1, "assistant"),
    ]
    for index, text in ((0, "ace"), (1, "bd")):
        mine = [c["choices"][0] for c in chunks[2:] if c["choices"][0]["index"] == index]
        assert "".join(c["delta"]["content"] or "" for c in mine) == text
        assert all(c["delta"]["role"] is None for c in mine)


def test_an_event_with_unicode_line_separators_stays_one_line():
    """``str.splitlines`` (httpx's ``iter_lines``) breaks at U+0085, U+2028 and U+2029."""
    text = "a\u0085b\u2028c\u2029d"
    event = sse({"text": text})
    assert len(event.splitlines()) == 2 and event.splitlines()[1] == ""
    assert json.loads(event.splitlines()[0].removeprefix("data: ")) == {"text": text}
