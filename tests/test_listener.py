"""The listener's bounds, attacked over raw sockets against the real sidecar on loopback.

Each request head is capped as a whole (MAX_REQUEST_HEAD_BYTES: 431, then the connection closes),
a head gets REQUEST_HEAD_TIMEOUT_SECONDS (then 408), an idle kept-alive connection is closed after
KEEPALIVE_TIMEOUT_SECONDS and a connection beyond MAX_CONNECTIONS is answered 503 and closed at
once, before a byte is read. Bodies and
heads that were answered never count as head bytes. The counting reads private attributes of
aiohttp's RequestHandler (listener.py names them): these tests pin its behaviour, so an aiohttp
release that changes them fails here. The in-process tests run on asyncio's loop; the last test
runs `python -m oauth_sidecar` on both event loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from conftest import FakeIdp, FakeUpstream, SidecarFactory, sidecar_env, wait_until
from processes import PROCESS_TIMEOUT, free_port, sidecar_process, wait_ready
from structlog.testing import capture_logs
from test_metrics import scrape
from test_security import RawResponse, parse_responses

BOUND = 5.0  # seconds: the bound on every connect, write and read
CAP = 16384  # MAX_REQUEST_HEAD_BYTES in most tests: its least value with MAX_HEADER_BYTES=8190
SMALL = {"MAX_HEADER_BYTES": "8190", "JWT_MAX_TOKEN_BYTES": "4096",
         "MAX_REQUEST_HEAD_BYTES": str(CAP)}
FIELD = 8000  # bytes of one padding header: under MAX_HEADER_BYTES=8190
SHORT = "0.5"  # seconds: a head timeout or keep-alive short enough to wait for
SECRET_VALUE = "do-not-log-this-header-value"


# -- the wire -------------------------------------------------------------------------------------


def padded_head(size: int, first: str = "GET /healthz HTTP/1.1", *headers: str,
                end: bool = True) -> bytes:
    """A request head of exactly `size` bytes (with its blank line when `end`): the request line,
    Host, the headers, then X-Pad header lines filling the rest."""
    head = f"{first}\r\nHost: 127.0.0.1\r\n" + "".join(f"{h}\r\n" for h in headers)
    closing = "\r\n" if end else ""
    index = 0
    while (missing := size - len(head) - len(closing)) > 0:
        name = f"X-Pad-{index}: "
        value = min(FIELD, missing - len(name) - 2)
        if value < 1:  # too little room for another line: lengthen the previous one instead
            raise AssertionError("choose a size that leaves room for a whole header line")
        head += name + "a" * value + "\r\n"
        index += 1
    data = (head + closing).encode("latin-1")
    assert len(data) == size, (len(data), size)
    return data


def header_lines(count: int, size: int = 1000) -> list[bytes]:
    return [f"X-Line-{i}: {'b' * size}\r\n".encode() for i in range(count)]


@dataclass
class Raw:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    data: bytes = b""
    closed: bool = False

    async def send(self, *parts: bytes, pause: float = 0.0) -> bool:
        """Write the parts (a pause between them); False once the sidecar closed on us."""
        for index, part in enumerate(parts):
            if index and pause:
                await asyncio.sleep(pause)
            try:
                self.writer.write(part)
                await asyncio.wait_for(self.writer.drain(), BOUND)
            except ConnectionError:
                return False
            if self.reader.at_eof():
                return False
        return True

    async def read_until_closed(self, bound: float = BOUND) -> list[RawResponse]:
        """Everything until the sidecar closes the connection (which must happen in `bound`)."""
        async with asyncio.timeout(bound):
            with contextlib.suppress(ConnectionError):
                while chunk := await self.reader.read(65536):
                    self.data += chunk
        self.closed = True
        return parse_responses(self.data)

    async def responses(self, count: int) -> list[RawResponse]:
        """Read until `count` complete responses arrived (bounded)."""
        async with asyncio.timeout(BOUND):
            while len(parsed := parse_responses(self.data)) < count:
                chunk = await self.reader.read(65536)
                assert chunk, f"closed after {len(parsed)} responses: {self.data[:300]!r}"
                self.data += chunk
        return parsed

    def close(self) -> None:
        self.writer.close()


@asynccontextmanager
async def connect(port: int | None) -> AsyncIterator[Raw]:
    assert port is not None
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), BOUND)
    raw = Raw(reader, writer)
    try:
        yield raw
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), BOUND)


def assert_refusal(response: RawResponse, status: int, error: str) -> None:
    assert response.status == status, (response.status, response.body[:200])
    body = response.json()
    assert body["error"] == error
    assert set(body) == {"error", "error_description"}
    assert response.headers["connection"] == ["close"]
    assert response.headers["cache-control"] == ["no-store"]
    assert "date" in response.headers
    assert response.headers["server"] == ["oauth-sidecar"]  # no version, like every answer


def refusal_events(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == "request_head_refused"]


def assert_no_header_content(logs: Sequence[Mapping[str, Any]]) -> None:
    text = json.dumps([dict(event) for event in logs], default=str)
    assert SECRET_VALUE not in text
    assert "bbbbbbbb" not in text
    assert "aaaaaaaa" not in text


# -- the whole head is capped --------------------------------------------------------------------


async def test_a_dribbled_head_over_the_cap_gets_431_in_json_and_the_connection_closes(
    make_sidecar: SidecarFactory,
) -> None:
    """Today's attack: header lines (each under MAX_HEADER_BYTES) dribbled without an end."""
    client = await make_sidecar(**SMALL)
    with capture_logs() as logs:
        async with connect(client.port) as raw:
            first = f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Secret: {SECRET_VALUE}\r\n"
            await raw.send(first.encode(), *header_lines(64), pause=0.005)  # 64 KB, 4 x the cap
            [response] = await raw.read_until_closed()
    assert_refusal(response, 431, "request_header_fields_too_large")
    assert str(CAP) in response.json()["error_description"]
    [event] = refusal_events(logs)
    assert event["status"] == 431
    assert event["reason"] == "too_large"
    assert event["remote"] == "127.0.0.1"
    assert CAP - 1100 < event["head_bytes"] <= CAP + 1
    assert_no_header_content(logs)


