"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from baton_paged.async_engine import EngineStoppedError, QueueFullError, RequestFailedError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(status: int, message: str) -> dict:
    kind = ERROR_TYPES.get(status, "error")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


def status_of(error: Exception) -> int:
    """The HTTP status an exception from the engine maps to."""
    if isinstance(error, APIError):
        return error.status
    if isinstance(error, ValueError):
        return 400
    if isinstance(error, QueueFullError | EngineStoppedError):
        return 503
    return 500


def install_handlers(app) -> None:
    async def on_error(_: Request, error: Exception) -> JSONResponse:
        return error_response(status_of(error), str(error))

    async def on_malformed(_: Request, error: RequestValidationError) -> JSONResponse:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in error.errors()
        )
        return error_response(400, f"malformed request body: {details}")

    for kind in (APIError, ValueError, QueueFullError, EngineStoppedError, RequestFailedError):
        app.add_exception_handler(kind, on_error)
    app.add_exception_handler(RequestValidationError, on_malformed)
