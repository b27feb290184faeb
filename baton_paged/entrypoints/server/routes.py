"""The FastAPI app: OpenAI's completions, chat completions and models routes, /health, /metrics.

Every route that generates turns its body into a prompt and ``SamplingParams`` first, so a bad
request fails with a 400 before anything is queued. Streaming responses are server-sent events
(``data: {json}``, ending ``data: [DONE]``). A client that goes away, streaming or not, closes
its output stream, which aborts the request and frees its pages at once (see
``AsyncEngine.generate``) instead of decoding for nobody until ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from baton_paged.entrypoints.async_engine import AsyncEngine
from baton_paged.entrypoints.server.errors import (
    ERROR_TYPES,
    APIError,
    ErrorResponse,
    install_handlers,
)
from baton_paged.entrypoints.server.guards import RequestGuard
from baton_paged.entrypoints.server.limits import (
    ServerLimits,
    check_context,
    check_sampling,
)
from baton_paged.entrypoints.server.logs import StatsLog, log_request
from baton_paged.entrypoints.server.openapi import published_schema
from baton_paged.entrypoints.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from baton_paged.entrypoints.server.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from baton_paged.entrypoints.server.shapes import ChatShape, CompletionShape
from baton_paged.entrypoints.server.streaming import sse_events
from baton_paged.entrypoints.server.tokenizing import Tokenizing
from baton_paged.entrypoints.server.tools import template_turn, tool_use
from baton_paged.entrypoints.server.utility_routes import (
    DetokenizeResponse,
    TokenizeResponse,
    UtilityRoutes,
    VersionResponse,
)
from baton_paged.metrics import EngineMetrics
from baton_paged.outputs import RequestOutput
from baton_paged.processing.chat_prompt import conversation_prompt
from baton_paged.processing.input_processor import PromptInput
from baton_paged.processing.tool_calls import PARSERS
from baton_paged.request import Request as EngineRequest
from baton_paged.structured_outputs import StructuredOutputsParams

T = TypeVar("T")
logger = logging.getLogger(__name__)


def build_app(
    engine: AsyncEngine,
    model_name: str,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    tool_parser: str | None = None,
    *,
    aliases: Sequence[str] = (),
    chat_template: str | None = None,
    tokenizer_info: bool = False,
    log_requests: bool = False,
    stats_interval: float | None = None,
) -> FastAPI:
    """The app serving ``engine`` as ``model_name``; with ``api_key``, /v1 routes need it as a
    Bearer token. ``limits``: what one request may ask (``ServerLimits``' defaults if None).
    ``tool_parser``: how replies under tool_choice "auto" are read (``PARSERS``' names; None
    refuses "auto", as vLLM without --enable-auto-tool-choice). ``aliases``: more ids requests
    may name the model by; ``chat_template``: the chat route's template instead of the
    tokenizer's; ``tokenizer_info``: serve ``GET /tokenizer_info``; ``log_requests``: a log line
    per finished request; ``stats_interval``: seconds between stats lines (None: none)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: give a key, or none to serve without one")
    if tool_parser is not None and tool_parser not in PARSERS:
        raise ValueError(f"unknown tool call parser {tool_parser!r}; choose one of {list(PARSERS)}")
    limits = limits or ServerLimits()
    server = Routes(engine, model_name, limits, tool_parser, aliases, chat_template)
    app = FastAPI(
        title="baton-paged",
        docs_url=None,
        redoc_url=None,
        lifespan=closing(server.tokenizing, stats_interval and StatsLog(engine, stats_interval)),
    )
    app.state.engine = engine
    install_handlers(app)
    app.add_middleware(RequestGuard, limits=limits)
    guard = [Depends(bearer_check(api_key))] if api_key else []
    refusals = (400, 401, 404, 500, 503) if api_key else (400, 404, 500, 503)
    metrics = EngineMetrics(engine, model_name)
    engine.finish_listeners.append(metrics.observe)
    if log_requests:
        engine.finish_listeners.append(log_request)

    app.get("/health", response_class=Response, responses=HEALTH)(server.health)
    app.get("/metrics", response_class=PlainTextResponse, responses=METRICS)(
        lambda: Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
    )
    utility = UtilityRoutes(server)
    app.post("/tokenize", response_model=TokenizeResponse, responses=errors(400, 404))(
        utility.tokenize
    )
    app.post("/detokenize", response_model=DetokenizeResponse, responses=errors(400, 404))(
        utility.detokenize
    )
    app.get("/version", response_model=VersionResponse)(utility.version)
    if tokenizer_info:
        app.get("/tokenizer_info")(utility.tokenizer_info)
    app.get(
        "/v1/models",
        dependencies=guard,
        response_model=ModelList,
        responses=errors(401) if api_key else {},
    )(server.models)
    for path, route, reply, chunk in (
        ("/v1/completions", server.completions, CompletionResponse, CompletionResponse),
        (
            "/v1/chat/completions",
            server.chat_completions,
            ChatCompletionResponse,
            ChatCompletionChunk,
        ),
    ):
        responses = generated(reply, chunk, refusals)
        app.post(path, dependencies=guard, response_model=None, responses=responses)(route)
    max_logprobs = engine.inputs.max_logprobs
    app.openapi = published_schema(app.openapi, limits, max_logprobs, bearer=bool(api_key))
    return app


def closing(tokenizing: Tokenizing, stats: StatsLog | None):
    """The app's lifespan: the stats line runs with it, and its tokenizer threads end with
    it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        logging_stats = asyncio.ensure_future(stats.run()) if stats else None
        try:
            yield
        finally:
            if logging_stats is not None:
                logging_stats.cancel()
            tokenizing.close()

    return lifespan


HEALTH = {
    200: {"description": "The engine's step loop is running; empty body.", "content": {}},
    503: {"description": "The engine has stopped or is shutting down.", "model": ErrorResponse},
}
METRICS = {200: {"description": "Prometheus text format.", "content": {"text/plain": {}}}}


def errors(*statuses: int) -> dict:
    return {
        status: {"model": ErrorResponse, "description": ERROR_TYPES[status]} for status in statuses
    }


def generated(model: type, chunk: type, refusals: tuple[int, ...]) -> dict:
    """A generating route's replies: JSON, or server-sent events with ``"stream": true`` (the
    schema of an event stream describes one event, as OpenAPI 3.1 reads it)."""
    data = f"A {chunk.__name__} as JSON, an error object if the request fails, then [DONE]."
    event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
    event["properties"]["data"]["description"] = data
    stream = {"text/event-stream": {"schema": event}}
    ok = {"model": model, "description": "The reply, or its stream.", "content": stream}
    return {200: ok, **errors(*refusals)}


def bearer_check(api_key: str) -> Callable:
    """``Authorization: Bearer KEY``; the scheme's case does not matter (RFC 9110), the key's
    does, and it is compared in constant time."""
    expected = api_key.encode()

    async def check(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        valid = scheme.lower() == "bearer"
        if not (secrets.compare_digest(given.strip().encode(), expected) and valid):
            raise APIError(401, "invalid or missing API key")

    return check


class Routes:
    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        limits: ServerLimits,
        tool_parser: str | None = None,
        aliases: Sequence[str] = (),
        chat_template: str | None = None,
    ):
        self.engine = engine
        self.model_name = model_name
        self.model_names = list(dict.fromkeys([model_name, *aliases]))
        """Every id a request may name the model by; replies carry the first."""
        self.chat_template = chat_template
        self.created = int(time.time())
        """When the server started (``/v1/models`` cards' ``created``, as vLLM's)."""
        self.limits = limits
        self.tool_parser = tool_parser
        """How replies under tool_choice "auto" are read (None: "auto" is refused)."""
        self.tokenizing = Tokenizing()

    async def health(self) -> Response:
        if not self.engine.is_accepting:
            raise APIError(503, "the engine has stopped or is shutting down")
        return Response(status_code=200)

    async def models(self) -> ModelList:
        max_len = self.engine.inputs.max_model_len
        return ModelList(
            data=[
                ModelCard(
                    id=name, created=self.created, root=self.model_name, max_model_len=max_len
                )
                for name in self.model_names
            ]
        )

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        prompts, reply_id = body.engine_prompts(), CompletionShape.new_id(body.request_id)
        prepared = await self.prepare(
            body, lambda: prompts, body.prompt_size, "prompt", request, reply_id
        )
        if prepared is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        echoes = [self.prompt_text(p) if body.echo else "" for p in prepared]
        shape = CompletionShape(
            self.model_name, body.choices, self.decode, echoes,
            reply_id=reply_id, score_only=body.score_only,
            prompt_logprobs=body.prompt_logprobs is not None,
        )  # fmt: skip
        return await self.respond(body, prepared, shape, request)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        tools = tool_use(body.tools, body.tool_choice, body.parallel_tool_calls, self.tool_parser)
        turns = [template_turn(m) for m in body.messages]
        rendered = body.template_options() | ({"tools": list(tools.tools)} if tools.tools else {})
        tokenizer, reply_id = self.engine.tokenizer, ChatShape.new_id(body.request_id)
        prepared = await self.prepare(
            body,
            lambda: [
                conversation_prompt(tokenizer, turns, chat_template=self.chat_template, **rendered)
            ],
            body.prompt_size,
            "messages",
            request,
            reply_id,
            calls=tools.spec(),
        )
        if prepared is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        top_n = body.top_logprobs or 0
        shape = ChatShape(
            self.model_name, body.choices, self.decode, top_n=top_n, tools=tools,
            reply_id=reply_id, prompt_logprobs=body.prompt_logprobs is not None,
        )  # fmt: skip
        return await self.respond(body, prepared, shape, request)

    async def prepare(
        self,
        body: SamplingFields,
        render: Callable[[], list[PromptInput]],
        size: int,
        what: str,
        request: Request,
        reply_id: str,
        calls: StructuredOutputsParams | None = None,
    ) -> list[EngineRequest] | None:
        """The engine's requests, one per prompt, checked and tokenized (else a 400, or 404 for
        another model, before anything is queued), or None if the client left meanwhile.
        ``render`` makes the prompts of ``size`` characters in all; it runs with the tokenizer,
        off the event loop. The requests' ids are the reply's (numbered for several prompts, as
        vLLM's), so the log lines name what the client was sent."""
        self.check_model(body.model)
        check_sampling(body, self.limits, self.engine.inputs.max_logprobs)
        inputs = self.engine.inputs
        params = body.sampling_params(calls, inputs.sampling_defaults)

        def tokenize() -> list[EngineRequest]:
            prompts = render()
            ids = (
                [reply_id]
                if len(prompts) == 1
                else [f"{reply_id}-{i}" for i in range(len(prompts))]
            )
            return [
                inputs.prepare(prompt, params, request_id, body.priority)
                for prompt, request_id in zip(prompts, ids, strict=True)
            ]

        prepared = await unless_gone(self.tokenizing.run(size, tokenize), request)
        for one in prepared or ():
            prompt_len = len(one.prompt_token_ids)
            check_context(prompt_len, body.token_limit(), inputs.max_model_len, what)
        return prepared

    def check_model(self, model: str | None) -> None:
        """404 for a model this server does not serve under any of its names."""
        if model is not None and model not in self.model_names:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server has {self.model_name!r}",
                param="model",
            )

    def prompt_text(self, prepared: EngineRequest) -> str:
        if prepared.prompt is not None:
            return prepared.prompt
        return self.engine.tokenizer.decode(prepared.prompt_token_ids)

    def decode(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    async def respond(
        self, body, prepared: list[EngineRequest], shape, request: Request
    ) -> Response:
        streams = [self.engine.generate_request(one) for one in prepared]
        # Submission errors surface with the first outputs, before any byte is sent.
        firsts = await unless_gone(all_or_none(map(anext, streams), streams), request, streams)
        if firsts is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if body.stream:
            events = sse_events(list(zip(firsts, streams, strict=True)), shape, body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        finals = map(_last, firsts, streams)
        finals = await unless_gone(all_or_none(finals, streams), request, streams)
        if finals is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(shape.whole(finals).model_dump())


async def all_or_none(work: Iterable[Awaitable[T]], streams: Sequence[AsyncIterator]) -> list[T]:
    """Every result of ``work`` (which reads ``streams``), or, if one fails or the caller is
    cancelled, none: the rest is cancelled and every stream closed, aborting its request."""
    tasks = [asyncio.ensure_future(one) for one in work]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
        raise


CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a client that left; nobody reads it."""


async def unless_gone(
    work: Awaitable[T], request: Request, streams: Sequence[AsyncIterator] = ()
) -> T | None:
    """``work``'s result, or None if the client disconnects first, which cancels ``work`` (a
    tokenization not started yet is dropped) and closes ``streams`` (aborting their requests).

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
            for stream in streams:
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
