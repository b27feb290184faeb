"""AttentionMetadata: packing offsets, trimmed block table, and slots that agree with the table."""

import numpy as np
import pytest
import torch

from baton_paged.allocator import slot_mapping
from baton_paged.attention import AttentionMetadata

TABLE = np.array([[7, 2, 9, 0], [4, 0, 0, 0], [1, 8, 0, 0]], dtype=np.int32)


def test_offsets_lengths_and_trimmed_table():
    meta = AttentionMetadata.build([1, 3, 5], [9, 3, 6], TABLE, page_size=4)
    assert meta.cu_seqlens_q.tolist() == [0, 1, 4, 9]
    assert meta.cu_seqlens_k.tolist() == [0, 9, 12, 18]
    assert meta.seqused_k.tolist() == [9, 3, 6]
    assert meta.block_table.tolist() == TABLE[:, :3].tolist()  # 9 tokens need 3 pages of 4
    dtypes = (meta.cu_seqlens_q, meta.cu_seqlens_k, meta.seqused_k, meta.block_table)
    assert all(t.dtype == torch.int32 for t in dtypes)
    assert meta.slot_mapping.dtype == torch.int64
    assert (meta.batch_size, meta.num_tokens, meta.max_query_len, meta.max_context_len) == (
        3,
        9,
        5,
        9,
    )
    assert not meta.is_decode_only


def test_slots_are_the_new_positions_through_each_requests_pages():
    meta = AttentionMetadata.build([1, 3, 5], [9, 3, 6], TABLE, page_size=4)
    expected = np.concatenate(
        [
            slot_mapping(TABLE[[0]], [8], [9], 4),
            slot_mapping(TABLE[[1]], [0], [3], 4),
            slot_mapping(TABLE[[2]], [1], [6], 4),
        ]
    )
    assert meta.slot_mapping.tolist() == expected.tolist()


def test_decode_only_batch():
    meta = AttentionMetadata.build([1, 1], [5, 1], TABLE, page_size=4)
    assert meta.is_decode_only and meta.slot_mapping.tolist() == [2 * 4 + 0, 4 * 4 + 0]


def test_metadata_is_frozen():
    meta = AttentionMetadata.build([1], [1], TABLE, page_size=4)
    with pytest.raises(AttributeError):
        meta.page_size = 8


@pytest.mark.parametrize(
    ("query", "context", "table", "message"),
    [
        ([], [], TABLE, "non-empty"),
        ([1, 2], [3], TABLE, "equal-length"),
        ([0], [3], TABLE, "1 <= query_len"),
        ([4], [3], TABLE, "1 <= query_len"),
        ([1, 1, 1, 1], [1, 1, 1, 1], TABLE, "lacks 4 rows"),
        ([1], [17], TABLE, "needs more than"),
        ([1], [3], np.array([[-1]], dtype=np.int32), "page ids >= 0"),
    ],
)
def test_bad_input_is_refused(query, context, table, message):
    with pytest.raises(ValueError, match=message):
        AttentionMetadata.build(query, context, table, page_size=4)
