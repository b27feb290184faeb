"""vLLM's sampling features through the whole engine: penalties, logit_bias and min_p against
transformers' own logits processors (greedy, float64, token for token), and ``n`` / ``best_of``
completions run as child requests."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import MinPLogitsWarper

from baton_paged.model.sampler import SamplingRow, sample
from baton_paged.sampling_params import FieldError, SamplingParams

PROMPTS = ([5, 9, 2, 7, 5, 9], [100, 3, 3, 3], [42])


@pytest.fixture(scope="module")
def hf_generate(tiny_model_dir):
    @cache
    def model():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float64)

    def generate(prompt, max_tokens, **options):
        ids = torch.tensor([prompt])
        out = model().generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                               do_sample=False, attention_mask=torch.ones_like(ids),
                               **options)  # fmt: skip
        return tuple(out[0, len(prompt) :].tolist())

    return generate


def run_all(engine, params):
    ids = [
        engine.add_request({"prompt_token_ids": list(p)}, params, request_id=str(i))
        for i, p in enumerate(PROMPTS)
    ]
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
    assert engine.cache.pool.num_used == 0 and not engine.requests and not engine.groups
    return [done[i] for i in ids]


def greedy(**options) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **options)


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence / frequency penalties over the generated tokens only."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        output = input_ids[:, self.prompt_len :]
        counts.scatter_add_(1, output, torch.ones_like(output, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def test_repetition_penalty_equals_transformers(make_engine, hf_generate):
    outputs = run_all(make_engine("llama"), greedy(repetition_penalty=1.8))
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.outputs[0].token_ids == hf_generate(prompt, 12, repetition_penalty=1.8)
    plain = run_all(make_engine("llama"), greedy())
    assert [o.outputs[0].token_ids for o in plain] != [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 0.0), (0.0, 1.2), (-0.5, 0.8)])
def test_presence_and_frequency_penalties(make_engine, hf_generate, presence, frequency):
    params = greedy(presence_penalty=presence, frequency_penalty=frequency)
    outputs = run_all(make_engine("llama"), params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        processor = OpenAIPenalties(len(prompt), presence, frequency)
        expected = hf_generate(prompt, 12, logits_processor=LogitsProcessorList([processor]))
        assert output.outputs[0].token_ids == expected


def test_logit_bias_equals_transformers_sequence_bias(make_engine, hf_generate):
    bias = {17: 3.0, 250: -50.0, 3: 1.0}
    outputs = run_all(make_engine("llama"), greedy(logit_bias=bias))
    sequence_bias = {(token,): value for token, value in bias.items()}
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.outputs[0].token_ids == hf_generate(prompt, 12, sequence_bias=sequence_bias)
    forced = run_all(make_engine("llama"), greedy(logit_bias={77: 100}))
    assert all(o.outputs[0].token_ids == (77,) * 12 for o in forced)


def test_bad_logit_bias_queues_nothing(make_engine):
    engine = make_engine("llama")
    with pytest.raises(FieldError, match="logit_bias token ids must be <") as error:
        engine.add_request([1, 2], greedy(logit_bias={10**6: 1.0}))
    assert error.value.param == "logit_bias"
    assert not engine.requests and not engine.has_unfinished_requests()


def test_min_p_keeps_what_transformers_keeps():
    torch.manual_seed(0)
    logits = torch.randn(4, 300, dtype=torch.float64) * 3
    for min_p in (0.05, 0.3, 0.9):
        expected = MinPLogitsWarper(min_p)(None, logits.clone()).isfinite()
        params = SamplingParams(min_p=min_p, temperature=1.0)
        generator = torch.Generator().manual_seed(1)
        drawn = {
            sample(logits, [SamplingRow(params, generator)] * 4).token_ids[0] for _ in range(400)
        }
        assert drawn <= set(expected[0].nonzero().flatten().tolist())
        from baton_paged.model.sampler import _min_p

        assert torch.equal(_min_p(logits, [min_p] * 4).isfinite(), expected)


def test_n_completions_are_seeded_children(make_engine):
    params = SamplingParams(n=3, seed=11, temperature=1.0, max_tokens=8, ignore_eos=True)
    first = run_all(make_engine("llama"), params)
    again = run_all(make_engine("llama"), params)
    for output, repeat in zip(first, again, strict=True):
        assert [c.index for c in output.outputs] == [0, 1, 2]
        assert output.outputs == repeat.outputs  # reproducible with a seed
        assert len({c.token_ids for c in output.outputs}) > 1  # completion i uses seed + i
        assert all(c.logprobs is None for c in output.outputs)
    single = run_all(make_engine("llama"), SamplingParams(seed=12, temperature=1.0, max_tokens=8,
                                                          ignore_eos=True))  # fmt: skip
    assert [o.outputs[0].token_ids for o in single] == [o.outputs[1].token_ids for o in first]


def test_best_of_returns_the_most_likely_completions(make_engine):
    options = {"seed": 5, "temperature": 1.0, "max_tokens": 6, "ignore_eos": True, "logprobs": 0}
    every = run_all(make_engine("llama"), SamplingParams(n=4, **options))
    best = run_all(make_engine("llama"), SamplingParams(n=2, best_of=4, **options))
    for all_four, two in zip(every, best, strict=True):
        ranked = sorted(all_four.outputs, key=lambda c: c.cumulative_logprob, reverse=True)
        assert [c.token_ids for c in two.outputs] == [c.token_ids for c in ranked[:2]]
        assert [c.index for c in two.outputs] == [0, 1]


def test_aborting_a_parent_stops_every_child(make_engine):
    engine = make_engine("llama")
    engine.add_request([1, 2, 3], SamplingParams(n=3, max_tokens=50, ignore_eos=True), "p")
    engine.step()
    assert len(engine.requests) == 3
    output = engine.abort_request("p")
    assert output.finished and len(output.outputs) == 3
    assert all(c.finish_reason == "abort" for c in output.outputs)
    assert not engine.requests and not engine.groups and engine.cache.pool.num_used == 0
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], SamplingParams(n=2), "q")
        engine.add_request([1], SamplingParams(n=2), "q")


@pytest.mark.parametrize("policy", ["baton", "chunked"])
def test_prompt_logprobs_equal_the_models(make_engine, tiny_model_dir, policy):
    """chunked with an 8-token budget splits the 30-token prompt over several forwards."""
    engine = make_engine("llama", policy=policy, max_num_batched_tokens=8)
    prompt = [(7 * i + 3) % 500 for i in range(30)]
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, logprobs=1)
    engine.add_request(prompt, params, "r")
    while engine.has_unfinished_requests():
        outputs = engine.step()
    (output,) = outputs
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float64)
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    scored = output.prompt_logprobs
    assert scored[0] is None and len(scored) == len(prompt)
    tokenizer = engine.tokenizer
    for position, entry in enumerate(scored[1:]):
        token = prompt[position + 1]
        assert entry[token].logprob == pytest.approx(float(expected[position, token]), abs=1e-7)
        top = expected[position].topk(2).indices.tolist()
        assert set(top) <= set(entry) and len(entry) <= 3
        assert all(lp.decoded_token == tokenizer.decode([t]) for t, lp in entry.items())
    for entry in output.outputs[0].logprobs:
        assert all(lp.decoded_token == tokenizer.decode([t]) for t, lp in entry.items())


def test_prompt_logprobs_are_reported_once_after_recompute(make_engine):
    engine = make_engine("llama", page_size=16, kv_memory="80KiB", preemption_mode="recompute",
                         max_batch_size=4)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=0)
    for i in range(4):
        engine.add_request([(i + 3 * j) % 500 for j in range(20)], params, str(i))
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert engine.stats.recompute_preemptions > 0
    assert all(len(o.prompt_logprobs) == 20 for o in done.values())


class AllowOnly(LogitsProcessor):
    def __init__(self, allowed: list[int]):
        self.allowed = allowed

    def __call__(self, input_ids, scores):
        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.allowed] = scores[:, self.allowed]
        return masked


def test_allowed_token_ids_equal_transformers_with_the_same_mask(make_engine, hf_generate):
    allowed = [3, 17, 42, 99, 250]
    outputs = run_all(make_engine("llama"), greedy(allowed_token_ids=allowed))
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert set(output.outputs[0].token_ids) <= set(allowed)
        processor = LogitsProcessorList([AllowOnly(allowed)])
        assert output.outputs[0].token_ids == hf_generate(prompt, 12, logits_processor=processor)


def test_bad_words_never_appear_and_equal_transformers(make_engine, hf_generate):
    """A word the unconstrained output contains, banned: transformers' ``bad_words_ids`` (which
    also looks at the prompt's tail; these prompts do not end in a banned word's start)."""
    engine = make_engine("llama")
    tokenizer = engine.tokenizer
    free = run_all(engine, greedy())[0].outputs[0]
    pairs = [list(free.token_ids[i : i + 2]) for i in range(1, len(free.token_ids) - 1)]

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    word = next(tokenizer.decode(p) for p in pairs if encode(tokenizer.decode(p).lstrip()) == p)
    params = greedy(bad_words=[word])
    banned = [encode(text) for text in (word.lstrip(), " " + word.lstrip())]
    for prompt, output in zip(PROMPTS, run_all(make_engine("llama"), params), strict=True):
        ids = list(output.outputs[0].token_ids)
        for seq in banned:
            windows = [ids[i : i + len(seq)] for i in range(len(ids) - len(seq) + 1)]
            assert seq not in windows
        assert tuple(ids) == hf_generate(prompt, 12, bad_words_ids=banned)
    assert run_all(make_engine("llama"), params)[0].outputs[0].token_ids != free.token_ids


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
        ({"bad_words": [""]}, "bad_words"),
        ({"bad_words": [3]}, "bad_words"),
    ],
)
def test_bad_allowed_or_banned_values_name_their_field(options, field):
    with pytest.raises(FieldError) as error:
        SamplingParams(**options)
    assert error.value.param == field


def test_allowed_token_ids_outside_the_vocabulary_are_refused(make_engine):
    engine = make_engine("llama")
    with pytest.raises(FieldError, match="vocabulary"):
        engine.add_request("x", SamplingParams(allowed_token_ids=[10**7]))
    assert not engine.requests
