"""Request bodies on their way upstream (oauth_sidecar.request_body), through the production
sidecar: bodies are written byte for byte on raw sockets (stalls and chunk boundaries matter) and
received by a raw upstream that records every byte as it arrives, whether the body was complete,
and whether the sidecar closed the connection.

What must hold: a body over WHOLE_BODY_BYTES, chunked included, reaches the upstream while the
client is still sending it; MAX_REQUEST_BODY_BYTES still applies, and when it is crossed mid-stream
the upstream sees a body that breaks off (no last chunk, then the connection closed), never a
complete one; a body that stops arriving is 408 after REQUEST_BODY_TIMEOUT_SECONDS of silence,
never 504, and is not counted as an upstream failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from conftest import FakeIdp, SidecarFactory, wait_until
from processes import free_port
from test_metrics import scrape

from oauth_sidecar.request_body import WHOLE_BODY_BYTES

BOUND = 5.0  # seconds: every connect, write and read on a raw socket
KIB = 1024


# -- the raw upstream -----------------------------------------------------------------------------


def dechunk(raw: bytes) -> tuple[bytes, bool]:
    """The body so far of a chunked message, and whether its last chunk has arrived."""
    body = b""
    while True:
        size_line, sep, rest = raw.partition(b"\r\n")
        if not sep:
            return body, False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body, rest.startswith(b"\r\n")  # no trailers here
        if len(rest) < size + 2:
            return body + rest[:size], False
        body, raw = body + rest[:size], rest[size + 2:]


@dataclass
class Received:
    head: bytes
    raw: bytearray = field(default_factory=bytearray)
    complete: bool = False
    closed: bool = False  # the sidecar closed the connection before the body was complete

    @property
    def chunked(self) -> bool:
        return b"\r\ntransfer-encoding: chunked" in self.head.lower()

    def announced(self) -> int | None:
        for line in self.head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return int(value)
        return None

    @property
    def body(self) -> bytes:
        return dechunk(bytes(self.raw))[0] if self.chunked else bytes(self.raw)

    def is_complete(self) -> bool:
        if self.chunked:
            return dechunk(bytes(self.raw))[1]
        return len(self.raw) >= (self.announced() or 0)


@dataclass
class RawUpstream:
    """Records each request's head and body bytes as they arrive; answers 200 JSON once a body
    is complete, never before."""

    requests: list[Received] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            received = Received(head)
            self.requests.append(received)
            while not received.is_complete():
                data = await asyncio.wait_for(reader.read(64 * KIB), 30)
                if not data:
                    received.closed = True
                    return
                received.raw += data
            received.complete = True
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 11\r\nConnection: close\r\n\r\n{\"ok\":true}")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            if self.requests:
                self.requests[-1].closed = True
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    yield upstream
    server.close()
    await asyncio.wait_for(server.wait_closed(), BOUND)


# -- the raw client -------------------------------------------------------------------------------


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def post_head(token: str, *lines: str) -> bytes:
    fields = ["POST /mcp HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {token}",
              "Content-Type: application/json", *lines]
    return ("\r\n".join(fields) + "\r\n\r\n").encode()


@dataclass
class Answer:
    status: int
    error: str | None


class RawClient:
    """One connection to the sidecar; writes are bounded, reads stop at one full answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int | None) -> RawClient:
        assert port is not None
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), BOUND)
        return cls(reader, writer)

    async def send(self, *parts: bytes, pause: float = 0.0) -> None:
        for index, part in enumerate(parts):
            if index and pause:
                await asyncio.sleep(pause)
            self.writer.write(part)
            await asyncio.wait_for(self.writer.drain(), BOUND)

    async def answer(self, within: float = BOUND) -> Answer:
        async with asyncio.timeout(within):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await self.reader.readexactly(length)
            error = json.loads(body).get("error") if body.startswith(b"{") else None
        return Answer(status, error)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), BOUND)


# -- large bodies stream --------------------------------------------------------------------------


