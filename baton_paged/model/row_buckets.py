"""The row counts oneDNN's linears run at: a forward's rows padded up to a small fixed set (the
float32 column-block kernel, ``csrc/blocked_linear.cpp``, compiles nothing per count and pads
nothing).

Why: oneDNN builds (JIT-compiles) a kernel for every new row count of a weight shape, and the
first call at a count pays for it. On an Intel Xeon with AMX (bfloat16, 2 threads) that cost
1-3 ms per shape, 4-12x the call itself (a weight shape's four linears of the small Llama: 2.0-11.6
ms at a new count, 0.3-0.9 ms again), so a fresh engine's first ``generate``, whose prompts and
batches bring new counts all the time, ran 19% below its warm speed; and a long-running server
with many counts would outgrow oneDNN's cache of 1024 kernels. Padded to a bucket, every count a
forward meets is one of ``ROW_BUCKETS``, built once per weight shape at start-up
(``packed_linear.warm_up``). Padding costs little: at decode sizes a linear's time is reading its
weight, whatever the rows; above 64 rows the buckets are 32 apart, at most 1.5x the rows at 65
and under 1.13x from 257. More rows than the largest bucket run in chunks of it.
"""

from __future__ import annotations

from bisect import bisect_left

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, *range(64, 513, 32))
"""Every row count a oneDNN-packed linear runs at."""
LARGEST = ROW_BUCKETS[-1]


def bucket_for(rows: int) -> int:
    """The smallest bucket holding ``rows`` (1 <= rows <= ``LARGEST``)."""
    return ROW_BUCKETS[bisect_left(ROW_BUCKETS, rows)]


def row_chunks(rows: int) -> list[tuple[int, int]]:
    """``(start, stop)`` pieces of ``rows`` rows, each at most ``LARGEST``."""
    return [(start, min(rows, start + LARGEST)) for start in range(0, rows, LARGEST)]


def buckets_up_to(rows: int) -> tuple[int, ...]:
    """The buckets a forward of at most ``rows`` rows can use."""
    return ROW_BUCKETS[: bisect_left(ROW_BUCKETS, min(rows, LARGEST)) + 1]
