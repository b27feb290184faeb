"""The OpenAI-compatible HTTP server: ``build_app(async_engine, model_name)`` and its pieces."""

from baton_paged.server.app import build_app

__all__ = ["build_app"]