async def test_a_large_chunked_body_reaches_the_upstream_while_it_is_still_being_sent(
    make_sidecar: SidecarFactory, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    """Before: a chunked body was read whole (up to MAX_REQUEST_BODY_BYTES) before the upstream
    saw a byte of it."""
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=raw_upstream.url)
    pieces = [os.urandom(64 * KIB) for _ in range(16)]  # 1 MiB
    client = await RawClient.connect(sidecar.port)
    try:
        await client.send(post_head(idp.mint(), "Transfer-Encoding: chunked"),
                          *(chunk(piece) for piece in pieces[:4]))
        # The first 256 KiB are on their way upstream before the client sends another byte.
        await wait_until(lambda: bool(raw_upstream.requests)
                         and len(raw_upstream.requests[0].body) >= 128 * KIB)
        await client.send(*(chunk(piece) for piece in pieces[4:]), LAST_CHUNK)
        answer = await client.answer()
    finally:
        await client.close()
    assert answer.status == 200
    (received,) = raw_upstream.requests
    assert received.complete
    assert received.chunked  # its length was unknown: relayed chunked
    assert received.body == b"".join(pieces)


async def test_a_large_body_of_known_length_streams_with_its_length(
    make_sidecar: SidecarFactory, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=raw_upstream.url)
    body = os.urandom(512 * KIB)
    client = await RawClient.connect(sidecar.port)
    try:
        await client.send(post_head(idp.mint(), f"Content-Length: {len(body)}"), body[:256 * KIB])
        await wait_until(lambda: bool(raw_upstream.requests)
                         and len(raw_upstream.requests[0].body) >= 128 * KIB)
        await client.send(body[256 * KIB:])
        answer = await client.answer()
    finally:
        await client.close()
    assert answer.status == 200
    (received,) = raw_upstream.requests
    assert (received.complete, received.chunked, received.announced()) == (True, False, len(body))
    assert received.body == body


async def test_a_small_chunked_body_is_still_sent_whole_with_its_length(
    make_sidecar: SidecarFactory, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=raw_upstream.url)
    pieces = [b"a" * 1000, b"b" * 2000]
    client = await RawClient.connect(sidecar.port)
    try:
        await client.send(post_head(idp.mint(), "Transfer-Encoding: chunked"),
                          *(chunk(p) for p in pieces), LAST_CHUNK, pause=0.1)
        answer = await client.answer()
    finally:
        await client.close()
    assert answer.status == 200
    (received,) = raw_upstream.requests
    assert (received.chunked, received.announced()) == (False, 3000)
    assert received.body == b"".join(pieces)


async def test_a_chunked_body_over_the_cap_mid_stream_is_413_and_breaks_off_upstream(
    make_sidecar: SidecarFactory, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    """Streaming began at WHOLE_BODY_BYTES; the cap is crossed later. The client gets 413; the
    upstream got a chunked body without its last chunk, then the connection closed: by RFC 9112
    §7.1 an incomplete message, never mistaken for a complete request."""
    cap = 3 * WHOLE_BODY_BYTES
    metrics = free_port()
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=raw_upstream.url,
                                 MAX_REQUEST_BODY_BYTES=str(cap), METRICS_PORT=str(metrics))
    client = await RawClient.connect(sidecar.port)
    parts = [post_head(idp.mint(), "Transfer-Encoding: chunked"),
             *(chunk(os.urandom(32 * KIB)) for _ in range(16)), LAST_CHUNK]  # 512 KiB
    sending = asyncio.create_task(client.send(*parts))
    try:
        answer = await client.answer()
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, TimeoutError):
            await sending
        await client.close()
    assert (answer.status, answer.error) == (413, "request_too_large")
    await wait_until(lambda: bool(raw_upstream.requests) and raw_upstream.requests[0].closed)
    (received,) = raw_upstream.requests
    assert received.chunked
    assert not received.complete
    assert WHOLE_BODY_BYTES < len(received.body) <= cap
    assert (await scrape(metrics)).series("upstream_errors_total") == {}


