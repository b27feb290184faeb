"""The soak's abusive clients (``soak.py`` lists the kinds, their rates and why): raw HTTP/1.1 on
sockets, since an HTTP library refuses to send most of this abuse, each reply judged against the
refusal it must be."""

from __future__ import annotations

import itertools
import json
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from harness import summary
from serving_http import SERVED_NAME
from soak_normal import ROUTES, WORDS

REFUSAL_PERIOD_S = 0.5
BIG_PROMPT_PERIOD_S = 20.0
BIG_PROMPT_BURST = 4
"""Large prompts sent at once the first time: at least as many as the server tokenizes at a time
(see ``large_prompts``), and few enough that none is refused for being one too many."""
SLOWLORIS_OPEN = 4
DISCONNECT_PERIOD_S = 3.0
DISCONNECT_AFTER_EVENTS = 3
ABORT_PERIOD_S = 5.0
ABORT_AFTER_S = 0.5
LONG_PROMPT_TOKENS, LONG_MAX_TOKENS = 256, 700
"""The requests clients leave: long enough to own pages and still run when the client goes."""
MAX_BODY_BYTES = 2_000_000
"""``ServerLimits.max_body_bytes``' default, which the 1.9 MB prompt must fit under."""


@dataclass(frozen=True)
class Reply:
    """What came back on a raw connection; ``error`` when no whole reply did."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    error: str | None = None


def http_request(
    method: str, path: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: soak", "Connection: close"]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def exchange(port: int, request: bytes, timeout: float, piece: int = 1 << 16, pause: float = 0):
    """Send ``request`` in pieces (``pause`` s apart), stopping as soon as the server answers (a
    refusal may come before the body is all sent, and the server then reads no more), and read
    the reply until the server closes the connection."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            send_until_answered(sock, request, piece, pause)
            return read_reply(sock)
    except OSError as error:  # refused, or a timeout before any reply
        return Reply(None, {}, b"", f"{type(error).__name__}: {error}")


def send_until_answered(sock: socket.socket, request: bytes, piece: int, pause: float) -> None:
    try:
        for start in range(0, len(request), piece):
            if select.select([sock], [], [], 0)[0]:  # a reply (or the close) is already here
                return
            sock.sendall(request[start : start + piece])
            time.sleep(pause)
    except (BrokenPipeError, ConnectionResetError):  # it closed mid-send: its reply is queued
        pass


def read_reply(sock: socket.socket) -> Reply:
    data, error = b"", None
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except OSError as failure:  # a reset after a whole reply is harmless; parse_reply decides
        error = f"{type(failure).__name__}: {failure}"
    return parse_reply(data, error)


def parse_reply(data: bytes, error: str | None) -> Reply:
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return Reply(None, {}, b"", error or f"no whole reply head: {data[:80]!r}")
    first, *lines = head.decode("latin-1").split("\r\n")
    fields = (line.partition(":") for line in lines)
    headers = {name.strip().lower(): value.strip() for name, _, value in fields}
    status, length = int(first.split()[1]), headers.get("content-length")
    if length is not None and len(body) < int(length):
        return Reply(status, headers, body, error or "the body was cut short")
    return Reply(status, headers, body if length is None else body[: int(length)])


def judged(
    reply: Reply, status: int, header: tuple[str, str] | None = None
) -> tuple[str | None, bool]:
    """What is wrong with ``reply`` as the refusal ``status`` (None: nothing), and whether it
    is a server error (a 5xx, or a refused connection). ``header``: (name, a word its value
    must hold)."""
    if reply.status is None or reply.error:
        return reply.error, str(reply.error).startswith("ConnectionRefused")
    if reply.status != status:
        text = reply.body[:160].decode(errors="replace")
        return f"HTTP {reply.status} (expected {status}): {text}", reply.status >= 500
    if header is not None and header[1] not in reply.headers.get(header[0], ""):
        return f"HTTP {status} without {header[1]} in its {header[0]} header", False
    return error_shape_problem(reply.body, status), False


