"""Reply bodies from engine outputs, for completions and chat: whole replies, stream chunks and
the usage chunk, built through the ``responses`` models.

A ``Piece`` is what one choice adds in one message (all of it in a whole reply, the new part in
a chunk), so whole replies and streams share one path per route, ``n`` choices included.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from baton_paged.entrypoints.server import responses as r
from baton_paged.entrypoints.server.tools import ToolUse
from baton_paged.outputs import CompletionOutput, Logprob, RequestOutput

TokenLogprobs = tuple[dict[int, Logprob], ...]


@dataclass(frozen=True)
class Piece:
    index: int
    text: str
    logprobs: TokenLogprobs | None
    """Per new token: the sampled token first, then the top N (None if none were asked for)."""
    finish_reason: str | None
    stop_reason: int | str | None
    offset: int
    """Where the piece's first new token starts in the choice's text."""


def usage_of(output: RequestOutput) -> r.Usage:
    prompt = len(output.prompt_token_ids)
    completion = sum(len(choice.token_ids) for choice in output.outputs)
    return r.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


class CompletionShape:
    """``/v1/completions`` bodies: ``text_completion`` objects, streamed as the same objects."""

    prefix = "cmpl"

    def __init__(
        self,
        model: str,
        n: int,
        decode: Callable[[int], str],
        echo: str = "",
        top_n: int = 0,
        request_id: str | None = None,
    ):
        """``decode``: a token id's text (for logprobs); ``echo``: the prompt text to prepend;
        ``top_n``: chat's top_logprobs; ``request_id``: the client's (vLLM's field), which the
        reply's id then carries."""
        self.model, self.n, self.decode, self.echo, self.top_n = model, n, decode, echo, top_n
        self.id = f"{self.prefix}-{request_id or uuid.uuid4().hex}"
        self.created = int(time.time())

    def head(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model}

    def whole(self, output: RequestOutput) -> r.CompletionResponse:
        choices = [self.choice(self.whole_piece(done)) for done in output.outputs]
        return r.CompletionResponse(**self.head(), choices=choices, usage=usage_of(output))

    def whole_piece(self, done: CompletionOutput) -> Piece:
        text, logprobs = self.echo + done.text, done.logprobs
        return Piece(
            done.index, text, logprobs, done.finish_reason, done.stop_reason, len(self.echo)
        )

    def choice(self, piece: Piece) -> r.CompletionChoice:
        return r.CompletionChoice(
            index=piece.index,
            text=piece.text,
            logprobs=None if piece.logprobs is None else self.legacy_logprobs(piece),
            finish_reason=piece.finish_reason,
            stop_reason=piece.stop_reason,
        )

    def legacy_logprobs(self, piece: Piece) -> r.CompletionLogprobs:
        tokens, chosen, tops, offsets, offset = [], [], [], [], piece.offset
        for step in piece.logprobs:
            token_id, logprob = next(iter(step.items()))  # the sampled token comes first
            token = self.decode(token_id)
            tokens.append(token)
            chosen.append(logprob.logprob)
            tops.append({self.decode(t): lp.logprob for t, lp in step.items()})
            offsets.append(offset)
            offset += len(token)
        return r.CompletionLogprobs(
            tokens=tokens, token_logprobs=chosen, top_logprobs=tops, text_offset=offsets
        )

    def opening(self) -> list:
        """Chunks before any token: the echoed prompt of each choice."""
        if not self.echo:
            return []
        pieces = [Piece(i, self.echo, None, None, None, 0) for i in range(self.n)]
        return [self.chunk(piece) for piece in pieces]

    def chunk(self, piece: Piece, done: CompletionOutput | None = None):
        """A stream chunk for ``piece`` of the choice now at ``done``; None: nothing to send
        yet."""
        return r.CompletionResponse(**self.head(), choices=[self.choice(piece)])

    def usage_chunk(self, output: RequestOutput):
        return r.CompletionResponse(**self.head(), choices=[], usage=usage_of(output))


class ChatShape(CompletionShape):
    """``/v1/chat/completions`` bodies: ``chat.completion`` objects and their chunks. With tools
    (``server/tools.py``) a reply's text is read into its content and calls (``finish_reason``
    "tool_calls" when it made some and stopped); a stream then sends each choice whole, content
    and calls in one chunk, when it ends, since a call is only known once its text is complete."""

    prefix = "chatcmpl"

    def __init__(self, *args, tools: ToolUse | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tools = tools if tools is not None and tools.mode != "none" else None

    def whole(self, output: RequestOutput) -> r.ChatCompletionResponse:
        choices = [self.message(self.whole_piece(done)) for done in output.outputs]
        return r.ChatCompletionResponse(**self.head(), choices=choices, usage=usage_of(output))

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
        return r.TopLogprob(token=token, logprob=logprob.logprob, bytes=list(token.encode()))

    def opening(self) -> list:
        """Each choice's first chunk carries the role."""
        return [
            r.ChatCompletionChunk(
                **self.head(),
                choices=[r.ChatChunkChoice(index=i, delta=r.Delta(role="assistant", content=""))],
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

    def usage_chunk(self, output: RequestOutput):
        return r.ChatCompletionChunk(**self.head(), choices=[], usage=usage_of(output))
