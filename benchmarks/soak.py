"""Soak: one request must never hurt the others. ``baton-paged serve`` under closed-loop normal
clients, first alone (phase A, the baseline), then beside every kind of abusive client the
server has a limit for (phase B); errors, the normal clients' latency B against A, the server's
RSS growth and the KV pages left in use once it is idle.

    python benchmarks/soak.py [--minutes 20] [--baseline-minutes 5] [--quick]
        [--model random|PATH] [--threads 1] [--clients 4] [--read-timeout 5] [--out STEM]

Server: the real CLI in a subprocess (``serving_http.Server``: a launcher that pins torch's
threads, /health to know it is up, SIGINT to stop), ``--max-model-len 1024 --read-timeout 5``
and every other flag at its default (so the limits under test are the shipped ones); the
random-weight small Llama by default (``--model random``, built locally). One server runs
the whole soak: an unmeasured warm-up of normal traffic (oneDNN builds its kernels for new
shapes on first use, which would otherwise land in phase A's tail), phase A, then phase B. One
process for both phases keeps everything but the abuse equal between them: the same warmed
caches, heap and page placement; a fresh server per phase would add process-to-process
variation to the latency ratio, and RSS growth is judged inside phase B anyway (after its own
warm-up, when the large prompts' buffers have been allocated once), where it shows whether
abuse leaks. After each phase the server is brought to idle and checked to hold no request and
no page, so B also starts clean.

Normal clients (both phases, the same seeded request sequence in each): ``--clients`` closed
loops (each sends its next request when the last one ended) over ``httpx.AsyncClient``, a mix
of /v1/completions and /v1/chat/completions, streamed or not, greedy or sampled (temperature
0.8, top_p 0.95), prompts of 4-40 words, 16-64 new tokens with ``ignore_eos`` so every request
costs exactly its budget. A reply counts only if it is a 200 of the right shape: the right
object, one choice finished by length, ``usage.completion_tokens`` equal to the budget; a stream
also has only ``data:`` events, no error event, a usage chunk, and ends with ``data: [DONE]``.
Latency is end to end (send to last byte) and, for streams, TTFT (send to first event). A probe
GETs /health every 0.5 s in both phases (its latency is the client's view: it shares the
client's event loop, so it reads high if anything).

Abusive clients (phase B only), threads on raw sockets (one connection per attempt, ``Connection:
close``, sent in pieces with a stop as soon as the server answers, as a refused upload must):
  * refusals, one every 0.5 s in turn: logprobs=49152, top_logprobs=100, n=64, best_of=64, 100
    stop strings, a 5,000-character stop string, a lone surrogate in a prompt and in a chat
    message, temperature Infinity and NaN, ``"prompt": [false]``, ``"n": "2"``, 301 logit_bias
    entries (each a 400), a 3 MB body (413), 150 header fields, a 20 KB header sent at once and
    trickled in 1 KB pieces (431: the app's guard, or the connection layer before parsing), GET
    /v1/completions (405 with ``Allow``); each reply must be the status and OpenAI's error object
    ``{"error": {"message", "type", "param", "code"}}``;
  * a 1.9 MB prompt every 20 s (inside the body limit; tokenized off the event loop, then a 400:
    longer than the context), the one abuse that costs real server CPU (0.5-1.5 s); the first
    time 4 at once, at least as many as the server tokenizes at a time (see ``large_prompts``:
    that is the most memory large prompts take, so the RSS warm-up includes it);
  * slowloris: 4 connections always open, each sending a partial request line, partial headers
    or a partial body and then nothing; each must get a JSON 408 after ``--read-timeout``;
  * a disconnect mid-stream every 3 s (a 256-token prompt, 700 new tokens, streamed; 3 events
    read, then the socket closed, with FIN or with RST in turn) and an abort every 5 s (the same
    request not streamed; the client gives up after 0.5 s): each must abort its request and free
    its pages.
Anything else is counted: a 5xx, a refused or reset connection to a normal client, a normal reply
of the wrong shape, a /health that is not 200, the server dying or logging a traceback are
server errors; an abusive reply that is not its expected refusal is a wrong refusal.

Rates: the machine has 2 cores that client and server share. The normal clients keep the
engine busy (about 4 requests in flight, 12 requests/s on the small model) while this client
uses under a tenth of a core; the refusals at 2/s cost the server a few ms each and the
slowloris connections nothing but a timer, together under 2% of a core; the 1.9 MB prompt every
20 s 3-6% of one; the disconnects and aborts add one request to the batch for a fraction of the
time, as real users who leave do. The abuse is meant to be constant and broad, not a flood: a
flood of valid requests is a capacity question (503 past ``--max-waiting``), not abuse. The
server gets 1 torch thread by default (``--threads``), so that its forward has a core and the
other one serves the event loops, the tokenizer threads and this client: with 2, the forward's
OpenMP threads need both cores, any other busy thread stalls it, and phase B would measure that
oversubscription more than whether abuse hurts the others.

After each phase: traffic stops, the abusive threads finish their last attempt (a slowloris
its 408), then /metrics is polled until no request is running, waiting or swapped and
``baton:kv_pages_in_use`` is 0 in both pools, for at most 30 s; what remains is leaked. RSS
is sampled every 2 s throughout; growth is from the end of phase B's warm-up (its first 2
minutes, or a quarter of it if shorter) to its end, each the median of the samples in the 20 s
before (so one large prompt's transient buffer does not decide it). Reported beside it: the same
over phase A after its first minute and over B's second half, with the slope of each (a leak
keeps its slope; an allocator settling, as each thread's heap reaches the high-water mark of the
largest prompt it served, flattens). CPU per wall second of this
client, the server and everything else is recorded per phase; a phase in which other processes
took more than a quarter core is flagged disturbed.

Verdict (the issue's targets): pass iff 0 server errors and 0 wrong refusals, every abusive
kind answered as expected at least once, 0 pages and 0 requests left after each phase, RSS growth
after warm-up <= 5%, and the normal clients' p99 latency B / A <= 1.5. /health p99 during B is
reported beside the issue's 100 ms. Results: ``results/soak-cpu.json`` and ``.md`` (``--quick``:
``soak-cpu-quick``; ``--out STEM``: STEM.json and STEM.md, a bare name inside ``results/``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import random
import select
import socket
import statistics
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import harness
import httpx
import numpy as np
import psutil
import torch
from harness import RESULTS, check, markdown, percentile, ratio
from prometheus_client.parser import text_string_to_metric_families
from serving_http import DISTURBED_CPU, SERVED_NAME, Server, busy_cpu_seconds

MAX_MODEL_LEN = 1024
TARGETS = {"rss_growth_pct": 5.0, "p99_ratio": 1.5, "health_p99_s": 0.1}
"""The issue's targets: RSS growth after warm-up, normal p99 latency B / A, /health (reported)."""
RSS_PERIOD_S = 2.0
RSS_WINDOW_S = 20.0
RSS_WARMUP_S = 120.0
"""Phase B's warm-up for RSS: this long, or a quarter of the phase if that is shorter."""
HEALTH_PERIOD_S = 0.5
HEALTH_TIMEOUT_S = 10.0
IDLE_WAIT_S = 30.0
"""How long the engine gets after a phase to finish and abort what is left."""
NORMAL_TIMEOUT_S = 120.0
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
WORDS = (
    "the a of and to in is it that was for on are with as his they at be this from have or by "
    "one had not but what all were when we there can an your which their said if do will each "
    "about how up out them then she many some so these would other into has more her two like "
    "him see time could no make than first been its who now people my made over did down only "
    "way find use may water long little very after words called just where most know"
).split()
ROUTES = {
    "completions": ("/v1/completions", "text_completion", "text_completion"),
    "chat": ("/v1/chat/completions", "chat.completion", "chat.completion.chunk"),
}
"""Route -> (path, the reply's object, a streamed chunk's object)."""


