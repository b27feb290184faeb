"""Ray Serve scale-out: a local Ray cluster on CPU runs two replicas of the tiny model behind
Serve's HTTP proxy; concurrent requests reach both and every reply equals the offline engine's."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from baton_paged import LLM, SamplingParams  # noqa: E402
from baton_paged.plugins.ray_serve import (  # noqa: E402
    REPLICA_HEADER,
    baton_application,
    parse_builder_args,
)

OPTIONS = {"dtype": "float64", "max_batch_size": 4, "max_model_len": 128}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = baton_application(
        {"model": path, **OPTIONS},
        replicas=2,
        ray_actor_options={"num_cpus": 0.5},
        served_model_name=[Path(path).name, "second"],
    )
    serve.run(app, name="baton", route_prefix="/")
    yield f"http://127.0.0.1:{port}", path
    serve.shutdown()
    ray.shutdown()


def test_two_replicas_serve_and_equal_the_offline_engine(cluster):
    url, path = cluster
    prompts = [f"request {i}: def main():" for i in range(16)]

    async def one(client, prompt):
        body = {"model": Path(path).name, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        reply = await client.post(f"{url}/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.headers[REPLICA_HEADER], reply.json()["choices"][0]["text"]

    async def run_all():
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    served = asyncio.run(run_all())
    assert len({replica for replica, _ in served}) == 2
    offline = LLM(path, **OPTIONS).generate(prompts, SamplingParams(temperature=0, max_tokens=8))
    assert [text for _, text in served] == [out.outputs[0].text for out in offline]


def test_every_replica_answers_to_each_served_name(cluster):
    url, path = cluster
    cards = httpx.get(f"{url}/v1/models", timeout=60).json()["data"]
    assert [card["id"] for card in cards] == [Path(path).name, "second"]
    body = {"model": "second", "prompt": "x", "max_tokens": 2}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200 and reply.json()["model"] == Path(path).name


def test_streaming_goes_through_the_proxy(cluster):
    url, path = cluster
    body = {"model": Path(path).name, "prompt": "x", "max_tokens": 5, "temperature": 0}
    body["stream"] = True
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as reply:
        lines = [line for line in reply.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3


def test_the_serve_run_arguments_are_converted_and_checked():
    args = {"model": "m", "max_batch_size": "8", "replicas": "3", "watch_device_memory": "true"}
    engine_options, extra = parse_builder_args(args)
    assert engine_options == {"model": "m", "max_batch_size": 8, "watch_device_memory": True}
    assert extra["replicas"] == 3 and extra["max_waiting"] == 1024
    with pytest.raises(ValueError, match="unknown options"):
        parse_builder_args({"model": "m", "max_batch_sise": "8"})
    with pytest.raises(ValueError, match="replicas must be a positive int"):
        baton_application({"model": "m"}, replicas=0)