def error_shape_problem(body: bytes, status: int) -> str | None:
    """None if ``body`` is OpenAI's error object for ``status``."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return f"not a JSON object: {body[:160]!r}"
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"not OpenAI's error shape: {body[:160]!r}"
    if error["code"] != status or not isinstance(error["message"], str) or not error["message"]:
        return f"error code or message wrong for {status}: {body[:160]!r}"
    return None


class Tally:
    """Per abusive kind: attempts, the expected outcome, anything else (the first few kept),
    and how many of those were server errors; for the refusals also how long each took, and
    for ``TIMELINE`` kinds when (from ``origin``), to set beside the normal clients' slowest
    requests. Lanes on several threads add to it."""

    EXAMPLES = 3
    TIMELINE = ("prompt_1_9mb",)

    def __init__(self, kinds: list[str], origin: float):
        self.lock, self.origin = threading.Lock(), origin
        zero = {"sent": 0, "expected": 0, "unexpected": 0, "server_errors": 0, "finished_first": 0}
        self.rows = {kind: dict(zero) for kind in kinds}
        self.examples: dict[str, list[str]] = {kind: [] for kind in kinds}
        self.timings: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}

    def finished_first(self, kind: str) -> None:
        """An attempt the server answered in full before the client could act (a leaving client
        whose request was already done): neither the expected outcome nor a wrong one."""
        with self.lock:
            self.rows[kind]["sent"] += 1
            self.rows[kind]["finished_first"] += 1

    def add(
        self, kind: str, problem: str | None, server_error: bool = False, began: float | None = None
    ) -> None:
        """One attempt's outcome; ``began``: when it was sent (``time.perf_counter``)."""
        with self.lock:
            row = self.rows[kind]
            row["sent"] += 1
            row["expected" if problem is None else "unexpected"] += 1
            row["server_errors"] += server_error
            if problem is not None and len(self.examples[kind]) < self.EXAMPLES:
                self.examples[kind].append(problem[:300])
            if began is not None:
                seconds = time.perf_counter() - began
                self.timings[kind].append((round(began - self.origin, 2), round(seconds, 4)))

    def summary(self) -> dict:
        with self.lock:
            return {kind: self.kind_summary(kind) for kind in self.rows}

    def kind_summary(self, kind: str) -> dict:
        row = self.rows[kind] | {"examples": self.examples[kind]}
        if self.timings[kind]:
            row["seconds"] = summary([seconds for _, seconds in self.timings[kind]])
        if kind in self.TIMELINE:
            row["attempts"] = self.timings[kind]
        return row


@dataclass(frozen=True)
class Refusal:
    """An abusive request and the refusal it must get (``header``: one the reply must carry)."""

    name: str
    request: bytes
    status: int
    pause: float = 0.0
    """Seconds between 1 KB pieces; 0: sent at once."""
    header: tuple[str, str] | None = None


def completion(**fields) -> bytes:
    """A completion body with ``fields``. ``json.dumps`` writes ``float("inf")`` as Infinity and
    a lone surrogate as \\ud800: the bytes a careless client sends."""
    return json.dumps({"model": SERVED_NAME, "prompt": "hi", "max_tokens": 8} | fields).encode()


def chat(content: str = "hi", **fields) -> bytes:
    messages = [{"role": "user", "content": content}]
    body = {"model": SERVED_NAME, "messages": messages, "max_tokens": 8}
    return json.dumps(body | fields).encode()


COMPLETIONS, CHAT = ROUTES["completions"][0], ROUTES["chat"][0]


def bad_completion(name: str, status: int = 400, **fields) -> Refusal:
    return Refusal(name, http_request("POST", COMPLETIONS, completion(**fields)), status)


def bad_chat(name: str, content: str = "hi", **fields) -> Refusal:
    return Refusal(name, http_request("POST", CHAT, chat(content, **fields)), 400)


