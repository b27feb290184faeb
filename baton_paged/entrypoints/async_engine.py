"""AsyncEngine: the engine's step loop on a background thread, one async stream per request.

The model forward is long, blocking, GIL-releasing torch work, so it runs on its own thread and
the asyncio loop stays free to accept connections and write streams. Only the engine thread
touches the ``Engine``: the event loop checks and tokenizes a request itself (so bad input fails
at once), then posts the add, or an abort, to an inbox that the engine thread applies between
iterations, exactly where BATON lets requests join and leave. The event loop never waits for an
iteration: a lock held across a forward would stall every stream for one iteration per arrival
and, since a plain lock is not fair, starve submissions while the engine thread re-takes it.
Outputs cross back to each request's event loop with ``call_soon_threadsafe``, unbuilt: the
reader builds the latest one when it takes it (``_Stream``), so building outputs is not step-loop
work and a reader that falls behind skips the outputs it would only overwrite.

The loop runs on a thread of its own, or, with ``own_thread=False``, on whichever thread calls
``run_loop`` (``baton-paged serve`` gives it the main thread and uvicorn a background one). That
matters on CPU: torch's OpenMP runtime keeps one worker pool per thread that has run parallel
work, and once two pools exist (the main thread's, from loading the model, and the engine
thread's) their workers oversubscribe the cores and small ops lose their intra-op speedup; a
step loop on a fresh thread ran about 1.5-2x slower than on the main thread.

A stream that is closed early (a client disconnecting, a cancelled task) aborts its request
before the next iteration, which frees its pages. If an iteration raises, the requests it may have
left half-done fail with that error (their pages freed), those it had already finished get their
output, and the loop carries on with the rest. If the loop itself ever stops, for a shutdown or a
bug, every open stream fails and new requests are refused, so no caller waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from baton_paged.engine import Engine
from baton_paged.outputs import RequestOutput
from baton_paged.processing.input_processor import PromptInput
from baton_paged.processing.output_processor import Output, built
from baton_paged.request import Request
from baton_paged.sampling_params import SamplingParams
from baton_paged.snapshot import EngineSnapshot

logger = logging.getLogger(__name__)


IDLE_POLL_S = 0.5
"""How often an idle step loop looks at the stop flag without being woken."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 503)."""


class RequestFailedError(RuntimeError):
    """An engine iteration raised while this request was in it."""


class EngineStoppedError(RuntimeError):
    """The step loop has stopped (shut down, or died); nothing more is served (HTTP 503)."""


class _Stream:
    """One request's outputs on their way to its reader, on the reader's event loop.

    Outputs are cumulative (each holds everything so far), so an output its reader has not
    taken yet is replaced by the next one instead of queueing behind it, as vLLM's output
    collector does: a reader that falls behind reads the latest state once, not every step it
    missed, and nothing is lost (a finished output or an error is never replaced). Outputs
    arrive unbuilt (``OutputSnapshot``) and are built by the reader when it takes them, on its
    own thread, off the engine's step loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: deque[Output | Exception] = deque()
        self._ready = asyncio.Event()

    def put(self, item: Output | Exception) -> None:
        """Called on ``loop`` (``call_soon_threadsafe``)."""
        items = self._items
        unread = items[-1] if items else None
        if _replaceable(unread) and _replaceable(item):
            items[-1] = item
        else:
            items.append(item)
        self._ready.set()

    async def get(self) -> RequestOutput:
        """The next output, built (raising the error that ended the request, if one did)."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, Exception):
            raise item
        return built(item)


