"""Text to token ids, holding the GIL as briefly as the tokenizer allows.

A server tokenizes on worker threads so a huge prompt delays only itself, but the GIL is shared.
``tokenizer.encode`` on a fast (Rust) tokenizer releases it while it splits and merges, then
builds and later frees a string and an offset pair per token while holding it: for a
multi-megabyte prompt that stalled the event loop, and every other client, for 150-300 ms. The
Rust tokenizer's batch path without offsets gives the same ids and holds the GIL for a few tens
of milliseconds.
"""

from __future__ import annotations

from typing import Any


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """``tokenizer.encode(text, add_special_tokens=...)``, by the fast path where there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return fast([text], add_special_tokens=add_special_tokens)[0].ids