def refusals() -> list[Refusal]:
    """The cheap refusals, sent one after another."""
    many = tuple((f"X-Soak-{k}", "1") for k in range(150))
    big = (("X-Soak-Big", "a" * 20_000),)
    return [
        bad_completion("logprobs_49152", logprobs=49152),
        bad_chat("chat_top_logprobs_100", logprobs=True, top_logprobs=100),
        bad_completion("n_64", n=64),
        bad_completion("best_of_64", best_of=64),
        bad_completion("stop_100_strings", stop=[f"s{k}" for k in range(100)]),
        bad_completion("stop_5000_chars", stop="x" * 5000),
        bad_completion("surrogate_prompt", prompt="a\ud800b"),
        bad_chat("chat_surrogate_message", "a\ud800b"),
        bad_completion("temperature_infinity", temperature=float("inf")),
        bad_completion("temperature_nan", temperature=float("nan")),
        bad_completion("prompt_list_of_false", prompt=[False]),
        bad_completion("n_as_string", n="2"),
        bad_completion("logit_bias_301", logit_bias={str(k): 1 for k in range(301)}),
        bad_completion("body_3mb", 413, prompt="x" * 3_000_000),
        Refusal("headers_150", http_request("POST", COMPLETIONS, completion(), many), 431),
        Refusal("header_20kb", http_request("POST", COMPLETIONS, completion(), big), 431),
        Refusal("header_20kb_trickled", http_request("GET", "/health", b"", big), 431, 0.005),
        Refusal("get_completions", http_request("GET", COMPLETIONS), 405, header=("allow", "POST")),
    ]


def big_prompt(seed: int) -> Refusal:
    """A 1.9 MB prompt of words: inside the body limit, far past the context (a 400)."""
    rng, words, size = random.Random(seed), [], 0
    while size < 1_900_000 - 200:
        words.append(rng.choice(WORDS))
        size += len(words[-1]) + 1
    body = completion(prompt=" ".join(words))
    assert len(body) < MAX_BODY_BYTES, len(body)
    return Refusal("prompt_1_9mb", http_request("POST", COMPLETIONS, body), 400)


def refuse(port: int, kind: Refusal, tally: Tally) -> None:
    began, piece = time.perf_counter(), 1024 if kind.pause else 1 << 16
    reply = exchange(port, kind.request, timeout=60, piece=piece, pause=kind.pause)
    tally.add(kind.name, *judged(reply, kind.status, kind.header), began=began)


SLOWLORIS = {
    "slowloris_request_line": b"POST /v1/compl",
    "slowloris_headers": b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nContent-Le",
    "slowloris_body": http_request("POST", COMPLETIONS, completion())[:-20],
}
"""A request cut off where a slow client stops sending, each held open until the server acts."""


def slowloris(port: int, kind: str, read_timeout: float, tally: Tally) -> None:
    """Send the start of a request, then nothing: a JSON 408 must come after the read timeout."""
    begun = time.perf_counter()
    reply = exchange(port, SLOWLORIS[kind], timeout=read_timeout + 30)
    problem, server_error = judged(reply, 408)
    waited = time.perf_counter() - begun
    if problem is None and waited < 0.9 * read_timeout:
        problem = f"408 after {waited:.2f} s, before the {read_timeout:g} s read timeout"
    tally.add(kind, problem, server_error)


def long_body(seed: int, stream: bool) -> bytes:
    """A request that runs long enough to be left: token ids, so its length is exact."""
    rng = random.Random(seed)
    prompt = [rng.randrange(10, 250) for _ in range(LONG_PROMPT_TOKENS)]
    body = completion(prompt=prompt, max_tokens=LONG_MAX_TOKENS, ignore_eos=True, stream=stream)
    return http_request("POST", COMPLETIONS, body)


def disconnect(port: int, request: bytes, tally: Tally, reset: bool) -> None:
    """Read a few events of a stream, then close the connection (an RST if ``reset``)."""
    kind = "reset_mid_stream" if reset else "disconnect_mid_stream"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(request)
            data = read_events(sock, DISCONNECT_AFTER_EVENTS)
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as error:
        refused = isinstance(error, ConnectionRefusedError)
        tally.add(kind, f"{type(error).__name__}: {error}", refused)
        return
    tally.add(kind, *stream_start_problem(data))


def read_events(sock: socket.socket, count: int) -> bytes:
    """What the server sent until ``count`` SSE events arrived (or it closed)."""
    data = b""
    while data.count(b"data: ") < count and (chunk := sock.recv(1 << 16)):
        data += chunk
    return data


