"""ModelRunner: one ``ForwardBatch`` in, the logits of its sampling rows out.

The runner packs the rows' tokens into one sequence with their positions, builds the step's
``AttentionMetadata`` once for all layers, and asks for logits at the last token of each
sampling row only, which spares the LM head on prompt tokens. The forward is the native
Llama-family executor when the engine has one (``llama_executor.py``), else the unmodified
Hugging Face model with its attention routed through our bridge (``attention/hf_bridge.py``):
any causal LM runs that way (``model_forward``). On CUDA, decode steps replay CUDA graphs of that
forward (``decode_graphs.py``), captured before the runner is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from baton_paged.allocator import HostSwapPool, KVCache, execute_swap
from baton_paged.attention import AttentionBackend, AttentionMetadata, PagedStep
from baton_paged.attention.cpu_extension import cpu_kernels
from baton_paged.model.decode_graphs import DecodeGraphs, Forward
from baton_paged.model.llama_executor import LlamaExecutor
from baton_paged.model.sampled_tokens import SampledTokens
from baton_paged.sched.plan import ForwardBatch, ScheduledRow, StepPlan


def model_forward(model: torch.nn.Module, executor: LlamaExecutor | None) -> Forward:
    """Logits of the ``keep`` rows of packed tokens at their positions: the native executor's
    forward when there is one, else the Hugging Face model's (attention through our bridge)."""
    if executor is not None:
        return executor.forward

    def hf_forward(
        ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, step: PagedStep
    ) -> torch.Tensor:
        out = model(
            input_ids=ids[None],
            position_ids=positions[None],
            use_cache=False,
            logits_to_keep=keep,
            baton_step=step,
        )
        return out.logits[0]

    return hf_forward


class ModelRunner:
    def __init__(
        self,
        forward: Forward,
        cache: KVCache,
        backend: AttentionBackend,
        host: HostSwapPool | None = None,
        graphs: DecodeGraphs | None = None,
    ):
        """``forward`` from ``model_forward``; ``graphs``: decode graphs of it, if captured."""
        self.forward = forward
        self.cache = cache
        self.backend = backend
        self.host = host
        self.graphs = graphs
        self.device = cache.storage.device
        kernels = cpu_kernels() if self.device.type == "cpu" and host is not None else None
        self.copy_pages = None if kernels is None else kernels.copy_pages
        """Scattered swaps' copier (``allocator/swap.py``): the attention kernels' where built."""

    def swap(self, plan: StepPlan) -> None:
        """Issue the plan's page copies on the current stream: every swap-out before any swap-in,
        and all before the forwards (the order ``allocator/swap.py``'s page-reuse rule needs)."""
        for swap in (*plan.swap_out, *plan.swap_in):
            execute_swap(swap, self.cache, self.host, self.copy_pages)

    @torch.inference_mode()
    def execute(
        self,
        forward: ForwardBatch,
        extra_tokens: Sequence[int] = (),
        previous: SampledTokens | None = None,
    ) -> torch.Tensor:
        """Run the forward; return the logits of each sampling row's last token in row order,
        then those of the packed tokens ``extra_tokens`` (prompt positions whose log-probabilities
        a request asked for): ``[num sampling rows + len(extra_tokens), vocab]``. Decode rows
        whose token is ``IN_FLIGHT`` take it from ``previous``, the last step's samples."""
        if self.graphs is not None and not extra_tokens and self.graphs.covers(forward):
            return self.graphs.run(forward, previous)
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
        one_each = meta.num_tokens == len(rows)
        if one_each and not extra_tokens and all(row.sample for row in rows):
            # one token per row, each sampled (a decode batch): no per-row ranges to build
            positions = np.fromiter((row.start for row in rows), np.int64, len(rows))
            keep = np.arange(len(rows))
        else:
            positions = np.concatenate([np.arange(row.start, row.end) for row in rows])
            last = np.cumsum(query_lens) - 1
            keep = np.concatenate([last[[row.sample for row in rows]], np.asarray(extra_tokens)])
        keep, positions = self._to_device(keep), self._to_device(positions)
        ids = self._input_ids(ids, rows, query_lens, previous)
        return self.forward(ids, positions, keep, PagedStep(self.cache, meta, self.backend))

    def _input_ids(
        self,
        ids: np.ndarray,
        rows: Sequence[ScheduledRow],
        query_lens: list[int],
        previous: SampledTokens | None,
    ) -> torch.Tensor:
        """The packed ids on the device, in-flight ones filled from ``previous`` there."""
        sources = None if previous is None else previous.sources(rows)
        if sources is None or not (sources >= 0).any():
            return self._to_device(ids)
        both = self._to_device(np.stack([ids, np.repeat(sources, query_lens)]))
        previous.fill(both[0], both[1])
        return both[0]

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(self.device)
