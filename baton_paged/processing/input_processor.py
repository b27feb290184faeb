"""InputProcessor: a prompt and its sampling parameters, checked and turned into a ``Request``.

It reads only what is fixed once the engine is built (tokenizer, context length, page pool
size), never the engine's live state, so a server can check and tokenize a request on its own
thread while an iteration runs, and a bad request fails before anything is queued.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from baton_paged.allocator import pages_needed
from baton_paged.inputs import PROMPT_KEYS
from baton_paged.processing.grammars import GrammarCompiler
from baton_paged.processing.prompt_encoding import encode, untruncated
from baton_paged.request import Request
from baton_paged.sampling_params import FieldError, SamplingParams

PromptInput = str | Sequence[int] | dict
"""Text, token ids, or ``{"prompt": text}`` / ``{"prompt_token_ids": ids[, "prompt": text]}``
(``baton_paged.inputs``' ``TextPrompt`` and ``TokensPrompt``)."""


class InputProcessor:
    def __init__(
        self,
        tokenizer: Any,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        page_size: int,
        num_pages: int,
        device: str,
        max_logprobs: int,
        grammars: GrammarCompiler,
        sampling_defaults: dict[str, Any] | None = None,
    ):
        self.tokenizer = untruncated(tokenizer)  # before any thread encodes with it
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.page_size = page_size
        self.num_pages = num_pages
        """Pages of the whole device pool: a request needing more could never run."""
        self.device = device
        self.max_logprobs = max_logprobs
        """Most log-probabilities per token a request may ask for (EngineConfig.max_logprobs)."""
        self.grammars = grammars
        """Compiles structured-output specs: here, on the caller's thread, never in a step."""
        self.sampling_defaults = dict(sampling_defaults or {})
        """``SamplingParams`` fields the model's generation config sets (see
        ``EngineConfig.generation_config``): the defaults of requests that leave them unset."""
        self._ids = itertools.count()

    def default_params(self, **sent: Any) -> SamplingParams:
        """``SamplingParams`` of the fields ``sent``, the model's defaults filling the rest."""
        return SamplingParams(**(self.sampling_defaults | sent))

    def prepare(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> Request:
        """The request for ``prompt``, or ValueError saying why it can never run."""
        params = SamplingParams() if params is None else params
        request_id = str(next(self._ids)) if request_id is None else request_id
        if not isinstance(params, SamplingParams):
            raise ValueError(f"expected SamplingParams, got {type(params).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an int, got {priority!r}")
        self._check_logit_bias(params)
        self._check_allowed(params)
        self._check_logprobs(params)
        text, ids = self._tokenize(prompt)
        if params.truncate_prompt_tokens is not None and len(ids) > params.truncate_prompt_tokens:
            text, ids = None, ids[-params.truncate_prompt_tokens :]  # the text no longer matches
        seed = params.seed
        grammar = self._grammar(params)
        return Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            max_tokens=self._max_tokens(ids, params),
            eos_token_ids=self.eos_token_ids,
            priority=priority,
            prompt=text,
            generator=None if seed is None else torch.Generator(self.device).manual_seed(seed),
            grammar=grammar,
            bad_words_token_ids=self._bad_words(params.bad_words),
        )

    def _grammar(self, params: SamplingParams) -> Any:
        """The request's grammar matcher (None without structured outputs); a spec that cannot
        compile is refused here, naming its field."""
        if params.structured_outputs is None:
            return None
        try:
            return self.grammars.matcher(params.structured_outputs)
        except ValueError as error:
            raise FieldError(str(error), "structured_outputs") from error

    def _tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            unknown = sorted(set(prompt) - PROMPT_KEYS)
            if unknown:
                raise FieldError(
                    f"prompt keys {unknown} are not supported: this engine takes text or token "
                    f"prompts ({sorted(PROMPT_KEYS)}), never images or other inputs",
                    "prompt",
                )
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            ids = encode(self.tokenizer, prompt) if prompt else []
            if not ids:
                raise ValueError("the prompt is empty")
            return prompt, ids  # the tokenizer's own ids need no range check
        return None, self._check_ids(prompt)

    def _check_ids(self, ids) -> list[int]:
        ids = list(ids)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = len(self.tokenizer)
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        return ids

    def _check_logit_bias(self, params: SamplingParams) -> None:
        """The one check of logit_bias ids against the vocabulary (``SamplingParams`` refuses
        negative ones): a bias for a token the model lacks fails here, not as an index error
        mid-step."""
        vocab = len(self.tokenizer)
        outside = [token_id for token_id, _ in params.logit_bias if token_id >= vocab]
        if outside:
            message = f"logit_bias token ids must be < the vocabulary's {vocab}: {outside[:10]}"
            raise FieldError(message, "logit_bias")

    def _check_allowed(self, params: SamplingParams) -> None:
        vocab = len(self.tokenizer)
        outside = [t for t in params.allowed_token_ids or () if t >= vocab]
        if outside:
            message = f"allowed_token_ids must be < the vocabulary's {vocab}: {outside[:10]}"
            raise FieldError(message, "allowed_token_ids")

    def _bad_words(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Each word's token sequences: as written (without leading spaces) and after a space,
        where that tokenizes differently (mid-text, most tokenizers fold the space in)."""
        sequences: dict[tuple[int, ...], None] = {}
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = encode(self.tokenizer, text, add_special_tokens=False)
                if ids:
                    sequences[tuple(ids)] = None
        return tuple(sequences)

    def _check_logprobs(self, params: SamplingParams) -> None:
        """Each returned log-probability is work on every step: past the limit, refuse."""
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            if asked is not None and asked > self.max_logprobs:
                raise ValueError(
                    f"{name}={asked} asks for more log-probabilities per token than this engine's "
                    f"limit of {self.max_logprobs} (max_logprobs, the --max-logprobs flag)"
                )

    def _max_tokens(self, ids: list[int], params: SamplingParams) -> int:
        """The request's max_tokens; ValueError if its prompt fits neither model nor pool."""
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the model's context is "
                f"{self.max_model_len} tokens, leaving no room to generate"
            )
        max_tokens = min(params.max_tokens or room, room)
        needed = pages_needed(len(ids) + max_tokens, self.page_size)
        if needed > self.num_pages:
            raise ValueError(
                f"the request needs {needed} KV pages (prompt {len(ids)} + up to {max_tokens} "
                f"new tokens) but the whole pool has {self.num_pages}; raise kv_memory or "
                "lower max_tokens"
            )
        return max_tokens
