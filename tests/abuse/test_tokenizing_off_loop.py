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


HUGE_AT_ONCE = 3
"""More than the large lane's threads: one waits for a thread, the small lane does not."""


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_health_and_other_clients_answer_while_huge_prompts_are_tokenized(server, route):
    """Relative, not timed: on the event loop, one huge prompt held every answer for as long as
    it took to tokenize; off it, /health answers in a small part of that time, and small
    requests are served meanwhile."""
    replies, durations = [], []

    def send_huge() -> None:
        start = time.monotonic()
        replies.append(server.post(route, huge_prompt(route), timeout=300))
        durations.append(time.monotonic() - start)

    huge = [threading.Thread(target=send_huge) for _ in range(HUGE_AT_ONCE)]
    for thread in huge:
        thread.start()
    health, small_served = [], 0
    while any(thread.is_alive() for thread in huge):
        start = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        health.append(time.monotonic() - start)
        small = server.post("completions", {"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert small.status_code == 200
        small_served += any(thread.is_alive() for thread in huge)
    assert small_served >= 2, "small requests were served while the prompts were tokenized"
    assert len(health) >= 3 and max(health) < min(durations) / 3, (health, durations)
    for reply in replies:
        refused(reply, 400, "tokens; the model's context is 512 tokens")
