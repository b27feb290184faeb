"""The Triton paged-attention kernel the ``triton`` backend launches (imported only when used).

Program ``(request * tiles + tile, kv_head)``: rows are the (token, query head) pairs of
``BLOCK_T`` new tokens and the ``GROUP`` query heads sharing ``kv_head``, padded to ``BLOCK_R``
(``tl.dot`` wants at least 16). Keys come a page at a time (``BLOCK_N`` = page size) from the
pages the block table lists; each row keeps a running max and sum (online softmax).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_attention_kernel(
    query, key_cache, value_cache, out,
    block_table, cu_seqlens_q, context_lens,
    scale, tiles,
    q_stride_t, q_stride_h,
    c_stride_page, c_stride_slot, c_stride_head,
    o_stride_t, o_stride_h,
    table_stride,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    request = tl.program_id(0) // tiles
    tile = tl.program_id(0) % tiles
    kv_head = tl.program_id(1)
    q_start = tl.load(cu_seqlens_q + request)
    q_len = tl.load(cu_seqlens_q + request + 1) - q_start
    context = tl.load(context_lens + request)
    if tile * BLOCK_T >= q_len:
        return

    rows = tl.arange(0, BLOCK_R)
    token = tile * BLOCK_T + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_T * GROUP) & (token < q_len)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_ptrs = query + (q_start + token)[:, None] * q_stride_t + head[:, None] * q_stride_h
    q = tl.load(q_ptrs + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    limit = context - q_len + token  # the last key each row may see
    num_keys = context - q_len + tl.minimum(q_len, (tile + 1) * BLOCK_T)
    slots = tl.arange(0, BLOCK_N)
    running_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for page_index in range(0, tl.cdiv(num_keys, BLOCK_N)):
        page = tl.load(block_table + request * table_stride + page_index).to(tl.int64)
        positions = page_index * BLOCK_N + slots
        kv_ptrs = page * c_stride_page + slots[:, None] * c_stride_slot + kv_head * c_stride_head
        kv_mask = (positions < num_keys)[:, None] & dim_ok[None, :]
        k = tl.load(key_cache + kv_ptrs + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(value_cache + kv_ptrs + dims[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        visible = positions[None, :] <= limit[:, None]
        scores = tl.where(visible, scores * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        # rows that have seen no key yet keep -inf; exp(-inf - -inf) would be NaN, so use 0
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        weights = tl.exp(scores - safe_max[:, None])
        correction = tl.exp(running_max - safe_max)
        running_sum = running_sum * correction + tl.sum(weights, 1)
        if IEEE:
            update = tl.dot(weights.to(v.dtype), v, input_precision="ieee")
        else:
            update = tl.dot(weights.to(v.dtype), v)
        acc = acc * correction[:, None] + update
        running_max = new_max

    result = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
    o_ptrs = out + (q_start + token)[:, None] * o_stride_t + head[:, None] * o_stride_h
    tl.store(o_ptrs + dims[None, :], result.to(out.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])  # fmt: skip
