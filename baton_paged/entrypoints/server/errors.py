"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``.

Every error the app returns has it: ours (``APIError``), the engine's (ValueError is a bad
request), bodies that fail validation or are not JSON / not UTF-8 (FastAPI's 422 and 400, which
would otherwise be ``{"detail": ...}``), unknown routes or methods, and bugs (500).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from baton_paged.entrypoints.async_engine import (
    EngineStoppedError,
    QueueFullError,
    RequestFailedError,
)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}

RETRY_AFTER_S = 1
"""What a 503 tells the client to wait (``Retry-After``): the queue drains in iterations."""


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    """The request field at fault, when one is."""
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(
    status: int, message: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    """The error as JSON; a 503 says when to retry."""
    headers = dict(headers or {})
    if status == 503:
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def status_of(error: Exception) -> int:
    """The HTTP status an exception from the engine maps to."""
    if isinstance(error, APIError):
        return error.status
    if isinstance(error, ValueError):
        return 400
    if isinstance(error, QueueFullError | EngineStoppedError):
        return 503
    return 500


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """One message for all of a body's problems, and the first faulty field."""
    problems, params = [], []
    for problem in _most_specific(error.errors()):
        path = ".".join(str(p) for p in problem["loc"][1:] if not _is_tag(p))
        path = problem.get("ctx", {}).get("field", path)
        if problem["type"] == "extra_forbidden":
            problems.append(f"unknown field '{path}' (not supported by this server)")
        elif problem["type"] == "json_invalid":
            problems.append(f"the body is not valid JSON ({problem['msg']} at character {path})")
            path = ""
        else:
            message = problem["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: {message}" if path else message)
        params.append(path)
    problems = list(dict.fromkeys(problems))  # a union's members often fail alike
    return "malformed request body: " + "; ".join(problems), next(filter(None, params), None)


def _most_specific(problems: list[dict]) -> list[dict]:
    """Where a union member took the value's type but refused the value (a surrogate in a
    string), that is the problem, not the other members' "should be a list"."""

    def field(problem: dict) -> tuple:
        return tuple(step for step in problem["loc"] if not _is_tag(step))

    bad_values = {field(p) for p in problems if p["type"] == "value_error"}
    return [p for p in problems if p["type"] == "value_error" or field(p) not in bad_values]


def _is_tag(location: str | int) -> bool:
    """pydantic's own steps in an error's location: a dict key, a union member's type."""
    return isinstance(location, str) and (
        location in ("[key]", "str", "int", "float", "bool") or "[" in location
    )


def install_handlers(app) -> None:
    async def on_error(_: Request, error: Exception) -> JSONResponse:
        return error_response(status_of(error), str(error), getattr(error, "param", None))

    async def on_malformed(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(400, *validation_message(error))

    async def on_http(_: Request, error: HTTPException) -> JSONResponse:
        message = str(error.detail)
        if error.status_code == 400:  # FastAPI's only 400: a body it could not read
            message = f"{message}: send a UTF-8 JSON object"
        return error_response(error.status_code, message, headers=error.headers)  # 405: Allow

    kinds = (APIError, ValueError, QueueFullError, EngineStoppedError, RequestFailedError)
    for kind in (*kinds, Exception):  # Exception: a bug is still a 500 in OpenAI's shape
        app.add_exception_handler(kind, on_error)
    app.add_exception_handler(RequestValidationError, on_malformed)
    app.add_exception_handler(HTTPException, on_http)
