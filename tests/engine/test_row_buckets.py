"""Row buckets: every row count a oneDNN-packed linear runs at is one of a few, padding changes
no output, and the kernels for them are built at start-up. float32 runs here on oneDNN too (the
``onednn`` fixture, conftest.py): where the column-block kernel takes it, it pads nothing."""

from __future__ import annotations

import pytest
import torch
from test_llama_executor import load, prefill_logits

from baton_paged import LLM, SamplingParams
from baton_paged.attention import attach
from baton_paged.model import llama_executor, packed_linear
from baton_paged.model.decoder_kernels import DECODER_KERNELS
from baton_paged.model.packed_linear import PackedLinear, warm_up
from baton_paged.model.row_buckets import (
    LARGEST,
    ROW_BUCKETS,
    bucket_for,
    buckets_up_to,
    row_chunks,
)


def test_every_row_count_gets_the_smallest_bucket_that_holds_it():
    for rows in range(1, LARGEST + 1):
        bucket = bucket_for(rows)
        index = ROW_BUCKETS.index(bucket)
        assert bucket >= rows and (index == 0 or ROW_BUCKETS[index - 1] < rows)
        assert bucket <= 2 * rows and (rows <= 64 or bucket < rows + 32)
    assert buckets_up_to(20) == (1, 2, 4, 8, 16, 24)
    assert buckets_up_to(10_000) == ROW_BUCKETS


def test_chunks_cover_the_rows_in_order_at_most_the_largest_bucket_each():
    for rows in (1, LARGEST, LARGEST + 1, 3 * LARGEST + 7):
        chunks = row_chunks(rows)
        assert chunks[0][0] == 0 and chunks[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
        assert all(0 < stop - start <= LARGEST for start, stop in chunks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 17, 33, 100, LARGEST + 70])
def test_padded_rows_give_the_kernels_own_answer_for_the_real_rows(rows, dtype, onednn):
    """Against oneDNN called on exactly ``rows`` rows: float32 to the bit; bfloat16 (whose kernel
    may block a row count's tail differently) within its output rounding."""
    weight, bias = torch.randn(96, 64, dtype=dtype), torch.randn(96, dtype=dtype)
    linear = PackedLinear(weight, bias)
    x = torch.randn(rows, 64, dtype=dtype)
    got = linear(x)
    exact = torch.ops.mkldnn._linear_pointwise(x, linear._packed, bias, "none", [], "")
    assert got.shape == (rows, 96) and got.is_contiguous()
    if dtype == torch.float32:
        assert torch.equal(got, exact)
    else:
        torch.testing.assert_close(got, exact, atol=0.05, rtol=0.01)


def test_warm_up_builds_each_weight_shape_once_at_every_bucket(monkeypatch, onednn):
    calls = []
    monkeypatch.setattr(PackedLinear, "_bucketed", lambda self, x: calls.append(x.shape))
    linears = [PackedLinear(torch.randn(96, 64)) for _ in range(3)]  # one shape
    linears.append(PackedLinear(torch.randn(32, 64), torch.randn(32)))  # another: a bias
    linears.append(PackedLinear(torch.randn(96, 64).double()))  # unpacked: nothing to build
    assert warm_up(linears, 20) == 2 * len(buckets_up_to(20))
    assert sorted({shape[0] for shape in calls}) == [1, 2, 4, 8, 16, 24]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_executor_logits_are_the_same_padded_or_not(tiny_model_dir, dtype, monkeypatch, onednn):
    model = load(tiny_model_dir, "llama", dtype)
    prompts = [[5, 17, 300, 2, 9, 44, 100], [7, 8], list(range(30, 63))]  # 42 rows: padded to 48
    with torch.inference_mode():
        executor = llama_executor.LlamaExecutor(model, DECODER_KERNELS.kernels(), 128)
        executor._loop = None  # the Python loop, whose linears bucket_for pads
        attach(model, 128)
        padded = prefill_logits(executor, model, prompts, dtype)
        monkeypatch.setattr(packed_linear, "bucket_for", lambda rows: rows)
        exact = prefill_logits(executor, model, prompts, dtype)
    if dtype == torch.float32:
        assert torch.equal(padded, exact)
    else:
        torch.testing.assert_close(padded, exact, atol=0.1, rtol=0.02)


def mixed_batch_tokens(model_dir) -> list[list[int]]:
    """Greedy tokens of a mixed batch, float32: prompts of several lengths, then decode steps of
    1-5 rows."""
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 17, 90, 2)]
    params = [SamplingParams(temperature=0, max_tokens=12 + 3 * i) for i in range(5)]
    llm = LLM(model_dir, dtype="float32", kv_memory="64MiB", swap_memory="0")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_greedy_tokens_are_the_same_padded_or_not(tiny_model_dir, monkeypatch, onednn):
    """Through the engine's Python layer loop, each row count padded to its bucket, then every
    count run as it is. (The C++ loop pads to the same buckets: test_decoder_loop.py.)"""
    monkeypatch.setattr(llama_executor, "_loop_weights", lambda layers: None)
    padded = mixed_batch_tokens(tiny_model_dir("llama"))
    monkeypatch.setattr(packed_linear, "bucket_for", lambda rows: rows)
    assert mixed_batch_tokens(tiny_model_dir("llama")) == padded
