"""Server-sent events for ``"stream": true``: a chunk per choice per new piece of text, then
usage if asked, then ``data: [DONE]``.

Each choice of an ``n > 1`` request streams on its own index and finishes on its own; a choice
whose text is held back (a possible stop string) sends nothing until it is released, and its
tokens' logprobs travel with the text they make.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel

from baton_paged.entrypoints.server.errors import error_body, status_of
from baton_paged.entrypoints.server.shapes import CompletionShape, Piece
from baton_paged.outputs import CompletionOutput, RequestOutput


@dataclass(frozen=True)
class Sent:
    """How much of one choice its stream has sent."""

    text: str = ""
    tokens: int = 0
    finished: bool = False


def next_piece(done: CompletionOutput, sent: Sent, offset: int) -> tuple[Piece | None, Sent]:
    """The part of ``done`` not yet sent (None if nothing new), and what is sent after it."""
    if sent.finished:
        return None, sent
    text = done.text[len(sent.text) :] if done.text.startswith(sent.text) else ""
    if not text and not done.finish_reason:
        return None, sent
    logprobs = None if done.logprobs is None else done.logprobs[sent.tokens :]
    start = offset + len(sent.text)
    piece = Piece(done.index, text, logprobs, done.finish_reason, done.stop_reason, start)
    total = sent.text + text
    return piece, Sent(total, len(done.token_ids), done.finish_reason is not None)


async def sse_events(
    first: RequestOutput, rest: AsyncIterator[RequestOutput], shape: CompletionShape, usage: bool
):
    sent: dict[int, Sent] = {}
    last = first
    try:
        for chunk in shape.opening():
            yield sse(chunk)
        async for output in _chain(first, rest):
            last = output
            for done in output.outputs:
                before = sent.get(done.index, Sent())
                piece, sent[done.index] = next_piece(done, before, len(shape.echo))
                chunk = None if piece is None else shape.chunk(piece, done)
                if chunk is not None:
                    yield sse(chunk)
        if usage:
            yield sse(shape.usage_chunk(last))
    except Exception as error:  # the request failed mid-stream: say so in the stream
        yield sse(error_body(status_of(error), str(error)))
    finally:
        await rest.aclose()  # a client gone mid-stream aborts its request now, not at GC
    yield "data: [DONE]\n\n"


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
