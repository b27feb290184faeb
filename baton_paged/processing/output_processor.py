"""OutputProcessor: a request's text, logprobs and stop conditions as its tokens arrive.

After each sampled token, in vLLM's order: EOS (unless ``ignore_eos``) or a stop token id ends
the request with "stop" once ``min_tokens`` are out; a stop string ends it with "stop" and cuts the
text before the match (after it with ``include_stop_str_in_output``); reaching ``max_tokens`` or
the model's context ends it with "length".

The engine hands over each forward's logits once (``sample``): the sampling rows' logits are
sampled on the device (EOS and stop ids suppressed below ``min_tokens``); the rest score the
prompt positions ``prompt_positions`` asked the forward for. Once the host has read the tokens
(``accept``; under step-ahead scheduling one step later, after the next forward is launched),
each is appended and its stop conditions checked.

Log-probabilities carry each token's text (``decoded_token``, the token decoded on its own, as
vLLM's). Prompt log-probabilities: position ``p``'s logits score prompt token ``p + 1`` (the
first prompt token has none, reported as None like vLLM). A prompt may be computed over several
forwards (chunked prefill) and again after a recompute preemption: ``prompt_positions`` asks only
for positions not yet scored, so each is reported once.

While a stop string may still complete, snapshots hold back the text's last ``len(stop) - 1``
characters: a stream must never send the start of a stop string that the final text then cuts,
so every snapshot's text is a prefix of the final one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from baton_paged.model.sampler import (
    DeviceSample,
    SamplingRow,
    collect_logprobs,
    sample_on_device,
    token_logprobs,
)
from baton_paged.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from baton_paged.processing.detokenizer import IncrementalDetokenizer, find_stop
from baton_paged.processing.grammar_masks import GrammarMasks
from baton_paged.processing.token_text import text_decoder
from baton_paged.request import Request, RequestStatus
from baton_paged.sched.plan import ForwardBatch

PromptPosition = tuple[int, Request, int]
"""``(packed token index in the forward, request, prompt position)`` whose logits are wanted."""


@dataclass(frozen=True)
class ForwardOutputs:
    """What one forward's logits did: the requests that got a token, in row order, and those of
    them that finished, with why."""

    touched: tuple[Request, ...]
    finished: tuple[tuple[str, RequestStatus], ...]


@dataclass
class _TextState:
    request: Request
    detokenizer: IncrementalDetokenizer
    prompt_token_ids: tuple[int, ...] = ()
    """The prompt as every output of the request carries it: made once, not once per output
    (a chat prompt of a thousand tokens would otherwise be copied at every step of a stream)."""
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    """``[None, scored position 0, 1, ...]`` when the request asked for prompt logprobs."""
    cumulative_logprob: float | None = None
    stopped_text: str | None = field(default=None)
    """The final text once a stop string cut it."""
    flushed: bool = False
    """The detokenizer's held-back text is in ``text`` (the request finished)."""
    stop_holdback: int = 0
    """Characters an unfinished snapshot holds back: a stop string's start could be there."""
    matcher: Any = None
    """The request's grammar matcher, advanced by every token it accepts (structured outputs):
    a preempted request keeps it, as it keeps its tokens."""


class SampledRows(NamedTuple):
    """One forward's sampling rows, drawn on the device, their tokens not yet read: the rows'
    request states and sampling rows, in the same order as the draw's tokens."""

    states: tuple[_TextState, ...]
    rows: tuple[SamplingRow, ...]
    drawn: DeviceSample
    releases: int
    """The processor's count of released requests when these were drawn."""


