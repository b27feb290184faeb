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
from baton_paged.model.sampled_tokens import SampledTokens
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
    def run(self, forward: ForwardBatch, previous: SampledTokens | None = None) -> torch.Tensor:
        """``[len(rows), vocab]`` logits of a decode step ``covers`` accepted, in row order; rows
        whose token is ``IN_FLIGHT`` take it from ``previous`` on the device, before the replay
        (``SampledTokens.fill``: no wait for the step that drew it)."""
        n = len(forward.rows)
        bucket = next(b for b in self.buckets if b >= n)
        sources = np.full(bucket, -1, dtype=np.int64)
        if previous is not None:
            sources[:n] = previous.sources(forward.rows)
        context_lens = self._load(forward, bucket, sources)
        if (sources >= 0).any():
            previous.fill(self._buffers.input_ids[:bucket], self._buffers.sources[:bucket])
        if self.mode == "eager":
            step = self._step(bucket, context_lens)
            return self.forward(*self._buffers.inputs(bucket), step)[:n]
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits[:n].clone()  # the next replay overwrites the graph's output

    def _load(self, forward: ForwardBatch, bucket: int, sources: np.ndarray) -> tuple[int, ...]:
        """Write the step's rows, then padding, into the static buffers (``sources``: where
        each row's in-flight token is, or -1); return the context lengths (padding rows: 1).

        The block table is kept from step to step (``_StaticBuffers``): a row's entries past its
        context may be another step's page ids, which no kernel reads (they stop at
        ``seqused_k``), and a padding row needs only its first entry, the scratch page."""
        rows, n = forward.rows, len(forward.rows)
        buffers = self._buffers
        ends = np.ones(bucket, dtype=np.int64)
        ends[:n] = [row.end for row in rows]
        buffers.wait_for_copy()
        table = buffers.host_table[:bucket]
        width = min(forward.block_table.shape[1], self.max_pages)
        table[:n, :width] = forward.block_table[:, :width]
        table[n:, 0] = self.scratch_page
        ids = np.zeros(bucket, dtype=np.int64)
        ids[:n] = [row.token_ids[0] for row in rows]
        slots = slot_mapping(table, ends - 1, ends, self.page_size)
        buffers.load(bucket, ids, ends, slots, sources)
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
        self._buffers.wait_for_copy()
        self._buffers.host_table[:] = self.scratch_page
        for bucket in reversed(self.buckets):
            ends = np.ones(bucket, dtype=np.int64)
            slots = np.full(bucket, self.scratch_page * self.page_size, dtype=np.int64)
            none = np.full(bucket, -1, dtype=np.int64)
            self._buffers.load(bucket, np.zeros(bucket, dtype=np.int64), ends, slots, none)
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
    """Device tensors at fixed addresses, sized for the largest bucket; a bucket uses a prefix.

    Every per-step input is a view of one device block, filled from one host block of the same
    layout (pinned on CUDA) by one asynchronous copy per step: the inputs' int64 fields, then the
    int32 ones with the block table last, so a bucket's rows end the part that is copied. The host
    block is written again only once the last copy from it has finished (an event; in steady state
    that copy, queued ahead of the previous step's forward, has long landed)."""

    def __init__(self, max_bucket: int, max_pages: int, device: torch.device):
        self.max_bucket, self.max_pages = max_bucket, max_pages
        self._longs = 4 * max_bucket  # input ids, positions, slot mapping, in-flight sources
        ints = (max_bucket + 1) + max_bucket + max_bucket * max_pages
        size = self._longs + (ints + 1) // 2
        pinned = torch.device(device).type == "cuda"
        self._host = torch.zeros(size, dtype=torch.int64, pin_memory=pinned)
        self._copied = torch.cuda.Event() if pinned else None
        self._device = torch.zeros(size, dtype=torch.int64, device=device)
        host = self._fields(self._host)
        self._host_fields = {name: tensor.numpy() for name, tensor in host.items()}
        self.host_table = self._host_fields["block_table"]
        """The host side of the block table, ``[max_bucket, max_pages]``: written in place."""
        device_fields = self._fields(self._device)
        self.input_ids, self.positions = device_fields["input_ids"], device_fields["positions"]
        self.slot_mapping, self.seqused_k = (
            device_fields["slot_mapping"],
            device_fields["seqused_k"],
        )
        self.cu_seqlens_k, self.sources = device_fields["cu_seqlens_k"], device_fields["sources"]
        self.block_table = device_fields["block_table"]
        self.keep = torch.arange(max_bucket, device=device)
        self.cu_seqlens_q = torch.arange(max_bucket + 1, dtype=torch.int32, device=device)

    def _fields(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        b = self.max_bucket
        longs = block[: self._longs]
        ints = block[self._longs :].view(torch.int32)
        return {
            "input_ids": longs[:b],
            "positions": longs[b : 2 * b],
            "slot_mapping": longs[2 * b : 3 * b],
            "sources": longs[3 * b : 4 * b],
            "cu_seqlens_k": ints[: b + 1],
            "seqused_k": ints[b + 1 : 2 * b + 1],
            "block_table": ints[2 * b + 1 : 2 * b + 1 + b * self.max_pages].view(b, self.max_pages),
        }

    def inputs(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids[:bucket], self.positions[:bucket], self.keep[:bucket]

    def load(
        self,
        bucket: int,
        ids: np.ndarray,
        ends: np.ndarray,
        slots: np.ndarray,
        sources: np.ndarray,
    ) -> None:
        """Write a step's inputs (the block table is already in ``host_table``) and copy the
        part of the block that ``bucket`` reads to the device."""
        self.wait_for_copy()
        host = self._host_fields
        host["input_ids"][:bucket] = ids
        host["sources"][:bucket] = sources
        host["positions"][:bucket] = ends - 1
        host["slot_mapping"][:bucket] = slots
        host["seqused_k"][:bucket] = ends
        host["cu_seqlens_k"][0] = 0
        host["cu_seqlens_k"][1 : bucket + 1] = np.cumsum(ends)
        ints_used = 2 * self.max_bucket + 1 + bucket * self.max_pages
        used = self._longs + (ints_used + 1) // 2
        self._device[:used].copy_(self._host[:used], non_blocking=True)
        if self._copied is not None:  # on the stream the copy ran on: the block's device's
            self._copied.record(torch.cuda.current_stream(self._device.device))

    def wait_for_copy(self) -> None:
        """Until the last copy from the host block has finished (call before writing it)."""
        if self._copied is not None:
            self._copied.synchronize()
