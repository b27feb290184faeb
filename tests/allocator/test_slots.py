"""Slot helpers: where each new token's K/V is written."""

import numpy as np
import pytest

from baton_paged.allocator import BlockTable, offsets_within, pages_needed, slot_mapping


@pytest.mark.parametrize(("tokens", "pages"), [(0, 0), (1, 1), (16, 1), (17, 2), (33, 3)])
def test_pages_needed(tokens, pages):
    assert pages_needed(tokens, 16) == pages


def test_slot_mapping_crosses_page_boundaries():
    # page size 4: positions 2..6 live in page 9 (offsets 2, 3) then page 5 (offsets 0, 1, 2)
    np.testing.assert_array_equal(
        slot_mapping(np.array([[9, 5]]), [2], [7], 4), [38, 39, 20, 21, 22]
    )
    assert slot_mapping(np.array([[9]]), [1], [1], 4).size == 0


def test_slot_mapping_rejects_positions_past_the_pages():
    with pytest.raises(ValueError, match="do not fit in 2 pages"):
        slot_mapping(np.array([[9, 5]]), [0], [9], 4)
    with pytest.raises(ValueError, match="start <= end"):
        slot_mapping(np.array([[9, 5]]), [3], [2], 4)


def test_decode_slots_use_each_rows_pages():
    table = BlockTable(max_rows=3, max_pages=3)
    table.insert("a", [4, 7])
    table.insert("b", [2])
    positions = np.array([5, 0])
    np.testing.assert_array_equal(
        slot_mapping(table.as_numpy(), positions, positions + 1, 4), [29, 8]
    )


def test_rows_pack_in_order():
    table = np.array([[7, 2, 9], [4, 0, 0]])
    slots = slot_mapping(table, [7, 0], [9, 2], 4)
    np.testing.assert_array_equal(slots, [2 * 4 + 3, 9 * 4 + 0, 16, 17])


def test_offsets_within():
    np.testing.assert_array_equal(offsets_within(np.array([2, 0, 3])), [0, 1, 0, 1, 2])
