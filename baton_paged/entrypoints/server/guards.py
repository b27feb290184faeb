"""RequestGuard: the HTTP-level limits, checked before a route reads a byte of the body.

Too many header fields, or a header block too large, is a 431; a body larger than
``max_body_bytes`` is a 413, at once when ``Content-Length`` says so, else as soon as the bytes
received pass the limit (a chunked upload), so the server never buffers more than the limit.
Every refusal is OpenAI-shaped JSON naming the limit and its flag. It is plain ASGI, so the
limits hold wherever the app runs: ``baton-paged serve``, an ASGI mount, Ray Serve. (Under
``baton-paged serve`` the connection layer, ``server/connection.py``, also stops a header block
past the limit before it is parsed, and a client that goes silent mid-request.)
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from baton_paged.entrypoints.server.errors import error_body
from baton_paged.entrypoints.server.limits import ServerLimits


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` mid-body; the app's handler for HTTPException answers it."""

    def __init__(self, limit: int):
        super().__init__(413, body_too_large(limit), headers={"Connection": "close"})


def body_too_large(limit: int) -> str:
    return f"the request body is larger than this server allows ({limit} bytes; --max-body-bytes)"


def header_refusal(scope: Scope, limits: ServerLimits) -> str | None:
    """Why a request's line and headers are refused, or None."""
    headers = scope["headers"]
    if len(headers) > limits.max_headers:
        return (
            f"the request has {len(headers)} header fields, more than this server allows "
            f"({limits.max_headers}; --max-headers)"
        )
    line = len(scope["method"]) + len(scope.get("raw_path", b"")) + len(scope["query_string"])
    size = line + 12 + sum(len(name) + len(value) + 4 for name, value in headers)  # CRLFs etc.
    if size > limits.max_header_bytes:
        return (
            f"the request line and headers take {size} bytes, more than this server allows "
            f"({limits.max_header_bytes}; --max-header-bytes)"
        )
    return None


class RequestGuard:
    def __init__(self, app: ASGIApp, limits: ServerLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = header_refusal(scope, self.limits)
        if refusal is not None:
            await refuse(send, 431, refusal)
            return
        declared = content_length(scope["headers"])
        limit = self.limits.max_body_bytes
        if declared is not None and declared > limit:
            await refuse(send, 413, body_too_large(limit))
            return
        await self.app(scope, counting(receive, limit), send)


def counting(receive: Receive, limit: int) -> Receive:
    """``receive``, raising BodyTooLarge once the body passes ``limit`` bytes."""
    received = 0

    async def receive_within_limit() -> Message:
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise BodyTooLarge(limit)
        return message

    return receive_within_limit


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server has refused it already; let the body decide
    return None


async def refuse(send: Send, status: int, message: str) -> None:
    """Answer before the app runs; the connection closes, as the body was never read."""
    body = json.dumps(error_body(status, message)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
