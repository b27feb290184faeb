"""Reply bodies from engine outputs, for completions and chat: whole replies, stream chunks and
the usage chunk, built through the ``responses`` models.

A ``Piece`` is what one choice adds in one message (all of it in a whole reply, the new part in
a chunk), so whole replies and streams share one path per route, ``n`` choices included.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from baton_paged.entrypoints.server import responses as r
from baton_paged.entrypoints.server.tools import ToolUse
from baton_paged.outputs import CompletionOutput, Logprob, RequestOutput

TokenLogprobs = tuple[dict[int, Logprob], ...]
PromptSteps = tuple[tuple[int, dict[int, Logprob] | None], ...]
"""An echoed prompt's tokens, each with its logprobs (None for the first: nothing precedes it)."""
FLOOR = -9999.0
"""A logprob of -inf (a token a grammar forbids) is sent as this, as vLLM and OpenAI do: JSON
has no infinity."""


@dataclass(frozen=True)
class Piece:
    index: int
    """The choice's index in the reply: prompt ``i``'s ``j``-th choice is ``i * n + j``."""
    text: str
    logprobs: TokenLogprobs | None
    """Per new token: the sampled token first, then the top N (None if none were asked for)."""
    finish_reason: str | None
    stop_reason: int | str | None
    offset: int
    """Where the piece's first new token starts in the choice's text."""
    echoed: PromptSteps = ()
    """With ``echo`` and ``logprobs``: the prompt's tokens, scored, before the new ones."""


def usage_of(outputs: Sequence[RequestOutput], generated: bool = True) -> r.Usage:
    """Token counts over a reply's prompts; ``generated=False``: a score-only reply, whose
    drawn token is not sent."""
    prompt = sum(len(output.prompt_token_ids) for output in outputs)
    drawn = sum(len(choice.token_ids) for output in outputs for choice in output.outputs)
    completion = drawn if generated else 0
    return r.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def prompt_logprobs_body(output: RequestOutput) -> r.PromptLogprobs:
    """vLLM's ``prompt_logprobs`` reply field: per prompt token, by token id."""
    return [
        None
        if step is None
        else {
            str(token): r.PromptLogprob(
                logprob=max(lp.logprob, FLOOR), rank=lp.rank, decoded_token=lp.decoded_token
            )
            for token, lp in step.items()
        }
        for step in output.prompt_logprobs
    ]


