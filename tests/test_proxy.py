"""The streaming reverse proxy, always through the production app with a valid token.

Upstreams are real servers on loopback: the shared FakeUpstream, small scripted aiohttp apps, and
raw asyncio servers for faults (reset, hang, truncated body) that aiohttp will not produce.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import FakeIdp, FakeUpstream, SidecarFactory, bearer, wait_until
from multidict import CIMultiDict
from processes import free_port
from structlog.testing import capture_logs
from test_metrics import scrape

from oauth_sidecar.app import PROXY
from oauth_sidecar.request_body import WHOLE_BODY_BYTES
from oauth_sidecar.upstream import proxy as proxy_module

Client = TestClient[web.Request, web.Application]
Respond = Callable[[web.Request], Awaitable[web.StreamResponse]]
ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

BOUND = aiohttp.ClientTimeout(total=5)  # every request in this module is a bounded wait
SLOW_BOUND = aiohttp.ClientTimeout(total=10)


# --- scripted upstreams -------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    """Exactly the header lines received (duplicates kept), case-insensitive lookup."""
    body: bytes


async def _json_ok(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True})


@dataclass
class ScriptedUpstream:
    """An aiohttp upstream that records every request's raw headers, then runs `respond`."""

    respond: Respond = _json_ok
    seen: list[Seen] = field(default_factory=list)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1"))
                              for k, v in request.raw_headers)
        self.seen.append(Seen(request.method, request.path_qs, headers, body))
        return await self.respond(request)


StartUpstream = Callable[[Respond], Awaitable[ScriptedUpstream]]


