"""DecodeGraphs: decode steps replayed from CUDA graphs captured once per batch-size bucket.

Why: a GPU decode step of a small or mid-sized model is bound by kernel launches, not by the
GPU: each layer launches a dozen kernels of a few microseconds, and Python issues them one by
one. A CUDA graph records the whole forward once and replays it with one launch. vLLM does this
for decode at a fixed list of batch sizes; so do we.

How: a graph replays fixed addresses and shapes. Every input therefore lives in a static buffer
sized for the largest bucket, and a step of ``n`` requests runs the graph of the smallest bucket
``b >= n``: rows ``n..b`` are padding whose token is 0 at position 0, whose context is one token
in the cache's scratch page (a page no request owns, ``KVCache(scratch_pages=1)``), and whose
K/V is written there, so padding never touches a request's pages. The attention metadata the
graph was captured with is views of the same buffers, with ``max_model_len`` as every host-side
context length: only backends that read lengths from the device tensors (``graph_safe``) can be
captured. A step that is not decode-only, or larger than the largest bucket, runs eagerly.

``mode="eager"`` keeps the buffers and padding but calls the forward instead of replaying a
graph, with the step's true host lengths: the CPU tests check the padding logic that way, on
every backend, against HF ``generate``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from baton_paged.allocator import KVCache
from baton_paged.allocator.slots import pages_needed, slot_mapping
from baton_paged.attention import AttentionBackend, AttentionMetadata, PagedStep
from baton_paged.config import EngineConfig
from baton_paged.sched.plan import ForwardBatch

logger = logging.getLogger(__name__)

GRAPH_MODES = ("cuda", "eager")
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PagedStep], torch.Tensor]
"""``(input_ids, positions, keep, step) -> logits of the keep rows``: the runner's forward."""


