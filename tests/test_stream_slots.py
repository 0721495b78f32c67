"""MAX_STREAMS_PER_SUBJECT through the production sidecar: real event-stream upstreams, two
subjects with real tokens, metrics scraped from the real listener.

The rule under test: a request that may become an event stream (a GET, or a POST whose Accept
allows text/event-stream) takes one of its subject's slots before it is forwarded, or is refused
with 429 at once, so a refusal never comes after the upstream executed the request. The slot comes
back when the answer is not a stream, or when the stream ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import FakeIdp, SidecarFactory, bearer, wait_until
from processes import free_port
from test_metrics import scrape

from oauth_sidecar.app import PROXY

Client = TestClient[web.Request, web.Application]
BOUND = 10.0  # seconds: every exchange in this module
MCP_ACCEPT = "application/json, text/event-stream"  # what MCP clients send with every POST
ALICE, BOB = "alice", "bob"


@dataclass
class EventStreams:
    """An MCP-like upstream. GET: an event stream held open until the client leaves. POST: the
    answer the test names in X-Answer: `json`, `sse-end` (one event, then the end, as a tool call
    answered over SSE) or `sse-open` (one event, then held open); `X-Hold` makes a JSON answer
    wait until `release` is set. Every request that reached it is recorded, as executed."""

    executed: list[tuple[str, str]] = field(default_factory=list)  # (method, subject header)
    open: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.executed.append((request.method, request.headers.get("X-Who", "")))
        answer = "sse-open" if request.method == "GET" else request.headers.get("X-Answer", "")
        if answer == "json":
            if "X-Hold" in request.headers:
                await self.release.wait()
            return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        if answer == "sse-end":
            await response.write_eof()
            return response
        self.open += 1
        try:
            await self.stop.wait()  # until the sidecar closes the stream, or the test ends
        finally:
            self.open -= 1
        return response

    def count(self, method: str) -> int:
        return sum(1 for seen, _ in self.executed if seen == method)


@pytest.fixture
async def streams() -> AsyncIterator[tuple[EventStreams, str]]:
    upstream = EventStreams()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield upstream, f"http://127.0.0.1:{server.port}"
    upstream.stop.set()  # a failed test left streams open: end them, so closing is quick
    upstream.release.set()
    await server.close()


@dataclass
class Limited:
    client: Client
    metrics_port: int
    tokens: dict[str, str]


StartLimited = Callable[[int], Awaitable[Limited]]


@pytest.fixture
def limited(
    make_sidecar: SidecarFactory, idp: FakeIdp, streams: tuple[EventStreams, str]
) -> StartLimited:
    async def start(limit: int) -> Limited:
        port = free_port()
        client = await make_sidecar(MCP_UPSTREAM_URL=streams[1], METRICS_PORT=str(port),
                                    MAX_STREAMS_PER_SUBJECT=str(limit))
        tokens = {who: idp.mint(claims={"sub": who}) for who in (ALICE, BOB)}
        return Limited(client, port, tokens)

    return start


def headers(token: str, who: str, accept: str = MCP_ACCEPT, **extra: str) -> dict[str, str]:
    return {**bearer(token), "Accept": accept, "X-Who": who, **extra}


async def open_stream(sidecar: Limited, who: str) -> aiohttp.ClientResponse:
    """A GET stream, its first event read (so the upstream holds it open)."""
    response = await sidecar.client.get(
        "/mcp", headers=headers(sidecar.tokens[who], who), timeout=aiohttp.ClientTimeout(BOUND))
    assert response.status == 200, await response.text()
    async with asyncio.timeout(BOUND):
        assert await response.content.readuntil(b"\n\n") == b"data: first\n\n"
    return response


async def assert_refused(response: aiohttp.ClientResponse) -> None:
    assert response.status == 429
    assert response.content_type == "application/json"
    assert (await response.json())["error"] == "rate_limited"
    assert int(response.headers["Retry-After"]) >= 1
    # The refused connection is closed, so it holds no descriptor another user needs.
    assert response.headers["Connection"] == "close"


async def post(sidecar: Limited, who: str, answer: str, accept: str = MCP_ACCEPT,
               **extra: str) -> aiohttp.ClientResponse:
    return await sidecar.client.post(
        "/mcp", data=b'{"jsonrpc":"2.0","id":1,"method":"tools/call"}',
        headers=headers(sidecar.tokens[who], who, accept, **{"X-Answer": answer, **extra}),
        timeout=aiohttp.ClientTimeout(BOUND))


async def test_a_subject_over_its_streams_gets_429_before_the_upstream_and_others_are_unaffected(
    limited: StartLimited, streams: tuple[EventStreams, str]
) -> None:
    upstream = streams[0]
    sidecar = await limited(2)
    held = [await open_stream(sidecar, ALICE) for _ in range(2)]

    third = await sidecar.client.get("/mcp", headers=headers(sidecar.tokens[ALICE], ALICE),
                                     timeout=aiohttp.ClientTimeout(BOUND))
    await assert_refused(third)
    # A tool call that could be answered as a stream is refused too, and never executed.
    await assert_refused(await post(sidecar, ALICE, "sse-end"))
    assert upstream.count("GET") == 2
    assert upstream.count("POST") == 0

    others = [await open_stream(sidecar, BOB) for _ in range(2)]  # Bob's budget is his own
    assert upstream.open == 4

    result = await scrape(sidecar.metrics_port)
    assert result.series("rate_limited_total") == {(("scope", "streams"),): 2}
    assert result.series("auth_failures_total") == {(("reason", "rate_limited_streams"),): 2}
    assert result.value("open_streams") == 4
    for response in held + others:
        response.close()


async def test_a_stream_that_ends_gives_its_slot_back(
    limited: StartLimited, streams: tuple[EventStreams, str]
) -> None:
    upstream = streams[0]
    sidecar = await limited(1)
    # Ended by the upstream: a tool call answered over SSE.
    answered = await post(sidecar, ALICE, "sse-end")
    assert answered.status == 200
    assert await answered.read() == b"data: first\n\n"
    # Ended by the client: it leaves.
    stream = await open_stream(sidecar, ALICE)
    await assert_refused(await post(sidecar, ALICE, "sse-end"))
    stream.close()
    await wait_until(lambda: upstream.open == 0)
    await wait_until(lambda: sidecar.client.app[PROXY].in_flight() == 0)
    again = await open_stream(sidecar, ALICE)
    again.close()


async def test_an_answer_that_is_not_a_stream_holds_the_slot_only_until_its_headers(
    limited: StartLimited, streams: tuple[EventStreams, str]
) -> None:
    upstream = streams[0]
    sidecar = await limited(1)
    for _ in range(3):  # each JSON answer gives the slot back at once
        answered = await post(sidecar, ALICE, "json")
        assert answered.status == 200
        assert (await answered.json())["result"] == {}
    # While a JSON answer is awaited, the request may still become a stream: it holds the slot.
    pending = asyncio.ensure_future(post(sidecar, ALICE, "json", **{"X-Hold": "1"}))
    await wait_until(lambda: upstream.count("POST") == 4)
    await assert_refused(await sidecar.client.get(
        "/mcp", headers=headers(sidecar.tokens[ALICE], ALICE),
        timeout=aiohttp.ClientTimeout(BOUND)))
    upstream.release.set()
    async with asyncio.timeout(BOUND):
        assert (await pending).status == 200
    stream = await open_stream(sidecar, ALICE)
    stream.close()
    await wait_until(lambda: upstream.open == 0)
    await wait_until(lambda: sidecar.client.app[PROXY].in_flight() == 0)
    # Requests that cannot become a stream never take a slot, even with every slot taken.
    stream = await open_stream(sidecar, ALICE)
    answered = await post(sidecar, ALICE, "json", accept="application/json")
    assert answered.status == 200
    stream.close()


async def test_a_stream_the_upstream_opens_against_accept_is_relayed_and_counted_never_refused(
    limited: StartLimited, streams: tuple[EventStreams, str]
) -> None:
    """An answer already executed is never refused: a POST that took no slot (its Accept excludes
    event streams) but that the upstream answers with one anyway is relayed, and counts."""
    upstream = streams[0]
    sidecar = await limited(1)
    stream = await open_stream(sidecar, ALICE)
    surprise = await post(sidecar, ALICE, "sse-open", accept="application/json")
    assert surprise.status == 200
    async with asyncio.timeout(BOUND):
        assert await surprise.content.readuntil(b"\n\n") == b"data: first\n\n"
    assert upstream.count("POST") == 1

    stream.close()
    await wait_until(lambda: upstream.open == 1)
    await wait_until(lambda: sidecar.client.app[PROXY].open_streams() == 1)
    # The surprise stream still holds Alice's one slot.
    await assert_refused(await sidecar.client.get(
        "/mcp", headers=headers(sidecar.tokens[ALICE], ALICE),
        timeout=aiohttp.ClientTimeout(BOUND)))
    surprise.close()
    await wait_until(lambda: upstream.open == 0)
    await wait_until(lambda: sidecar.client.app[PROXY].in_flight() == 0)
    again = await open_stream(sidecar, ALICE)
    again.close()


@pytest.mark.parametrize("accept", [
    "text/event-stream", "application/json, text/event-stream;q=0.5", "text/*", "*/*",
    "application/json, */*;q=0.1",
])
async def test_every_accept_that_allows_an_event_stream_takes_a_slot(
    limited: StartLimited, streams: tuple[EventStreams, str], accept: str
) -> None:
    sidecar = await limited(1)
    stream = await open_stream(sidecar, ALICE)
    await assert_refused(await post(sidecar, ALICE, "sse-end", accept=accept))
    assert streams[0].count("POST") == 0
    stream.close()


@pytest.mark.parametrize("accept", [
    "application/json", "application/json, text/event-stream;q=0", "text/event-stream; q=0.0",
])
async def test_an_accept_that_excludes_event_streams_takes_no_slot(
    limited: StartLimited, streams: tuple[EventStreams, str], accept: str
) -> None:
    sidecar = await limited(1)
    stream = await open_stream(sidecar, ALICE)
    answered = await post(sidecar, ALICE, "json", accept=accept)
    assert answered.status == 200
    stream.close()
