"""MemoryMonitor: memory pressure with high/low watermarks and hysteresis.

Pressure is the device page pool's occupancy (pages owned / pages) or, when a device-memory
reader is given, whichever of the two is higher. The scheduler consults it once per iteration:

* above the high watermark the batch shrinks: one request per iteration is swapped to host
  memory (or freed for recompute when the host pool is full), down to a batch of one;
* from then until pressure falls below the low watermark the batch does not grow (a
  higher-priority request may still take a preempted one's place);
* below the low watermark the batch grows again, swapped requests resuming in service order.

The gap between the watermarks is the hysteresis that keeps a batch from swapping the same request
out and in on alternate iterations. Admission also keeps the pool itself at or below the high
watermark (unless the batch is empty), so pool pressure mostly comes from decode growth.
"""

from __future__ import annotations

from baton_paged.allocator import PagePool
from baton_paged.sched.device_memory import MemoryReader


class Hysteresis:
    """Two watermarks and the state between them, fed one reading per iteration: holding from a
    reading above ``high`` until one below ``low``. The engine's ``MemoryMonitor`` and the vLLM
    plugin's ``PressureGate`` both decide by it, so their rules cannot drift apart."""

    def __init__(self, high_watermark: float, low_watermark: float):
        check_watermarks(high_watermark, low_watermark)
        self.high = high_watermark
        self.low = low_watermark
        self.reading = 0.0
        """The last reading observed."""
        self.holding = False
        """True from a high-watermark crossing until a reading falls below the low watermark."""
        self.high_crossings = 0
        self.low_crossings = 0

    def observe(self, reading: float) -> float:
        """Take this iteration's reading and move between the two states; return it."""
        self.reading = reading
        if not self.holding and reading > self.high:
            self.holding = True
            self.high_crossings += 1
        elif self.holding and reading < self.low:
            self.holding = False
            self.low_crossings += 1
        return reading

    @property
    def above_high(self) -> bool:
        return self.reading > self.high


class MemoryMonitor(Hysteresis):
    def __init__(
        self,
        pool: PagePool,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        reader: MemoryReader | None = None,
    ):
        super().__init__(high_watermark, low_watermark)
        self.pool = pool
        self.reader = reader

    def read(self) -> float:
        occupancy = self.pool.num_used / self.pool.num_pages
        return max(occupancy, self.reader()) if self.reader else occupancy

    def update(self) -> float:
        """Read the pressure now and observe it; return the reading (also ``reading``)."""
        return self.observe(self.read())

    def pool_allows(self, pages_used: int) -> bool:
        """Would ``pages_used`` owned pages keep the pool at or under the high watermark?"""
        return pages_used <= self.high * self.pool.num_pages


def check_watermarks(high: float, low: float) -> None:
    numbers = all(isinstance(x, float | int) and not isinstance(x, bool) for x in (high, low))
    if not (numbers and 0 < low < high <= 1):
        raise ValueError(
            f"memory watermarks need 0 < low < high <= 1, got low={low!r}, high={high!r}"
        )
