"""Every backend equals a naive float64 attention on random ragged batches over shuffled pages."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
from paged_batch import KINDS, make_batch, naive_attention, random_lengths
from threads import torch_threads

from baton_paged.attention import AttentionRequirements, create_backend
from baton_paged.attention.cpu_extension import cpu_kernels
from baton_paged.attention.registry import BACKENDS, backend_class

TOLERANCE = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}
HEADS = {"gqa": (8, 2), "mha": (4, 4)}
HEAD_DIM = 32


def check_backend(
    name, kind, heads, page_size, dtype, device, seed=0, head_dim=HEAD_DIM, max_context=None
):
    num_heads, num_kv_heads = HEADS[heads] if isinstance(heads, str) else heads
    req = AttentionRequirements(
        torch.device(device), dtype, page_size, head_dim, num_heads, num_kv_heads
    )
    reason = backend_class(name).unsupported_reason(req)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    rng = np.random.default_rng(seed)
    max_context = max_context or min(max(3 * page_size, 40), 600)
    query_lens, context_lens = random_lengths(kind, 6, max_context, rng)
    backend = create_backend(name, req)
    batch = make_batch(
        query_lens,
        context_lens,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
        device=device,
        seed=seed,
        backend=backend,
    )
    scale = head_dim**-0.5
    out = backend.forward(batch.query, batch.key, batch.value, batch.cache, 0, batch.meta, scale)
    assert out.shape == batch.query.shape and out.dtype == dtype
    expected = naive_attention(batch, scale)
    torch.testing.assert_close(out.double().cpu(), expected.cpu(), **TOLERANCE[dtype])


@pytest.fixture(params=[True, False], ids=["tiles", "vectors"])
def prompt_tiles(request):
    """The cpu_paged kernel with its prompt tiles on (bfloat16 on AMX tiles: amx_attention.h;
    float32 on AVX-512 register tiles: float_tiles.h; skipped where the CPU or build has none),
    then with every item on its vector maths."""
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("the attention kernels cannot be built here")
    params = request.node.callspec.params
    dtype, head_dim = params.get("dtype", torch.bfloat16), params.get("head_dim", 64)
    if request.param and params.get("kind") == "decode":
        pytest.skip("decode rows never reach the tiles")
    if request.param and dtype == torch.bfloat16:
        if not kernels.amx_attention_available():
            pytest.skip("no AMX tiles on this CPU or build")
        if head_dim % 32:
            pytest.skip("bfloat16 tiles take head sizes of 32k")
    if request.param and dtype == torch.float32:
        if not kernels.float_tiles_available():
            pytest.skip("no AVX-512 build here")
        if head_dim % 16:
            pytest.skip("float32 tiles take head sizes of 16k")
    if request.param and dtype not in (torch.bfloat16, torch.float32):
        pytest.skip(f"no tiles for {dtype}")
    with tiles_switched(kernels, request.param):
        yield request.param


@contextlib.contextmanager
def tiles_switched(kernels, enabled: bool):
    """The kernel's prompt tiles switched on or off inside the block, restored after it."""
    previous = kernels.use_prompt_tiles(enabled)
    try:
        yield
    finally:
        kernels.use_prompt_tiles(previous)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("page_size", [1, 16, 256])
@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["cpu_paged", "torch", "padded"])
def test_cpu_backend_matches_naive_attention(name, kind, heads, page_size, dtype):
    check_backend(name, kind, heads, page_size, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("page_size", [16, 32, 80])
@pytest.mark.parametrize("heads", [(8, 2), (9, 3), (4, 4)], ids=["gqa4", "gqa3", "mha"])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_paged_prompts_on_tiles_and_vectors(kind, heads, page_size, dtype, prompt_tiles):
    """Head size 64 on both of the kernel's paths: prompt tiles of 16 tokens (48 rows a KV head
    at 3 query heads a KV head, 16 at one) on tiles (bfloat16: AMX; float32: chunks of 32 rows
    in two vectors, the last one of up to 16 in one), decode rows on the vector math. Pages of
    80 tokens make blocks of 240 keys (96 on AMX tiles, rounded to 32) that start mid-page."""
    check_backend("cpu_paged", kind, heads, page_size, dtype, "cpu", seed=11, head_dim=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 256])
def test_cpu_paged_tiles_on_one_thread_walk_every_head_of_each_item(head_dim, dtype, prompt_tiles):
    """On one thread, a batch of at least four items keeps each item's KV heads together
    (plan_items splits them by head only when threads would idle), so the tiles walk several
    heads an item, locating keys and restarting chunks per head; head sizes of one step of 32
    dims and of eight (on AMX: two groups of four 16-dim slices for the values)."""
    with torch_threads(1):
        check_backend(
            "cpu_paged", "prefill_with_context", (6, 3), 16, dtype, "cpu", seed=6,
            head_dim=head_dim, max_context=200,
        )  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", ["cpu_paged", "torch", "padded"])
