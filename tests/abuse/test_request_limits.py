"""Amplifiers: one request asking for far more work than others (logprobs over the vocabulary,
a thousand completions, a hundred thousand stop strings) is refused before it is queued, with a
message naming the limit's flag; at the limit it is served."""

from __future__ import annotations

import pytest
from real_server import refused

VOCAB_OF_SMOLLM2 = 49152


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("completions", {"prompt": "x", "logprobs": VOCAB_OF_SMOLLM2}, "logprobs"),
        ("completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
    ],
)
def test_logprobs_past_the_limit_are_refused_naming_the_flag(server, route, body, param):
    refused(server.post(route, body), 400, "--max-logprobs", "(20;", param=param)


def test_logprobs_at_the_limit_are_served(server):
    user = {"role": "user", "content": "x"}
    body = {"messages": [user], "logprobs": True, "top_logprobs": 20, "max_tokens": 3}
    reply = server.post("chat/completions", body, timeout=60)
    assert reply.status_code == 200, reply.text
    steps = reply.json()["choices"][0]["logprobs"]["content"]
    assert len(steps) == 3 and all(len(step["top_logprobs"]) == 20 for step in steps)
    for step in steps:
        values = [top["logprob"] for top in step["top_logprobs"]]
        assert values == sorted(values, reverse=True)


@pytest.mark.parametrize(
    ("body", "words", "param"),
    [
        ({"n": 1024}, ("n=1024", "--max-best-of"), "n"),
        ({"n": 3}, ("n=3", "(2;"), "n"),
        ({"best_of": 1024}, ("best_of=1024", "--max-best-of"), "best_of"),
        ({"stop": [f"s{i}" for i in range(100_000)]}, ("100000 stop strings",), "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, ("--max-stop-sequences",), "stop"),
        ({"stop": "x" * 1025}, ("1025 characters", "--max-stop-chars"), "stop"),
        ({"stop_token_ids": list(range(33))}, ("33 stop_token_ids", "--max-stop-token-ids"), None),
        (
            {"logit_bias": {str(i): 1 for i in range(301)}},
            ("301 entries", "--max-logit-bias"),
            "logit_bias",
        ),
    ],
)
def test_amplifiers_past_their_limits_are_refused_naming_the_flag(server, body, words, param):
    refused(server.post("completions", {"prompt": "x", **body}), 400, *words, param=param)


def test_amplifiers_at_their_limits_are_served(server):
    body = {
        "prompt": "x",
        "max_tokens": 4,
        "n": 2,
        "best_of": 2,
        "stop": ["a" * 256, "b" * 256, "c" * 256, "d" * 256],
        "stop_token_ids": list(range(32)),
        "logit_bias": {str(i): 0.5 for i in range(300)},
    }
    reply = server.post("completions", body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 2


def test_a_prompt_longer_than_the_context_is_refused(server):
    refused(server.post("completions", {"prompt": list(range(1, 600))}), 400, "512")
