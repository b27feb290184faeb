"""The HTTP connection under ``baton-paged serve``: uvicorn's h11 protocol with a read timeout,
and refusals in OpenAI's JSON shape.

uvicorn times out a connection only between requests (keep-alive). A client that opens a
connection and sends nothing, or sends its headers or body a byte at a time, holds a connection
and its buffers forever; enough of them exhaust the server. Here, as nginx does it, a request's
headers must arrive whole within ``read_timeout`` of the connection opening, of the previous
response ending, or of their first byte after an idle keep-alive wait, and its body may go
silent for at most ``read_timeout`` between two reads;
past either, the client gets a 408 and the connection closes. While the server itself stops
reading (flow control: the app has not consumed what came) the client is not waiting on us, so
the clock does not run. Between requests uvicorn's keep-alive timeout still rules.

A header block larger than ``max_header_bytes`` is refused by h11 before it is parsed; uvicorn
then answers a plain-text 400, which becomes a JSON 431 here (or a JSON 400 for other requests
h11 cannot parse).
"""

from __future__ import annotations

import json
from http import HTTPStatus

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from baton_paged.entrypoints.server.errors import error_body
from baton_paged.entrypoints.server.limits import ServerLimits

GRACE_S = 5.0
"""After the drain timeout, the time uvicorn gives requests to write the errors they now got
before it cuts connections."""


def serving_config(
    app, host: str, port: int, limits: ServerLimits, drain_timeout: float, log_level: str = "info"
):
    """uvicorn's config for ``app`` under these limits (``baton-paged serve``, and the tests)."""
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        log_level=log_level,
        timeout_graceful_shutdown=drain_timeout + GRACE_S,
    )


class GuardedH11Protocol(H11Protocol):
    limits: ServerLimits = ServerLimits()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._headers_since = self._last_read = self.loop.time()
        self._read_timer = self.loop.call_later(self.limits.read_timeout, self._check_reading)

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        if self.timeout_keep_alive_task is not None:  # idle between requests until now
            self._headers_since = now
        self._last_read = now
        super().data_received(data)

    def on_response_complete(self) -> None:
        """The next request's headers are awaited from now (some may be buffered already)."""
        self._headers_since = self.loop.time()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._read_timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """h11 could not parse the request: a header block past the limit, or not HTTP."""
        received = len(self.conn.trailing_data[0])
        limit = self.limits.max_header_bytes
        if received > limit:
            message = (
                f"the request line and headers are larger than this server allows ({limit} "
                "bytes; --max-header-bytes)"
            )
            self._refuse(431, message)
        else:
            self._refuse(400, f"{msg} (send an HTTP/1.1 request)")

    def _check_reading(self) -> None:
        if self.transport.is_closing():
            return
        timeout = self.limits.read_timeout
        if self.flow.read_paused:  # the server stopped reading, not the client sending
            self._last_read = self.loop.time()
        since = self._waiting_since()
        waited = 0.0 if since is None else self.loop.time() - since
        if waited >= timeout:
            message = f"the client did not send its request within {timeout:g} s (--read-timeout)"
            self._refuse(408, message)
            return
        self._read_timer = self.loop.call_later(timeout - waited, self._check_reading)

    def _waiting_since(self) -> float | None:
        """Since when the server has been waiting on the client: for headers, since the
        connection opened, the last response ended or an idle keep-alive wait did; for a body,
        since its last bytes. None while it is not waiting on the client."""
        if self.flow.read_paused:
            return None
        cycle = self.cycle
        if cycle is None or cycle.response_complete:  # awaiting the next request's headers
            idle = self.timeout_keep_alive_task is not None  # keep-alive's own timeout rules
            return None if idle else self._headers_since
        return self._last_read if cycle.more_body and not cycle.response_started else None

    def _refuse(self, status: int, message: str) -> None:
        """Answer outside h11's state machine (it may be in error, or mid-request) and close."""
        body = json.dumps(error_body(status, message)).encode()
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()
