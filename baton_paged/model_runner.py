"""ModelRunner: one ``ForwardBatch`` in, the logits of its sampling rows out.

Any Hugging Face causal LM runs unmodified: its attention goes through our bridge
(``attention/hf_bridge.py``), so the runner only packs the rows' tokens into one ``(1, T)``
sequence with their positions, builds the step's ``AttentionMetadata`` once for all layers, and
asks for logits at the last token of each sampling row only (``logits_to_keep``), which spares
the LM head on prompt tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from baton_paged.allocator import HostSwapPool, KVCache, execute_swap
from baton_paged.attention import AttentionBackend, AttentionMetadata, PagedStep
from baton_paged.sched.plan import ForwardBatch, StepPlan


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        cache: KVCache,
        backend: AttentionBackend,
        host: HostSwapPool | None = None,
    ):
        self.model = model
        self.cache = cache
        self.backend = backend
        self.host = host
        self.device = cache.storage.device

    def swap(self, plan: StepPlan) -> None:
        """Issue the plan's page copies on the current stream: every swap-out before any swap-in,
        and all before the forwards (the order ``allocator/swap.py``'s page-reuse rule needs)."""
        for swap in (*plan.swap_out, *plan.swap_in):
            execute_swap(swap, self.cache, self.host)

    @torch.inference_mode()
    def execute(self, forward: ForwardBatch) -> torch.Tensor:
        """Run the forward; return ``[num sampling rows, vocab]`` logits in row order."""
        rows = forward.rows
        query_lens = [len(row.token_ids) for row in rows]
        meta = AttentionMetadata.build(
            query_lens,
            [row.end for row in rows],
            forward.block_table,
            self.cache.spec.page_size,
            self.device,
        )
        ids = np.fromiter((t for row in rows for t in row.token_ids), np.int64, meta.num_tokens)
        positions = np.concatenate([np.arange(row.start, row.end) for row in rows])
        last = np.cumsum(query_lens) - 1
        keep = last[[row.sample for row in rows]]
        out = self.model(
            input_ids=self._to_device(ids)[None],
            position_ids=self._to_device(positions)[None],
            use_cache=False,
            logits_to_keep=self._to_device(keep),
            baton_step=PagedStep(self.cache, meta, self.backend),
        )
        return out.logits[0]

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(self.device)
