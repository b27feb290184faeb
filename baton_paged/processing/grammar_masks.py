"""GrammarMasks: one step's token masks for the rows under a grammar, applied to their logits.

Each constrained row's matcher writes its allowed tokens as bits (32 per int32 word) into one
host buffer (beside a GPU all rows at once on llguidance's thread pool; on the CPU one after
another, leaving the cores to the forward); the buffer goes to the logits' device
in one copy, where the bits are unpacked (a byte-to-bits lookup) and -inf added to every
disallowed token's logit, in place, before the sampler sees them (so greedy, sampling and
log-probabilities all follow the grammar, as vLLM applies its bitmask). Rows without a grammar
are not touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


class GrammarMasks:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._executor = None
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @torch.inference_mode()  # the logits are the forward's inference tensors
    def apply(self, logits: torch.Tensor, rows: Sequence[tuple[int, Any]]) -> None:
        """Mask ``logits`` (``[N, vocab]``) in place: row ``i`` of each ``(i, matcher)`` in
        ``rows`` keeps only the tokens its matcher allows next."""
        if not rows:
            return
        # the pool's threads would take the cores a CPU forward runs on (measured: 0.86x the
        # unconstrained tokens/s on 2 cores, against 0.92x one after another); beside a GPU
        # the cores are free
        matchers = [matcher for _, matcher in rows]
        packed = self._fill(matchers, parallel=logits.is_cuda).to(logits.device, non_blocking=True)
        # each byte of the packed words (little-endian: token 8j + b is bit b of byte j) looks up
        # its eight tokens' additions, 0 or -inf, as an embedding row: adding them is exact (x + 0
        # is x) and 8x faster on the CPU than a boolean masked_fill over the same rows
        table = self._penalty_table(logits.device, logits.dtype)
        penalty = F.embedding(packed.view(torch.uint8).int(), table).view(len(rows), -1)
        penalty = penalty[:, : logits.shape[1]]
        index = [i for i, _ in rows]
        if index == list(range(logits.shape[0])):  # every row constrained: no index needed
            logits.add_(penalty)
        else:
            logits.index_add_(0, torch.tensor(index, device=logits.device), penalty)

    def _fill(self, matchers: list[Any], parallel: bool) -> torch.Tensor:
        """``[len(matchers), words]`` int32 on the host (pinned where CUDA is: a fresh tensor
        each step, which the caching host allocator reuses once its copy is done). ``parallel``:
        on llguidance's thread pool, else one matcher after another on this thread."""
        pinned = torch.cuda.is_available()
        buffer = torch.empty(len(matchers), self.words, dtype=torch.int32, pin_memory=pinned)
        size = self.words * 4
        if parallel:
            pairs = [(matcher, i) for i, matcher in enumerate(matchers)]
            self._executor_().unsafe_compute_mask_ptr(pairs, buffer.data_ptr(), size, len(pairs))
        else:
            for i, matcher in enumerate(matchers):
                matcher.unsafe_compute_mask_ptr(buffer.data_ptr() + i * size, size)
        return buffer

    def _executor_(self):
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        return self._executor

    def _penalty_table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[256, 8]``: for each byte value, -inf where its bit is 0 (refused), else 0."""
        key = (device, dtype)
        if key not in self._tables:
            byte = torch.arange(256, dtype=torch.int32)[:, None]
            allowed = ((byte >> torch.arange(8, dtype=torch.int32)) & 1).bool()
            self._tables[key] = torch.where(allowed, 0.0, float("-inf")).to(device, dtype)
        return self._tables[key]
