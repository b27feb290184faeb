"""SamplingParams: vLLM's defaults and field names, normalisation, and clear validation errors."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from baton_paged.sampling_params import FieldError, SamplingParams


def test_defaults_follow_vllm():
    params = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 1.0, 0)
    assert (params.max_tokens, params.min_tokens, params.seed, params.logprobs) == (
        16,
        0,
        None,
        None,
    )
    assert params.stop == () and params.stop_token_ids == ()
    assert not params.ignore_eos and not params.include_stop_str_in_output
    assert params.skip_special_tokens
    assert not params.is_greedy


def test_vllm_keyword_call_runs_unchanged():
    params = SamplingParams(
        temperature=0.8, top_p=0.95, top_k=-1, seed=7, max_tokens=None, stop=["\n\n"], logprobs=5
    )
    assert params.top_k_disabled and params.max_tokens is None and params.stop == ("\n\n",)


@pytest.mark.parametrize(("temperature", "greedy"), [(0.0, True), (9e-6, True), (1e-5, False)])
def test_is_greedy_below_1e_5(temperature, greedy):
    assert SamplingParams(temperature=temperature).is_greedy is greedy


def test_stop_is_normalised_to_tuples_and_params_are_hashable():
    single = SamplingParams(stop="###", stop_token_ids=[3, 4])
    assert single.stop == ("###",) and single.stop_token_ids == (3, 4)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert hash(single) == hash(SamplingParams(stop=("###",), stop_token_ids=(3, 4)))


def test_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


def test_every_field_has_a_docstring_for_help_text():
    lines = inspect.getsource(SamplingParams).splitlines()
    for field in dataclasses.fields(SamplingParams):
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{field.name}:"))
        assert lines[index + 1].strip().startswith('"""'), field.name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature=-0.1"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_k": -2}, "top_k=-2"),
        ({"top_k": 2.0}, "top_k=2.0"),
        ({"top_k": True}, "top_k=True"),
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"min_tokens": -1}, "min_tokens=-1"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens=5 > max_tokens=4"),
        ({"logprobs": -1}, "logprobs=-1"),
        ({"stop": ""}, "stop strings must be non-empty"),
        ({"stop": ["ok", ""]}, "stop strings must be non-empty"),
        ({"stop_token_ids": [1, -3]}, "-3"),
        ({"seed": 1.5}, "seed=1.5"),
        ({"n": 0}, "n=0"),
        ({"best_of": 1, "n": 2}, "best_of=1 < n=2"),
        ({"presence_penalty": 2.5}, "presence_penalty=2.5"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty=nan"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p=1.5"),
        ({"logit_bias": {-1: 1.0}}, "-1"),
        ({"logit_bias": {3: "x"}}, "logit_bias[3]='x'"),
        ({"logit_bias": 3}, "logit_bias must map"),
        ({"prompt_logprobs": -1}, "prompt_logprobs=-1"),
    ],
)
def test_bad_values_name_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError) as error:
        SamplingParams(**kwargs)
    assert message in str(error.value)
    assert next(iter(kwargs)) in str(error.value)


@pytest.mark.parametrize("bias", [{-1: 1.0}, {True: 1.0}, 3])
def test_a_bad_logit_bias_key_is_a_field_error_naming_it(bias):
    with pytest.raises(FieldError) as error:
        SamplingParams(logit_bias=bias)
    assert error.value.param == "logit_bias"


def test_logit_bias_is_clamped_sorted_pairs():
    params = SamplingParams(logit_bias={9: 250, 2: -0.5})
    assert params.logit_bias == ((2, -0.5), (9, 100.0))
    assert hash(params) == hash(SamplingParams(logit_bias=[(2, -0.5), (9, 100.0)]))


def test_min_tokens_may_exceed_nothing_when_max_tokens_is_none():
    assert SamplingParams(min_tokens=1000, max_tokens=None).min_tokens == 1000
