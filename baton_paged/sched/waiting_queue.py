"""WaitingQueue: requests not in the batch, served by priority, then first come, first served.

A preempted request goes back under its original arrival number, so it resumes ahead of requests
that arrived after it. Kept as a sorted list: queues hold hundreds of requests, and a sorted list
gives ordered iteration (admission looks past a head that does not fit) and O(n) removal (abort).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

from baton_paged.request import Request


class WaitingQueue:
    def __init__(self) -> None:
        self._entries: list[tuple[int, int, str]] = []
        self._requests: dict[str, Request] = {}
        self._arrival_numbers: dict[str, int] = {}
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __iter__(self) -> Iterator[Request]:
        """Requests in service order (a snapshot: safe to pop while iterating)."""
        return iter([self._requests[rid] for _, _, rid in self._entries])

    def push(self, request: Request) -> None:
        number = self._arrival_numbers.setdefault(request.request_id, next(self._counter))
        bisect.insort(self._entries, (request.priority, number, request.request_id))
        self._requests[request.request_id] = request

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def peek(self) -> Request | None:
        return self._requests[self._entries[0][2]] if self._entries else None

    def remove(self, request_id: str) -> Request:
        request = self._requests.pop(request_id)
        key = (request.priority, self._arrival_numbers[request_id], request_id)
        del self._entries[bisect.bisect_left(self._entries, key)]
        return request

    def forget(self, request_id: str) -> None:
        """Drop the arrival number of a request that has finished for good."""
        self._arrival_numbers.pop(request_id, None)