# Normal clients ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormalSpec:
    route: str
    stream: bool
    sampled: bool
    max_tokens: int
    body: dict


@dataclass
class Call:
    """One normal request as its client saw it (``time.perf_counter`` seconds)."""

    route: str
    stream: bool
    sampled: bool
    max_tokens: int
    sent: float
    latency: float = float("nan")
    ttft: float | None = None
    error: str | None = None


def normal_specs(seed: int, client: int) -> Iterator[NormalSpec]:
    """Client ``client``'s endless request sequence; the same in every phase."""
    rng = random.Random(seed * 1000 + client)
    while True:
        route, stream = rng.choice(list(ROUTES)), rng.random() < 0.5
        sampled, max_tokens = rng.random() < 0.5, rng.randint(16, 64)
        text = " ".join(rng.choices(WORDS, k=rng.randint(4, 40)))
        body: dict = {"model": SERVED_NAME, "max_tokens": max_tokens, "ignore_eos": True}
        body |= {"temperature": 0.8, "top_p": 0.95} if sampled else {"temperature": 0}
        if route == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        yield NormalSpec(route, stream, sampled, max_tokens, body)


async def normal_call(client: httpx.AsyncClient, spec: NormalSpec) -> Call:
    call = Call(spec.route, spec.stream, spec.sampled, spec.max_tokens, time.perf_counter())
    try:
        if spec.stream:
            call.error = await streamed(client, spec, call)
        else:
            response = await client.post(ROUTES[spec.route][0], json=spec.body)
            call.error = reply_problem(response, spec)
    except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError) as error:
        # reset, refused, timed out; or a body that is not JSON / lacks a field
        call.error = f"{type(error).__name__}: {error}"
    call.latency = time.perf_counter() - call.sent
    return call


