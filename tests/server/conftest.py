"""Fixtures of the OpenAI-route tests (see serving.py)."""

from __future__ import annotations

import openai
import pytest
from serving import KEY, serving


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with serving(tiny_model_dir("llama")) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fuzz: schemathesis against the OpenAI app (bounded; in the default run)"
    )
