"""AsyncEngine: the engine's step loop on a background thread, one async stream per request.

The model forward is long, blocking, GIL-releasing torch work, so it runs on its own thread and
the asyncio loop stays free to accept connections and write streams. One lock serialises every
call into the ``Engine`` (add, abort, step): requests join and leave between iterations, exactly
as BATON wants. Outputs cross back to each request's event loop with ``call_soon_threadsafe``.

A stream that is closed early (a client disconnecting, a cancelled task) aborts its request at
once, which frees its pages. If an iteration raises, the requests it was running fail with that
error (their pages freed) and the loop carries on with the rest.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from baton_paged.engine import Engine, PromptInput
from baton_paged.outputs import RequestOutput
from baton_paged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 503)."""


class RequestFailedError(RuntimeError):
    """An engine iteration raised while this request was in it."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int = 1024):
        self.engine = engine
        self.max_waiting = max_waiting
        """Most requests waiting to join the batch; more are refused with QueueFullError."""
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._stopping = False
        self._streams: dict[str, _Stream] = {}
        self.finish_listeners: list[Callable[[RequestOutput], None]] = []
        """Called on the engine thread with every request's final output (metrics use it)."""
        self._thread = threading.Thread(target=self._loop, name="baton-engine", daemon=True)
        self._thread.start()

    async def generate(
        self,
        prompt: PromptInput,
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request (ValueError or QueueFullError before anything is queued) and yield
        its output after every iteration that gave it a token, the last one finished."""
        request_id, stream = self.submit(prompt, params, request_id, priority)
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def submit(
        self, prompt: PromptInput, params: SamplingParams, request_id: str | None, priority: int
    ) -> tuple[str, _Stream]:
        """Queue the request and open its stream on the calling event loop."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if len(self.engine.scheduler.waiting) >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
            request_id = self.engine.add_request(prompt, params, request_id, priority)
            self._streams[request_id] = stream
        self._work.set()
        return request_id, stream

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; its pages are free when this returns."""
        with self._lock:
            self._streams.pop(request_id, None)
            self._finished(self.engine.abort_request(request_id))

    def shutdown(self) -> None:
        self._stopping = True
        self._work.set()
        self._thread.join(timeout=30)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_unfinished_requests():
                self._work.wait(timeout=0.5)
                self._work.clear()
                continue
            with self._lock:
                self._step()

    def _step(self) -> None:
        running = list(self.engine.scheduler.running)
        try:
            outputs = self.engine.step()
        except Exception as error:  # one bad iteration must not take the server down
            logger.exception("engine iteration failed; failing the requests it ran")
            self._fail(list(dict.fromkeys([*running, *self.engine.scheduler.running])), error)
            return
        for output in outputs:
            self._deliver(output.request_id, output)
            if output.finished:
                self._finished(output)

    def _fail(self, request_ids: list[str], error: Exception) -> None:
        for request_id in request_ids:
            self._finished(self.engine.abort_request(request_id))
            self._deliver(request_id, RequestFailedError(f"{type(error).__name__}: {error}"))

    def _finished(self, output: RequestOutput | None) -> None:
        for listener in self.finish_listeners if output is not None else ():
            listener(output)

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        finished = isinstance(item, Exception) or item.finished
        stream = self._streams.pop(request_id, None) if finished else self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