@pytest.mark.parametrize("dribbled", [False, True], ids=["one-write", "dribbled"])
async def test_a_head_of_exactly_the_cap_is_served_and_one_byte_more_is_431(
    make_sidecar: SidecarFactory, upstream: FakeUpstream, dribbled: bool,
) -> None:
    client = await make_sidecar(**SMALL)
    for size, status in ((CAP, 200), (CAP + 1, 431)):
        head = padded_head(size)
        parts = [head[i:i + 700] for i in range(0, len(head), 700)] if dribbled else [head]
        async with connect(client.port) as raw:
            await raw.send(*parts, pause=0.002)
            if status == 200:
                [response] = await raw.responses(1)
                assert response.status == 200, response.body
                assert response.json() == {"status": "ok"}
            else:
                [response] = await raw.read_until_closed()
                assert_refusal(response, 431, "request_header_fields_too_large")


async def test_a_32_kib_token_with_ordinary_headers_fills_the_default_cap_and_is_served(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream,
) -> None:
    """The defaults admit one MAX_HEADER_BYTES header (an Entra token with many groups) beside
    the request line and ordinary headers, up to MAX_REQUEST_HEAD_BYTES; one byte more is 431."""
    client = await make_sidecar(JWT_MAX_TOKEN_BYTES="32000")
    groups = [f"group-{i:05d}-{'g' * 20}" for i in range(660)]
    token = idp.mint(claims={"groups": groups})
    assert 30000 < len(token) <= 32000
    lines = (f"Authorization: Bearer {token}", "Content-Type: application/json",
             "Accept: application/json, text/event-stream", "Content-Length: 2",
             "User-Agent: claude-code/2.0", "MCP-Protocol-Version: 2025-06-18")
    for size, status in ((65536, 200), (65537, 431)):
        head = padded_head(size, "POST /mcp HTTP/1.1", *lines)
        async with connect(client.port) as raw:
            await raw.send(head + b"{}")
            if status == 200:
                [response] = await raw.responses(1)
                assert response.status == 200, response.body
            else:
                [response] = await raw.read_until_closed()
                assert_refusal(response, 431, "request_header_fields_too_large")
    assert [r.body for r in upstream.requests] == [b"{}"]  # only the first reached it


# -- what is not head bytes -----------------------------------------------------------------------


async def test_pipelined_heads_are_counted_one_by_one_and_the_next_is_still_capped(
    make_sidecar: SidecarFactory,
) -> None:
    """Two pipelined heads of 3/4 of the cap each (together over it) are both answered; a head
    over the cap on the same connection afterwards is still refused."""
    client = await make_sidecar(**SMALL)
    async with connect(client.port) as raw:
        await raw.send(padded_head(12000) + padded_head(12000))
        assert [r.status for r in await raw.responses(2)] == [200, 200]
        await raw.send(padded_head(CAP + 1000))
        responses = await raw.read_until_closed()
    assert_refusal(responses[2], 431, "request_header_fields_too_large")