class CompletionShape:
    """``/v1/completions`` bodies: ``text_completion`` objects, streamed as the same objects. A
    reply answers one or several prompts: ``echoes`` holds each one's echoed text ("" without
    ``echo``), and every method that reads an output takes its prompt's place."""

    prefix = "cmpl"

    def __init__(
        self,
        model: str,
        n: int,
        decode: Callable[[int], str],
        echoes: Sequence[str] = ("",),
        top_n: int = 0,
        reply_id: str | None = None,
        score_only: bool = False,
        prompt_logprobs: bool = False,
    ):
        """``decode``: a token id's text (for logprobs); ``top_n``: chat's top_logprobs;
        ``reply_id``: the reply's id (``new_id``; a fresh one if None), which the engine's
        requests carry too;
        ``score_only``: send each echoed prompt alone (``max_tokens=0``), without the token
        drawn after it; ``prompt_logprobs``: the client asked for that field (``echo`` with
        ``logprobs`` scores the prompt too, but sends it in ``logprobs``)."""
        self.model, self.n, self.decode, self.top_n = model, n, decode, top_n
        self.echoes, self.score_only = tuple(echoes), score_only
        self.prompt_logprobs = prompt_logprobs
        self.id = reply_id or self.new_id()
        self.created = int(time.time())

    @classmethod
    def new_id(cls, request_id: str | None = None) -> str:
        """A reply's id: ``cmpl-`` (chat: ``chatcmpl-``) and the client's ``request_id`` (vLLM's
        field), or a random one."""
        return f"{cls.prefix}-{request_id or uuid.uuid4().hex}"

    def head(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model}

    def index(self, prompt: int, choice: int) -> int:
        return prompt * self.n + choice

    def offset(self, prompt: int) -> int:
        """Where prompt ``prompt``'s new text starts in each of its choices."""
        return len(self.echoes[prompt])

    def whole(self, outputs: Sequence[RequestOutput]) -> r.CompletionResponse:
        choices = [
            self.choice(self.whole_piece(prompt, output, done), output)
            for prompt, output in enumerate(outputs)
            for done in output.outputs
        ]
        usage = usage_of(outputs, not self.score_only)
        return r.CompletionResponse(**self.head(), choices=choices, usage=usage)

    def whole_piece(self, prompt: int, output: RequestOutput, done: CompletionOutput) -> Piece:
        echo = self.echoes[prompt]
        text, logprobs = done.text, done.logprobs
        if self.score_only:
            text, logprobs = "", None if logprobs is None else ()
        return Piece(
            self.index(prompt, done.index),
            echo + text,
            logprobs,
            done.finish_reason,
            done.stop_reason,
            len(echo),
            self.echoed(prompt, output, scored=logprobs is not None),
        )

    def echoed(self, prompt: int, output: RequestOutput, scored: bool) -> PromptSteps:
        """The prompt's scored tokens, where the choice's logprobs include them."""
        if not (scored and self.echoes[prompt] and output.prompt_logprobs is not None):
            return ()
        return tuple(zip(output.prompt_token_ids, output.prompt_logprobs, strict=True))

    def choice(self, piece: Piece, output: RequestOutput | None = None) -> r.CompletionChoice:
        """``output``: the prompt's, in the choice's first message (for ``prompt_logprobs``)."""
        return r.CompletionChoice(
            index=piece.index,
            text=piece.text,
            logprobs=None if piece.logprobs is None else self.legacy_logprobs(piece),
            finish_reason=piece.finish_reason,
            stop_reason=piece.stop_reason,
            prompt_logprobs=self.prompt_logprobs_of(output),
        )

    def prompt_logprobs_of(self, output: RequestOutput | None) -> r.PromptLogprobs:
        if output is None or not self.prompt_logprobs:
            return None
        return prompt_logprobs_body(output)

    def legacy_logprobs(self, piece: Piece) -> r.CompletionLogprobs:
        """OpenAI's parallel lists: the echoed prompt's tokens (offsets from 0, the first one
        unscored), then the new ones (offsets from the piece's)."""
        logprobs = r.CompletionLogprobs(
            tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[]
        )
        offset = 0
        for token_id, step in piece.echoed:
            offset += self.add_step(logprobs, token_id, step, offset)
        offset = piece.offset
        for step in piece.logprobs:
            offset += self.add_step(logprobs, next(iter(step)), step, offset)
        return logprobs

    def add_step(
        self,
        into: r.CompletionLogprobs,
        token_id: int,
        step: dict[int, Logprob] | None,
        offset: int,
    ) -> int:
        """Append one token's entries; return its text's length."""
        token = self.decode(token_id)
        into.tokens.append(token)
        into.text_offset.append(offset)
        if step is None:
            into.token_logprobs.append(None)
            into.top_logprobs.append(None)
        else:
            into.token_logprobs.append(max(step[token_id].logprob, FLOOR))
            tops = {self.decode(t): max(lp.logprob, FLOOR) for t, lp in step.items()}
            into.top_logprobs.append(tops)
        return len(token)

    def opening(self, prompt: int, first: RequestOutput) -> list:
        """Chunks before any new text of prompt ``prompt``'s choices (``first``: its first
        output): each choice's echoed prompt, scored if asked, and ``prompt_logprobs``."""
        if not (self.echoes[prompt] or self.prompt_logprobs):
            return []
        chunks = []
        for done in first.outputs:
            scored = done.logprobs is not None
            piece = Piece(
                self.index(prompt, done.index),
                self.echoes[prompt],
                () if scored else None,
                None,
                None,
                0,
                self.echoed(prompt, first, scored),
            )
            choice = self.choice(piece, first)
            chunks.append(r.CompletionResponse(**self.head(), choices=[choice]))
        return chunks

    def chunk(self, piece: Piece, done: CompletionOutput | None = None):
        """A stream chunk for ``piece`` of the choice now at ``done``; None: nothing to send
        yet. A score-only choice sends only its end."""
        if self.score_only:
            if piece.finish_reason is None:
                return None
            piece = replace(piece, text="", logprobs=None)
        return r.CompletionResponse(**self.head(), choices=[self.choice(piece)])

    def usage_chunk(self, outputs: Sequence[RequestOutput]):
        usage = usage_of(outputs, not self.score_only)
        return r.CompletionResponse(**self.head(), choices=[], usage=usage)