def _replaceable(item: Output | Exception | None) -> bool:
    """An unfinished output: the next one holds all it holds."""
    return item is not None and not isinstance(item, Exception) and not item.finished


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int = 1024, own_thread: bool = True):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.inputs = engine.inputs
        """Checks and tokenizes requests on the caller's thread; it reads nothing that changes."""
        self.max_waiting = max_waiting
        """Most requests waiting to join the batch; more are refused with QueueFullError."""
        self._inbox: deque[Callable[[], None]] = deque()
        """Adds and aborts posted by event loops, applied in order on the engine thread."""
        self._streams: dict[str, _Stream] = {}
        self._posted_adds = 0
        """Adds in the inbox: they count towards the waiting bound before the engine sees them."""
        self._lock = threading.Lock()
        """Guards the inbox, the streams and the count; never held across an engine call."""
        self._work = threading.Event()
        self._stopping = False
        self._drain_deadline: float | None = None
        """Set by ``drain``: new requests are refused, and open ones fail at this time."""
        self._looping = False
        self._loop_done = threading.Event()
        self._loop_done.set()
        self.finish_listeners: list[Callable[[RequestOutput], None]] = []
        """Called on the engine thread with every request's final output (metrics use it)."""
        self._thread: threading.Thread | None = None
        if own_thread:
            self._looping = True  # healthy from the start, not from when the thread is scheduled
            self._thread = threading.Thread(target=self.run_loop, name="baton-engine", daemon=True)
            self._thread.start()

    @classmethod
    def build(
        cls,
        model: str | None = None,
        *,
        hf_model: Any = None,
        tokenizer: Any = None,
        max_waiting: int = 1024,
        **options,
    ) -> AsyncEngine:
        """An AsyncEngine with its own thread, for a checkpoint or an already-loaded transformers
        model (see ``Engine.build``)."""
        engine = Engine.build(model, hf_model=hf_model, tokenizer=tokenizer, **options)
        return cls(engine, max_waiting=max_waiting)

    async def generate(
        self,
        prompt: PromptInput,
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request (ValueError or QueueFullError before anything is queued) and yield
        its output after every iteration that gave it a token, the last one finished."""
        request = self.inputs.prepare(prompt, params, request_id, priority)
        outputs = self.generate_request(request)
        try:
            async for output in outputs:
                yield output
        finally:  # closed early, this aborts now: an abandoned inner generator would only
            await outputs.aclose()  # post its abort when the event loop finalises it

    async def generate_request(self, request: Request) -> AsyncIterator[RequestOutput]:
        """``generate`` for a request ``inputs.prepare`` has made (a server prepares requests
        off the event loop, and once)."""
        request_id, stream = self.submit_request(request)
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request_id)

    def submit(
        self, prompt: PromptInput, params: SamplingParams, request_id: str | None, priority: int
    ) -> tuple[str, _Stream]:
        """Check the request, open its stream on the calling event loop and post its add."""
        return self.submit_request(self.inputs.prepare(prompt, params, request_id, priority))

    def submit_request(self, request: Request) -> tuple[str, _Stream]:
        """Open the stream of a request ``inputs.prepare`` made and post its add."""
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if self._stopping:
                raise EngineStoppedError("the engine has stopped and takes no more requests")
            if self._drain_deadline is not None:
                raise EngineStoppedError("the server is shutting down and takes no more requests")
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            samples = request.params.num_samples  # each completion queues a request
            if samples > 1 and samples > self.max_waiting:
                raise ValueError(
                    f"{samples} completions (n / best_of) exceed the queue of {self.max_waiting}"
                )
            if self.snapshot.num_queued + self._posted_adds + samples > self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
            self._streams[request.request_id] = stream
            self._posted_adds += samples
            self._inbox.append(lambda: self._add(request))
        self._work.set()
        return request.request_id, stream

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; the engine thread frees its pages before its next
        iteration. The stream gets nothing more."""
        with self._lock:
            self._streams.pop(request_id, None)
            self._inbox.append(lambda: self._finished(self.engine.abort_request(request_id)))
        self._work.set()

    def shutdown(self) -> None:
        """Stop the loop after its current iteration (and wait for its own thread, if any);
        ``close`` also hands the model back."""
        self._stopping = True
        self._work.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def drain(self, timeout: float) -> None:
        """Refuse new requests and let open ones finish for ``timeout`` seconds; then every
        request still open fails with EngineStoppedError (its client gets an error, not a cut
        connection) and the loop stops. Only assigns, so a signal handler may call it."""
        self._drain_deadline = time.monotonic() + timeout

    def stop_soon(self) -> None:
        """``shutdown`` for a signal handler: it only sets a flag (taking a lock there could
        deadlock the thread it interrupted), which an idle loop notices within ``IDLE_POLL_S``."""
        self._stopping = True

    def close(self) -> None:
        """Shut down, fail the streams still open and give the model back (``Engine.close``)."""
        self.shutdown()
        finished = self._loop_done.wait(timeout=30)  # the loop finishes its iteration first
        self._fail_open_streams(EngineStoppedError("the engine was closed"))
        if not finished:  # closing now would free pages under a running forward
            logger.warning("the step loop is still in an iteration; the engine is left open")
            return
        self.engine.close()

    def _fail_open_streams(self, error: Exception) -> None:
        """Refuse new requests and end every open stream with ``error``."""
        with self._lock:
            self._stopping = True
            streams, self._streams = list(self._streams.values()), {}
            self._inbox.clear()
            self._posted_adds = 0
        for stream in streams:
            with contextlib.suppress(RuntimeError):  # its event loop is already closed
                stream.loop.call_soon_threadsafe(stream.put, error)

    @property
    def snapshot(self) -> EngineSnapshot:
        """The engine's state after its latest iteration, add or abort; safe from any thread."""
        return self.engine.snapshot

    @property
    def is_running(self) -> bool:
        return self._looping and not self._stopping

    @property
    def is_accepting(self) -> bool:
        """Running and not draining: new requests are taken."""
        return self.is_running and self._drain_deadline is None

    def run_loop(self) -> None:
        """Apply posted adds and aborts and run iterations until ``shutdown``; blocks."""
        self._looping = True
        self._loop_done.clear()
        try:
            while not self._stopping and not self._drain_expired():
                self._work.clear()  # before the inbox is read, so a later post wakes the wait
                self._apply_inbox()
                if self.engine.has_unfinished_requests():
                    self._step()
                else:
                    self._work.wait(IDLE_POLL_S)
        except Exception:
            logger.exception("the engine's step loop died")
            raise
        finally:
            self._looping = False
            self._fail_open_streams(EngineStoppedError(self._stop_reason()))
            self._loop_done.set()

    def _drain_expired(self) -> bool:
        return self._drain_deadline is not None and time.monotonic() >= self._drain_deadline

    def _stop_reason(self) -> str:
        if self._drain_expired():
            return "the server shut down before this request finished (its drain timeout passed)"
        return "the engine's step loop stopped"

    def _apply_inbox(self) -> None:
        with self._lock:
            posted = list(self._inbox)
            self._inbox.clear()
        for apply in posted:
            apply()

    def _add(self, request: Request) -> None:
        try:
            self.engine.enqueue(request)
        except ValueError as error:  # its id came back into use after it was checked
            self._deliver(request.request_id, error)
        finally:
            with self._lock:
                self._posted_adds -= request.params.num_samples

    def _step(self) -> None:
        try:
            outputs = self.engine.step_unbuilt()
        except Exception as error:  # one bad iteration must not take the server down
            logger.exception("engine iteration failed; failing the requests it left half-done")
            try:
                outputs, suspect = self.engine.salvage_failed_step()
            except Exception:  # nothing can be trusted now: fail every request, keep serving
                logger.exception("could not sort out the failed iteration; failing every request")
                outputs, suspect = [], list(self.engine.requests)
            self._fail(suspect, error)
        for output in outputs:
            if output.finished:  # built here once: the listeners and the stream share it
                output = built(output)
                self._finished(output)
            self._deliver(output.request_id, output)

    def _fail(self, request_ids: list[str], error: Exception) -> None:
        for request_id in request_ids:
            try:
                self._finished(self.engine.abort_request(request_id))
            except Exception:  # its pages are freed before its output is built; tell it anyway
                logger.exception("aborting %s failed", request_id)
            self._deliver(request_id, RequestFailedError(f"{type(error).__name__}: {error}"))

    def _finished(self, output: RequestOutput | None) -> None:
        for listener in self.finish_listeners if output is not None else ():
            try:
                listener(output)
            except Exception:  # a metrics bug must not stop the engine
                logger.exception("finish listener %r failed", listener)

    def _deliver(self, request_id: str, item: Output | Exception) -> None:
        finished = isinstance(item, Exception) or item.finished
        with self._lock:
            streams = self._streams
            stream = streams.pop(request_id, None) if finished else streams.get(request_id)
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(stream.put, item)
        except RuntimeError:  # its event loop has closed: nobody will read it, so stop it
            if not finished:
                self.abort(request_id)
