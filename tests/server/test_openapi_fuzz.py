"""Schemathesis against the app in-process (ASGI, no socket, no network): requests generated
from /openapi.json never get a 500, and every answer matches the schema (status, content type,
body). Bounded to a few examples per route and a short context so it stays well under a minute;
``-m fuzz`` runs it alone, ``-m "not fuzz"`` leaves it out."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from serving import HEADERS, KEY, MODEL, tiny_engine

from baton_paged.entrypoints.async_engine import AsyncEngine
from baton_paged.entrypoints.server import build_app

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def app_schema(tiny_model_dir):
    engine = AsyncEngine(tiny_engine(tiny_model_dir("llama"), max_model_len=32), max_waiting=64)
    yield schemathesis.openapi.from_asgi("/openapi.json", build_app(engine, MODEL, KEY))
    engine.shutdown()


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.fuzz
def test_the_schema_is_true_and_nothing_is_a_500(app_schema):
    labels = []
    for operation in operations(app_schema):
        labels.append(operation.label)

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def fuzz(case):
            case.call_and_validate(headers=HEADERS, checks=CHECKS)

        fuzz()
    # health, metrics, tokenize, detokenize, version, models, completions, chat
    assert len(labels) == 8, labels