class ChatShape(CompletionShape):
    """``/v1/chat/completions`` bodies: ``chat.completion`` objects and their chunks. With tools
    (``server/tools.py``) a reply's text is read into its content and calls (``finish_reason``
    "tool_calls" when it made some and stopped); a stream then sends each choice whole, content
    and calls in one chunk, when it ends, since a call is only known once its text is complete."""

    prefix = "chatcmpl"

    def __init__(self, *args, tools: ToolUse | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tools = tools if tools is not None and tools.mode != "none" else None

    def whole(self, outputs: Sequence[RequestOutput]) -> r.ChatCompletionResponse:
        (output,) = outputs  # a conversation is one prompt
        choices = [self.message(self.whole_piece(0, output, done)) for done in output.outputs]
        return r.ChatCompletionResponse(
            **self.head(),
            choices=choices,
            usage=usage_of(outputs),
            prompt_logprobs=self.prompt_logprobs_of(output),
        )

    def message(self, piece: Piece) -> r.ChatChoice:
        content, calls, finish_reason = self.read(piece.text, piece.finish_reason)
        return r.ChatChoice(
            index=piece.index,
            message=r.AssistantMessage(content=content, tool_calls=calls or None),
            logprobs=self.chat_logprobs(piece.logprobs),
            finish_reason=finish_reason,
            stop_reason=piece.stop_reason,
        )

    def read(
        self, text: str, finish_reason: str | None
    ) -> tuple[str | None, list[r.ToolCall], str | None]:
        """The reply's content, its calls and its finish reason."""
        if self.tools is None:
            return text, [], finish_reason
        content, calls = self.tools.read(text)
        called = [
            r.ToolCall(id=c.id, function=r.CalledFunction(name=c.name, arguments=c.arguments))
            for c in calls
        ]
        return (
            content,
            called,
            "tool_calls" if called and finish_reason == "stop" else finish_reason,
        )

    def chat_logprobs(self, steps: TokenLogprobs | None) -> r.ChatLogprobs | None:
        if steps is None:
            return None
        content = []
        for step in steps:
            (chosen, logprob), *_ = step.items()  # the sampled token comes first
            tops = sorted(step.items(), key=lambda item: item[1].rank)[: self.top_n]
            top_logprobs = [self.top(t, lp) for t, lp in tops]
            token = self.top(chosen, logprob)
            content.append(r.TokenLogprob(**token.model_dump(), top_logprobs=top_logprobs))
        return r.ChatLogprobs(content=content)

    def top(self, token_id: int, logprob: Logprob) -> r.TopLogprob:
        token = self.decode(token_id)
        value = max(logprob.logprob, FLOOR)
        return r.TopLogprob(token=token, logprob=value, bytes=list(token.encode()))

    def opening(self, prompt: int, first: RequestOutput) -> list:
        """Each choice's first chunk carries the role (the first one also ``prompt_logprobs``,
        if asked)."""
        return [
            r.ChatCompletionChunk(
                **self.head(),
                choices=[r.ChatChunkChoice(index=i, delta=r.Delta(role="assistant", content=""))],
                prompt_logprobs=self.prompt_logprobs_of(first) if i == 0 else None,
            )
            for i in range(self.n)
        ]

    def chunk(self, piece: Piece, done: CompletionOutput | None = None):
        if self.tools is not None:
            return self.tool_chunk(piece, done)
        choice = r.ChatChunkChoice(
            index=piece.index,
            delta=r.Delta(content=piece.text or None),
            logprobs=self.chat_logprobs(piece.logprobs),
            finish_reason=piece.finish_reason,
            stop_reason=piece.stop_reason,
        )
        return r.ChatCompletionChunk(**self.head(), choices=[choice])

    def tool_chunk(self, piece: Piece, done: CompletionOutput):
        """With tools: nothing until the choice ends, then its content and calls at once."""
        if piece.finish_reason is None:
            return None
        content, calls, finish_reason = self.read(done.text, piece.finish_reason)
        deltas = [r.DeltaToolCall(index=i, **call.model_dump()) for i, call in enumerate(calls)]
        choice = r.ChatChunkChoice(
            index=piece.index,
            delta=r.Delta(content=content, tool_calls=deltas or None),
            logprobs=self.chat_logprobs(done.logprobs),
            finish_reason=finish_reason,
            stop_reason=piece.stop_reason,
        )
        return r.ChatCompletionChunk(**self.head(), choices=[choice])

    def usage_chunk(self, outputs: Sequence[RequestOutput]):
        return r.ChatCompletionChunk(**self.head(), choices=[], usage=usage_of(outputs))
