"""Server-sent events for ``"stream": true``: a chunk per choice per new piece of text, then
usage if asked, then ``data: [DONE]``. A completions request with several prompts streams all
their choices in one event stream, each on its own index, as their tokens come.

Each choice of an ``n > 1`` request streams on its own index and finishes on its own; a choice
whose text is held back (a possible stop string) sends nothing until it is released, and its
tokens' logprobs travel with the text they make.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel

from baton_paged.entrypoints.server.errors import error_body, status_of
from baton_paged.entrypoints.server.shapes import CompletionShape, Piece
from baton_paged.outputs import CompletionOutput, RequestOutput

T = TypeVar("T")


@dataclass(frozen=True)
class Sent:
    """How much of one choice its stream has sent."""

    text: str = ""
    tokens: int = 0
    finished: bool = False


def next_piece(
    done: CompletionOutput, sent: Sent, offset: int, index: int
) -> tuple[Piece | None, Sent]:
    """The part of ``done`` not yet sent (None if nothing new), as choice ``index`` of the
    reply, and what is sent after it."""
    if sent.finished:
        return None, sent
    text = done.text[len(sent.text) :] if done.text.startswith(sent.text) else ""
    if not text and not done.finish_reason:
        return None, sent
    logprobs = None if done.logprobs is None else done.logprobs[sent.tokens :]
    start = offset + len(sent.text)
    piece = Piece(index, text, logprobs, done.finish_reason, done.stop_reason, start)
    total = sent.text + text
    return piece, Sent(total, len(done.token_ids), done.finish_reason is not None)


Opened = tuple[RequestOutput, AsyncIterator[RequestOutput]]
"""One prompt's stream: its first output, and the rest."""


async def sse_events(opened: Sequence[Opened], shape: CompletionShape, usage: bool):
    """The events of a reply to one or several prompts (their outputs interleaved as they
    come; each choice's own in order)."""
    sent: dict[tuple[int, int], Sent] = {}
    last = [first for first, _ in opened]
    try:
        for prompt, (first, _) in enumerate(opened):
            for chunk in shape.opening(prompt, first):
                yield sse(chunk)
        outputs = merged([_chain(first, rest) for first, rest in opened])
        async with aclosing(outputs):  # its reads end before the streams close
            async for prompt, output in outputs:
                last[prompt] = output
                for done in output.outputs:
                    key = (prompt, done.index)
                    index, offset = shape.index(*key), shape.offset(prompt)
                    piece, sent[key] = next_piece(done, sent.get(key, Sent()), offset, index)
                    chunk = None if piece is None else shape.chunk(piece, done)
                    if chunk is not None:
                        yield sse(chunk)
        if usage:
            yield sse(shape.usage_chunk(last))
    except Exception as error:  # the request failed mid-stream: say so in the stream
        yield sse(error_body(status_of(error), str(error)))
    finally:  # a client gone mid-stream aborts its requests now, not at GC
        for _, rest in opened:
            await rest.aclose()
    yield "data: [DONE]\n\n"


async def merged(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """The items of several streams as each comes, tagged with its stream's place; one read
    in flight per stream keeps each stream's own order."""
    if len(streams) == 1:  # the common case, without a task per item
        async for item in streams[0]:
            yield 0, item
        return
    reads = {asyncio.ensure_future(anext(stream)): i for i, stream in enumerate(streams)}
    try:
        while reads:
            done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
            for read in done:
                i = reads.pop(read)
                try:
                    item = read.result()
                except StopAsyncIteration:
                    continue
                reads[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, item
    finally:
        for read in reads:
            read.cancel()
        await asyncio.gather(*reads, return_exceptions=True)


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item


LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
"""Characters ``str.splitlines`` breaks lines at (httpx's ``iter_lines`` among the clients that
split with it) though SSE does not: escaped, an event stays one line. They can only occur inside
JSON strings, where the escape means the same character."""


def sse(payload: BaseModel | dict) -> str:
    text = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {text.translate(LINE_BREAKS)}\n\n"
