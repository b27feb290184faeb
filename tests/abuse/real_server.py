"""``baton-paged serve`` as a user starts it, in a subprocess on a free port, for the abuse tests:
every request in them crosses a real socket to the real server (uvicorn, the guarded connection,
the app, the engine on the main thread), and the process is watched for dying."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

KEY = "abuse-test-key"
START_TIMEOUT_S = 180  # a liveness bound: a loaded CI machine starts slowly


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RealServer:
    def __init__(self, model_dir: Path, *flags: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_id = Path(model_dir).name
        self.log = tempfile.NamedTemporaryFile("w+", prefix="abuse-serve-", suffix=".log")
        command = [
            sys.executable,
            "-c",
            "from baton_paged.entrypoints.cli import main; main()",
            "serve",
        ]
        command += ["--model", str(model_dir), "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_healthy(self) -> RealServer:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, f"the server exited: {self.output()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never became healthy"
            time.sleep(0.2)

    def post(self, route: str, body, headers: dict | None = None, **options) -> httpx.Response:
        """POST JSON (or raw bytes, or an iterator of them: chunked) to /v1/<route> with the
        key."""
        headers = {"Authorization": f"Bearer {KEY}", **(headers or {})}
        if not isinstance(body, dict | list):
            headers.setdefault("Content-Type", "application/json")
            return httpx.post(f"{self.url}/v1/{route}", content=body, headers=headers, **options)
        return httpx.post(f"{self.url}/v1/{route}", json=body, headers=headers, **options)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def refused(reply: httpx.Response, status: int, *words: str, param: str | None = None) -> dict:
    """Assert an OpenAI-shaped refusal with ``status`` whose message holds ``words``."""
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    for word in words:
        assert word in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_no_pages_owned(server: RealServer, patience_s: float = 10) -> None:
    """Once every request has ended, no page is owned and nothing runs or waits. Aborts reach
    the engine between iterations, so the gauges get a few seconds to settle."""
    deadline = time.monotonic() + patience_s
    while True:
        gauges = engine_gauges(server)
        busy = {name: value for name, value in gauges.items() if value}
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not busy, busy


def engine_gauges(server: RealServer) -> dict[str, float]:
    """The KV pages owned per pool and the requests running, waiting and swapped."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    wanted = ("baton:kv_pages_in_use", "vllm:num_requests_")
    return {
        f"{sample.name}{_without_model(sample.labels)}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(wanted)
    }


def _without_model(labels: dict) -> str:
    rest = {k: v for k, v in labels.items() if k != "model_name"}
    return str(rest) if rest else ""