class OutputProcessor:
    def __init__(
        self, tokenizer: Any, max_model_len: int, generator: torch.Generator, vocab_size: int
    ):
        """``generator`` draws the samples of requests without a seed of their own;
        ``vocab_size``: the logits' width, which grammar masks cover."""
        self.tokenizer = tokenizer
        self.masks = GrammarMasks(vocab_size)
        self._decode_ids = text_decoder(tokenizer)
        self.max_model_len = max_model_len
        self.generator = generator
        self._states: dict[str, _TextState] = {}
        self._releases = 0
        """Requests forgotten so far: rows drawn before the latest release may be ended ones'."""

    def add(self, request: Request) -> None:
        params = request.params
        detokenizer = IncrementalDetokenizer(
            self.tokenizer, request.prompt_token_ids, params.skip_special_tokens
        )
        wants_logprobs = params.logprobs is not None
        self._states[request.request_id] = _TextState(
            request,
            detokenizer,
            tuple(request.prompt_token_ids),
            logprobs=[] if wants_logprobs else None,
            cumulative_logprob=0.0 if wants_logprobs else None,
            prompt_logprobs=None if params.prompt_logprobs is None else [None],
            stop_holdback=_stop_holdback(params),
            matcher=None if request.grammar is None else request.grammar.deep_copy(),
        )

    def release(self, request_id: str) -> None:
        """Forget a finished request once its final output is built."""
        self._states.pop(request_id, None)
        self._releases += 1

    def suppressed_token_ids(self, request: Request) -> tuple[int, ...]:
        """Tokens the request may not sample now: EOS and stop ids before ``min_tokens``, and
        the token that would complete one of its bad words."""
        params = request.params
        banned = _completing_bad_words(request) if request.bad_words_token_ids else ()
        if len(request.output_token_ids) >= params.min_tokens:
            return banned
        eos = () if params.ignore_eos else request.eos_token_ids
        return eos + params.stop_token_ids + banned

    def sample(
        self, forward: ForwardBatch, logits: torch.Tensor, positions: list[PromptPosition]
    ) -> SampledRows:
        """Take one forward's logits (its sampling rows', then ``positions``' from
        ``prompt_positions``): score those prompt positions, and draw every sampling row's next
        token on the device, a placeholder of its request until ``accept`` reads it. A row whose
        request ended while the forward was in flight (step-ahead scheduling: it finished on
        the previous step's token, or was aborted) is dropped."""
        sampling = [row.request_id for row in forward.rows if row.sample]
        self._add_prompt_logprobs(positions, logits[len(sampling) :])
        states = tuple(map(self._states.get, sampling))  # an ended request's is released
        if None in states:
            logits = logits[[i for i, state in enumerate(states) if state is not None]]
            states = tuple(state for state in states if state is not None)
        rows = tuple(self._sampling_row(state.request) for state in states)
        logits = logits[: len(states)]
        self.masks.apply(
            logits, [(i, s.matcher) for i, s in enumerate(states) if s.matcher is not None]
        )
        drawn = sample_on_device(logits, rows)
        for state in states:
            state.request.num_placeholders += 1
        return SampledRows(states, rows, drawn, self._releases)

    def accept(self, sampled: SampledRows, token_ids: list[int]) -> ForwardOutputs:
        """The host has read ``sampled``'s tokens (``token_ids``, in its row order): each
        replaces its request's placeholder, and its stop conditions are checked. A request
        aborted meanwhile gets nothing."""
        logprobs = collect_logprobs(sampled.drawn, token_ids, sampled.rows)
        now, touched, finished = time.monotonic(), [], []
        aborted = self._releases != sampled.releases  # else no row's request ended meanwhile
        for state, token, its_logprobs in zip(sampled.states, token_ids, logprobs, strict=True):
            if aborted and state.request.status.is_finished:
                continue
            touched.append(state.request)
            status = self._append(state, token, its_logprobs, now)
            if status is not None:
                finished.append((state.request.request_id, status))
        return ForwardOutputs(tuple(touched), tuple(finished))

    def _sampling_row(self, request: Request) -> SamplingRow:
        return SamplingRow(
            request.params,
            request.generator or self.generator,
            self.suppressed_token_ids(request),
            request.prompt_token_ids,
            request.output_token_ids,
        )

    def _append(
        self, state: _TextState, token: int, logprobs: dict[int, Logprob] | None, now: float
    ) -> RequestStatus | None:
        """Record one new token at time ``now``; return the finished status it causes, if any."""
        request = state.request
        request.first_token_time = request.first_token_time or now
        request.token_times.append(now)
        request.num_placeholders -= 1
        request.output_token_ids.append(token)
        if logprobs is not None:
            state.logprobs.append(self._decoded(logprobs))
            state.cumulative_logprob += logprobs[token].logprob
        if state.matcher is not None:
            state.matcher.consume_token(token)
        new_text = state.detokenizer.add(token)
        state.text += new_text
        status = self._check_stop(request, state, token, len(new_text))
        if status is not None:
            request.finished_time = now
        return status

    def prompt_positions(self, forward: ForwardBatch) -> list[PromptPosition]:
        """The prompt positions of ``forward`` whose log-probabilities are asked for and not yet
        scored, in packed order: the forward computes their logits too."""
        wanted, offset = [], 0
        for row in forward.rows:
            state = self._states[row.request_id]
            if state.prompt_logprobs is not None:
                request = state.request
                first = max(row.start, len(state.prompt_logprobs) - 1)
                last = min(row.end, len(request.prompt_token_ids) - 1)
                wanted += [(offset + p - row.start, request, p) for p in range(first, last)]
            offset += len(row.token_ids)
        return wanted

    def _add_prompt_logprobs(self, positions: list[PromptPosition], logits: torch.Tensor) -> None:
        """Score ``positions`` from their logits (``[len(positions), vocab]``)."""
        if not positions:
            return
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        logprobs = logits.to(dtype).log_softmax(dim=-1)
        for (_, request, position), row in zip(positions, logprobs, strict=True):
            token = request.prompt_token_ids[position + 1]
            top_n = request.params.prompt_logprobs
            entry = self._decoded(token_logprobs(row, token, top_n))
            self._states[request.request_id].prompt_logprobs.append(entry)

    def _decoded(self, logprobs: dict[int, Logprob]) -> dict[int, Logprob]:
        return {
            token: replace(logprob, decoded_token=self._decode_ids([token], False))
            for token, logprob in logprobs.items()
        }

    def _check_stop(
        self, request: Request, state: _TextState, token: int, new_chars: int
    ) -> RequestStatus | None:
        params = request.params
        past_min = len(request.output_token_ids) >= params.min_tokens
        if past_min and token in request.eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if past_min and token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if past_min and params.stop and (match := find_stop(state.text, new_chars, params.stop)):
            start, stop = match
            state.stopped_text = state.text[
                : start + (len(stop) if params.include_stop_str_in_output else 0)
            ]
            request.stop_reason = stop
            return RequestStatus.FINISHED_STOPPED
        if state.matcher is not None and state.matcher.is_stopped():
            return RequestStatus.FINISHED_STOPPED  # the grammar is complete
        if len(request.output_token_ids) >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def output(self, request: Request) -> RequestOutput:
        """A snapshot of the request (the same one again for a finished request, until
        ``release``)."""
        return self.snapshot(request).build()

    def snapshot(self, request: Request) -> OutputSnapshot:
        """What the request's output holds now, captured in a few field reads so the output
        itself can be built later, on another thread (``OutputSnapshot.build``)."""
        finished = request.status.is_finished
        state = self._states[request.request_id]
        if finished and not state.flushed:
            state.flushed = True
            if state.stopped_text is None:
                state.text += state.detokenizer.flush()
        if state.stopped_text is not None:
            text = state.stopped_text
        elif finished or not state.stop_holdback:
            text = state.text
        else:
            text = state.text[: max(len(state.text) - state.stop_holdback, 0)]
        return OutputSnapshot(
            request,
            state.prompt_token_ids,
            state.logprobs,
            state.prompt_logprobs,
            len(request.output_token_ids),
            text,
            request.status.finish_reason if finished else None,
            request.stop_reason,
            state.cumulative_logprob,
            request.first_token_time,
            request.finished_time,
            request.num_preemptions,
        )


