"""GrammarMasks: one step's token masks for the rows under a grammar, applied to their logits.

Each constrained row's matcher writes its allowed tokens as bits (32 per int32 word) into one
host buffer, all rows at once on llguidance's thread pool; the buffer goes to the logits' device
in one copy, where the bits are unpacked and every disallowed token's logit set to -inf, in
place, before the sampler sees them (so greedy, sampling and log-probabilities all follow the
grammar, as vLLM applies its bitmask). Rows without a grammar are not touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class GrammarMasks:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._executor = None
        self._shifts: dict[torch.device, torch.Tensor] = {}

    @torch.inference_mode()  # the logits are the forward's inference tensors
    def apply(self, logits: torch.Tensor, rows: Sequence[tuple[int, Any]]) -> None:
        """Mask ``logits`` (``[N, vocab]``) in place: row ``i`` of each ``(i, matcher)`` in
        ``rows`` keeps only the tokens its matcher allows next."""
        if not rows:
            return
        bits = self._fill([matcher for _, matcher in rows]).to(logits.device, non_blocking=True)
        shifts = self._shift_table(logits.device)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)
        allowed = allowed[:, : logits.shape[1]].bool()
        index = torch.tensor([i for i, _ in rows], device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))

    def _fill(self, matchers: list[Any]) -> torch.Tensor:
        """``[len(matchers), words]`` int32 on the host (pinned where CUDA is: a fresh tensor
        each step, which the caching host allocator reuses once its copy is done)."""
        pinned = torch.cuda.is_available()
        buffer = torch.empty(len(matchers), self.words, dtype=torch.int32, pin_memory=pinned)
        pairs = [(matcher, i) for i, matcher in enumerate(matchers)]
        self._executor_().unsafe_compute_mask_ptr(
            pairs, buffer.data_ptr(), self.words * 4, len(matchers)
        )
        return buffer

    def _executor_(self):
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        return self._executor

    def _shift_table(self, device: torch.device) -> torch.Tensor:
        if device not in self._shifts:
            self._shifts[device] = torch.arange(32, dtype=torch.int32, device=device)
        return self._shifts[device]
