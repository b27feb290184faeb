"""Memory budgets: bytes with units, or a fraction of free memory."""

import psutil
import pytest

from baton_paged.allocator import (
    KVCacheSpec,
    budget_bytes,
    free_memory_bytes,
    num_pages_for_budget,
    parse_memory_budget,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4GiB", 4 * 2**30),
        ("512MB", 512 * 10**6),
        ("1.5 kib", 1536),
        ("1000", 1000),
        (2048, 2048),
        ("0.5", 0.5),
        ("1.0", 1.0),
        (0.25, 0.25),
    ],
)
def test_parse(text, value):
    assert parse_memory_budget(text) == value


@pytest.mark.parametrize("text", ["", "lots", "4 parsecs", "-1GiB", "0", "1.5", "0.0", 0, True])
def test_parse_rejects_nonsense(text):
    with pytest.raises(ValueError):
        parse_memory_budget(text)


def test_fraction_of_host_memory():
    available = psutil.virtual_memory().available
    assert free_memory_bytes("cpu") > 0
    assert budget_bytes("0.5", "cpu") == pytest.approx(available / 2, rel=0.2)


def test_budget_too_small_for_one_page_says_why():
    spec = KVCacheSpec(num_layers=8, num_kv_heads=4, head_dim=64)
    with pytest.raises(ValueError, match="holds no page of 262144 bytes"):
        num_pages_for_budget(spec, "100KiB", "cpu")
    assert num_pages_for_budget(spec, "1MiB", "cpu") == 4
