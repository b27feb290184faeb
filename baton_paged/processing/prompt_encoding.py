"""Text to token ids, holding the GIL as briefly as the tokenizer allows.

A server tokenizes on worker threads so a huge prompt delays only itself, but the GIL is shared.
``tokenizer.encode`` on a fast (Rust) tokenizer releases it while it splits and merges, then
builds and later frees a string and an offset pair per token while holding it: for a
multi-megabyte prompt that stalled the event loop, and every other client, for 150-300 ms. The
Rust tokenizer's batch path without offsets holds it for a few tens of milliseconds.

That path applies the truncation and padding stored in the Rust tokenizer, which transformers
may load from ``tokenizer.json`` and which ``tokenizer.encode`` switches off per call (by
changing them: not something to do while other threads encode). So the engine switches them off
once, at build time (``untruncated``), and ``encode`` takes the fast path only while they are
off: a prompt is never cut short without a word.
"""

from __future__ import annotations

from typing import Any


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """``tokenizer.encode(text, add_special_tokens=...)``, by the fast path where it gives the
    same ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return fast([text], add_special_tokens=add_special_tokens)[0].ids


def untruncated(tokenizer: Any) -> Any:
    """``tokenizer`` with the Rust tokenizer's stored truncation and padding off (what
    ``tokenizer.encode`` asks for anyway); call it before threads share the tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "no_truncation"):
        backend.no_truncation()
        backend.no_padding()
    return tokenizer