async def test_heads_waiting_behind_a_busy_request_share_the_cap(
    make_sidecar: SidecarFactory, idp: FakeIdp,
) -> None:
    """Complete heads pipelined behind a request still being answered are held in memory: they
    count together, so one connection cannot queue 32 heads of the cap each. Over it, the stream
    being answered goes on (no 431 can be written into it) and nothing more is parsed."""
    client = await make_sidecar(**SMALL)
    with capture_logs() as logs:
        async with connect(client.port) as raw:
            stream = f"GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {idp.mint()}\r\n\r\n"
            await raw.send(stream.encode())
            async with asyncio.timeout(BOUND):
                while b"event-2" not in raw.data:
                    raw.data += await raw.reader.read(65536)
            await raw.send(padded_head(7000) + padded_head(7000))  # 14,000 waiting: under the cap
            await asyncio.sleep(0.2)
            assert refusal_events(logs) == []
            await raw.send(padded_head(7000))  # 21,000 would wait: refused at the cap's end
            await wait_until(lambda: bool(refusal_events(logs)))
            assert not raw.reader.at_eof()  # the stream is not cut
    [event] = refusal_events(logs)
    assert (event["status"], event["head_bytes"]) == (431, CAP)


async def test_a_chunked_body_of_tiny_chunks_is_not_counted_but_what_follows_it_is(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream,
) -> None:
    client = await make_sidecar(**SMALL)
    chunks = b"1\r\nx\r\n" * 20000 + b"0\r\n\r\n"  # 120 KB of framing: 7 x the cap
    head = (f"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {idp.mint()}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    async with connect(client.port) as raw:
        await raw.send(head + chunks)
        assert [r.status for r in await raw.responses(1)] == [200]
        await raw.send(padded_head(CAP + 1))
        responses = await raw.read_until_closed()
    assert_refusal(responses[1], 431, "request_header_fields_too_large")
    assert [len(r.body) for r in upstream.requests] == [20000]


async def test_a_content_length_body_is_not_counted_and_a_head_in_the_same_write_is(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream,
) -> None:
    """A body of 6 x the cap, then (same write) a head over the cap: the body is a body, the
    head is refused (431 if the POST was answered by then, else a close after its answer)."""
    client = await make_sidecar(**SMALL)
    body = b"x" * (6 * CAP)
    head = (f"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {idp.mint()}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    async with connect(client.port) as raw:
        await raw.send(head + body + padded_head(CAP + 1))
        responses = await raw.read_until_closed()
    assert [r.status for r in responses] in ([200], [200, 431])
    assert [len(r.body) for r in upstream.requests] == [len(body)]


# -- time to send a head, idle connections --------------------------------------------------------


@pytest.mark.parametrize("sender", ["silent", "dribbling"])
async def test_a_head_not_complete_in_time_gets_408_and_the_connection_closes(
    make_sidecar: SidecarFactory, sender: str,
) -> None:
    """A head that stalls, or keeps trickling a byte at a time, is refused at the deadline:
    bytes arriving do not extend it."""
    client = await make_sidecar(REQUEST_HEAD_TIMEOUT_SECONDS=SHORT)
    with capture_logs() as logs:
        async with connect(client.port) as raw:
            started = time.monotonic()
            await raw.send(f"GET /mcp HTTP/1.1\r\nX-Secret: {SECRET_VALUE}\r\n".encode())
            while sender == "dribbling" and time.monotonic() - started < 3 * float(SHORT):
                await raw.send(b"X")  # after the answer the sidecar still reads, for a moment
                await asyncio.sleep(0.05)
            [response] = await raw.read_until_closed()
    assert_refusal(response, 408, "request_timeout")
    assert SHORT in response.json()["error_description"]
    [event] = refusal_events(logs)
    assert (event["status"], event["reason"]) == (408, "timeout")
    assert_no_header_content(logs)


async def test_a_new_connection_that_sends_nothing_is_closed_at_the_head_timeout(
    make_sidecar: SidecarFactory,
) -> None:
    client = await make_sidecar(REQUEST_HEAD_TIMEOUT_SECONDS=SHORT)
    async with connect(client.port) as raw:
        assert await raw.read_until_closed() == []
    assert raw.data == b""  # nothing to answer: no request was begun


async def test_a_later_heads_time_starts_at_its_first_byte(
    make_sidecar: SidecarFactory,
) -> None:
    """Between requests the keep-alive time applies; the next head's clock starts with it."""
    client = await make_sidecar(REQUEST_HEAD_TIMEOUT_SECONDS=SHORT, KEEPALIVE_TIMEOUT_SECONDS="30")
    async with connect(client.port) as raw:
        await raw.send(padded_head(200))
        await raw.responses(1)
        await asyncio.sleep(2 * float(SHORT))  # idle longer than a head may take
        await raw.send(padded_head(200))
        assert [r.status for r in await raw.responses(2)] == [200, 200]
        await raw.send(b"GET /healthz HTTP/1.1\r\n")
        responses = await raw.read_until_closed()
    assert_refusal(responses[2], 408, "request_timeout")


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(
    make_sidecar: SidecarFactory,
) -> None:
    client = await make_sidecar(KEEPALIVE_TIMEOUT_SECONDS=SHORT)
    async with connect(client.port) as raw:
        await raw.send(padded_head(200))
        responses = await raw.read_until_closed()
    assert [r.status for r in responses] == [200]  # then closed, with nothing more said


# -- connections ----------------------------------------------------------------------------------


async def test_connections_beyond_the_cap_are_answered_503_and_closed_and_others_keep_working(
    make_sidecar: SidecarFactory,
) -> None:
    metrics_port = free_port()
    client = await make_sidecar(MAX_CONNECTIONS="3", METRICS_PORT=str(metrics_port))
    # The test client's own pool is not in play: every connection here is ours.
    with capture_logs() as logs:
        async with connect(client.port) as a, connect(client.port) as b, connect(client.port) as c:
            for raw in (a, b, c):
                await raw.send(padded_head(200))
                await raw.responses(1)
            for _ in range(2):
                async with connect(client.port) as refused:
                    await refused.send(padded_head(200))
                    [answer] = await refused.read_until_closed()
                    assert_refusal(answer, 503, "service_unavailable")
                    assert answer.headers["retry-after"] == ["1"]
            for raw in (a, b, c):  # the admitted ones are unaffected
                await raw.send(padded_head(200))
                assert [r.status for r in await raw.responses(2)] == [200, 200]
            result = await scrape(metrics_port)
            assert result.value("open_connections") == 3
            assert result.value("connections_refused_total") == 2
        async with contextlib.AsyncExitStack() as stack:  # once they closed, one is admitted
            await admitted(client.port, stack)
    refused_lines = [e for e in logs if e["event"] == "connections_refused"]
    assert len(refused_lines) == 1  # a flood is one line per interval, not one per connection
    assert refused_lines[0]["limit"] == 3
    assert refused_lines[0]["log_level"] == "warning"


async def test_refused_heads_are_counted_in_metrics(make_sidecar: SidecarFactory) -> None:
    metrics_port = free_port()
    client = await make_sidecar(**SMALL, REQUEST_HEAD_TIMEOUT_SECONDS=SHORT,
                                METRICS_PORT=str(metrics_port))
    async with connect(client.port) as raw:
        await raw.send(padded_head(CAP + 1))
        await raw.read_until_closed()
    async with connect(client.port) as raw:
        await raw.send(b"GET / HTTP/1.1\r\n")
        await raw.read_until_closed()
    result = await scrape(metrics_port)
    assert result.value("request_heads_refused_total", reason="too_large") == 1
    assert result.value("request_heads_refused_total", reason="timeout") == 1


# -- aiohttp's own refusals ----------------------------------------------------------------------


async def test_a_malformed_head_is_refused_in_json_without_echoing_it(
    make_sidecar: SidecarFactory,
) -> None:
    client = await make_sidecar()
    async with connect(client.port) as raw:
        await raw.send(f"GET /mcp HTTP/1.1\r\nHost: x\r\nBroken {SECRET_VALUE}\r\n\r\n".encode())
        [response] = await raw.read_until_closed()
    assert response.status == 400
    assert response.json() == {"error": "bad_request", "error_description": "Bad Request"}
    assert response.headers["server"] == ["oauth-sidecar"]  # aiohttp's would name its version
    assert SECRET_VALUE.encode() not in raw.data


# -- a refused request's body is not read --------------------------------------------------------

BODY_CEILING = 256 << 20  # bytes: far above what socket buffers hold, far below 10 s of draining
PIECE = b"x" * 65536
ENDLESS = 10**12  # a Content-Length never sent in full


@dataclass
class Flood:
    sent: int  # body bytes the sidecar's socket took before it would take no more
    answer: bytes  # everything it sent back
    eof: bool  # it half-closed (we read EOF) while we were still sending


async def flood_body(port: int | None, head: bytes, chunked: bool) -> Flood:
    """Send head, then body bytes without end until the sidecar stops taking them (a write that
    stalls for BOUND, or a reset) or BODY_CEILING is reached, reading its answer meanwhile."""
    assert port is not None
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), BOUND)
    answer, sent = b"", 0
    eof = asyncio.Event()

    async def read() -> None:
        nonlocal answer
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                answer += chunk
        eof.set()

    reading = asyncio.create_task(read())
    piece = b"%x\r\n%s\r\n" % (len(PIECE), PIECE) if chunked else PIECE
    try:
        writer.write(head)
        while sent < BODY_CEILING:
            writer.write(piece)
            await asyncio.wait_for(writer.drain(), BOUND)
            sent += len(piece)
    except (ConnectionError, TimeoutError):
        pass  # it stopped taking the body: reset, or stalled
    finally:
        stopped_with_eof = eof.is_set()
        writer.transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reading, BOUND)
    return Flood(sent, answer, stopped_with_eof)


