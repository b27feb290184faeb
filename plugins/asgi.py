"""baton-paged's OpenAI routes as an ASGI sub-application for an existing service.

    from fastapi import FastAPI
    from baton_paged.plugins.asgi import baton_app

    app = FastAPI()                                   # the service you already run
    llm = baton_app(hf_model=model, tokenizer=tokenizer, served_model_name="my-model")
    app.mount("/llm", llm)                            # POST /llm/v1/completions, ...

Any ASGI framework that mounts sub-applications (Starlette ``Mount``, FastAPI ``mount``) works.
Mounted applications get no lifespan events, so the engine's step loop starts on its own thread
when the app is built; stop it in the parent's shutdown with ``llm.state.engine.close()``. Served
on its own (``uvicorn.run(baton_app(...))``), the app closes its engine at shutdown itself.

On CPU, torch runs the loop's small ops faster on the thread that loaded the model (see
``AsyncEngine``); ``baton-paged serve`` arranges that, an embedding service may not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from baton_paged.entrypoints.async_engine import AsyncEngine
from baton_paged.entrypoints.model_id import served_model_names
from baton_paged.entrypoints.server import build_app
from baton_paged.entrypoints.server.limits import ServerLimits


def baton_app(
    model: str | None = None,
    *,
    hf_model: Any = None,
    tokenizer: Any = None,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_waiting: int = 1024,
    limits: ServerLimits | None = None,
    tool_parser: str | None = None,
    **options,
) -> FastAPI:
    """The routes of ``baton-paged serve`` (``/v1/completions``, ``/v1/chat/completions``,
    ``/v1/models``, ``/health``, ``/metrics``) for a checkpoint or an already-loaded
    transformers model, under ``limits`` (``ServerLimits``), reading tool_choice "auto" replies
    with ``tool_parser`` (``build_app``). ``options`` are ``EngineConfig`` fields."""
    engine = AsyncEngine.build(
        model, hf_model=hf_model, tokenizer=tokenizer, max_waiting=max_waiting, **options
    )
    source = model or getattr(hf_model, "name_or_path", None)
    name, *aliases = served_model_names(source, [served_model_name] if served_model_name else None)
    app = build_app(engine, name, api_key, limits, tool_parser, aliases=aliases)
    app.router.lifespan_context = _closing(engine, app.router.lifespan_context)
    return app


def _closing(engine: AsyncEngine, inner):
    """The app's own lifespan (``inner``), then ``engine`` closed (handing a lent model back)
    when the server stops; only a top-level app gets it, a mounted one is closed by its parent."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner(app):
            yield
        await asyncio.to_thread(engine.close)

    return lifespan