def test_cpu_backend_on_more_random_mixed_batches(name, seed):
    check_backend(name, "mixed", "gqa", 16, torch.float64, "cpu", seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [20, 8, 16, 48, 96, 128])
def test_cpu_paged_kernel_on_head_sizes_off_and_on_its_vector_widths(head_dim, dtype, prompt_tiles):
    """Each of the kernel's three maths: head sizes that are not a multiple of 8 take its scalar
    loops, 8 its 8-lane vectors, multiples of 16 its 16-lane ones; 48 and 96 also run the values'
    leftover 16-lane slices beside (96) or instead of (48) whole 64-lane groups (whose bfloat16
    sums run in pairs' order until finished). bfloat16 keys lie in pairs of dims: the 16-lane
    path reads them so, the others unpaired."""
    check_backend("cpu_paged", "mixed", "gqa", 16, dtype, "cpu", seed=3, head_dim=head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [1, 2, 3, 5, 6, 8])
def test_cpu_paged_kernel_on_every_query_group_size(group, dtype, prompt_tiles):
    """The 16-lane path weighs the values for up to four query heads of a KV head at once (a
    token's rows); groups of 2 and 3 take its narrower variants, 5, 6 and 8 a four followed by
    the rest, 1 its one-row loop (two keys at a time); and scores keys for up to four rows at
    once likewise. Mixed batches: prompts' tiles hold several tokens, whose rows see different
    keys."""
    heads = (2 * group, 2)
    check_backend("cpu_paged", "mixed", heads, 16, dtype, "cpu", seed=group, head_dim=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["decode", "prefill_with_context", "mixed"])
def test_cpu_paged_kernel_across_several_softmax_blocks(kind, dtype, prompt_tiles):
    """Contexts up to 700 keys on 16-token pages: several of the kernel's 256-key softmax blocks
    and a ragged last one, on its 16-lane path (scores sixteen keys at a time) and on tiles, where
    a tile's first chunks of rows may see none of a block its later ones see."""
    check_backend("cpu_paged", kind, "gqa", 16, dtype, "cpu", seed=7, max_context=700)


def test_cpu_paged_kernel_on_one_long_prompt_split_into_tiles():
    """One request's 300 new tokens after 200 of context: 19 tiles of the same request, each with
    its own causal limit, across threads."""
    req = AttentionRequirements(torch.device("cpu"), torch.float64, 16, HEAD_DIM, 8, 2)
    backend = create_backend("cpu_paged", req)
    batch = make_batch(
        [300],
        [500],
        num_heads=8,
        num_kv_heads=2,
        head_dim=HEAD_DIM,
        page_size=16,
        dtype=torch.float64,
        backend=backend,
    )
    out = backend.forward(batch.query, batch.key, batch.value, batch.cache, 0, batch.meta, 0.1)
    torch.testing.assert_close(out, naive_attention(batch, 0.1), **TOLERANCE[torch.float64])


@pytest.mark.parametrize(
    ("dtype", "query_lens", "context_lens", "by_torch", "by_torch_on_tiles"),
    [
        # a whole prompt, a decode row, 40 new tokens after 300 cached, a short prompt, a whole
        # prompt of 1.13M (query, key) pairs: from 4096 pairs on; where prompt tiles run on AMX
        # tiles, only whole prompts from 2^20 pairs (~1450 tokens)
        (
            torch.bfloat16, [96, 1, 40, 20, 1500], [96, 300, 340, 20, 1500],
            [True, False, True, False, True], [False, False, False, False, True],
        ),
        # 600 new tokens after 1200 cached: a mask of 1.08M entries, so in two pieces of rows
        # (on AMX tiles the kernel's: new tokens after cached ones stay with the tiles)
        (torch.bfloat16, [600], [1800], [True], [False]),
        # float32 goes only as a whole prompt of ~1M (query, key) pairs: 1500 tokens do, 1000 do
        # not, nor do 600 after 1200 cached (1.08M pairs); on register tiles only from 4M pairs
        # (~2900 tokens)
        (
            torch.float32, [1500, 1000, 600, 1], [1500, 1000, 1800, 64],
            [True, False, False, False], [False, False, False, False],
        ),
    ],
    ids=["bfloat16", "bfloat16-pieces", "float32"],
)  # fmt: skip
def test_cpu_paged_hands_requests_of_many_new_tokens_to_torch_attention(
    dtype, query_lens, context_lens, by_torch, by_torch_on_tiles, prompt_tiles
):
    """A request whose new tokens see enough keys is attended by torch's own attention on its
    context gathered from the pages (paged_attention.cpp's ``by_torch``): its rows equal
    ``scaled_dot_product_attention`` on that context to the bit, the mask aligned bottom-right
    where earlier tokens are cached (in pieces of rows where that mask would be large, each
    against the keys its rows see); the other rows of the same call stay the kernel's. Every row
    matches naive attention."""
    heads, kv_heads, dim, scale = 9, 3, 64, 0.125
    req = AttentionRequirements(torch.device("cpu"), dtype, 16, dim, heads, kv_heads)
    backend = create_backend("cpu_paged", req)
    batch = make_batch(
        query_lens, context_lens, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim,
        page_size=16, dtype=dtype, seed=5, backend=backend,
    )  # fmt: skip
    out = backend.forward(batch.query, batch.key, batch.value, batch.cache, 0, batch.meta, scale)
    torch.testing.assert_close(out.double(), naive_attention(batch, scale), **TOLERANCE[dtype])
    starts = np.cumsum([0, *query_lens])
    expected_by_torch = by_torch_on_tiles if prompt_tiles else by_torch
    for b, torch_rows in enumerate(expected_by_torch):
        expected = torch.cat(list(torch_pieces(batch, b, scale)))
        assert torch.equal(out[starts[b] : starts[b + 1]], expected) == torch_rows, b


