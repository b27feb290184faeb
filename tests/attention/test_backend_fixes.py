"""GPU backend rules the CPU can check: broken optional packages make a backend unavailable
instead of crashing the first step, xformers' dtype and compute-capability rules, the GQA decode
window for torch's bundled FlashAttention, the packed FlashAttention form's key layout and
xformers' mask built once per step. Fake modules, a reference of the varlen kernel's contract and
a faked capability stand in for a GPU."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from paged_batch import KINDS, make_batch, naive_attention, random_lengths

from baton_paged.attention import flash_backend, xformers_backend
from baton_paged.attention.base import AttentionRequirements
from baton_paged.attention.metadata import AttentionMetadata

CUDA_BF16 = AttentionRequirements(torch.device("cuda"), torch.bfloat16, 256, 64, 8, 2)


def clear_import_caches() -> None:
    flash_backend._paged_varlen_kernel.cache_clear()
    flash_backend._fa4_imports.cache_clear()
    xformers_backend._import_problem.cache_clear()


@pytest.fixture
def fresh_imports():
    clear_import_caches()
    yield
    clear_import_caches()


@pytest.fixture
def capability(monkeypatch):
    def set_to(major, minor):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    set_to(9, 0)
    return set_to


def test_a_flash_attn_without_its_varlen_kernel_is_not_chosen(
    monkeypatch, fresh_imports, capability
):
    """flash-attn 4 alone installs only ``flash_attn.cute``: the package imports, the kernel
    does not. The backend must fall to torch's bundled kernel or say it has none."""
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    kernel = flash_backend._paged_varlen_kernel()
    assert kernel is not flash_backend._flash_attn_package
    reason = flash_backend.FlashAttnBackend.unsupported_reason(CUDA_BF16)
    assert reason is None if kernel is not None else "flash-attn package" in reason


def test_an_importable_flash_attn_is_used(monkeypatch, fresh_imports):
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    assert flash_backend._paged_varlen_kernel() is flash_backend._flash_attn_package


@pytest.mark.parametrize(
    "broken",
    [
        None,  # import raises ImportError: not installed
        types.ModuleType("xformers"),  # a module, not a package: xformers.ops cannot import
    ],
)
def test_a_missing_or_broken_xformers_is_unavailable(
    monkeypatch, fresh_imports, capability, broken
):
    monkeypatch.setitem(sys.modules, "xformers", broken)
    reason = xformers_backend.XformersBackend.unsupported_reason(CUDA_BF16)
    assert reason is not None and "xformers" in reason


@pytest.mark.parametrize(
    ("dtype", "cap", "problem"),
    [
        (torch.float32, (9, 0), None),
        (torch.float32, (10, 0), "no float32 operator on compute capability 10.0"),
        (torch.float32, (12, 0), "no float32 operator"),
        (torch.bfloat16, (7, 5), "8.0+ for bfloat16"),
        (torch.bfloat16, (12, 0), None),
        (torch.float16, (7, 5), None),
    ],
)
def test_xformers_dtype_rules_follow_its_operators(dtype, cap, problem):
    found = xformers_backend._dtype_problem(dtype, cap)
    assert found is None if problem is None else problem in found


def test_bundled_flash_decode_uses_no_window_so_fa2_takes_its_gqa_path(monkeypatch):
    calls = []
    varlen = types.ModuleType("torch.nn.attention.varlen")
    varlen.varlen_attn = lambda *args, **kwargs: calls.append(kwargs["window_size"])
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", varlen)
    table = np.zeros((2, 1), dtype=np.int32)
    decode = AttentionMetadata.build([1, 1], [5, 9], table, 16)
    prefill = AttentionMetadata.build([3, 1], [5, 9], table, 16)
    for meta in (decode, prefill):
        pages = torch.empty(1, 16, 2, 8)
        flash_backend._torch_bundled(torch.empty(meta.num_tokens, 8, 8), pages, pages, meta, 1.0)
    assert calls == [(-1, -1), (-1, 0)]


def test_xformers_mask_is_built_once_per_step(monkeypatch):
    built = []
    mask_class = types.SimpleNamespace(from_seqlens=lambda **kw: built.append(kw) or object())
    fmha = types.SimpleNamespace(
        attn_bias=types.SimpleNamespace(BlockDiagonalCausalWithOffsetPaddedKeysMask=mask_class)
    )
    backend = xformers_backend.XformersBackend()
    table = np.zeros((2, 1), dtype=np.int32)
    step, next_step = (AttentionMetadata.build([1, 1], [5, 9], table, 16) for _ in range(2))
    first = backend._mask(fmha, step, 16, "cpu")
    assert all(backend._mask(fmha, step, 16, "cpu") is first for _ in range(5))  # more layers
    assert backend._mask(fmha, next_step, 16, "cpu") is not first
    assert len(built) == 2