@pytest.mark.parametrize(("case", "status"), [
    ("tokenless-length", 401), ("tokenless-chunked", 401), ("over-limit-with-token", 413),
    ("public-wrong-method", 405),
])
async def test_a_refused_request_whose_body_is_still_arriving_is_closed_not_drained(
    make_sidecar: SidecarFactory, idp: FakeIdp, case: str, status: int
) -> None:
    """aiohttp reads and discards an unread body for up to 10 s after the answer (44.9 GB on
    loopback, 8.6 s of CPU, for no token at all): the answer says Connection: close, the
    sidecar half-closes after it, stops reading, and closes LINGER_SECONDS later."""
    client = await make_sidecar()
    chunked = case == "tokenless-chunked"
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {ENDLESS}"
    target, extra = {
        "tokenless-length": ("POST /mcp", ""), "tokenless-chunked": ("POST /mcp", ""),
        "over-limit-with-token": ("POST /mcp", f"Authorization: Bearer {idp.mint()}\r\n"),
        "public-wrong-method": ("PUT /healthz", ""),
    }[case]
    head = f"{target} HTTP/1.1\r\nHost: x\r\n{extra}{framing}\r\n\r\n".encode()
    with capture_logs():
        flood = await flood_body(client.port, head, chunked)
    [response] = parse_responses(flood.answer)
    assert response.status == status
    assert flood.sent < BODY_CEILING  # it stopped taking the body (main: 10 s at full speed)
    assert flood.eof  # and said it was done while we could still send
    assert response.headers["connection"] == ["close"]