def stream_start_problem(data: bytes) -> tuple[str | None, bool]:
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None
    if status != 200:
        return f"HTTP {status} instead of a stream: {data[:160]!r}", bool(status and status >= 500)
    if b'data: {"error"' in body:
        return f"an error event: {body[:300]!r}", False
    if body.count(b"data: ") < DISCONNECT_AFTER_EVENTS:
        return f"the stream ended after {body.count(b'data: ')} events", False
    return None, False


def abort(port: int, request: bytes, tally: Tally) -> None:
    """Send a long non-streamed request and give up on it after ``ABORT_AFTER_S``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=ABORT_AFTER_S) as sock:
            sock.sendall(request)
            early = read_reply(sock)  # a socket timeout here is the client giving up
    except OSError as error:
        refused = isinstance(error, ConnectionRefusedError)
        tally.add("abort_non_streaming", f"{type(error).__name__}: {error}", refused)
        return
    if early.status is None and str(early.error).startswith("TimeoutError"):
        tally.add("abort_non_streaming", None)
        return
    if early.status == 200:  # the tiny model can finish all 700 tokens inside ABORT_AFTER_S
        tally.finished_first("abort_non_streaming")
        return
    problem = f"answered before the client gave up: HTTP {early.status} {early.body[:120]!r}"
    tally.add("abort_non_streaming", problem, bool(early.status and early.status >= 500))


def large_prompts(port: int, kind: Refusal, tally: Tally) -> Callable[[], None]:
    """The 1.9 MB prompt: ``BIG_PROMPT_BURST`` at once the first time, then one at a time. A
    tokenizer thread's allocator keeps the high-water mark of the largest prompt it tokenized
    (about 200 MB for this one), so the burst, the most memory large prompts can take at once,
    puts what they keep into RSS before phase B's warm-up ends; what grows after it is growth."""
    sizes = itertools.chain([BIG_PROMPT_BURST], itertools.repeat(1))

    def act() -> None:
        senders = [
            threading.Thread(target=refuse, args=(port, kind, tally)) for _ in range(next(sizes))
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()

    return act


def lane(stop: threading.Event, period: float, act: Callable[[], None]) -> None:
    """``act()`` every ``period`` s (back to back if it takes longer) until ``stop``."""
    while not stop.is_set():
        begun = time.perf_counter()
        act()
        stop.wait(max(0.0, period - (time.perf_counter() - begun)))


def in_turn(items, act: Callable) -> Callable[[], None]:
    """A callable that calls ``act`` on the next of ``items`` each time, round and round."""
    turn = itertools.cycle(items)
    return lambda: act(next(turn))


LEAVING = ("disconnect_mid_stream", "reset_mid_stream", "abort_non_streaming")
"""The kinds of client that leave a request they started."""


def abuse_lanes(port: int, read_timeout: float, seed: int, tally: Tally) -> list[tuple]:
    """(period, act) of every abusive loop."""
    cheap, large = refusals(), big_prompt(seed)
    stream, plain = long_body(seed + 1, stream=True), long_body(seed + 2, stream=False)
    lanes = [
        (REFUSAL_PERIOD_S, in_turn(cheap, lambda kind: refuse(port, kind, tally))),
        (BIG_PROMPT_PERIOD_S, large_prompts(port, large, tally)),
        (DISCONNECT_PERIOD_S, in_turn((False, True), partial(disconnect, port, stream, tally))),
        (ABORT_PERIOD_S, lambda: abort(port, plain, tally)),
    ]
    kinds = list(SLOWLORIS)
    for k in range(SLOWLORIS_OPEN):  # each connection starts on another kind
        order = kinds[k % len(kinds) :] + kinds[: k % len(kinds)]
        lanes.append((0.0, in_turn(order, lambda kind: slowloris(port, kind, read_timeout, tally))))
    return lanes


def start_abuse(port: int, read_timeout: float, seed: int, stop: threading.Event):
    """Every abusive lane on its own thread until ``stop``: (tally, threads)."""
    kinds = [kind.name for kind in refusals()] + ["prompt_1_9mb", *SLOWLORIS, *LEAVING]
    tally = Tally(kinds, origin=time.perf_counter())
    threads = [
        threading.Thread(target=lane, args=(stop, period, act), daemon=True, name="abuse")
        for period, act in abuse_lanes(port, read_timeout, seed, tally)
    ]
    for thread in threads:
        thread.start()
    return tally, threads