def graph_mode(config: EngineConfig, backend: type[AttentionBackend]) -> str | None:
    """``"cuda"`` when decode steps should replay CUDA graphs here, else None (and why, logged)."""
    if torch.device(config.device).type != "cuda" or config.enforce_eager:
        return None
    if not backend.graph_safe:
        logger.info("decode runs eagerly: the %s backend cannot be captured", backend.name)
        return None
    return "cuda"


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Batch sizes with a graph: 1, 2, 4, then every multiple of 8, and the maximum itself."""
    sizes = {n for n in (1, 2, 4) if n <= max_batch_size}
    sizes.update(range(8, max_batch_size + 1, 8))
    sizes.add(max_batch_size)
    return tuple(sorted(sizes))


class DecodeGraphs:
    def __init__(
        self,
        forward: Forward,
        cache: KVCache,
        backend: AttentionBackend,
        max_batch_size: int,
        max_model_len: int,
        mode: str = "cuda",
    ):
        if mode not in GRAPH_MODES:
            raise ValueError(f"unknown graph mode {mode!r}; choose one of {GRAPH_MODES}")
        if cache.storage.shape[0] <= cache.num_pages:
            raise ValueError("decode graphs need a KV cache with a scratch page for padding rows")
        self.forward, self.cache, self.backend, self.mode = forward, cache, backend, mode
        self.buckets = batch_buckets(max_batch_size)
        self.max_model_len = max_model_len
        self.page_size = cache.spec.page_size
        self.scratch_page = cache.num_pages
        self.max_pages = pages_needed(max_model_len, self.page_size)
        self._buffers = _StaticBuffers(self.buckets[-1], self.max_pages, cache.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if mode == "cuda":
            self._capture_all()

    def covers(self, forward: ForwardBatch) -> bool:
        """Whether ``forward`` is a decode step a bucket holds."""
        rows = forward.rows
        return len(rows) <= self.buckets[-1] and all(
            len(row.token_ids) == 1 and row.sample for row in rows
        )

    @torch.inference_mode()
    def run(self, forward: ForwardBatch) -> torch.Tensor:
        """``[len(rows), vocab]`` logits of a decode step ``covers`` accepted, in row order."""
        n = len(forward.rows)
        bucket = next(b for b in self.buckets if b >= n)
        context_lens = self._load(forward, bucket)
        if self.mode == "eager":
            step = self._step(bucket, context_lens)
            return self.forward(*self._buffers.inputs(bucket), step)[:n]
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits[:n].clone()  # the next replay overwrites the graph's output

    def _load(self, forward: ForwardBatch, bucket: int) -> tuple[int, ...]:
        """Write the step's rows, then padding, into the static buffers; return the context
        lengths (padding rows: 1)."""
        rows, n = forward.rows, len(forward.rows)
        ends = np.ones(bucket, dtype=np.int64)
        ends[:n] = [row.end for row in rows]
        table = np.full((bucket, self.max_pages), self.scratch_page, dtype=np.int32)
        width = min(forward.block_table.shape[1], self.max_pages)
        table[:n, :width] = forward.block_table[:, :width]
        ids = np.zeros(bucket, dtype=np.int64)
        ids[:n] = [row.token_ids[0] for row in rows]
        self._buffers.load(
            bucket, ids, ends, table, slot_mapping(table, ends - 1, ends, self.page_size)
        )
        return tuple(int(end) for end in ends)

    def _step(self, bucket: int, context_lens: tuple[int, ...]) -> PagedStep:
        buffers = self._buffers
        meta = AttentionMetadata(
            query_lens=(1,) * bucket,
            context_lens=context_lens,
            page_size=self.page_size,
            cu_seqlens_q=buffers.cu_seqlens_q[: bucket + 1],
            cu_seqlens_k=buffers.cu_seqlens_k[: bucket + 1],
            seqused_k=buffers.seqused_k[:bucket],
            block_table=buffers.block_table[:bucket],
            slot_mapping=buffers.slot_mapping[:bucket],
        )
        return PagedStep(self.cache, meta, self.backend)

    @torch.inference_mode()  # as the eager forward runs: no autograd state in the graphs
    def _capture_all(self) -> None:
        """Capture every bucket, largest first, into one memory pool (vLLM's order: the smaller
        graphs then reuse the largest one's activation memory)."""
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            ends = np.ones(bucket, dtype=np.int64)
            table = np.full((bucket, self.max_pages), self.scratch_page, dtype=np.int32)
            slots = np.full(bucket, self.scratch_page * self.page_size, dtype=np.int64)
            self._buffers.load(bucket, np.zeros(bucket, dtype=np.int64), ends, table, slots)
            step = self._step(bucket, (self.max_model_len,) * bucket)
            args = (*self._buffers.inputs(bucket), step)
            side = torch.cuda.Stream()  # warm up off the capture stream: JIT, cuBLAS workspaces
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.forward(*args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.forward(*args)
            self._graphs[bucket] = (graph, logits)
        torch.cuda.synchronize()


class _StaticBuffers:
    """Device tensors at fixed addresses, sized for the largest bucket; a bucket uses a prefix."""

    def __init__(self, max_bucket: int, max_pages: int, device: torch.device):
        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.input_ids = zeros(max_bucket)
        self.positions = zeros(max_bucket)
        self.keep = torch.arange(max_bucket, device=device)
        self.slot_mapping = zeros(max_bucket)
        self.cu_seqlens_q = torch.arange(max_bucket + 1, dtype=torch.int32, device=device)
        self.cu_seqlens_k = zeros(max_bucket + 1, dtype=torch.int32)
        self.seqused_k = zeros(max_bucket, dtype=torch.int32)
        self.block_table = zeros(max_bucket, max_pages, dtype=torch.int32)

    def inputs(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids[:bucket], self.positions[:bucket], self.keep[:bucket]

    def load(
        self,
        bucket: int,
        ids: np.ndarray,
        ends: np.ndarray,
        table: np.ndarray,
        slots: np.ndarray,
    ) -> None:
        def put(buffer: torch.Tensor, array: np.ndarray) -> None:
            buffer.copy_(torch.from_numpy(np.ascontiguousarray(array)))

        put(self.input_ids[:bucket], ids)
        put(self.positions[:bucket], ends - 1)
        put(self.seqused_k[:bucket], ends.astype(np.int32))
        put(
            self.cu_seqlens_k[: bucket + 1], np.concatenate([[0], np.cumsum(ends)]).astype(np.int32)
        )
        put(self.block_table[:bucket], table)
        put(self.slot_mapping[:bucket], slots)