# -- the served process, on both event loops ------------------------------------------------------


async def admitted(port: int | None, stack: contextlib.AsyncExitStack) -> Raw:
    """A connection the sidecar admitted and answered on (retried while it refuses: connections
    just closed by the client may not have reached it yet)."""
    async with asyncio.timeout(BOUND):
        while True:
            raw = await stack.enter_async_context(connect(port))
            await raw.send(padded_head(200))
            with contextlib.suppress(AssertionError):
                await raw.responses(1)
                return raw
            await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_the_bounds_hold_in_the_served_process_on_both_event_loops(
    idp: FakeIdp, upstream: FakeUpstream, event_loop: str,
) -> None:
    port = free_port()
    env = sidecar_env(idp, upstream, **SMALL, HOST="127.0.0.1", PORT=str(port),
                      EVENT_LOOP=event_loop, REQUEST_HEAD_TIMEOUT_SECONDS="1",
                      MAX_CONNECTIONS="3")
    timeout = aiohttp.ClientTimeout(total=PROCESS_TIMEOUT, sock_connect=1)
    async with sidecar_process(env) as proc:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await wait_ready(session, f"http://127.0.0.1:{port}", proc)
        async with contextlib.AsyncExitStack() as stack:
            held = [await admitted(port, stack) for _ in range(3)]
            async with connect(port) as refused:  # uvloop's transport writes the answer too
                [answer] = await refused.read_until_closed()
                assert_refusal(answer, 503, "service_unavailable")
            for raw in held:  # the admitted ones are unaffected
                await raw.send(padded_head(200))
                assert [r.status for r in await raw.responses(2)] == [200, 200]
        async with contextlib.AsyncExitStack() as stack:
            raw = await admitted(port, stack)
            await raw.send(b"GET /mcp HTTP/1.1\r\nHost: x\r\n", *header_lines(40), pause=0.005)
            responses = await raw.read_until_closed()
        assert_refusal(responses[1], 431, "request_header_fields_too_large")
        async with contextlib.AsyncExitStack() as stack:
            raw = await admitted(port, stack)
            await raw.send(b"GET /mcp HTTP/1.1\r\n")
            responses = await raw.read_until_closed()
        assert_refusal(responses[1], 408, "request_timeout")
