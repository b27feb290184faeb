"""Structured outputs through the whole engine (``SamplingParams(structured_outputs=...)``).

A random-weight model under a grammar still produces valid output (that is what the mask
guarantees): every JSON output validates against its schema, every regex output full-matches,
every choice is one of its set, every grammar output parses, greedy and sampled, with several
completions. Greedy constrained outputs are the same with and without preemption (swap and
recompute), with prefix caching on and off, under each policy and with step-ahead scheduling.
A spec that cannot compile is a ValueError naming its field, and nothing is queued."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from baton_paged.sampling_params import FieldError, SamplingParams
from baton_paged.structured_outputs import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,5}-[0-9]{1,3}"
CHOICE = ["north", "south", "east", "west"]
GRAMMAR = 'start: "(" expr ")"\nexpr: NUMBER ("+" NUMBER)*\nNUMBER: /[0-9]{1,2}/'


def spec(kind: str) -> StructuredOutputsParams:
    return {
        "json": StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
        "regex": StructuredOutputsParams(regex=REGEX),
        "choice": StructuredOutputsParams(choice=CHOICE),
        "grammar": StructuredOutputsParams(grammar=GRAMMAR),
        "json_object": StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
    }[kind]


def check_valid(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICE
    else:
        assert re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})*\)", text), text


def run(engine, requests):
    """``requests``: ``(request_id, prompt ids, params)``; every final output by id."""
    for request_id, prompt, params in requests:
        engine.add_request({"prompt_token_ids": prompt}, params, request_id=request_id)
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
        engine.scheduler.check_integrity()
    assert engine.cache.pool.num_used == 0 and not engine.requests
    return done


KINDS = ("json", "regex", "choice", "grammar", "json_object")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_output_is_valid(make_engine, temperature):
    engine = make_engine(max_batch_size=6)
    requests = [
        (f"{kind}-{i}", [7 + i, 30, 2 * i + 1],
         SamplingParams(temperature=temperature, seed=i, max_tokens=200, n=2,
                        structured_outputs=spec(kind)))
        for kind in KINDS for i in range(2)
    ]  # fmt: skip
    done = run(engine, requests)
    for request_id, *_ in requests:
        kind = request_id.rsplit("-", 1)[0]
        for completion in done[request_id].outputs:
            fresh = engine.inputs.grammars.matcher(spec(kind))
            assert fresh.validate_tokens(list(completion.token_ids)) == len(completion.token_ids)
            if kind != "json_object":  # a free object may run to max_tokens on random weights
                assert completion.finish_reason == "stop", (request_id, completion.text)
            if completion.finish_reason == "stop":
                check_valid(kind, completion.text)


def test_unconstrained_rows_beside_constrained_ones_are_unchanged(make_engine, reference):
    engine = make_engine(max_batch_size=4)
    free = SamplingParams(temperature=0, max_tokens=12)
    requests = [
        ("free", [5, 9, 2], free),
        ("json", [5, 9, 2], SamplingParams(temperature=0, max_tokens=200,
                                           structured_outputs=spec("json"))),
    ]  # fmt: skip
    done = run(engine, requests)
    assert done["free"].outputs[0].token_ids == reference("llama", (5, 9, 2), 12)
    check_valid("json", done["json"].outputs[0].text)


def constrained_workload():
    """Requests of every kind arriving over a few steps, long enough to be preempted."""
    return [
        (f"{kind}-{i}", [3 + i, 11, 40 + i, 2],
         SamplingParams(temperature=0, max_tokens=60, ignore_eos=True,
                        structured_outputs=spec(kind)))
        for i, kind in enumerate(KINDS * 2)
    ]  # fmt: skip


def texts(done):
    return {rid: (o.outputs[0].token_ids, o.outputs[0].finish_reason) for rid, o in done.items()}


@pytest.mark.parametrize(
    "options",
    [
        {"policy": "orca"},
        {"policy": "static"},
        {"policy": "chunked", "max_num_batched_tokens": 8},
        {"enable_prefix_caching": False},
        {"async_scheduling": True},
        {"max_batch_size": 3, "page_size": 4, "kv_memory": "64KiB"},  # swap preemption
        {"max_batch_size": 3, "page_size": 4, "kv_memory": "64KiB", "preemption_mode": "recompute"},
    ],
    ids=["orca", "static", "chunked", "no-prefix-cache", "step-ahead", "swap", "recompute"],
)
def test_greedy_constrained_outputs_do_not_depend_on_scheduling(make_engine, options):
    baseline = texts(run(make_engine(max_batch_size=10), constrained_workload()))
    engine = make_engine(**{"max_batch_size": 10, **options})
    assert texts(run(engine, constrained_workload())) == baseline
    if "kv_memory" in options:
        assert engine.stats.preemptions > 0


def test_an_abort_mid_grammar_frees_everything(make_engine):
    engine = make_engine(max_batch_size=4)
    params = SamplingParams(temperature=0, max_tokens=200, structured_outputs=spec("json"))
    engine.add_request({"prompt_token_ids": [1, 2, 3]}, params, request_id="a")
    engine.add_request({"prompt_token_ids": [4, 5, 6]}, params, request_id="b")
    engine.step()
    engine.step()
    assert engine.abort_request("a").outputs[0].finish_reason == "abort"
    done = run(engine, [])
    check_valid("json", done["b"].outputs[0].text)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"regex": "([a-"}, "structured_outputs.regex"),
        ({"json": {"type": "object", "properties": {"a": {"type": "frob"}}}},
         "structured_outputs.json"),
        ({"json": {"type": "object", "dependentSchemas": {"a": {}}}}, "structured_outputs.json"),
        ({"grammar": "start: ???"}, "structured_outputs.grammar"),
    ],
)  # fmt: skip
def test_a_spec_that_cannot_compile_is_refused_before_queuing(make_engine, fields, message):
    engine = make_engine()
    params = SamplingParams(structured_outputs=StructuredOutputsParams(**fields))
    with pytest.raises(FieldError, match=re.escape(message)) as refused:
        engine.add_request("x", params)
    assert refused.value.param == "structured_outputs"
    assert not engine.requests and not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"json": {"type": "object"}, "regex": "a"},
        {"choice": []},
        {"choice": "yes"},
        {"choice": ["a", 3]},
        {"regex": ""},
        {"json": "{not json"},
        {"json": 3},
    ],
)
def test_a_malformed_spec_is_a_value_error(fields):
    with pytest.raises(ValueError, match="structured_outputs"):
        StructuredOutputsParams(**fields)


def test_compiled_specs_are_cached_and_each_request_gets_its_own_matcher(make_engine):
    engine = make_engine()
    grammars = engine.inputs.grammars
    first = grammars.matcher(spec("json"))
    again = grammars.matcher(
        StructuredOutputsParams(json=dict(SCHEMA), disable_any_whitespace=True)
    )
    assert first is not again and len(grammars._compiled) == 1
    first.consume_token(grammars.tokenizer().tokenize_str("{")[0])
    assert (
        not again.is_error() and again.validate_tokens(grammars.tokenizer().tokenize_str("{")) == 1
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_masks_refuse_exactly_what_each_matcher_refuses(make_engine, dtype):
    """Rows 0 and 2 of four under grammars at different states: -inf exactly where llguidance's
    own per-token mask says no, every other logit unchanged to the bit."""
    engine = make_engine()
    grammars, masks = engine.inputs.grammars, engine.outputs.masks
    brace = grammars.tokenizer().tokenize_str('{"name":"ab')
    fresh, midway = grammars.matcher(spec("json")), grammars.matcher(spec("json"))
    assert midway.consume_tokens(brace)
    logits = torch.randn(4, masks.vocab_size, generator=torch.Generator().manual_seed(0))
    logits = logits.to(dtype)
    masked = logits.clone()
    masks.apply(masked, [(0, fresh), (2, midway)])
    for row, matcher in ((0, fresh), (2, midway)):
        allowed = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8) > 0
        allowed = allowed[: masks.vocab_size]
        assert torch.equal(masked[row][allowed], logits[row][allowed])
        assert torch.isneginf(masked[row][~allowed]).all() and 0 < allowed.sum() < len(allowed)
    assert torch.equal(masked[[1, 3]], logits[[1, 3]])


def test_the_thread_pool_fills_the_same_masks_as_one_after_another(make_engine):
    engine = make_engine()
    grammars, masks = engine.inputs.grammars, engine.outputs.masks
    matchers = [grammars.matcher(spec(kind)) for kind in KINDS]
    assert matchers[0].consume_tokens(grammars.tokenizer().tokenize_str('{"name":"x'))
    assert torch.equal(masks._fill(matchers, parallel=True), masks._fill(matchers, parallel=False))
