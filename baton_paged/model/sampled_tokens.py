"""SampledTokens: one step's sampled token ids, on the device and on their way to the host.

Step-ahead scheduling (``engine.py``) launches step N+1 before the host has read step N's
tokens: N+1's decode rows whose input is one of them (``IN_FLIGHT``) take it from ``on_device``
(``ModelRunner.execute``), and the host reads ``to_host()`` once N+1 is on its way. On CUDA the
copy to the host starts as soon as the tokens are drawn, into pinned memory, with an event to wait
on; on the CPU there is nothing to wait for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from baton_paged.sched.plan import IN_FLIGHT, ScheduledRow


class SampledTokens:
    def __init__(self, request_ids: Sequence[str], parts: Sequence[torch.Tensor]):
        """``parts``: the sampled ids of each forward of the step, in order (at least one);
        ``request_ids``: whose they are, in the same order."""
        self.request_ids = tuple(request_ids)
        self.on_device = parts[0] if len(parts) == 1 else torch.cat(parts)
        self._index: dict[str, int] | None = None
        if self.on_device.is_cuda:
            self._host = torch.empty(self.on_device.shape, dtype=torch.int64, pin_memory=True)
            self._host.copy_(self.on_device, non_blocking=True)
            self._ready: torch.cuda.Event | None = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = self.on_device, None

    def to_host(self) -> list[int]:
        """The ids, in ``request_ids`` order, once their copy has landed."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()

    def sources(self, rows: Sequence[ScheduledRow]) -> np.ndarray:
        """For each of the next step's rows: where its input token is in ``on_device``, or -1
        if the host has it (the row's token is not ``IN_FLIGHT``). Only decode rows (one token
        each) can be in flight."""
        if self._index is None:
            self._index = {rid: i for i, rid in enumerate(self.request_ids)}
        index = self._index
        return np.fromiter(
            (index[r.request_id] if r.token_ids[0] == IN_FLIGHT else -1 for r in rows),
            np.int64,
            len(rows),
        )

    def fill(self, input_ids: torch.Tensor, sources: torch.Tensor) -> None:
        """Write the in-flight ids into ``input_ids`` on the device: entry ``i`` becomes token
        ``sources[i]`` wherever that is not -1 (``sources`` per packed token, on the device).
        Nothing is read back, so the forward that drew these tokens need not have finished."""
        taken = self.on_device[sources.clamp(min=0)]
        input_ids.copy_(torch.where(sources >= 0, taken, input_ids))
