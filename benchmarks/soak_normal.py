"""The soak's normal clients (``soak.py`` says how they load the server and why): closed loops
over ``httpx.AsyncClient`` that send completions and chats, streamed or not, and check every
reply's shape, and the /health probe beside them."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
from serving_http import SERVED_NAME

HEALTH_PERIOD_S = 0.5
HEALTH_TIMEOUT_S = 10.0
NORMAL_TIMEOUT_S = 120.0
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