def same_bits_with_and_without_tiles(kernels, backend, batch, dtype) -> list[bool]:
    """Per token: whether the kernel gives it the same bits with its prompt tiles on as off (both
    checked against naive attention first)."""
    outs = {}
    for tiles in (True, False):
        with tiles_switched(kernels, tiles):
            outs[tiles] = backend.forward(
                batch.query, batch.key, batch.value, batch.cache, 0, batch.meta, 0.125
            )
        torch.testing.assert_close(
            outs[tiles].double(), naive_attention(batch, 0.125), **TOLERANCE[dtype]
        )
    return (outs[True] == outs[False]).all(dim=-1).all(dim=-1).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_paged_prompt_tiles_take_the_tiles_and_decode_rows_the_vector_math(dtype):
    """With tiles on, a prompt's items run on them (other bits than the vector math's: bfloat16's
    weights rounded on AMX, float32's sums in another order; both near naive attention), while
    decode rows and a prompt's last item of fewer rows than a chunk's vector holds keep the vector
    math's bits. Items here: bfloat16's of 16 tokens, float32's of 32 (SmolLM2's group of 3 makes
    16 tokens a chunk and a half of rows)."""
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("the attention kernels cannot be built here")
    available = {
        torch.bfloat16: kernels.amx_attention_available,
        torch.float32: kernels.float_tiles_available,
    }
    if not available[dtype]():
        pytest.skip(f"no {dtype} tiles on this CPU or build")
    req = AttentionRequirements(torch.device("cpu"), dtype, 16, 64, 9, 3)
    backend = create_backend("cpu_paged", req)
    batch = make_batch(
        [1, 36, 1], [200, 36, 33], num_heads=9, num_kv_heads=3, head_dim=64, page_size=16,
        dtype=dtype, seed=2, backend=backend,
    )  # fmt: skip
    same = same_bits_with_and_without_tiles(kernels, backend, batch, dtype)
    # tokens: decode, the prompt's first 32 tokens (items of 48 or 96 rows a KV head; its first
    # token sees one key of weight 1, the same bits either way), its last 4 (12 rows), decode
    assert same[:1] + same[33:] == [True] * 6
    assert same[1:33].count(False) >= 30


def float_tiles_or_skip():
    kernels = cpu_kernels()
    if kernels is None or not kernels.float_tiles_available():
        pytest.skip("no float32 prompt tiles on this CPU or build")
    return kernels


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("heads", [(8, 4), (9, 3), (4, 4)], ids=["gqa2", "gqa3", "mha"])
def test_cpu_paged_float_tiles_take_longer_items_on_long_contexts(heads, threads):
    """float32 tile items: 16 tokens, 32 at odd groups (whole chunks of 32 rows), and up to 128
    for a request whose context is 512 keys or more while the call keeps 2 items a thread: a whole
    prompt of 1100 tokens (items of 128, the last of 76), 200 new tokens after 500 cached, a short
    prompt and a decode row beside them, on two threads and on one (other item sizes)."""
    kernels = float_tiles_or_skip()
    num_heads, num_kv_heads = heads
    req = AttentionRequirements(torch.device("cpu"), torch.float32, 16, 64, *heads)
    backend = create_backend("cpu_paged", req)
    batch = make_batch(
        [1100, 200, 40, 1], [1100, 700, 40, 300], num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=64, page_size=16, dtype=torch.float32, seed=8, backend=backend,
    )  # fmt: skip
    with torch_threads(threads), tiles_switched(kernels, True):
        out = backend.forward(
            batch.query, batch.key, batch.value, batch.cache, 0, batch.meta, 0.125
        )
    torch.testing.assert_close(
        out.double(), naive_attention(batch, 0.125), **TOLERANCE[torch.float32]
    )


