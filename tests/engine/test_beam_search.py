"""``LLM.beam_search`` against a beam search written here over the transformers model's own
log-probabilities (float64): the same beams, in the same order, with the same scores; the beams
of a prompt share its cached pages; bad settings are refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from baton_paged import LLM, BeamSearchParams
from baton_paged.sampling_params import FieldError

PROMPTS = [list(range(5, 45)), [100, 3, 3, 3, 7]]


def reference_beams(model, prompt, width, steps, eos, length_penalty=1.0):
    """(tokens, cumulative logprob) of the best ``width`` beams, best first."""

    def score(beam, ended):
        tokens, total = beam
        return total / (len(tokens) - ended) ** length_penalty

    live, done = [(list(prompt), 0.0)], []
    for _ in range(steps):
        grown = []
        for tokens, total in live:
            with torch.no_grad():
                logits = model(torch.tensor([tokens])).logits[0, -1]
            values, ids = logits.log_softmax(-1).topk(2 * width)
            for value, token in zip(values.tolist(), ids.tolist(), strict=True):
                beam = (tokens + [token], total + value)
                (done if token in eos else grown).append(beam)
        live = sorted(grown, key=lambda b: score(b, False), reverse=True)[:width]
    ranked = [(b, score(b, True)) for b in done] + [(b, score(b, False)) for b in live]
    return [beam for beam, _ in sorted(ranked, key=lambda r: r[1], reverse=True)[:width]]


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beams_equal_a_beam_search_over_transformers(make_engine, tiny_model_dir, length_penalty):
    llm = LLM.from_engine(make_engine("llama"))
    params = BeamSearchParams(beam_width=3, max_tokens=5, length_penalty=length_penalty)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float64)
    eos = set(llm.engine.inputs.eos_token_ids)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        expected = reference_beams(model.eval(), prompt, 3, 5, eos, length_penalty)
        assert [s.tokens for s in output.sequences] == [tokens for tokens, _ in expected]
        cum = [s.cum_logprob for s in output.sequences]
        assert cum == pytest.approx([total for _, total in expected], abs=1e-6)
        first = output.sequences[0]
        assert first.text == llm.get_tokenizer().decode(first.tokens)
        assert len(first.logprobs) == len(first.tokens) - len(prompt)
    assert not llm.engine.requests and llm.engine.cache.pool.num_used == 0


def test_the_beams_of_a_prompt_share_its_cached_pages(make_engine):
    llm = LLM.from_engine(make_engine("llama", page_size=16))
    llm.beam_search([{"prompt_token_ids": PROMPTS[0]}], BeamSearchParams(4, 4))
    stats = llm.engine.stats
    # every beam after the first step finds the prompt's two full pages cached
    assert stats.prefix_cache_hits >= 3 * 4 * 32


@pytest.mark.parametrize(
    ("options", "field"),
    [({"beam_width": 0, "max_tokens": 4}, "beam_width"),
     ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
     ({"beam_width": 2, "max_tokens": 4, "temperature": 0.7}, "temperature")],
)  # fmt: skip
def test_bad_settings_are_refused_by_name(options, field):
    with pytest.raises(FieldError) as error:
        BeamSearchParams(**options)
    assert error.value.param == field
