"""The server the OpenAI-route tests talk to: the tiny random Llama in float64 behind a real
uvicorn on 127.0.0.1 (random port), and the offline ``LLM`` its answers are compared with."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton_paged.config import EngineConfig
from baton_paged.engine import Engine
from baton_paged.entrypoints.async_engine import AsyncEngine
from baton_paged.entrypoints.llm import LLM
from baton_paged.entrypoints.server import build_app
from baton_paged.entrypoints.server.limits import ServerLimits
from baton_paged.sampling_params import SamplingParams

KEY = "test-key"
MODEL = "tiny-llama"
MAX_MODEL_LEN = 256
HEADERS = {"Authorization": f"Bearer {KEY}"}
TEST_MEMORY = "64MiB"
"""KV pages and host swap pages of each test engine: plenty for the tiny model, where the
defaults (1 GiB each) made every server module hold 4 GiB until its engines were collected."""


def tiny_engine(path, max_model_len: int = MAX_MODEL_LEN) -> Engine:
    config = EngineConfig(
        model=str(path),
        dtype="float64",
        max_batch_size=8,
        max_model_len=max_model_len,
        kv_memory=TEST_MEMORY,
        swap_memory=TEST_MEMORY,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    return Engine(config, model, AutoTokenizer.from_pretrained(path))


LIMITS = ServerLimits(max_best_of=4)
"""The defaults but for n: the tests ask for up to 4 choices."""


@contextmanager
def serving(
    path, make_engine=tiny_engine, tool_parser=None, **app_options
) -> Iterator[SimpleNamespace]:
    """A real uvicorn serving ``make_engine(path)``, and a second such engine offline;
    ``app_options``: more of ``build_app``'s."""
    engine = AsyncEngine(make_engine(path), max_waiting=256)
    app = build_app(engine, MODEL, KEY, LIMITS, tool_parser, **app_options)
    uv = uvicorn.Server(uvicorn.Config(app, port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    port = uv.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        yield SimpleNamespace(url=url, engine=engine, offline=LLM.from_engine(make_engine(path)))
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()
        gc.collect()  # the engines' reference cycles hold their caches until a collection


def offline(server, prompt, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return server.offline.generate([prompt], params)[0].outputs[0]


"""For tests that need the engine to honour those fields (the server passes them by name)."""
