"""Decode graphs' static buffers and padding, checked on the CPU: ``mode="eager"`` runs the same
buffers, buckets and scratch-page padding as a CUDA graph replay, calling the forward instead of
replaying, so every policy's greedy output through it must still equal HF ``generate``. The
capture itself runs in the ``gpu`` tests (test_gpu_engine.py)."""

from __future__ import annotations

import random

import pytest
import torch
from equivalence import FORWARD_PATHS, check

from baton_paged import engine_parts
from baton_paged.allocator import KVCache, KVCacheSpec
from baton_paged.attention import flash_backend
from baton_paged.attention.registry import backend_class
from baton_paged.config import EngineConfig
from baton_paged.model.decode_graphs import DecodeGraphs, batch_buckets, graph_mode


@pytest.fixture(params=sorted(FORWARD_PATHS))
def forward_path(request) -> str:
    return request.param


@pytest.fixture
def eager_graphs(monkeypatch):
    """Engines built in this test decode through ``DecodeGraphs(mode="eager")``; returns the
    batch sizes the graphs ran, one per decode step they covered."""
    monkeypatch.setattr(engine_parts, "graph_mode", lambda config, backend: "eager")
    sizes: list[int] = []
    run = DecodeGraphs.run

    def counting_run(self, forward, previous=None):
        sizes.append(len(forward.rows))
        return run(self, forward, previous)

    monkeypatch.setattr(DecodeGraphs, "run", counting_run)
    return sizes


def test_buckets_cover_every_batch_size():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 24, 32)
    assert batch_buckets(36) == (1, 2, 4, 8, 16, 24, 32, 36)


def test_graphs_only_on_cuda_with_a_capturable_backend():
    def mode(backend, **options):
        return graph_mode(EngineConfig(**options), backend_class(backend))

    assert mode("triton") is None  # the CPU runs eagerly
    assert mode("triton", device="cuda") == "cuda"
    # flash-attn's forms: in place (capturable) or packed over gathered pages (eager)
    assert graph_mode(EngineConfig(device="cuda"), flash_backend.PagedFlash) == "cuda"
    assert graph_mode(EngineConfig(device="cuda"), flash_backend.PackedFlash) is None
    assert mode("triton", device="cuda", enforce_eager=True) is None
    for backend in ("torch", "padded", "xformers", "cpu_paged"):
        assert mode(backend, device="cuda") is None, backend


@pytest.mark.parametrize("step_ahead", [False, True])
@pytest.mark.parametrize("policy", ["baton", "orca", "static", "chunked"])
def test_padded_decode_equals_generate(make_engine, reference, eager_graphs, policy, step_ahead):
    """Six batch slots (buckets 1, 2, 4, 6): a batch of 3 or 5 decodes with padding rows. orca
    and chunked mix prompts into decode steps, which run eagerly: mostly, only their tails are
    decode-only. With step-ahead scheduling the rows' input ids are written into the graphs'
    static buffer on the device, from the previous step's samples."""
    engine = make_engine("llama", policy=policy, max_batch_size=6, max_num_batched_tokens=24,
                         async_scheduling=step_ahead)  # fmt: skip
    assert engine.runner.graphs is not None
    rng = random.Random(11)
    workload = [(tuple(rng.randrange(500) for _ in range(rng.randint(1, 40))),
                 rng.randint(1, 24), rng.randint(0, 10)) for _ in range(12)]  # fmt: skip
    check(engine, workload, reference, "llama")
    if policy in ("baton", "static"):
        padded = [n for n in eager_graphs if n not in batch_buckets(6)]
        assert padded, "no decode step needed padding rows"


def test_padding_never_writes_a_request_page(make_engine, eager_graphs):
    """Padding rows write only the scratch page (which starts as NaN: none of it reaches a real
    row), and every pool page stays as the requests left it."""
    engine = make_engine("llama", max_batch_size=4, page_size=16)
    for i, prompt in enumerate(([1, 2, 3], [4, 5, 6, 7, 8])):
        engine.add_request({"prompt_token_ids": prompt}, _greedy(5), request_id=str(i))
    engine.step()  # both prefilled; the next steps decode 2 rows in bucket 2, none padded
    storage = engine.cache.storage
    scratch = engine.cache.num_pages
    storage[scratch] = float("nan")
    before = storage[:scratch].clone()
    engine.add_request({"prompt_token_ids": [9]}, _greedy(3), request_id="2")
    while engine.scheduler.has_work():
        engine.step()
    assert 3 in eager_graphs  # three rows ran in bucket 4: one padding row
    # layer 0's K/V come from the embedding alone (deeper layers of a padding row may attend to
    # the NaN rest of the page on backends that read whole pages: padding output is discarded)
    assert not storage[scratch, 0, :, 0].isnan().any(), "padding did not write the scratch page"
    assert not storage[:scratch].isnan().any()
    untouched = ~(before != storage[:scratch]).flatten(1).any(1)
    assert untouched.sum() >= scratch - 3  # only the three requests' own pages changed


def test_cache_sizes_the_scratch_page_out_of_the_budget():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4, dtype=torch.float32)
    plain = KVCache.from_budget(spec, spec.bytes_per_page * 5)
    padded = KVCache.from_budget(spec, spec.bytes_per_page * 5, scratch_pages=1)
    assert (plain.num_pages, plain.storage.shape[0]) == (5, 5)
    assert (padded.num_pages, padded.storage.shape[0]) == (4, 5)
    with pytest.raises(ValueError, match="scratch page"):
        KVCache.from_budget(spec, spec.bytes_per_page, scratch_pages=1)


def test_graphs_refuse_a_cache_without_a_scratch_page():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4, dtype=torch.float32)
    backend = backend_class("torch")()
    with pytest.raises(ValueError, match="scratch page"):
        DecodeGraphs(lambda *args: None, KVCache(spec, 4), backend, 4, 16, "eager")


def _greedy(max_tokens: int):
    from baton_paged.sampling_params import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens)
