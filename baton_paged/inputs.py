"""vLLM's prompt types (``vllm.inputs``), so scripts that build prompts with them run unchanged.

A prompt is a text, a list of token ids, or one of these dicts; any other key (vLLM's
``multi_modal_data``, ``mm_processor_kwargs``...) is refused by name, since this engine takes
text and token prompts only and silently dropping an image would answer a different question.
"""

from typing import TypedDict

from typing_extensions import NotRequired  # typing's own from Python 3.11


class TextPrompt(TypedDict):
    prompt: str
    """The text, tokenized by the model's tokenizer (with its special tokens)."""


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    """The prompt as token ids, used as given."""
    prompt: NotRequired[str]
    """Its text, if known (outputs carry it back; nothing is tokenized)."""


PROMPT_KEYS = frozenset(TokensPrompt.__annotations__) | frozenset(TextPrompt.__annotations__)
"""The keys a prompt dict may have."""
