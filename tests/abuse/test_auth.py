"""The API key: an empty one is a mistake the server refuses to start with (it would turn
authentication off), the scheme is matched without regard to case, the key exactly. The model
id clients see never shows the server's filesystem."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from real_server import KEY

SERVE = [sys.executable, "-c", "from baton_paged.entrypoints.cli import main; main()", "serve"]


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--api-key", ""], {}),
        (["--api-key", "   "], {}),
        ([], {"BATON_PAGED_API_KEY": ""}),
    ],
)
def test_an_empty_api_key_is_a_startup_error(args, env):
    environment = {**os.environ, **env}
    started = subprocess.run(
        [*SERVE, "--model", "random", *args], capture_output=True, text=True, env=environment
    )
    assert started.returncode == 2, started.stderr
    assert "the API key is empty" in started.stderr


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_scheme_is_case_insensitive(server, scheme):
    reply = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", f"Bearer {KEY.upper()}", f"Bearer {KEY}x", f"Basic {KEY}", KEY],
)
def test_anything_but_the_key_is_401(server, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, headers=headers)
    assert reply.status_code == 401 and reply.json()["error"]["code"] == 401


def test_the_model_id_is_the_checkpoint_name_not_its_path(server, tiny_model_dir):
    headers = {"Authorization": f"Bearer {KEY}"}
    models = httpx.get(f"{server.url}/v1/models", headers=headers).json()["data"]
    assert [model["id"] for model in models] == [tiny_model_dir("llama").name]
    assert "/" not in models[0]["id"]
    reply = server.post("completions", {"prompt": "x", "max_tokens": 1, "model": models[0]["id"]})
    assert reply.status_code == 200 and reply.json()["model"] == models[0]["id"]