def reference_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, *,
                           scale, seqused_k):  # fmt: skip
    """FA2's documented varlen semantics in plain torch: request ``b``'s keys start at
    ``cu_k[b]`` and ``seqused_k[b]`` of them are used; causal is bottom-right aligned; query head
    ``h`` reads KV head ``h // (Hq / Hkv)``."""
    assert dropout == 0.0 and not debug
    out = torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    for b in range(len(cu_q) - 1):
        queries = q[cu_q[b] : cu_q[b + 1]]
        used = int(seqused_k[b])
        assert queries.shape[0] <= max_q and used <= max_k and cu_k[b] + used <= k.shape[0]
        keys = k[cu_k[b] : cu_k[b] + used].repeat_interleave(group, dim=1)
        values = v[cu_k[b] : cu_k[b] + used].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        if causal:
            visible = (
                torch.arange(used)[None, :]
                <= used - len(queries) + torch.arange(len(queries))[:, None]
            )
            scores = scores.masked_fill(~visible, float("-inf"))
        out[cu_q[b] : cu_q[b + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
    return out, None, None, None, None


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("page_size", [1, 16])
def test_packed_flash_lays_out_keys_as_the_varlen_kernel_reads_them(
    monkeypatch, kind, page_size, seed
):
    """The packed form's part (gathered rows, key offsets, seqused_k, causality per step) run
    against a reference of the kernel's contract; the kernel itself runs in the gpu tests."""
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args[8])
        return reference_flash_varlen(*args, **kwargs)

    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", kernel)
    query_lens, context_lens = random_lengths(kind, 5, 70, np.random.default_rng(seed))
    batch = make_batch(query_lens, context_lens, num_heads=8, num_kv_heads=2, head_dim=16,
                       page_size=page_size, dtype=torch.float64, seed=seed)  # fmt: skip
    backend = flash_backend.PackedFlash()
    for _ in range(2):  # a second layer of the same step reuses the step's offsets
        out = backend.forward(batch.query, batch.key, batch.value, batch.cache, 0, batch.meta, 0.3)
        torch.testing.assert_close(out, naive_attention(batch, 0.3), atol=1e-10, rtol=1e-10)
    assert calls == [batch.meta.max_query_len > 1] * 2


def test_flash_picks_the_packed_form_for_pages_its_in_place_kernel_cannot_read():
    kernel_reads_in_place = flash_backend._paged_varlen_kernel() is not None
    paged_16 = flash_backend.FlashAttnBackend.create(
        AttentionRequirements(torch.device("cuda"), torch.bfloat16, 16, 64, 8, 2)
    )
    paged_256 = flash_backend.FlashAttnBackend.create(CUDA_BF16)
    assert isinstance(paged_16, flash_backend.PackedFlash) and not paged_16.graph_safe
    expected = flash_backend.PagedFlash if kernel_reads_in_place else flash_backend.PackedFlash
    assert type(paged_256) is expected


NO_OPERATOR = """No operator found for `memory_efficient_attention_forward` with inputs:
     query       : shape=(1, 3, 1, 2, 64) (torch.bfloat16)
     attn_bias   : <class 'BlockDiagonalCausalWithOffsetPaddedKeysMask'>
`fa3F@0.0.0` is not supported because:
    xFormers wasn't build with CUDA support
    operator wasn't built - see `python -m xformers.info` for more info
`cutlassF-pt` is not supported because:
    xFormers wasn't build with CUDA support
"""


def test_an_xformers_without_a_working_operator_is_unavailable(monkeypatch, capability):
    """xformers 0.0.35 imports on torch 2.11, but its library (built for 2.10) does not load and
    every operator refuses: the backend must say so, naming the reason all operators share."""

    def refuse(*args, **kwargs):
        raise NotImplementedError(NO_OPERATOR)

    mask_class = types.SimpleNamespace(from_seqlens=lambda **kw: object())
    fmha = types.SimpleNamespace(
        memory_efficient_attention=refuse,
        attn_bias=types.SimpleNamespace(BlockDiagonalCausalWithOffsetPaddedKeysMask=mask_class),
    )
    ops = types.ModuleType("xformers.ops")
    ops.fmha = fmha
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    xformers_backend._operator_problem.cache_clear()
    try:
        reason = xformers_backend._operator_problem(torch.device("cpu"), torch.bfloat16, 64)
    finally:
        xformers_backend._operator_problem.cache_clear()
    assert (
        reason
        == "xformers has no operator that runs here (xFormers wasn't build with CUDA support)"
    )


def reference_fa4_paged(q, k_pages, v_pages, *, cu_seqlens_q, max_seqlen_q, seqused_k, page_table,
                        softmax_scale, causal):  # fmt: skip
    """FA4's documented varlen call over a page table, in plain torch: request ``b``'s keys are
    the first ``seqused_k[b]`` slots of its pages in table order; causal is bottom-right aligned;
    returns ``(out, lse)``."""
    page_size = k_pages.shape[1]
    cu_k, rows = [0], []
    for b, used in enumerate(seqused_k.tolist()):
        pages = page_table[b, : -(-used // page_size)].long()
        rows.append((k_pages[pages].flatten(0, 1)[:used], v_pages[pages].flatten(0, 1)[:used]))
        cu_k.append(cu_k[-1] + used)
    keys, values = (torch.cat(part) for part in zip(*rows, strict=True))
    max_k = int(seqused_k.max())
    args = (q, keys, values, cu_seqlens_q, cu_k, max_seqlen_q, max_k, 0.0, causal, False)
    out, *_ = reference_flash_varlen(*args, scale=softmax_scale, seqused_k=seqused_k)
    return out, None


@pytest.fixture
def fake_fa4(monkeypatch, fresh_imports, capability):
    """A ``flash_attn.cute`` whose kernel is FA4's contract in plain torch, recording its calls."""
    calls = []
    cute = types.ModuleType("flash_attn.cute")

    def varlen(*args, **kwargs):
        calls.append(kwargs)
        return reference_fa4_paged(*args, **kwargs)

    cute.flash_attn_varlen_func = varlen
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    return calls


def test_fa4_reads_the_engines_16_token_pages_in_place(fake_fa4):
    req = AttentionRequirements(torch.device("cuda"), torch.bfloat16, 16, 64, 8, 2)
    assert flash_backend.FlashAttnBackend.page_size_for(req) == 16
    backend = flash_backend.FlashAttnBackend.create(req)
    assert isinstance(backend, flash_backend.PagedFlash) and backend.graph_safe
    assert backend._kernel is flash_backend._flash_attn_4
    assert flash_backend.FlashAttnBackend.unsupported_reason(req) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"head_dim": 256}, "head dim of 8-128"),
        ({"dtype": torch.float32}, "float16 or bfloat16"),
    ],
)
def test_fa4_is_not_used_outside_its_shapes(fake_fa4, change, reason):
    from dataclasses import replace

    req = replace(
        AttentionRequirements(torch.device("cuda"), torch.bfloat16, 16, 64, 8, 2), **change
    )
    assert reason in flash_backend._fa4_reason(req)
    assert flash_backend._in_place_kernel(req) is not flash_backend._flash_attn_4


