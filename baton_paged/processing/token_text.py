"""Token ids to text, straight through the Rust tokenizer where transformers would add nothing.

The detokenizer decodes a short window twice per generated token. Through
``tokenizer.decode`` most of that time was transformers' wrapper (argument conversion and
checks), not the Rust decode it ends in: measured on the tiny model at 128 requests, the Rust
call was 13% of the decode time. For a stock fast tokenizer the wrapper only forwards to
``backend_tokenizer.decode`` and then, if ``clean_up_tokenization_spaces`` is set, cleans the
text up; ``text_decoder`` calls the Rust tokenizer directly exactly then, and keeps
``tokenizer.decode`` for anything else (a slow tokenizer, a subclass with its own decoding,
clean-up on), so the text is the same either way. ``rust_tokenizer`` hands that same Rust
tokenizer to the detokenizer's decode stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

TextDecoder = Callable[[Sequence[int], bool], str]
"""``(token_ids, skip_special_tokens) -> text``, as ``tokenizer.decode`` gives it."""


def text_decoder(tokenizer: Any, backend: Any = None) -> TextDecoder:
    """``tokenizer.decode`` for token ids, by the direct path where it gives the same text
    (``backend``: ``rust_tokenizer(tokenizer)`` when the caller has already looked it up)."""
    backend = backend if backend is not None else rust_tokenizer(tokenizer)
    if backend is not None:
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


def rust_tokenizer(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` whose ``decode`` gives exactly ``tokenizer.decode``'s text,
    or None when transformers' decoding adds something of its own."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if backend is not None and _decodes_by_forwarding(tokenizer) else None


def _decodes_by_forwarding(tokenizer: Any) -> bool:
    """Whether ``tokenizer.decode`` is transformers' own, forwarding to the Rust tokenizer with
    no clean-up (the classes are looked up by name: their modules move between versions)."""
    if getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return False
    chain = {cls.__name__: cls for cls in type(tokenizer).__mro__}
    base = chain.get("PreTrainedTokenizerBase")
    fast = chain.get("TokenizersBackend") or chain.get("PreTrainedTokenizerFast")
    if base is None or fast is None or "_decode" not in vars(fast):
        return False
    return type(tokenizer).decode is base.decode and type(tokenizer)._decode is fast._decode
