"""Limits below the routes: body size (413), header count and size (431), clients that go
silent mid-request (408), methods a route lacks (405 with ``Allow``), a full queue (503 with
``Retry-After``). Raw sockets send what an HTTP client library would refuse to."""

from __future__ import annotations

import json
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from real_server import KEY, RealServer, refused

READ_TIMEOUT_S = 2  # the abuse server's --read-timeout


def test_a_body_over_the_limit_is_413_before_it_is_read(server):
    body = json.dumps({"prompt": "x" * 2_000_001}).encode()
    refused(server.post("completions", body), 413, "--max-body-bytes", "2000000")


def test_a_chunked_body_over_the_limit_is_413_once_it_passes_it(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(300):
            yield b"x" * 10_000

    reply = server.post("completions", chunks())  # no Content-Length: chunked
    refused(reply, 413, "--max-body-bytes")


def test_too_many_headers_are_431(server):
    headers = {f"x-filler-{i}": "1" for i in range(120)}
    reply = server.post("completions", {"prompt": "x"}, headers=headers)
    refused(reply, 431, "--max-headers", "(100;")


def test_a_header_block_over_the_limit_is_431(server):
    reply = server.post("completions", {"prompt": "x"}, headers={"x-big": "y" * 20_000})
    refused(reply, 431, "--max-header-bytes")


def test_headers_just_under_the_limit_are_served(server):
    reply = server.post(
        "completions", {"prompt": "x", "max_tokens": 1}, headers={"x-big": "y" * 8000}
    )
    assert reply.status_code == 200, reply.text


def raw_exchange(server: RealServer, *parts: bytes, pause: float = 0.0) -> tuple[bytes, float]:
    """Send ``parts`` (``pause`` seconds apart), then read until the server closes: what it
    answered and how long after connecting it closed."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        start = time.monotonic()
        for part in parts:
            sock.sendall(part)
            if select.select([sock], [], [], pause)[0]:  # it answered: stop sending
                break
        return read_all(sock), time.monotonic() - start


def assert_408(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == 408 and "--read-timeout" in error["message"]


def test_a_connection_that_sends_nothing_is_408_after_the_read_timeout(server):
    answer, elapsed = raw_exchange(server)
    assert_408(answer)
    assert elapsed >= READ_TIMEOUT_S * 0.9


def test_headers_trickled_past_the_read_timeout_are_408(server):
    """Each line comes well within the timeout, but the headers as a whole do not."""
    lines = [b"POST /v1/completions HTTP/1.1\r\n", *[b"x-slow: 1\r\n"] * 20]
    answer, elapsed = raw_exchange(server, *lines, pause=0.25)
    assert_408(answer)
    assert elapsed < READ_TIMEOUT_S + 3, "it was cut off at the timeout, not when it stopped"


def post_head(length: int, auth: bool = True) -> bytes:
    key = f"Authorization: Bearer {KEY}\r\n" if auth else ""
    return (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{key}"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_a_body_that_goes_silent_is_408(server):
    answer, _ = raw_exchange(server, post_head(100), b'{"prompt": ')
    assert_408(answer)


def test_a_slow_but_steady_body_is_served(server):
    """The body's clock is the silence between reads, not the whole upload."""
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode() + b" " * 30
    parts = [body[i : i + 8] for i in range(0, len(body), 8)]
    headers = post_head(len(body)) + b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(headers.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        start = time.monotonic()
        for part in parts:
            sock.sendall(part)
            time.sleep(0.4)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert time.monotonic() - start > READ_TIMEOUT_S, "the upload outlasted the timeout"
    assert answer.startswith(b"HTTP/1.1 200"), answer


def test_a_request_that_is_not_http_is_a_json_400(server):
    answer, _ = raw_exchange(server, b"\x16\x03\x01 not http at all\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert json.loads(body)["error"]["code"] == 400


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/completions"), ("POST", "/health")])
def test_a_wrong_method_is_405_with_allow(server, method, path):
    reply = httpx.request(method, f"{server.url}{path}", headers={"Authorization": f"Bearer {KEY}"})
    refused(reply, 405, "Method Not Allowed")
    assert reply.headers["allow"] in ("POST", "GET", "GET, HEAD", "HEAD, GET")


@pytest.fixture(scope="module")
def one_slot(tiny_model_dir):
    """A server with one batch slot, one waiting place, room for long requests and a 1 s read
    timeout."""
    flags = ("--max-waiting", "1", "--max-batch-size", "1", "--max-model-len", "4096")
    server = RealServer(tiny_model_dir("llama"), *flags, "--read-timeout", "1").wait_healthy()
    yield server
    assert server.stop() == 0, server.output()


LONG = {"prompt": "x", "max_tokens": 4000, "ignore_eos": True}


def test_a_full_queue_is_503_with_retry_after(one_slot):
    url = f"{one_slot.url}/v1/completions"
    with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=60) as first:
        next(first.iter_lines())  # running: it holds the only slot for a while
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: short_request(one_slot), range(4)))
    full = [reply for reply in replies if reply.status_code == 503]
    assert full, [reply.status_code for reply in replies]
    for reply in full:
        refused(reply, 503, "queue is full")
        assert int(reply.headers["retry-after"]) >= 1


def test_the_first_byte_does_not_restart_the_header_clock(one_slot):
    """Idle most of the timeout, then one byte: the headers were still due a timeout after the
    connection opened."""
    with socket.create_connection(("127.0.0.1", one_slot.port), timeout=30) as sock:
        start = time.monotonic()
        time.sleep(0.9)
        sock.sendall(b"P")
        answer = read_all(sock)
        elapsed = time.monotonic() - start
    assert_408(answer)
    assert elapsed < 1.5, elapsed  # 1 s after connecting, not 1 s after the byte


def test_a_pipelined_request_gets_its_own_time_for_its_headers(one_slot):
    """The second request's first bytes come with the first request, which runs longer than
    the timeout; its headers are due a timeout after the first response ends."""
    body = json.dumps(LONG).encode()
    first = post_head(len(body), auth=False) + body
    with socket.create_connection(("127.0.0.1", one_slot.port), timeout=60) as sock:
        start = time.monotonic()
        sock.sendall(first + b"GET /health HTTP/1.1\r\n")
        reader = sock.makefile("rb")
        status, _ = read_response(reader)
        assert status == 200 and time.monotonic() - start > 1, "the first outlasted the timeout"
        for line in (b"Host: x\r\n", b"Accept: */*\r\n", b"X-Slow: 1\r\n", b"\r\n"):
            time.sleep(0.2)  # 0.8 s in all, inside the timeout
            sock.sendall(line)
        assert read_response(reader)[0] == 200


def read_response(reader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length from a socket's file."""
    status = int(reader.readline().split()[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, reader.read(length)


def read_all(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def short_request(server: RealServer) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", json={"prompt": "y"}, timeout=120)
