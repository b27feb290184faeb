"""Page hashes: the identity of a full page of K/V for prefix caching.

A page's K/V depends on every token before it, not only its own, so each full page's key hashes
its tokens chained with the previous page's key: two requests share page ``i``'s key exactly when
their first ``(i + 1) * page_size`` tokens agree. ``salt`` carries whatever else changes K/V (the
model, the dtype): keys from different engines never meet. BLAKE2b with 16-byte digests keeps a
collision, which would hand a request another prefix's K/V, out of practical reach; Python's
``hash`` (64 bits, and ``hash(-1) == hash(-2)``) would not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def page_hashes(
    token_ids: Sequence[int], page_size: int, salt: bytes = b"", start_key: bytes | None = None
) -> list[bytes]:
    """Keys of each full page of ``token_ids`` (a trailing partial page has none)."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    key = start_key if start_key is not None else hashlib.blake2b(salt, digest_size=16).digest()
    keys = []
    for start in range(0, len(tokens) - page_size + 1, page_size):
        digest = hashlib.blake2b(key, digest_size=16)
        digest.update(tokens[start : start + page_size].tobytes())
        key = digest.digest()
        keys.append(key)
    return keys