# -- bodies that stop arriving --------------------------------------------------------------------


@dataclass(frozen=True)
class Stall:
    id: str
    framing: str  # a header line
    sent: bytes  # what arrives before the silence
    streamed: bool  # whether the upstream has seen the request by then


STALLS = [
    Stall("small-length", "Content-Length: 1000", b"x" * 10, streamed=False),
    Stall("large-length", f"Content-Length: {4 * WHOLE_BODY_BYTES}", b"x" * 2 * WHOLE_BODY_BYTES,
          streamed=True),
    Stall("small-chunked", "Transfer-Encoding: chunked", chunk(b"x" * 10), streamed=False),
    Stall("large-chunked", "Transfer-Encoding: chunked",
          chunk(b"x" * WHOLE_BODY_BYTES) + chunk(b"y" * WHOLE_BODY_BYTES), streamed=True),
]
# The body's own bound; and, for streamed bodies, the upstream's response timeout running out
# while the client is the one that is silent (before: a 504 counted as an upstream failure).
TIMEOUTS = {
    "body-timeout": {"REQUEST_BODY_TIMEOUT_SECONDS": "0.5"},
    "response-timeout": {"UPSTREAM_RESPONSE_TIMEOUT_SECONDS": "0.5"},
}
STALL_CASES = [(stall, name) for stall in STALLS for name in TIMEOUTS
               if stall.streamed or name == "body-timeout"]


@pytest.mark.parametrize(("stall", "bound"), STALL_CASES,
                         ids=[f"{stall.id}-{name}" for stall, name in STALL_CASES])
async def test_a_body_that_stops_arriving_is_408_and_not_an_upstream_failure(
    make_sidecar: SidecarFactory, idp: FakeIdp, raw_upstream: RawUpstream, stall: Stall,
    bound: str,
) -> None:
    metrics = free_port()
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=raw_upstream.url, METRICS_PORT=str(metrics),
                                 **TIMEOUTS[bound])
    client = await RawClient.connect(sidecar.port)
    try:
        await client.send(post_head(idp.mint(), stall.framing), stall.sent)
        answer = await client.answer()
    finally:
        await client.close()
    assert (answer.status, answer.error) == (408, "request_timeout")
    if stall.streamed:
        await wait_until(lambda: bool(raw_upstream.requests) and raw_upstream.requests[0].closed)
        assert not raw_upstream.requests[0].complete
    else:
        assert raw_upstream.requests == []
    result = await scrape(metrics)
    assert result.series("upstream_errors_total") == {}
    assert result.series("requests_total") == {(("route", "mcp"), ("status", "408")): 1}


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("size", [6 * KIB, 6 * WHOLE_BODY_BYTES])
async def test_a_slow_body_with_short_pauses_arrives_whole(
    make_sidecar: SidecarFactory, idp: FakeIdp, raw_upstream: RawUpstream, framing: str,
    size: int,
) -> None:
    """REQUEST_BODY_TIMEOUT_SECONDS bounds each silence, not the whole upload: six pauses of
    0.3 s, longer together than the 0.5 s bound, are fine."""
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=raw_upstream.url,
                                 REQUEST_BODY_TIMEOUT_SECONDS="0.5")
    body = os.urandom(size)
    pieces = [body[i:i + size // 6] for i in range(0, size, size // 6)]
    if framing == "length":
        parts = [post_head(idp.mint(), f"Content-Length: {size}"), *pieces]
    else:
        parts = [post_head(idp.mint(), "Transfer-Encoding: chunked"),
                 *(chunk(piece) for piece in pieces), LAST_CHUNK]
    client = await RawClient.connect(sidecar.port)
    try:
        await client.send(*parts, pause=0.3)
        answer = await client.answer()
    finally:
        await client.close()
    assert answer.status == 200
    assert raw_upstream.requests[0].body == body
