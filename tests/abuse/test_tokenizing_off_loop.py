"""A huge prompt delays only itself: it is templated and tokenized on a worker thread, so
other clients and /health are answered while it is (once the event loop tokenized it, and every
client waited 25-95 s for a 20 MB prompt)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from real_server import KEY, RealServer, refused

PROMPT_BYTES = 4_000_000


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    flags = ("--api-key", KEY, "--max-model-len", "512", "--max-body-bytes", "8000000")
    running = RealServer(tiny_model_dir("llama"), *flags).wait_healthy()
    yield running
    assert running.stop() == 0, running.output()


def huge_prompt(route: str) -> dict:
    text = "The quick brown fox jumps over the lazy dog. " * (PROMPT_BYTES // 45)
    if route == "completions":
        return {"prompt": text}
    return {"messages": [{"role": "user", "content": text}]}


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_health_and_other_clients_answer_while_a_huge_prompt_is_tokenized(server, route):
    replies = []
    huge = threading.Thread(
        target=lambda: replies.append(server.post(route, huge_prompt(route), timeout=300))
    )
    huge.start()
    time.sleep(0.5)  # its body is on the wire and being read or tokenized
    answered_during = []
    while huge.is_alive():
        start = time.monotonic()
        health = httpx.get(f"{server.url}/health", timeout=10)
        small = server.post("completions", {"prompt": "hi", "max_tokens": 2}, timeout=10)
        if huge.is_alive():
            answered_during.append(time.monotonic() - start)
        assert health.status_code == 200 and small.status_code == 200
    huge.join()
    assert len(answered_during) >= 2, "others were answered while the prompt was tokenized"
    assert max(answered_during) < 5, answered_during  # a liveness bound, not a speed target
    refused(replies[0], 400, "tokens; the model's context is 512 tokens")
