"""The FastAPI app: OpenAI's completions, chat completions and models routes, /health, /metrics.

Every route that generates turns its body into a prompt and ``SamplingParams`` first, so a bad
request fails with a 400 before anything is queued. Streaming responses are server-sent events
(``data: {json}``, ending ``data: [DONE]``). A client that goes away, streaming or not, closes
its output stream, which aborts the request and frees its pages at once (see
``AsyncEngine.generate``) instead of decoding for nobody until ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from baton_paged.async_engine import AsyncEngine
from baton_paged.outputs import RequestOutput
from baton_paged.server.chat import render_chat
from baton_paged.server.errors import APIError, error_body, install_handlers, status_of
from baton_paged.server.metrics import ServerMetrics
from baton_paged.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

T = TypeVar("T")
logger = logging.getLogger(__name__)


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The app serving ``engine`` as ``model_name``; with ``api_key``, /v1 routes need it as a
    Bearer token."""
    app = FastAPI(title="baton-paged", docs_url=None, redoc_url=None)
    app.state.engine = engine
    install_handlers(app)
    guard = [Depends(bearer_check(api_key))] if api_key else []
    server = Routes(engine, model_name)
    metrics = ServerMetrics(engine)
    engine.finish_listeners.append(metrics.observe)

    app.get("/health")(server.health)
    app.get("/metrics")(lambda: Response(metrics.render(), media_type=CONTENT_TYPE_LATEST))
    app.get("/v1/models", dependencies=guard)(server.models)
    app.post("/v1/completions", dependencies=guard)(server.completions)
    app.post("/v1/chat/completions", dependencies=guard)(server.chat_completions)
    return app


def bearer_check(api_key: str) -> Callable:
    async def check(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key")

    return check


class Routes:
    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    async def health(self) -> Response:
        return Response(status_code=200 if self.engine.is_running else 503)

    async def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "baton-paged"}
        return {"object": "list", "data": [card]}

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body)
        return await self.respond(body, body.engine_prompt(), CompletionShape, request)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body)
        prompt = render_chat(self.engine.tokenizer, body.messages)
        return await self.respond(body, prompt, ChatShape, request)

    def check_model(self, body: SamplingFields) -> None:
        if body.model is not None and body.model != self.model_name:
            raise APIError(
                404, f"the model {body.model!r} does not exist; this server has {self.model_name!r}"
            )

    async def respond(self, body: SamplingFields, prompt, shape: type, request: Request):
        params = body.sampling_params()
        stream = self.engine.generate(prompt, params, priority=body.priority)
        # Submission errors surface with the first output, before any byte is sent.
        first = await unless_gone(anext(stream), stream, request)
        if first is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        out = shape(self.model_name)
        if body.stream:
            events = sse_events(first, stream, out, body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        final = await unless_gone(_last(first, stream), stream, request)
        if final is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(out.whole(final))


CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a client that left; nobody reads it."""


async def unless_gone(work: Awaitable[T], stream: AsyncIterator, request: Request) -> T | None:
    """``work``'s result, or None if the client disconnects first, which closes ``stream``
    (aborting its request).

    Starlette notices a vanished client only while it writes a streaming body; a request still
    queued for its first token, or a non-streaming one, writes nothing, so a watcher listens for
    the ASGI ``http.disconnect`` message meanwhile.
    """
    working = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not working.done():
            working.cancel()
            await asyncio.gather(working, return_exceptions=True)
            await stream.aclose()
    return None if working.cancelled() else working.result()


async def _last(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = first
    async for output in rest:
        final = output
    return final


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects. A server whose ``receive`` fails cannot say, so the
    request is left to run (logged) rather than aborted on a guess."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0)  # never starve the loop, whatever receive() does
    except Exception:
        logger.warning("cannot watch for a client disconnect", exc_info=True)
        await asyncio.Event().wait()  # until cancelled, when the work is done


async def sse_events(first: RequestOutput, rest: AsyncIterator[RequestOutput], out, usage: bool):
    """Server-sent events: a chunk per new piece of text, then usage if asked, then [DONE]."""
    sent = ""
    last = first
    try:
        for chunk in out.opening():
            yield sse(chunk)
        async for output in _chain(first, rest):
            last = output
            text = output.outputs[0].text
            delta, sent = (text[len(sent) :], text) if text.startswith(sent) else ("", sent)
            finish = output.outputs[0].finish_reason
            if delta or finish:
                yield sse(out.chunk(delta, finish, output.outputs[0].stop_reason))
        if usage:
            yield sse(out.usage_chunk(last))
    except Exception as error:  # the request failed mid-stream: say so in the stream
        yield sse(error_body(status_of(error), str(error)))
    finally:
        await rest.aclose()  # a client gone mid-stream aborts its request now, not at GC
    yield "data: [DONE]\n\n"


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def usage_of(output: RequestOutput) -> dict:
    prompt, completion = len(output.prompt_token_ids), len(output.outputs[0].token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class CompletionShape:
    """``/v1/completions`` bodies: ``text_completion`` objects."""

    prefix, kind = "cmpl", "text_completion"

    def __init__(self, model: str):
        self.model = model
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, choice: dict, usage: dict | None, kind: str | None = None) -> dict:
        return {
            "id": self.id,
            "object": kind or self.kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice] if choice else [],
            "usage": usage,
        }

    def whole(self, output: RequestOutput) -> dict:
        done = output.outputs[0]
        choice = self.choice(done.text, done.finish_reason, done.stop_reason)
        return self.envelope(choice, usage_of(output))

    def choice(self, text: str, finish: str | None, stop_reason) -> dict:
        return {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": stop_reason,
        }

    def opening(self) -> list[dict]:
        return []

    def chunk(self, delta: str, finish: str | None, stop_reason) -> dict:
        return self.envelope(self.choice(delta, finish, stop_reason), None)

    def usage_chunk(self, output: RequestOutput) -> dict:
        return self.envelope({}, usage_of(output))


class ChatShape(CompletionShape):
    """``/v1/chat/completions`` bodies: ``chat.completion`` objects and their chunks."""

    prefix, kind = "chatcmpl", "chat.completion"
    chunk_kind = "chat.completion.chunk"

    def choice(self, text: str, finish: str | None, stop_reason) -> dict:
        message = {"role": "assistant", "content": text}
        return {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": stop_reason,
        }

    def opening(self) -> list[dict]:
        delta = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return [self.envelope(delta, None, self.chunk_kind)]

    def chunk(self, delta: str, finish: str | None, stop_reason) -> dict:
        choice = {
            "index": 0,
            "delta": {"content": delta} if delta else {},
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": stop_reason,
        }
        return self.envelope(choice, None, self.chunk_kind)

    def usage_chunk(self, output: RequestOutput) -> dict:
        return self.envelope({}, usage_of(output), self.chunk_kind)
