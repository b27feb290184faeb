"""The OpenAI-compatible HTTP server: ``build_app(async_engine, model_name)`` and its pieces."""

from baton_paged.entrypoints.server.routes import build_app

__all__ = ["build_app"]
