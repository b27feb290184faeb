"""BlockTable: insertion appends a row, removal fills the hole with the last row; no K/V moves."""

import numpy as np
import pytest

from baton_paged.allocator import BlockTable, IntegrityError


def test_insert_append_and_read_back():
    table = BlockTable(max_rows=4, max_pages=5)
    assert table.insert("a", [7, 3]) == 0
    assert table.insert("b", [5]) == 1
    table.append("a", [9])
    assert table.pages("a") == [7, 3, 9] and table.num_pages("a") == 3
    assert table.request_ids == ["a", "b"] and len(table) == 2 and "b" in table
    np.testing.assert_array_equal(table.as_numpy(), [[7, 3, 9, 0, 0], [5, 0, 0, 0, 0]])
    assert table.as_numpy().dtype == np.int32
    table.check_integrity()


def test_remove_moves_last_row_into_the_hole_and_returns_pages():
    table = BlockTable(max_rows=4, max_pages=3)
    for rid, pages in [("a", [1]), ("b", [2, 3]), ("c", [4, 5, 6])]:
        table.insert(rid, pages)
    assert table.remove("a") == [1]
    assert table.request_ids == ["c", "b"]
    assert table.row_of("c") == 0 and table.row_of("b") == 1
    np.testing.assert_array_equal(table.as_numpy(), [[4, 5, 6], [2, 3, 0]])
    assert table.remove("b") == [2, 3]
    assert table.remove("c") == [4, 5, 6]
    assert len(table) == 0 and not table._table.any()
    table.check_integrity()


def test_as_numpy_is_a_view_of_the_table():
    table = BlockTable(max_rows=2, max_pages=2)
    table.insert("a", [1])
    view = table.as_numpy()
    table.append("a", [8])
    assert view.tolist() == [[1, 8]]


def test_errors_leave_the_table_unchanged():
    table = BlockTable(max_rows=2, max_pages=2)
    table.insert("a", [1, 2])
    before = table.as_numpy().copy()
    with pytest.raises(ValueError, match="already in the block table"):
        table.insert("a", [3])
    with pytest.raises(ValueError, match="needs 3 pages; a row holds 2"):
        table.insert("b", [3, 4, 5])
    with pytest.raises(ValueError, match="needs 3 pages"):
        table.append("a", [3])
    with pytest.raises(KeyError, match="not in the block table"):
        table.remove("zzz")
    table.insert("b", [3])
    with pytest.raises(ValueError, match="full"):
        table.insert("c", [4])
    np.testing.assert_array_equal(table.as_numpy()[:1], before)
    assert table.request_ids == ["a", "b"]
    table.check_integrity()


def test_check_integrity_detects_dirty_padding():
    table = BlockTable(max_rows=2, max_pages=3)
    table.insert("a", [1])
    table._table[0, 2] = 5
    with pytest.raises(IntegrityError, match="padding"):
        table.check_integrity()


def test_sizes_must_be_positive():
    with pytest.raises(ValueError):
        BlockTable(0, 4)