def test_fa4_is_not_used_before_hopper(fake_fa4, capability):
    capability(8, 0)
    req = AttentionRequirements(torch.device("cuda"), torch.bfloat16, 16, 64, 8, 2)
    assert "9.x-11.x" in flash_backend._fa4_reason(req)
    assert flash_backend._in_place_kernel(req) is None
    assert isinstance(flash_backend.FlashAttnBackend.create(req), flash_backend.PackedFlash)


def test_a_broken_flash_attn_4_is_unavailable(monkeypatch, fresh_imports, capability):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # import raises
    req = AttentionRequirements(torch.device("cuda"), torch.bfloat16, 16, 64, 8, 2)
    assert "flash-attn-4" in flash_backend._fa4_reason(req)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", KINDS)
def test_fa4_gets_the_page_table_and_lengths_as_its_contract_reads_them(fake_fa4, kind, seed):
    """The backend's part of the FA4 call (page table, seqused_k, causality per step) against a
    reference of the kernel's contract; the kernel itself runs in the gpu tests."""
    query_lens, context_lens = random_lengths(kind, 5, 70, np.random.default_rng(seed))
    batch = make_batch(query_lens, context_lens, num_heads=8, num_kv_heads=2, head_dim=16,
                       page_size=16, dtype=torch.float64, seed=seed)  # fmt: skip
    backend = flash_backend.PagedFlash(flash_backend._flash_attn_4)
    out = backend.forward(batch.query, batch.key, batch.value, batch.cache, 0, batch.meta, 0.3)
    torch.testing.assert_close(out, naive_attention(batch, 0.3), atol=1e-10, rtol=1e-10)
    (call,) = fake_fa4
    assert (
        call["page_table"] is batch.meta.block_table and call["seqused_k"] is batch.meta.seqused_k
    )
    assert call["causal"] == (batch.meta.max_query_len > 1) and "cu_seqlens_k" not in call