def test_cpu_paged_float_tiles_keep_an_odd_group_s_chunks_whole():
    """Without grouping (one query head a KV head), float32 tile items take 32 tokens: a 20-token
    prompt is one item of 20 rows a KV head, all of it on the tiles (16-token items would leave
    its last 4 tokens, 4 rows, to the vector maths)."""
    kernels = float_tiles_or_skip()
    req = AttentionRequirements(torch.device("cpu"), torch.float32, 16, 64, 4, 4)
    backend = create_backend("cpu_paged", req)
    batch = make_batch(
        [20], [20], num_heads=4, num_kv_heads=4, head_dim=64, page_size=16, dtype=torch.float32,
        seed=9, backend=backend,
    )  # fmt: skip
    same = same_bits_with_and_without_tiles(kernels, backend, batch, torch.float32)
    assert same[16:].count(False) >= 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
def test_cpu_paged_ignores_stale_slots_past_each_context(kind, dtype, prompt_tiles):
    """Slots of a request's last page past its context (and pages nobody owns) hold NaN: no row
    reads them, on either path (on AMX tiles, keys past the context weigh zero and their values
    are laid out as zeros: a zero weight times a NaN would be NaN; float32 tiles score a block's
    last group of eight keys with its first key's K where the context ends inside it)."""
    num_heads, num_kv_heads, page_size = 9, 3, 16
    rng = np.random.default_rng(4)
    query_lens, context_lens = random_lengths(kind, 6, 300, rng)
    req = AttentionRequirements(torch.device("cpu"), dtype, page_size, 64, num_heads, num_kv_heads)
    backend = create_backend("cpu_paged", req)
    batch = make_batch(
        query_lens, context_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=64,
        page_size=page_size, dtype=dtype, seed=4, backend=backend,
    )  # fmt: skip
    used = {
        int(batch.meta.block_table[row, t // page_size]) * page_size + t % page_size
        for row, length in enumerate(context_lens)
        for t in range(length)
    }
    stale = [slot for slot in range(batch.cache.key(0).shape[0] * page_size) if slot not in used]
    nan = torch.full((len(stale), num_kv_heads, 64), float("nan"), dtype=dtype)
    backend.write_slots(batch.cache, 0, torch.tensor(stale), nan, nan)  # in the pages' layout
    out = backend.forward(batch.query, batch.key, batch.value, batch.cache, 0, batch.meta, 0.125)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), naive_attention(batch, 0.125), **TOLERANCE[dtype])


def torch_pieces(batch, b: int, scale: float):
    """Request b's rows by ``scaled_dot_product_attention`` as ``attend_by_torch`` calls it: a
    whole prompt causal, else pieces of rows of at most 2**20 mask entries (its kMaskEntries; at
    least 32 rows), each with its bottom-right mask over the keys it sees."""
    start = sum(batch.meta.query_lens[:b])
    q_len, context = batch.meta.query_lens[b], batch.meta.context_lens[b]
    piece = q_len if q_len == context else max(32, 2**20 // context)
    for row in range(0, q_len, piece):
        rows = min(piece, q_len - row)
        keys = context - q_len + row + rows
        seen = torch.ones(rows, keys, dtype=torch.bool).tril(keys - rows)
        mask = None if q_len == context else seen
        heads_first = lambda t: t.unsqueeze(0).transpose(1, 2)  # noqa: E731
        yield torch.nn.functional.scaled_dot_product_attention(
            heads_first(batch.query[start + row : start + row + rows]),
            heads_first(batch.full_keys[b][:keys]), heads_first(batch.full_values[b][:keys]),
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
        )[0].transpose(0, 1)  # fmt: skip


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's CPU interpreter only"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("kind", KINDS)
def test_triton_kernel_under_the_interpreter(kind, heads, page_size, dtype):
    """The Triton kernel's logic on CPU tensors (test_triton_backend.py runs this file with
    TRITON_INTERPRET=1; the interpreter computes in numpy, which has no bfloat16); its CUDA run,
    bfloat16 included, is the gpu test below."""
    check_backend("triton", kind, heads, page_size, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_gpu_backend_matches_naive_attention(name, kind, heads, page_size, dtype):
    check_backend(name, kind, heads, page_size, dtype, "cuda")
