"""The OpenAI routes mounted inside someone else's FastAPI app: the host's own routes keep
working, the mounted ones answer what the offline engine answers, streaming included."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton_paged import LLM, SamplingParams
from baton_paged.plugins.asgi import baton_app

NAME = "mounted-llama"


def load_reference(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)


@pytest.fixture(scope="module")
def host(tiny_model_dir):
    path = tiny_model_dir("llama")
    model = load_reference(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    app = FastAPI()
    app.get("/ping")(lambda: {"pong": True})
    llm = baton_app(hf_model=model, tokenizer=tokenizer, served_model_name=NAME, api_key="k")
    app.mount("/llm", llm)
    server = uvicorn.Server(uvicorn.Config(app, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", LLM(hf_model=load_reference(path), tokenizer=tokenizer)
    server.should_exit = True
    thread.join(timeout=10)
    llm.state.engine.close()


def test_the_host_app_keeps_its_own_routes(host):
    url, _ = host
    assert httpx.get(f"{url}/ping").json() == {"pong": True}
    assert httpx.get(f"{url}/llm/health").status_code == 200
    assert httpx.get(f"{url}/health").status_code == 404  # nothing leaks outside the mount


def test_mounted_routes_answer_like_the_offline_engine(host):
    url, offline = host
    client = openai.OpenAI(base_url=f"{url}/llm/v1", api_key="k", max_retries=0)
    assert [m.id for m in client.models.list().data] == [NAME]
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = offline.generate("def main():", params)[0].outputs[0].text
    reply = client.completions.create(model=NAME, prompt="def main():", max_tokens=8, temperature=0)
    assert reply.choices[0].text == expected
    stream = client.completions.create(
        model=NAME, prompt="def main():", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected


def test_the_mount_keeps_its_api_key(host):
    url, _ = host
    client = openai.OpenAI(base_url=f"{url}/llm/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_served_on_its_own_the_app_closes_its_engine_at_shutdown(tiny_model_dir):
    from fastapi.testclient import TestClient

    path = tiny_model_dir("llama")
    model = load_reference(path)
    llm = baton_app(hf_model=model, tokenizer=AutoTokenizer.from_pretrained(path))
    with TestClient(llm) as client:  # runs the app's lifespan, as uvicorn.run would
        assert client.get("/health").status_code == 200
    assert not llm.state.engine.is_running
    assert model.config._attn_implementation != "baton_paged", "the lent model was handed back"
