"""Beam search, vLLM's ``LLM.beam_search``: the ``beam_width`` most likely continuations of each
prompt, ranked by cumulative log-probability over length (``length_penalty``).

Each step asks the engine for one token of every live beam, with the ``2 * beam_width`` most
likely next tokens' log-probabilities, and keeps each prompt's ``beam_width`` best extensions; a
beam that draws an end-of-sequence token is complete. All beams of a step run as one batch, and
they share their prompt's K/V: every beam is resubmitted as its whole token sequence, and the
prefix cache serves the full pages they have in common (``sched/prefix_caching.py``), so a
step computes only each beam's last partial page. The scores are the model's raw
log-probabilities (vLLM's too), so no temperature applies to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from baton_paged.outputs import Logprob
from baton_paged.processing.input_processor import PromptInput
from baton_paged.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class BeamSearchSequence:
    """One beam: its tokens (the prompt's first, as vLLM's), the log-probabilities of each new
    token's step, and its text once the search ends."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    """"stop" after an end-of-sequence token, "length" otherwise."""
    stop_reason: int | None = None


@dataclass(frozen=True)
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]
    """The best ``beam_width`` beams, best first."""


@dataclass
class _Search:
    """One prompt's search: its live beams and those already complete."""

    beams: list[BeamSearchSequence]
    complete: list[BeamSearchSequence] = field(default_factory=list)


def beam_search(
    llm: Any, prompts: Sequence[PromptInput], params: BeamSearchParams
) -> list[BeamSearchOutput]:
    """``LLM.beam_search``; ``llm`` is the ``LLM`` whose ``generate`` runs each step."""
    inputs = llm.engine.inputs
    eos = set(inputs.eos_token_ids)
    searches = []
    for prompt in prompts:
        ids = inputs.prepare(prompt, SamplingParams(max_tokens=1)).prompt_token_ids
        searches.append(_Search([BeamSearchSequence(list(ids))]))
    step = SamplingParams(temperature=0, max_tokens=1, logprobs=2 * params.beam_width)
    for _ in range(params.max_tokens):
        live = []
        for search in searches:  # a beam at the context's end can grow no more
            for beam in search.beams:
                if len(beam.tokens) < inputs.max_model_len:
                    live.append((search, beam))
                else:
                    search.complete.append(replace(beam, finish_reason="length"))
            search.beams = []
        if not live:
            break
        batch = [{"prompt_token_ids": beam.tokens} for _, beam in live]
        for (search, beam), output in zip(live, llm.generate(batch, step, use_tqdm=False),
                                          strict=True):  # fmt: skip
            _extend(search, beam, output.outputs[0].logprobs[0], eos, params)
        for search in searches:
            search.beams = _best(search.beams, params)
    return [_finish(search, llm.get_tokenizer(), params) for search in searches]


def _extend(search: _Search, beam: BeamSearchSequence, step: dict[int, Logprob], eos, params):
    """Add ``beam``'s extensions by each of the step's likely tokens to ``search``."""
    for token, logprob in step.items():
        grown = BeamSearchSequence(
            beam.tokens + [token], beam.logprobs + [step], beam.cum_logprob + logprob.logprob
        )
        if token in eos and not params.ignore_eos:
            search.complete.append(replace(grown, finish_reason="stop", stop_reason=None))
        else:
            search.beams.append(grown)


def _best(beams: list[BeamSearchSequence], params: BeamSearchParams) -> list[BeamSearchSequence]:
    return sorted(beams, key=lambda b: _score(b, params), reverse=True)[: params.beam_width]


def _score(beam: BeamSearchSequence, params: BeamSearchParams) -> float:
    """vLLM's score: cumulative log-probability over the whole sequence's length (its end of
    sequence token not counted) to the ``length_penalty``."""
    length = len(beam.tokens) - (beam.finish_reason == "stop")
    return beam.cum_logprob / length**params.length_penalty


def _finish(search: _Search, tokenizer, params: BeamSearchParams) -> BeamSearchOutput:
    ended = [replace(b, finish_reason=b.finish_reason or "length") for b in search.beams]
    best = _best(search.complete + ended, params)
    for beam in best:
        beam.text = tokenizer.decode(beam.tokens)
    return BeamSearchOutput(best)