async def streamed(client: httpx.AsyncClient, spec: NormalSpec, call: Call) -> str | None:
    """Read a streamed reply, timing its first event; what is wrong with it, or None."""
    async with client.stream("POST", ROUTES[spec.route][0], json=spec.body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            return f"HTTP {response.status_code}: {text[:200]}"
        events = []
        async for line in sse_lines(response):
            if line:
                call.ttft = call.ttft or time.perf_counter() - call.sent
                events.append(line)
    return stream_problem(events, spec)


async def sse_lines(response: httpx.Response):
    """The stream's lines as SSE splits them: at line feeds (the server ends lines with LF).
    Not httpx's ``aiter_lines``, which splits like ``str.splitlines``, also at U+0085, U+2028
    and U+2029: JSON leaves those unescaped, and a random-weight model writes them now and then."""
    pending = b""
    async for chunk in response.aiter_bytes():
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode()
    if pending:
        yield pending.decode()


def reply_problem(response: httpx.Response, spec: NormalSpec) -> str | None:
    """What is wrong with a non-streamed normal reply, or None."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    data = response.json()
    if data.get("object") != ROUTES[spec.route][1] or len(data.get("choices", [])) != 1:
        return f"not one {ROUTES[spec.route][1]} choice: {response.text[:200]}"
    choice = data["choices"][0]
    text = choice.get("text") if spec.route == "completions" else choice["message"].get("content")
    if not isinstance(text, str) or choice.get("finish_reason") != "length":
        return f"choice without text or not finished by length: {choice}"
    return usage_problem(data.get("usage"), spec.max_tokens)


def stream_problem(events: list[str], spec: NormalSpec) -> str | None:
    """What is wrong with a normal stream's events, or None."""
    if not events or events[-1] != "data: [DONE]" or events.count("data: [DONE]") != 1:
        return f"the stream does not end with one data: [DONE] (last: {events[-1:]})"
    if others := [event for event in events if not event.startswith("data: ")]:
        return f"a line that is not a data: event: {others[0][:200]!r}"
    chunks = [json.loads(event[len("data: ") :]) for event in events[:-1]]
    if errors := [chunk["error"] for chunk in chunks if "error" in chunk]:
        return f"error event: {errors[0]}"
    if {chunk.get("object") for chunk in chunks} != {ROUTES[spec.route][2]}:
        return f"a chunk that is not a {ROUTES[spec.route][2]}"
    finishes = {choice.get("finish_reason") for c in chunks for choice in c.get("choices", [])}
    if "length" not in finishes:
        return f"no choice finished by length: {finishes}"
    usages = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
    return usage_problem(usages[-1] if usages else None, spec.max_tokens)


def usage_problem(usage: dict | None, max_tokens: int) -> str | None:
    if not usage or usage.get("completion_tokens") != max_tokens:
        return f"usage {usage} is not {max_tokens} completion tokens"
    return None


async def normal_client(client, specs: Iterator[NormalSpec], stop: threading.Event) -> list[Call]:
    """A closed loop: the next request as soon as the last one ended, until ``stop``."""
    calls = []
    while not stop.is_set():
        calls.append(await normal_call(client, next(specs)))
    return calls


@dataclass
class Probe:
    sent: float
    latency: float
    error: str | None = None


async def health_probe(client: httpx.AsyncClient, stop: threading.Event) -> list[Probe]:
    """GET /health every ``HEALTH_PERIOD_S`` until ``stop``."""
    probes = []
    while not stop.is_set():
        sent = time.perf_counter()
        try:
            status = (await client.get("/health")).status_code
            error = None if status == 200 else f"HTTP {status}"
        except httpx.HTTPError as failure:
            error = f"{type(failure).__name__}: {failure}"
        probes.append(Probe(sent, time.perf_counter() - sent, error))
        await asyncio.sleep(max(0.0, sent + HEALTH_PERIOD_S - time.perf_counter()))
    return probes


async def normal_traffic(url: str, clients: int, seed: int, stop: threading.Event):
    """Every normal client and the /health probe until ``stop``: (calls, probes)."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=NORMAL_TIMEOUT_S) as client,
        httpx.AsyncClient(base_url=url, timeout=HEALTH_TIMEOUT_S) as prober,
    ):
        loops = [normal_client(client, normal_specs(seed, k), stop) for k in range(clients)]
        *calls, probes = await asyncio.gather(*loops, health_probe(prober, stop))
    return [call for one in calls for call in one], probes


# Abusive clients: raw HTTP/1.1 ------------------------------------------------------------------


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
        zero = {"sent": 0, "expected": 0, "unexpected": 0, "server_errors": 0}
        self.rows = {kind: dict(zero) for kind in kinds}
        self.examples: dict[str, list[str]] = {kind: [] for kind in kinds}
        self.timings: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}

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
            row["seconds"] = stats([seconds for _, seconds in self.timings[kind]])
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


# The server: state, RSS, CPU ----------------------------------------------------------------------


def server_state(url: str) -> dict:
    """Requests running / waiting / swapped, KV pages in use per pool, requests aborted."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {
        (s.name, tuple(sorted(s.labels.values()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    state = {
        key: values.get((f"baton:num_requests_{key}", ()), float("nan"))
        for key in ("running", "waiting", "swapped")
    }
    for pool in ("device", "host"):
        state[f"{pool}_pages"] = values.get(("baton:kv_pages_in_use", (pool,)), float("nan"))
    state["aborted"] = values.get(("baton:request_success_total", ("abort",)), 0.0)
    return state


def wait_idle(url: str, timeout: float = IDLE_WAIT_S) -> dict | None:
    """Poll /metrics until nothing runs, waits or is swapped and no page is in use, or
    ``timeout``; the last state read and how long it took (None: the server did not answer)."""
    begun = time.perf_counter()
    while True:
        try:
            state = server_state(url)
        except httpx.HTTPError:
            return None
        busy = sum(
            state[k] for k in ("running", "waiting", "swapped", "device_pages", "host_pages")
        )
        if busy == 0 or time.perf_counter() - begun > timeout:
            return state | {"seconds": round(time.perf_counter() - begun, 2)}
        time.sleep(0.5)


class Watch(threading.Thread):
    """Samples the server's RSS every ``RSS_PERIOD_S``; if the server exits, records its exit
    code and sets the running phase's stop event so that clients stop at once."""

    def __init__(self, server: Server, origin: float):
        super().__init__(daemon=True, name="watch")
        self.server, self.origin = server, origin
        self.samples: list[tuple[float, float]] = []
        """(seconds since ``origin``, RSS MiB)."""
        self.exit_code: int | None = None
        self.phase_stop = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(RSS_PERIOD_S):
            if (code := self.server.proc.poll()) is not None:
                self.exit_code = code
                self.phase_stop.set()
                return
            try:
                rss = self.server.ps.memory_info().rss / 2**20
            except psutil.Error:  # it exited since the poll: the next poll says how
                continue
            self.samples.append((round(time.perf_counter() - self.origin, 2), round(rss, 1)))


def window_median(samples: list[tuple[float, float]], at: float) -> float | None:
    """The median RSS of the samples in the ``RSS_WINDOW_S`` before ``at`` (the last one
    before it if the window is empty)."""
    inside = [rss for t, rss in samples if at - RSS_WINDOW_S <= t <= at]
    before = [rss for t, rss in samples if t <= at]
    return statistics.median(inside) if inside else (before[-1] if before else None)


def growth(samples: list[tuple[float, float]], start: float, end: float) -> dict:
    """RSS from ``start`` to ``end`` (each a ``window_median``): MiB, percent, and the slope of
    a line through the samples between them (MiB per minute)."""
    first, last = window_median(samples, start), window_median(samples, end)
    figures = {"from_mib": first, "to_mib": last, "mib": None, "pct": None}
    figures["slope_mib_per_min"] = None
    if first is not None and last is not None:
        figures["mib"] = round(last - first, 1)
        figures["pct"] = round(100 * (last - first) / first, 3)
    between = [(t, rss) for t, rss in samples if start <= t <= end]
    if len(between) >= 3:
        times, values = zip(*between, strict=True)
        figures["slope_mib_per_min"] = round(60 * np.polyfit(times, values, 1)[0], 3)
    return figures


def rss_figures(samples: list[tuple[float, float]], a: Phase, b: Phase) -> dict:
    """The verdict's RSS growth in phase B after its warm-up; to tell an allocator settling
    from a leak, the same over phase A after its first minute (normal traffic only) and over
    B's second half (a leak keeps its slope, settling flattens); the start and the peak."""
    warm = min(RSS_WARMUP_S, (b.end - b.start) / 4)
    return {
        "start_mib": samples[0][1] if samples else None,
        "peak_mib": max((rss for _, rss in samples), default=None),
        "warmup_s": round(warm, 1),
        "after_warmup": growth(samples, b.start + warm, b.end),
        "phase_a": growth(samples, a.start + min(60.0, (a.end - a.start) / 4), a.end),
        "second_half_of_b": growth(samples, (b.start + b.end) / 2, b.end),
    }


CPU_USERS = ("client", "server", "other")


def cpu_mark(server: Server) -> tuple[float, float, float, float]:
    """CPU seconds of this client, the server and the whole machine, and the wall clock."""
    try:
        served = server.cpu_seconds()
    except psutil.Error:  # the server is gone: its CPU is unknown
        served = float("nan")
    return sum(os.times()[:2]), served, busy_cpu_seconds(), time.perf_counter()


def cpu_use(server: Server, mark: tuple[float, float, float, float]) -> dict:
    """Cores kept busy since ``mark`` by this client, the server and everything else."""
    client, served, busy, wall = (
        now - then for now, then in zip(cpu_mark(server), mark, strict=True)
    )
    other = (busy - client - served) / wall
    return {
        "client_cpu_per_wall": round(client / wall, 3),
        "server_cpu_per_wall": round(served / wall, 3),
        "other_cpu_per_wall": round(other, 3),
        "disturbed": bool(other > DISTURBED_CPU),
    }


# Phases ------------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    start: float = 0.0
    """Seconds since the soak began, as the RSS samples."""
    end: float = 0.0
    calls: list[Call] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    cpu: dict = field(default_factory=dict)
    idle: dict | None = None
    """The server's state once idle after the phase; None if it could not be read."""
    abuse: dict | None = None
    aborted: float | None = None
    """Requests the engine finished as aborted during the phase (/metrics)."""


def run_phase(server: Server, args, watch: Watch, name: str, seconds: float, abused: bool) -> Phase:
    """Normal traffic (and abuse if ``abused``) for ``seconds``, then wait for the server to be
    idle and read what is left in it."""
    phase = Phase(name, start=time.perf_counter() - watch.origin)
    stop = watch.phase_stop = threading.Event()
    if watch.exit_code is not None:  # the server died in an earlier phase: nothing to measure
        stop.set()
    timer = threading.Timer(seconds, stop.set)
    before, mark = wait_idle(server.url, timeout=0), cpu_mark(server)
    port = int(server.url.rsplit(":", 1)[1])
    tally, threads = start_abuse(port, args.read_timeout, args.seed, stop) if abused else (None, [])
    timer.start()
    phase.calls, phase.probes = asyncio.run(
        normal_traffic(server.url, args.clients, args.seed, stop)
    )
    timer.cancel()
    for thread in threads:
        thread.join(args.read_timeout + 60)
    phase.end, phase.cpu = time.perf_counter() - watch.origin, cpu_use(server, mark)
    phase.abuse = tally.summary() if tally else None
    print(f"{name}: {phase.end - phase.start:.0f} s, {len(phase.calls)} requests", flush=True)
    phase.idle = wait_idle(server.url)
    if phase.idle and before:
        phase.aborted = phase.idle["aborted"] - before["aborted"]
    return phase


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    quantiles = {f"p{q}": percentile(values, q) for q in (50, 90, 99)}
    mean, top = round(statistics.fmean(values), 4), round(max(values), 4)
    return {"n": len(values), "mean": mean} | quantiles | {"max": top}


def per_minute(phase: Phase, origin: float) -> list[dict]:
    """p50 / p99 latency of the calls sent in each minute of the phase: drift shows here."""
    minutes: dict[int, list[float]] = {}
    for call in phase.calls:
        minute = int((call.sent - origin - phase.start) // 60)
        if call.error is None:
            minutes.setdefault(minute, []).append(call.latency)
    return [
        {"minute": m, "n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)}
        for m, v in sorted(minutes.items())
    ]


def phase_figures(phase: Phase, origin: float) -> dict:
    """A phase's requests, errors and latencies, /health, CPU and what was left after it."""
    ok = [call for call in phase.calls if call.error is None]
    failed = [call for call in phase.calls if call.error is not None]
    wall = phase.end - phase.start
    slowest = sorted(ok, key=lambda call: call.latency, reverse=True)[:10]
    return {
        "seconds": round(wall, 1),
        "requests": len(phase.calls),
        "completed": len(ok),
        "failed": len(failed),
        "errors": sorted({call.error for call in failed})[:5],
        "requests_per_s": round(len(ok) / wall, 3),
        "e2e_s": stats([call.latency for call in ok]),
        "ttft_s": stats([call.ttft for call in ok if call.ttft is not None]),
        "health_s": stats([probe.latency for probe in phase.probes if probe.error is None]),
        "health_failed": sum(probe.error is not None for probe in phase.probes),
        "health_errors": sorted({p.error for p in phase.probes if p.error})[:5],
        "health_slowest": [
            [round(probe.sent - origin - phase.start, 2), round(probe.latency, 4)]
            for probe in sorted(phase.probes, key=lambda probe: probe.latency)[-5:]
        ],
        "per_minute": per_minute(phase, origin),
        "slowest": [
            asdict(call) | {"sent": round(call.sent - origin - phase.start, 2)} for call in slowest
        ],
        "idle_after": phase.idle,
        "aborted_by_engine": phase.aborted,
        "abuse": phase.abuse,
    } | phase.cpu


def log_tracebacks(text: str) -> list[str]:
    """For each traceback in the server's log, the line before it (what it was about): an
    exception the server logged is an error even when no client saw it."""
    lines = text.splitlines()
    return [
        lines[k - 1] if k else "" for k, line in enumerate(lines) if line.startswith("Traceback")
    ]


# Verdict and output ------------------------------------------------------------------------------


def error_counts(a: dict, b: dict, tracebacks: int, exit_code: int | None) -> dict:
    """Server errors by where they showed, and the wrong refusals."""
    abuse = b["abuse"] or {}
    counts = {
        "normal_requests_failed": a["failed"] + b["failed"],
        "health_failed": a["health_failed"] + b["health_failed"],
        "abusive_5xx_or_refused": sum(row["server_errors"] for row in abuse.values()),
        "server_log_tracebacks": tracebacks,
        "server_died": int(exit_code is not None),
    }
    counts["server_errors"] = sum(counts.values())
    unexpected = sum(row["unexpected"] for row in abuse.values())
    counts["wrong_refusals"] = unexpected - counts["abusive_5xx_or_refused"]
    return counts


def leftovers(phase: dict) -> tuple[float | None, float | None]:
    """(KV pages, requests) still in the server once idle after the phase; None if unknown."""
    idle = phase["idle_after"]
    if idle is None:
        return None, None
    pages = idle["device_pages"] + idle["host_pages"]
    return pages, idle["running"] + idle["waiting"] + idle["swapped"]


def checks(a: dict, b: dict, errors: dict, rss: dict) -> list[dict]:
    """The verdict's checks (``gate``), then for information /health beside the issue's 100 ms
    and the phases other processes disturbed."""
    never = [kind for kind, row in (b["abuse"] or {}).items() if row["expected"] == 0]
    p99_ratio = ratio(b["e2e_s"].get("p99"), a["e2e_s"].get("p99"), 3)
    gates = [
        ("server errors (see errors in the JSON)", errors["server_errors"], 0, "=="),
        ("wrong refusals to abusive requests", errors["wrong_refusals"], 0, "=="),
        ("abusive kinds never answered as expected", len(never), 0, "=="),
    ]
    for name, phase in (("A", a), ("B", b)):
        pages, requests = leftovers(phase)
        gates += [(f"KV pages left after phase {name}", pages, 0, "==")]
        gates += [(f"requests left after phase {name}", requests, 0, "==")]
    after_warmup = ("RSS growth % in phase B after warm-up", rss["after_warmup"]["pct"])
    gates += [(*after_warmup, TARGETS["rss_growth_pct"], "<=")]
    gates += [("normal p99 latency B / A", p99_ratio, TARGETS["p99_ratio"], "<=")]
    health = check(
        "/health p99 s in phase B", b["health_s"].get("p99"), TARGETS["health_p99_s"], "<="
    )
    second_half = check(
        "RSS growth % over phase B's second half", rss["second_half_of_b"]["pct"], None
    )
    disturbed = [name for name, phase in (("A", a), ("B", b)) if phase["disturbed"]]
    noted = check("phases other processes disturbed", ", ".join(disturbed) or "none", None)
    info = [health, second_half, noted]
    return [check(*gate) | {"gate": True} for gate in gates] + [
        row | {"gate": False} for row in info
    ]


def report(payload: dict) -> str:
    """The Markdown: phases, abusive kinds, RSS, checks and the verdict."""
    rows = []
    for name, p in payload["phases"].items():
        row = {
            "phase": name,
            "seconds": p["seconds"],
            "requests": p["completed"],
            "failed": p["failed"],
            "req/s": p["requests_per_s"],
        }
        row |= {f"e2e {q}": p["e2e_s"].get(q) for q in ("p50", "p99")}
        row |= {f"TTFT {q}": p["ttft_s"].get(q) for q in ("p50", "p99")}
        row |= {f"/health {q}": p["health_s"].get(q) for q in ("p50", "p99", "max")}
        row |= {
            "client cpu": p["client_cpu_per_wall"],
            "server cpu": p["server_cpu_per_wall"],
            "other cpu": p["other_cpu_per_wall"],
        }
        row["pages left"], row["requests left"] = leftovers(p)
        rows.append(row)
    abuse = payload["phases"]["B"]["abuse"] or {}
    counts = ("sent", "expected", "unexpected", "server_errors")
    kinds = [
        {"kind": kind}
        | {key: row[key] for key in counts}
        | {f"{q} s": row.get("seconds", {}).get(q) for q in ("p50", "max")}
        for kind, row in abuse.items()
    ]
    rss, setup = payload["rss"], payload["setup"]
    spans = {"after_warmup": f"B after its {rss['warmup_s']} s warm-up (verdict)"}
    spans |= {"phase_a": "A after its first minute", "second_half_of_b": "B's second half"}
    growths = [{"RSS over": label} | rss[key] for key, label in spans.items()]
    lines = [
        f"# Soak: {setup['model']} model, {setup['torch_threads']} torch thread(s), "
        f"{setup['clients']} normal clients; verdict: **{payload['verdict']}**",
        "",
        *markdown(rows),
        "",
        f"Server RSS: {rss['start_mib']} MiB at the start, peak {rss['peak_mib']} MiB.",
        "",
        *markdown(growths),
        "",
        *markdown(kinds),
        "",
        *markdown(payload["checks"], ["check", "value", "op", "target", "status", "gate"]),
    ]
    return "\n".join(lines) + "\n"


def results_stem(out: str) -> Path:
    """``--out``: a bare name lands in ``results/``; anything with a folder where it says."""
    path = Path(out)
    return RESULTS / out if path.parent == Path(".") else path


def write(stem: Path, payload: dict) -> str:
    stem.parent.mkdir(parents=True, exist_ok=True)
    text = report(payload)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    return text


def console(payload: dict) -> str:
    """The summary printed at the end of a run."""
    a, b = payload["phases"]["A"], payload["phases"]["B"]
    errors, rss = payload["errors"], payload["rss"]
    both = lambda f: f"A {f(a)} B {f(b)}"  # noqa: E731
    found = {key: count for key, count in errors.items() if count}
    return "\n".join(
        [
            f"verdict: {payload['verdict']}",
            f"server errors {errors['server_errors']}, wrong refusals {errors['wrong_refusals']}"
            f" {found or ''}",
            f"KV pages left {both(lambda p: leftovers(p)[0])}, requests left "
            f"{both(lambda p: leftovers(p)[1])}",
            f"e2e p50 {both(lambda p: p['e2e_s'].get('p50'))}; p99 "
            f"{both(lambda p: p['e2e_s'].get('p99'))}, B / A {payload['p99_ratio']}",
            f"requests {both(lambda p: p['completed'])}; /health p99 "
            f"{both(lambda p: p['health_s'].get('p99'))} s",
            f"RSS growth after warm-up {rss['after_warmup']['pct']}% "
            f"({rss['after_warmup']['mib']} MiB), over B's second half "
            f"{rss['second_half_of_b']['pct']}%; peak {rss['peak_mib']} MiB",
            "cores busy (client / server / other) "
            + both(lambda p: "/".join(str(p[f"{who}_cpu_per_wall"]) for who in CPU_USERS)),
        ]
    )


# Command line ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", default="random", help="random (default) or a checkpoint")
    parser.add_argument("--minutes", type=float, help="phase B (default 20; quick 2)")
    parser.add_argument("--baseline-minutes", type=float, help="phase A (default 5; quick 1)")
    parser.add_argument("--warmup-seconds", type=float, help="before A (default 30; quick 10)")
    parser.add_argument("--quick", action="store_true", help="short phases: a check it runs")
    parser.add_argument("--threads", type=int, default=1, help="server torch threads (1)")
    parser.add_argument("--clients", type=int, default=4, help="normal clients (4)")
    parser.add_argument("--read-timeout", type=float, default=5.0, help="server's, s (5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="results stem (soak-cpu, quick: soak-cpu-quick)")
    args = parser.parse_args(argv)
    defaults = {"minutes": (20, 2), "baseline_minutes": (5, 1), "warmup_seconds": (30, 10)}
    defaults["out"] = ("soak-cpu", "soak-cpu-quick")
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def serve_args(args) -> list[str]:
    flags = ["--model", args.model, "--max-model-len", str(MAX_MODEL_LEN)]
    return flags + ["--read-timeout", f"{args.read_timeout:g}"]


def source_digest() -> str:
    """A digest of the server's Python source: the tree may differ from every commit (and
    change between runs), so the results say which code they measured."""
    package = Path(__file__).resolve().parent.parent / "baton_paged"
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def git_state() -> str:
    """The commit and whether the tree differs from it (read only: no index refresh written)."""
    root = Path(__file__).resolve().parent.parent
    env = os.environ | {"GIT_OPTIONAL_LOCKS": "0"}
    command = ["git", "describe", "--always", "--dirty"]
    found = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
    return found.stdout.strip() or "unknown"


def soak(server: Server, args) -> dict:
    """Warm-up, phase A, phase B on one server; every figure the results hold."""
    measured = {"git": git_state(), "source_digest": source_digest()}  # what the server loads
    startup = server.wait_ready()
    origin = time.perf_counter()
    watch = Watch(server, origin)
    watch.start()
    warm = run_phase(server, args, watch, "warm-up", args.warmup_seconds, abused=False)
    a = run_phase(server, args, watch, "A", args.baseline_minutes * 60, abused=False)
    b = run_phase(server, args, watch, "B", args.minutes * 60, abused=True)
    watch.done.set()
    log = Path(server.log.name).read_text()
    phases = {p.name: phase_figures(p, origin) for p in (a, b)}
    rss = rss_figures(watch.samples, a, b)
    tracebacks = log_tracebacks(log)
    errors = error_counts(phases["A"], phases["B"], len(tracebacks), watch.exit_code)
    found = checks(phases["A"], phases["B"], errors, rss)
    setup = {
        "model": args.model,
        "serve_flags": serve_args(args),
        "clients": args.clients,
        "torch_threads": server.torch_threads(),
        "startup_s": round(startup, 2),
        "warmup": {
            "seconds": round(warm.end - warm.start, 1),
            "requests": len(warm.calls),
            "idle_after": warm.idle,
        },
    } | measured
    rates = {
        "refusal_period_s": REFUSAL_PERIOD_S,
        "big_prompt_period_s": BIG_PROMPT_PERIOD_S,
        "slowloris_open": SLOWLORIS_OPEN,
        "disconnect_period_s": DISCONNECT_PERIOD_S,
        "abort_period_s": ABORT_PERIOD_S,
        "abort_after_s": ABORT_AFTER_S,
        "big_prompt_burst": BIG_PROMPT_BURST,
    }
    return {
        "verdict": "pass" if all(r["status"] == "met" for r in found if r["gate"]) else "FAIL",
        "environment": harness.environment(args.threads, torch.device("cpu"))
        | {"httpx": httpx.__version__},
        "args": vars(args),
        "setup": setup | {"abuse_rates": rates},
        "targets": TARGETS,
        "checks": found,
        "errors": errors,
        "p99_ratio": ratio(phases["B"]["e2e_s"].get("p99"), phases["A"]["e2e_s"].get("p99"), 3),
        "phases": phases,
        "rss": rss,
        "rss_samples": watch.samples,
        "server_exit_code": watch.exit_code,
        "server_log_tracebacks": tracebacks[:5],
        "server_log_tail": log[-3000:] if tracebacks or watch.exit_code is not None else None,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    server = Server(serve_args(args), args.threads, log_prefix="soak")
    try:
        payload = soak(server, args)
    finally:
        server.stop()
    payload["total_seconds"] = round(time.perf_counter() - harness.STARTED, 1)
    stem = results_stem(args.out)
    write(stem, payload)
    print(console(payload), f"wrote {stem}.json and .md", sep="\n", flush=True)


if __name__ == "__main__":
    main()
