"""``baton-paged serve`` in a subprocess, as a user starts it, for the serving benchmark.

The server runs the real CLI (uvicorn, ``AsyncEngine``) on 127.0.0.1, behind a two-line launcher
that pins torch's threads (and ``OMP_NUM_THREADS``) before the CLI runs. The benchmark reads what
the server did from its ``/metrics`` counters and its CPU time from the process table.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

STARTUP_TIMEOUT_S = 180.0
LAUNCHER = (
    "import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
    "print(f'torch threads {torch.get_num_threads()}', flush=True); "
    "from baton_paged.cli import main; main(sys.argv[2:], prog_name='baton-paged')"
)
"""Pins torch's intra-op threads in the server process, then runs the real CLI."""
COUNTERS = ("iterations", "generation_tokens", "idle_slot_iterations")
"""The engine counters of /metrics (``baton:<name>_total``) a run's deltas are taken of."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``baton-paged serve ARGS`` in a subprocess, its log in a temporary file; ready once
    /health answers 200."""

    def __init__(self, serve_args: list[str], threads: int, log_prefix: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{log_prefix}-", suffix=".log")
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.command = [sys.executable, "-c", LAUNCHER, str(threads), "serve", *serve_args]
        self.command += ["--port", str(self.port)]
        self.proc = subprocess.Popen(
            self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self) -> float:
        """Seconds until /health said 200; RuntimeError with the log's tail if it never did."""
        start = time.perf_counter()
        while time.perf_counter() - start < STARTUP_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"no /health 200 within {STARTUP_TIMEOUT_S}s: {self.tail()}")

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system + times.children_user + times.children_system

    def counters(self) -> dict[str, float]:
        """The engine counters of /metrics (generated tokens, iterations, idle slots...)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.labels and sample.name.endswith("_total"):
                    values[sample.name.removesuffix("_total")] = sample.value
        return values

    def tail(self, chars: int = 1500) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-chars:]

    def torch_threads(self) -> int | None:
        for line in Path(self.log.name).read_text().splitlines():
            if line.startswith("torch threads "):
                return int(line.split()[-1])
        return None

    def stop(self) -> None:
        """SIGINT (uvicorn's graceful shutdown, then the engine thread's), kill if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def counter_deltas(before: dict, after: dict) -> dict:
    """What the server's engine did between two ``counters()`` reads: iterations and generated
    tokens, and so its mean decode batch (tokens per iteration)."""
    deltas = {k: after.get(f"baton:{k}", 0) - before.get(f"baton:{k}", 0) for k in COUNTERS}
    if deltas["iterations"]:
        deltas["tokens_per_iteration"] = round(
            deltas["generation_tokens"] / deltas["iterations"], 2
        )
    return deltas
