"""Past the drain timeout at shutdown, the requests still open are told so, in their own
format: a non-streaming one gets a JSON 503, a stream an error event and then ``[DONE]``.
Nothing is cut off silently, and the server exits cleanly."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
from real_server import RealServer, engine_gauges, refused

LONG = {"prompt": "x", "max_tokens": 4000, "ignore_eos": True}


def test_requests_open_past_the_drain_timeout_fail_in_their_own_format(tiny_model_dir):
    flags = ("--drain-timeout", "1", "--max-model-len", "4096")
    server = RealServer(tiny_model_dir("llama"), *flags).wait_healthy()
    try:
        replies, events = [], []
        whole = threading.Thread(
            target=lambda: replies.append(server.post("completions", LONG, timeout=120))
        )
        whole.start()
        with httpx.stream(
            "POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}, timeout=120
        ) as stream:
            lines = stream.iter_lines()
            wait_until_both_run(server)
            server.proc.send_signal(signal.SIGTERM)
            events = [line for line in lines if line.startswith("data: ")]
        whole.join(timeout=60)
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == 503 and "drain timeout" in error["message"]
        assert events[-1] == "data: [DONE]"
        assert len(events) > 3, "the stream had sent tokens before the shutdown"
        refused(replies[0], 503, "drain timeout")
        assert int(replies[0].headers["retry-after"]) >= 1
        assert server.proc.wait(timeout=60) == 0, server.output()
    finally:
        server.stop()


def wait_until_both_run(server: RealServer) -> None:
    deadline = time.monotonic() + 60
    while engine_gauges(server)["vllm:num_requests_running"] < 2:
        assert time.monotonic() < deadline, "the two requests never ran"
        time.sleep(0.05)