@pytest.fixture
async def start_upstream() -> AsyncIterator[StartUpstream]:
    servers: list[TestServer] = []

    async def start(respond: Respond) -> ScriptedUpstream:
        scripted = ScriptedUpstream(respond)
        app = web.Application(client_max_size=8 << 20)
        app.router.add_route("*", "/{tail:.*}", scripted.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        scripted.server = server
        return scripted

    yield start
    for server in servers:
        await server.close()


@asynccontextmanager
async def raw_upstream(on_connection: ConnectionHandler) -> AsyncIterator[str]:
    """A bare TCP server on loopback; every connection and handler task is ended on exit."""
    writers: set[asyncio.StreamWriter] = set()
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        writers.add(writer)
        try:
            await on_connection(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        await server.wait_closed()


def closed_port_url() -> tuple[str, int]:
    """A loopback URL on which nothing listens (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}", port


async def raw_get(client: Client, target: str, token: str) -> tuple[int, bytes]:
    """Send a request line byte for byte (aiohttp's client would normalise the path)."""
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: mcp.example.test\r\n"
            f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(5):
            data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# --- request headers ----------------------------------------------------------------------------


async def test_credentials_hop_by_hop_and_forged_identity_headers_never_reach_upstream(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    scripted = await start_upstream(_json_ok)
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url)
    token = idp.mint()
    sent = [
        ("Authorization", f"Bearer {token}"),
        ("Cookie", "session=secret"),
        ("Proxy-Authorization", "Basic c2VjcmV0"),
        ("Connection", "keep-alive, X-Foo"),
        ("X-Foo", "named-in-connection"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Trailer", "X-Checksum"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-User", "admin"),
        ("X-Forwarded-Email", "admin@example.com"),
        ("X-Forwarded-Groups", "admins"),
        ("X-Auth-Request-User", "admin"),
        ("X-Auth-Request-Email", "admin@example.com"),
        ("X-Real-IP", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6;proto=http"),
        ("Origin", "https://claude.ai"),
        ("Host", "evil.example"),
    ]
    response = await sidecar.post("/mcp", data=b"{}", headers=sent, timeout=BOUND)
    assert response.status == 200
    (seen,) = scripted.seen
    headers = seen.headers
    for name in ("Authorization", "Cookie", "Proxy-Authorization", "X-Foo", "Keep-Alive", "TE",
                 "Upgrade", "Trailer", "X-Forwarded-User", "X-Forwarded-Email",
                 "X-Forwarded-Groups", "X-Auth-Request-User", "X-Auth-Request-Email",
                 "X-Real-IP", "Forwarded", "Origin"):
        assert name not in headers, name
    assert "x-foo" not in headers.get("Connection", "").lower()
    assert token not in str(headers)
    assert headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert headers.getall("X-Forwarded-Proto") == ["https"]
    assert headers.getall("X-Forwarded-Host") == ["mcp.example.test"]
    assert headers.getall("Host") == [f"127.0.0.1:{scripted.server.port}"]  # type: ignore[union-attr]

async def test_headers_named_in_any_connection_line_are_removed(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    scripted = await start_upstream(_json_ok)
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url)
    sent = [*bearer(idp.mint()).items(), ("Connection", "keep-alive"), ("Connection", "X-Bar"),
            ("X-Bar", "hop")]
    response = await sidecar.post("/mcp", data=b"{}", headers=sent, timeout=BOUND)
    assert response.status == 200
    assert "X-Bar" not in scripted.seen[0].headers


async def test_mcp_protocol_headers_pass_untouched(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    scripted = await start_upstream(_json_ok)
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url)
    mcp_headers = {
        "Mcp-Session-Id": "1868a90c-Session",
        "MCP-Protocol-Version": "2025-11-25",
        "Last-Event-ID": "stream-1:42",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "get_weather",
        "Mcp-Param-Foo": "Bar Baz, qux",
    }
    response = await sidecar.post(
        "/mcp", data=b"{}", headers={**bearer(idp.mint()), **mcp_headers}, timeout=BOUND
    )
    assert response.status == 200
    (seen,) = scripted.seen
    for name, value in mcp_headers.items():
        assert seen.headers.getall(name) == [value], name


async def test_accept_encoding_is_not_added_when_the_client_sent_none(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    scripted = await start_upstream(_json_ok)
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url)
    response = await sidecar.get(
        "/mcp", headers=bearer(idp.mint()), skip_auto_headers=["Accept-Encoding"], timeout=BOUND
    )
    assert response.status == 200
    assert "Accept-Encoding" not in scripted.seen[0].headers


async def test_accept_encoding_sent_by_the_client_is_passed(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    scripted = await start_upstream(_json_ok)
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url)
    response = await sidecar.get(
        "/mcp", headers={**bearer(idp.mint()), "Accept-Encoding": "gzip"}, timeout=BOUND
    )
    assert response.status == 200
    assert scripted.seen[0].headers.getall("Accept-Encoding") == ["gzip"]


async def test_gzip_response_is_passed_through_still_compressed(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    payload = b'{"jsonrpc":"2.0","id":1,"result":{}}' * 50
    compressed = gzip.compress(payload)

    async def gzipped(request: web.Request) -> web.StreamResponse:
        return web.Response(body=compressed, headers={
            "Content-Type": "application/json", "Content-Encoding": "gzip",
        })

    scripted = await start_upstream(gzipped)
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url)
    response = await sidecar.get(
        "/mcp", headers={**bearer(idp.mint()), "Accept-Encoding": "gzip"},
        auto_decompress=False, timeout=BOUND,
    )
    assert response.status == 200
    assert response.headers["Content-Encoding"] == "gzip"
    body = await response.read()
    assert body == compressed
    assert gzip.decompress(body) == payload


# --- response headers ---------------------------------------------------------------------------

UPSTREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 2\r\n"
    b"Connection: keep-alive, X-Hop\r\n"
    b"X-Hop: named-in-connection\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Proxy-Authenticate: Basic\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"Trailer: X-Checksum\r\n"
    b"Access-Control-Allow-Origin: *\r\n"
    b"Access-Control-Allow-Credentials: true\r\n"
    b"Access-Control-Expose-Headers: X-Upstream-Secret\r\n"
    b"Mcp-Session-Id: session-7\r\n"
    b"Set-Cookie: a=1; Path=/; HttpOnly\r\n"
    b"Set-Cookie: b=2; Path=/\r\n"
    b"X-Kept: yes\r\n"
    b"\r\n{}"
)


async def _answer_every_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:  # keep-alive: GETs without bodies, one canned answer each
        await reader.readuntil(b"\r\n\r\n")
        writer.write(UPSTREAM_HEAD)
        await writer.drain()


async def test_upstream_hop_by_hop_response_headers_are_removed(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    async with raw_upstream(_answer_every_request) as url:
        sidecar = await make_sidecar(MCP_UPSTREAM_URL=url)
        response = await sidecar.get("/mcp", headers=bearer(idp.mint()), timeout=BOUND)
        assert response.status == 200
        assert await response.read() == b"{}"
        for name in ("Keep-Alive", "Proxy-Authenticate", "Proxy-Connection", "Trailer"):
            assert name not in response.headers, name
        assert "x-hop" not in response.headers.get("Connection", "").lower()
        assert response.headers["X-Kept"] == "yes"


async def test_upstream_response_headers_named_in_connection_are_removed(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    async with raw_upstream(_answer_every_request) as url:
        sidecar = await make_sidecar(MCP_UPSTREAM_URL=url)
        response = await sidecar.get("/mcp", headers=bearer(idp.mint()), timeout=BOUND)
        assert response.status == 200
        await response.read()
        assert "X-Hop" not in response.headers


async def test_upstream_cors_headers_are_dropped_without_origin(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    async with raw_upstream(_answer_every_request) as url:
        sidecar = await make_sidecar(MCP_UPSTREAM_URL=url)
        response = await sidecar.get("/mcp", headers=bearer(idp.mint()), timeout=BOUND)
        await response.read()
        assert response.status == 200
        assert not [name for name in response.headers if name.lower().startswith("access-control-")]


async def test_upstream_cors_headers_are_replaced_by_ours_for_an_allowed_origin(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    async with raw_upstream(_answer_every_request) as url:
        sidecar = await make_sidecar(MCP_UPSTREAM_URL=url)
        response = await sidecar.get(
            "/mcp", headers={**bearer(idp.mint()), "Origin": "https://claude.ai"}, timeout=BOUND
        )
        await response.read()
        assert response.status == 200
        assert response.headers.getall("Access-Control-Allow-Origin") == ["https://claude.ai"]
        assert "Access-Control-Allow-Credentials" not in response.headers
        (expose,) = response.headers.getall("Access-Control-Expose-Headers")
        assert "X-Upstream-Secret" not in expose
        assert "Mcp-Session-Id" in expose


async def test_session_id_and_set_cookie_pass_back_to_the_client(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    async with raw_upstream(_answer_every_request) as url:
        sidecar = await make_sidecar(MCP_UPSTREAM_URL=url)
        response = await sidecar.get("/mcp", headers=bearer(idp.mint()), timeout=BOUND)
        await response.read()
        assert response.headers.getall("Mcp-Session-Id") == ["session-7"]
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/; HttpOnly", "b=2; Path=/"]


def _answer_with(headers: Callable[[web.Request], dict[str, str]], status: int = 200,
                 stream: bool = False) -> Respond:
    async def respond(request: web.Request) -> web.StreamResponse:
        if not stream:
            return web.json_response({}, status=status, headers=headers(request))
        response = web.StreamResponse(status=status, headers={
            "Content-Type": "text/event-stream", **headers(request)})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await response.write_eof()
        return response

    return respond


SOFTWARE = {"Server": "gunicorn/20.0.4", "X-Powered-By": "Express", "X-AspNet-Version": "4.0.30319",
            "X-AspNetMvc-Version": "5.2", "X-Kept": "yes"}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_upstream_software_and_version_headers_are_dropped(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream, stream: bool
) -> None:
    scripted = await start_upstream(_answer_with(lambda request: SOFTWARE, stream=stream))
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url)
    response = await sidecar.get("/mcp", headers=bearer(idp.mint()), timeout=BOUND)
    assert response.status == 200
    await response.read()
    assert response.headers.getall("Server") == ["oauth-sidecar"]
    for name in ("X-Powered-By", "X-AspNet-Version", "X-AspNetMvc-Version"):
        assert name not in response.headers, name
    assert response.headers["X-Kept"] == "yes"


def _own_challenge(request: web.Request) -> dict[str, str]:
    return {"WWW-Authenticate": f'Bearer resource_metadata="http://{request.host}'
                                '/.well-known/oauth-protected-resource"'}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_an_upstream_challenge_never_reaches_the_client(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream, stream: bool
) -> None:
    """An upstream 403 with its own challenge: the status is the upstream's answer, the challenge
    (naming the upstream's internal address) would send the MCP client away from the sidecar."""
    scripted = await start_upstream(_answer_with(_own_challenge, status=403, stream=stream))
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url)
    response = await sidecar.post("/mcp", data=b"{}", headers=bearer(idp.mint()), timeout=BOUND)
    assert response.status == 403
    await response.read()
    assert "WWW-Authenticate" not in response.headers


async def test_an_upstream_401_is_a_502_never_a_sign_in_loop(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    """The upstream never sees the caller's token: its 401 is about the sidecar's credential.
    Relayed, it would tell the MCP client to sign in again, forever, towards the upstream."""
    scripted = await start_upstream(_answer_with(_own_challenge, status=401))
    metrics_port = free_port()
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url, METRICS_PORT=str(metrics_port))
    with capture_logs() as logs:
        response = await sidecar.post("/mcp", data=b"{}", headers=bearer(idp.mint()),
                                      timeout=BOUND)
    assert response.status == 502
    assert await response.json() == {
        "error": "upstream_refused",
        "error_description": "The MCP server refused the sidecar's credentials"}
    assert "WWW-Authenticate" not in response.headers
    assert scripted.url.encode() not in await response.read()
    assert [e["event"] for e in logs if e["event"] == "upstream_unauthorized"] == [
        "upstream_unauthorized"]
    assert 'oauth_sidecar_upstream_errors_total{kind="refused"} 1.0' in (
        await scrape(metrics_port)).text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_upstream_location_at_its_own_origin_is_given_back_under_the_public_one(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream, stream: bool
) -> None:
    """An upstream behind MCP_UPSTREAM_PATH=/inner redirects to its own URL (as servers that build
    absolute URLs from Host do): the client gets the public URL, never the internal address."""
    def own_urls(request: web.Request) -> dict[str, str]:
        origin = f"http://{request.host}"
        return {"Location": f"{origin}/inner/next?page=2", "Content-Location": "/inner/item"}

    scripted = await start_upstream(_answer_with(own_urls, status=307, stream=stream))
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url, MCP_UPSTREAM_PATH="/inner")
    response = await sidecar.post("/mcp", data=b"{}", headers=bearer(idp.mint()),
                                  allow_redirects=False, timeout=BOUND)
    assert response.status == 307
    await response.read()
    assert response.headers.getall("Location") == ["https://mcp.example.test/mcp/next?page=2"]
    assert response.headers.getall("Content-Location") == ["/mcp/item"]
    assert str(scripted.server.port) not in str(response.headers)  # type: ignore[union-attr]


async def test_upstream_location_no_public_url_reaches_is_dropped(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    def unreachable(request: web.Request) -> dict[str, str]:
        return {"Location": f"http://{request.host}/mcp/x", "Content-Location": "/mcp/y"}

    scripted = await start_upstream(_answer_with(unreachable, status=302))
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url, MCP_UPSTREAM_PATH="/inner")
    response = await sidecar.get("/mcp", headers=bearer(idp.mint()), allow_redirects=False,
                                 timeout=BOUND)
    assert response.status == 302
    assert "Location" not in response.headers
    assert "Content-Location" not in response.headers


# --- methods ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PUT"])
async def test_method_is_forwarded_with_a_valid_token(
    sidecar: Client, idp: FakeIdp, upstream: FakeUpstream, method: str
) -> None:
    body = b"{}" if method in ("POST", "PUT") else None
    response = await sidecar.request(
        method, "/mcp", headers=bearer(idp.mint()), data=body, timeout=BOUND
    )
    assert response.status == 200
    assert (await response.json())["method"] == method
    assert [r.method for r in upstream.requests] == [method]
    assert response.headers["Mcp-Session-Id"] == "session-1"


async def test_head_is_forwarded_and_answers_without_a_body(
    sidecar: Client, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    response = await sidecar.head("/mcp", headers=bearer(idp.mint()), timeout=BOUND)
    assert response.status == 200
    assert await response.read() == b""
    assert response.headers["Mcp-Session-Id"] == "session-1"
    assert [r.method for r in upstream.requests] == ["HEAD"]


# --- path mapping -------------------------------------------------------------------------------


async def _upstream_path(sidecar: Client, token: str, path: str) -> str:
    response = await sidecar.get(path, headers=bearer(token), timeout=BOUND)
    assert response.status == 200, path
    path_qs: str = (await response.json())["path_qs"]
    return path_qs


async def test_resource_path_maps_onto_mcp_upstream_path(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    sidecar = await make_sidecar(MCP_UPSTREAM_PATH="/inner")
    token = idp.mint()
    assert await _upstream_path(sidecar, token, "/mcp") == "/inner"
    assert await _upstream_path(sidecar, token, "/mcp/x") == "/inner/x"
    assert await _upstream_path(sidecar, token, "/mcp?a=1&b=two") == "/inner?a=1&b=two"
    assert await _upstream_path(sidecar, token, "/other") == "/other"
    assert await _upstream_path(sidecar, token, "/mcpx") == "/mcpx"


async def test_origin_only_resource_maps_every_path_under_mcp_upstream_path(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    sidecar = await make_sidecar(RESOURCE_URL="https://mcp.example.test", MCP_UPSTREAM_PATH="/mcp")
    token = idp.mint()
    assert await _upstream_path(sidecar, token, "/") == "/mcp"
    assert await _upstream_path(sidecar, token, "/x") == "/mcp/x"
    assert await _upstream_path(sidecar, token, "/?q=1") == "/mcp?q=1"


async def test_upstream_url_path_acts_as_mcp_upstream_path(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=upstream.url + "/base")
    token = idp.mint()
    assert await _upstream_path(sidecar, token, "/mcp") == "/base"
    assert await _upstream_path(sidecar, token, "/mcp/x?y=1") == "/base/x?y=1"
    assert await _upstream_path(sidecar, token, "/other") == "/other"


@pytest.mark.parametrize("target", [
    "/mcp%2fx", "/mcp/%2F", "/mcp/%2e%2e/admin", "/mcp/%2E", "/mcp/a%5cb", "/mcp/a%00b",
])
async def test_encoded_slash_backslash_or_dot_is_refused_before_upstream(
    sidecar: Client, idp: FakeIdp, upstream: FakeUpstream, target: str
) -> None:
    status, body = await raw_get(sidecar, target, idp.mint())
    assert status == 400
    assert b'"invalid_path"' in body
    assert upstream.requests == []


async def test_literal_backslash_in_path_is_refused_before_upstream(
    sidecar: Client, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    status, body = await raw_get(sidecar, "/mcp\\..\\admin", idp.mint())
    assert status == 400
    assert b'"invalid_path"' in body
    assert upstream.requests == []


# --- server-sent events -------------------------------------------------------------------------


async def test_sse_events_stream_unbuffered_and_client_disconnect_reaches_upstream(
    sidecar: Client, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    async with asyncio.timeout(5):
        response = await sidecar.get(
            "/sse", headers={**bearer(idp.mint()), "Accept": "text/event-stream"}
        )
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Accel-Buffering"] == "no"
        assert "Content-Length" not in response.headers
        events = [await response.content.readuntil(b"\n\n") for _ in range(3)]
    assert events == [f"id: {i}\ndata: event-{i}\n\n".encode() for i in range(3)]
    assert not upstream.stream_closed.is_set()  # the upstream is still holding the stream open

    response.close()  # the client leaves
    await wait_until(upstream.stream_closed.is_set, within=5)


async def test_upstream_session_has_no_total_timeout(sidecar: Client) -> None:
    session = sidecar.app[PROXY]._session
    assert session is not None
    assert session.timeout.total is None  # aiohttp's default 300 s would cut SSE at 5 minutes


async def test_a_client_that_stops_reading_is_dropped_and_its_upstream_stream_closed(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    """A raw client with a small receive buffer reads the response head of a fast event stream,
    then never reads again (its TCP window closes). Before: the relay blocked in write() forever
    and held the upstream stream open."""
    closed = asyncio.Event()

    async def firehose(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = b"data: " + b"x" * 4090 + b"\n\n"
        try:
            while True:
                await response.write(event)
                await asyncio.sleep(0)
        finally:
            closed.set()

    scripted = await start_upstream(firehose)
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url, CLIENT_WRITE_TIMEOUT_SECONDS="1")
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", sidecar.port)), 5)
        request = (f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {idp.mint()}"
                   "\r\nAccept: text/event-stream\r\n\r\n").encode()
        await asyncio.wait_for(loop.sock_sendall(sock, request), 5)
        head = await asyncio.wait_for(loop.sock_recv(sock, 1024), 5)
        assert head.startswith(b"HTTP/1.1 200 OK")
        # Not another byte is read: the sidecar must give up within the bound and let go.
        await wait_until(closed.is_set, within=15)
        await wait_until(lambda: sidecar.app[PROXY].in_flight() == 0)
        await wait_until(lambda: sidecar.app[PROXY].open_streams() == 0)


@pytest.mark.parametrize("size", [60_000, 16_000])
async def test_a_client_that_pipelines_and_never_reads_whole_answers_is_dropped(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream, size: int,
) -> None:
    """Whole answers (at most 64 KiB, read whole from the upstream) are written by aiohttp after
    the handler returned. A client pipelining requests it never reads the answers of held that
    write, its connection and a handler task forever; now the connection is aborted within
    CLIENT_WRITE_TIMEOUT_SECONDS. Small answers (16,000 bytes) are written without a timer
    while nothing is buffered; once the client's window has filled the buffer, the timer is
    armed again."""
    answer = b"x" * size

    async def large(request: web.Request) -> web.StreamResponse:
        return web.Response(body=answer, content_type="application/octet-stream")

    scripted = await start_upstream(large)
    # 3.6 or 4 MB of answers, far beyond the socket buffers on the way. The heads all arrive at
    # once (46 or 192 KB): the head cap is raised above them, so only the write can end this.
    requests = max(60, 4_000_000 // size)
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url, CLIENT_WRITE_TIMEOUT_SECONDS="1",
                                 MAX_REQUEST_HEAD_BYTES=str(1 << 20))
    request = (f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {idp.mint()}"
               "\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    with capture_logs() as logs, socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", sidecar.port)), 5)
        # The sidecar stops reading requests while it cannot answer: sending may stall too.
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(loop.sock_sendall(sock, request * requests), 5)
        await wait_until(lambda: any(e["event"] == "client_write_timeout" for e in logs),
                         within=15)
        received, ended = 0, False
        async with asyncio.timeout(15):
            while not ended:
                try:
                    chunk = await loop.sock_recv(sock, 1 << 16)
                except ConnectionError:
                    ended = True
                else:
                    received += len(chunk)
                    ended = not chunk
    assert received < requests * len(answer)  # aborted, not every answer delivered late
    assert len(scripted.seen) < requests


def _quiet_gap(content_type: str) -> Respond:
    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await asyncio.sleep(2)
        await response.write(b"data: two\n\n")
        await response.write_eof()
        return response

    return respond


async def test_quiet_sse_stream_is_not_cut_by_the_upstream_idle_timeout(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    scripted = await start_upstream(_quiet_gap("text/event-stream"))
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url, UPSTREAM_IDLE_TIMEOUT_SECONDS="1")
    response = await sidecar.get("/mcp", headers=bearer(idp.mint()), timeout=SLOW_BOUND)
    assert response.status == 200
    assert await response.read() == b"data: one\n\ndata: two\n\n"


async def test_quiet_non_sse_response_is_cut_by_the_idle_timeout(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    scripted = await start_upstream(_quiet_gap("application/json"))
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url, UPSTREAM_IDLE_TIMEOUT_SECONDS="1")
    response = await sidecar.get("/mcp", headers=bearer(idp.mint()), timeout=SLOW_BOUND)
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


# --- request bodies -----------------------------------------------------------------------------


async def test_one_megabyte_body_streams_through_intact(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    scripted = await start_upstream(_json_ok)
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url)
    body = os.urandom(1 << 20)
    response = await sidecar.post("/mcp", data=body, headers=bearer(idp.mint()), timeout=BOUND)
    assert response.status == 200
    (seen,) = scripted.seen
    assert hashlib.sha256(seen.body).hexdigest() == hashlib.sha256(body).hexdigest()


async def _chunks(total: int, size: int = 500) -> AsyncIterator[bytes]:
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


async def test_body_over_the_limit_is_refused_with_413(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar = await make_sidecar(MAX_REQUEST_BODY_BYTES="1000")
    response = await sidecar.post(
        "/mcp", data=b"x" * 2000, headers=bearer(idp.mint()), timeout=BOUND
    )
    assert response.status == 413
    assert (await response.json())["error"] == "request_too_large"
    assert upstream.requests == []


async def test_chunked_body_over_the_limit_is_refused_with_413(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar = await make_sidecar(MAX_REQUEST_BODY_BYTES="1000")
    response = await sidecar.post(
        "/mcp", data=_chunks(2000), headers=bearer(idp.mint()), timeout=BOUND
    )
    assert response.status == 413
    assert (await response.json())["error"] == "request_too_large"
    assert upstream.requests == []


async def test_chunked_body_under_the_limit_reaches_upstream_intact(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    scripted = await start_upstream(_json_ok)
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url, MAX_REQUEST_BODY_BYTES="1000")
    response = await sidecar.post(
        "/mcp", data=_chunks(900), headers=bearer(idp.mint()), timeout=BOUND
    )
    assert response.status == 200
    assert scripted.seen[0].body == b"x" * 900


# --- upstream faults ----------------------------------------------------------------------------


async def test_closed_upstream_port_gives_502_without_internal_address(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    url, port = closed_port_url()
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=url)
    response = await sidecar.post("/mcp", data=b"{}", headers=bearer(idp.mint()), timeout=BOUND)
    assert response.status == 502
    text = await response.text()
    assert (await response.json())["error"] == "upstream_unavailable"
    assert "127.0.0.1" not in text
    assert str(port) not in text


async def _never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # until the proxy gives up and closes


async def test_upstream_that_never_answers_gives_504(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    async with raw_upstream(_never_answer) as url:
        sidecar = await make_sidecar(
            MCP_UPSTREAM_URL=url, UPSTREAM_RESPONSE_TIMEOUT_SECONDS="0.5"
        )
        response = await sidecar.post(
            "/mcp", data=b"{}", headers=bearer(idp.mint()), timeout=BOUND
        )
        assert response.status == 504
        text = await response.text()
        assert (await response.json())["error"] == "upstream_timeout"
        assert "127.0.0.1" not in text


async def _reset_before_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # linger 0: the peer gets a TCP RST


async def test_upstream_reset_before_headers_gives_502(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    async with raw_upstream(_reset_before_headers) as url:
        sidecar = await make_sidecar(MCP_UPSTREAM_URL=url)
        response = await sidecar.get("/mcp", headers=bearer(idp.mint()), timeout=BOUND)
        assert response.status == 502
        assert (await response.json())["error"] == "upstream_unavailable"


def _truncated_body(length: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                             Awaitable[None]]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % length + b'{"partial":')
        await writer.drain()

    return answer


async def test_upstream_closing_mid_body_of_a_small_answer_is_a_502(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    """Small answers of known length are read whole before anything is sent: still honest."""
    async with raw_upstream(_truncated_body(100)) as url:
        sidecar = await make_sidecar(MCP_UPSTREAM_URL=url)
        response = await sidecar.get("/mcp", headers=bearer(idp.mint()), timeout=BOUND)
        assert response.status == 502
        assert (await response.json())["error"] == "upstream_unavailable"


async def test_upstream_closing_mid_body_of_a_streamed_answer_is_a_client_error_not_a_clean_end(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    async with raw_upstream(_truncated_body(WHOLE_BODY_BYTES + 1)) as url:
        sidecar = await make_sidecar(MCP_UPSTREAM_URL=url)
        response = await sidecar.get("/mcp", headers=bearer(idp.mint()), timeout=BOUND)
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


# --- readiness ----------------------------------------------------------------------------------


async def test_readyz_is_ready_with_the_upstream_up(sidecar: Client) -> None:
    response = await sidecar.get("/readyz", timeout=BOUND)
    assert response.status == 200
    assert await response.json() == {"status": "ready",
                                     "checks": {"idp": "ready", "upstream": "ready"}}
    assert response.headers["Cache-Control"] == "no-store"


async def test_readyz_names_the_part_not_ready_and_logs_where_once_per_change(
    make_sidecar: SidecarFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The public answer says which part, in fixed words; the address and the error go to the
    log, once when the state changes (every probe here really connects: no cache)."""
    monkeypatch.setattr(proxy_module, "READY_CACHE_SECONDS", 0.0)
    url, port = closed_port_url()
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=url)
    with capture_logs() as events:
        for _ in range(3):
            response = await sidecar.get("/readyz", timeout=BOUND)
            assert response.status == 503
            assert response.headers["Cache-Control"] == "no-store"
            assert await response.json() == {"status": "not_ready",
                                             "checks": {"idp": "ready", "upstream": "unreachable"}}
            text = await response.text()
            assert str(port) not in text
            assert "127.0.0.1" not in text
            assert "Error" not in text
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        try:
            for _ in range(2):
                response = await sidecar.get("/readyz", timeout=BOUND)
                assert response.status == 200
        finally:
            server.close()
            await server.wait_closed()
    changes = [e for e in events if e["event"] in ("not_ready", "ready")]
    assert [e["event"] for e in changes] == ["not_ready", "ready"]
    assert changes[0]["parts"] == ["upstream"]
    assert changes[0]["upstream"].startswith(f"127.0.0.1:{port}: ConnectionRefusedError")


async def test_accepted_202_without_body_passes_through(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    async def accepted(request: web.Request) -> web.StreamResponse:
        return web.Response(status=202)

    scripted = await start_upstream(accepted)
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url)
    response = await sidecar.post("/mcp", data=b"{}", headers=bearer(idp.mint()), timeout=BOUND)
    assert response.status == 202
    assert await response.read() == b""


async def test_upstream_redirect_is_returned_not_followed(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": "/elsewhere"})

    scripted = await start_upstream(redirect)
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url)
    response = await sidecar.post(
        "/mcp", data=b"{}", headers=bearer(idp.mint()), allow_redirects=False, timeout=BOUND
    )
    assert response.status == 307
    assert response.headers["Location"] == "/elsewhere"
    assert [seen.path_qs for seen in scripted.seen] == ["/mcp"]


async def test_quiet_sse_stream_is_cut_by_its_own_idle_timeout_when_set(
    make_sidecar: SidecarFactory, idp: FakeIdp, start_upstream: StartUpstream
) -> None:
    scripted = await start_upstream(_quiet_gap("text/event-stream"))
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=scripted.url, SSE_IDLE_TIMEOUT_SECONDS="1")
    response = await sidecar.get("/mcp", headers=bearer(idp.mint()), timeout=SLOW_BOUND)
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
