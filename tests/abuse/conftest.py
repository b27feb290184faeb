"""The abuse tests: a hostile or careless client against the real server (``real_server.py``).

One server serves the module's tests; each test ends by checking the server is still alive and
answering, and the module by checking that no KV page is left owned."""

from __future__ import annotations

import pytest
from real_server import KEY, RealServer, assert_no_pages_owned

SERVE_FLAGS = ("--api-key", KEY, "--max-model-len", "512", "--read-timeout", "2")
"""Defaults but a short read timeout (the slow-client tests wait it out) and a key."""


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    running = RealServer(tiny_model_dir("llama"), *SERVE_FLAGS).wait_healthy()
    yield running
    try:
        assert running.alive(), running.output()
        assert_no_pages_owned(running)
    finally:
        assert running.stop() == 0, running.output()


@pytest.fixture(autouse=True)
def still_serving(request):
    """After each test the server still answers a normal request."""
    yield
    if "server" not in request.fixturenames:
        return
    server = request.getfixturevalue("server")
    assert server.alive(), server.output()
    reply = server.post("completions", {"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert reply.status_code == 200, reply.text