class OutputSnapshot(NamedTuple):
    """A request's output at one moment: its values, and the lengths of the lists that only
    grow (tokens, their times and log-probabilities) at that moment. ``build`` reads nothing
    else, so it may run on another thread while the engine appends to those lists."""

    request: Request
    prompt_token_ids: tuple[int, ...]
    logprobs: list[dict[int, Logprob]] | None
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    num_tokens: int
    text: str
    finish_reason: str | None
    stop_reason: int | str | None
    cumulative_logprob: float | None
    first_token_time: float | None
    finished_time: float | None
    num_preemptions: int

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def build(self) -> RequestOutput:
        request, n = self.request, self.num_tokens
        completion = CompletionOutput(
            index=0,
            text=self.text,
            token_ids=tuple(request.output_token_ids[:n]),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else tuple(self.logprobs[:n]),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
        prompt_logprobs = self.prompt_logprobs
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=(completion,),
            finished=self.finished,
            prompt_logprobs=None if prompt_logprobs is None else tuple(prompt_logprobs),
            metrics=RequestMetrics(
                arrival_time=request.arrival_time,
                first_token_time=self.first_token_time,
                finished_time=self.finished_time,
                token_times=tuple(request.token_times[:n]),
                num_preemptions=self.num_preemptions,
                scheduled_time=request.scheduled_time,  # set once, before any token
            ),
            num_cached_tokens=request.num_cached_tokens,
        )


Output = RequestOutput | OutputSnapshot
"""A request's output, or the snapshot that builds it."""


def built(output: Output) -> RequestOutput:
    return output if isinstance(output, RequestOutput) else output.build()


def _completing_bad_words(request: Request) -> tuple[int, ...]:
    """The last token of each bad word whose other tokens the output ends with."""
    output = request.output_token_ids
    return tuple(
        word[-1]
        for word in request.bad_words_token_ids
        if len(word) == 1
        or (len(output) >= len(word) - 1 and output[1 - len(word) :] == list(word[:-1]))
    )


def _stop_holdback(params) -> int:
    """How much of a snapshot's tail could be the start of a stop string the final text cuts."""
    if not params.stop or params.include_stop_str_in_output:
        return 0
    return max(len(stop) for stop in params.stop) - 1
