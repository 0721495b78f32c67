"""Odd bytes in every parameter of every public endpoint: never a 5xx, never a traceback.

A seeded generator (the same cases on every run; change SEED to explore) writes each request as
raw bytes on a fresh connection to the real sidecar in either mode, with CORS origins, trusted
proxies, rate limits and the metrics listener on, so every public handler and the gate see them:
non-ASCII and invalid UTF-8, %-encoded garbage, NULs and other control bytes, huge and numeric
values, repeated parameters, odd content types and JSON, in the query, the form or JSON body and
the headers. Each request makes one to three of its parameters odd and sends the others as a real
client does, so it often gets past the first checks and carries its odd value into the later
ones (a real sealed state or code, the right client id and PKCE verifier). Whatever the
sidecar answers, it answers below 500, and neither the structlog events nor the standard
library's records contain an error or a traceback.
A failure names the case: `case 37` replays with the same SEED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import FakeIdp, FakeUpstream, SidecarFactory
from processes import free_port
from structlog.testing import capture_logs
from test_authserver import (
    CHALLENGE,
    CLAUDE_AI,
    CLIENT_ID,
    VERIFIER,
    TokenEndpoint,
    sealed_code,
    sealed_state,
    serve_document,
)
from test_security import parse_responses

Client = TestClient[web.Request, web.Application]

SEED = 20
CASES = 1500  # requests in all: a few seconds on loopback
CONCURRENCY = 8  # connections open at once
BOUND = 10.0  # seconds: the bound on each exchange
UPSTREAM_LIMIT = 1 << 17  # bytes of a line or header the test upstream and IdP take: all
SEALED = 12  # real sealed states and codes made before the fuzz, each usable once
ENV = {
    "STATIC_CLIENT_ID": CLIENT_ID, "STATIC_CLIENT_SECRET": "static-secret-1",
    "STATE_SECRET": "s" * 40, "CORS_ALLOW_ORIGINS": "https://inspector.example",
    "TRUSTED_PROXIES": "127.0.0.1", "RATE_LIMIT_RPM": "100000",
    "RATE_LIMIT_UNAUTHENTICATED_RPM": "100000", "SCOPES_SUPPORTED": "mcp:read",
}
# Text that has broken parsers, decoders and comparisons elsewhere.
ODD_TEXT = (
    "é", "\u212a", "\uff46\uff55\uff4c\uff4c", "\U0001f600", "\u2028", "\u202e", "\ufeff",
    "\x00", "\x1b[2K", "\x7f", "\x85", "\t", " ", "+", "%", "%zz", "%ff", "%00", "%c3%28",
    "%u2028", "..", ".", "/", "\\", "'", '"', "<script>", "{", "[", "null", "true", "-1", "0",
    "1e999", "NaN", "0x10", "9" * 5000, "a.b", "a.b.c", "=", "&", "#", "?", ";", ",", "*",
    "Bearer", "Basic x",
)
INVALID_UTF8 = (b"\xff", b"\xfe\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                b"\x80", b"\xe2\x80")
HEADERS = (
    "Origin", "X-Forwarded-For", "Forwarded", "X-Real-IP", "X-Request-Id", "Accept",
    "Accept-Encoding", "Content-Encoding", "Cookie", "User-Agent", "Mcp-Session-Id",
    "MCP-Protocol-Version", "Last-Event-ID", "Access-Control-Request-Method",
    "Access-Control-Request-Headers", "Authorization", "Range", "If-None-Match", "Referer",
    "X-Forwarded-Proto", "X-Forwarded-Host", "Content-Type",
)
CONTENT_TYPES = (
    "application/x-www-form-urlencoded", "application/json", "text/plain", "",
    "application/x-www-form-urlencoded; charset=latin-1", "multipart/form-data; boundary=x",
    "application/json; charset=utf-16", "application/x-www-form-urlencoded\x00", ";;;", "*/*",
)
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
METADATA = ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp",
            "/.well-known/oauth-authorization-server", "/.well-known/openid-configuration",
            "/.well-known/oauth-authorization-server/mcp")


@dataclass
class Sealed:
    """Real values the generator can put where a client would, each redeemable once."""

    states: list[str]
    codes: list[str]
    token: str
    issuer: str


class Odd:
    """The seeded generator of odd bytes."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)  # noqa: S311 - reproducible cases, not secrets

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def value(self, real: str | None = None) -> bytes:
        """Something odd, sometimes around a real value."""
        pieces = [self._piece() for _ in range(self.rng.randint(1, 4))]
        if real is not None and self.chance(0.5):  # a real value with odd bytes around it
            pieces.insert(self.rng.randrange(len(pieces) + 1), real.encode())
        return b"".join(pieces)

    def _piece(self) -> bytes:
        kind = self.rng.randrange(7)
        if kind == 0:
            return self.rng.choice(ODD_TEXT).encode()
        if kind == 1:
            return self.rng.choice(INVALID_UTF8)
        if kind == 2:
            return bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 8)))
        if kind == 3:
            return "".join(f"%{self.rng.randrange(256):02X}" for _ in range(3)).encode()
        if kind == 4 and self.chance(0.2):
            return b"x" * self.rng.choice((1000, 9000, 70000))
        return "".join(self.rng.choice("abcXYZ019-._~") for _ in range(8)).encode()

    def encoded(self, data: bytes) -> bytes:
        """For a query or a form: percent-encoded mostly, raw sometimes (the parser decides)."""
        if self.chance(0.9):
            return quote_from_bytes(data, safe="").encode()
        return data.replace(b" ", b"+").replace(b"\r", b"").replace(b"\n", b"")

    def pairs(self, fields: Mapping[str, str | None]) -> bytes:
        """name=value&... from fields: one to three of them odd, the others real (a field with
        no real value is left out), sometimes one repeated or an odd one added, in any order."""
        odd = set(self.rng.sample(list(fields), self.rng.randint(1, min(3, len(fields)))))
        items = [(name.encode(), real.encode() if real is not None and name not in odd
                  else self.value()) for name, real in fields.items()
                 if name in odd or real is not None]
        if self.chance(0.15) and items:
            items.append(self.rng.choice(items))
        if self.chance(0.15):
            items.append((self.value(), self.value()))
        if self.chance(0.5):
            self.rng.shuffle(items)
        parts = [self.encoded(name) + (b"" if self.chance(0.03) else b"=" + self.encoded(value))
                 for name, value in items]
        return b"&".join(parts)

    def header_value(self, real: str | None = None) -> bytes:
        """A real value (when there is one) half of the time, else an odd one."""
        if real is not None and self.chance(0.5):
            return real.encode()
        value = self.value(real)
        if self.chance(0.5):  # what the parser lets through, so a handler gets it
            return bytes(byte for byte in value if 0x20 <= byte < 0x7F or byte >= 0x80)
        if self.chance(0.9):  # a CR or LF ends the header: the parser's business, sometimes
            value = value.replace(b"\r", b"").replace(b"\n", b"")
        return value

    def json_value(self, depth: int = 0) -> Any:
        kind = self.rng.randrange(9 if depth < 3 else 6)
        if kind == 0:
            return self.value().decode("utf-8", "surrogateescape" if self.chance(0.5) else
                                       "replace")
        if kind == 1:
            return self.rng.choice((0, -1, 2**64, 1e308, -0.0, True, False, None))
        if kind == 2:
            return self.rng.choice(ODD_TEXT)
        if kind == 3:
            return CLAUDE_AI
        if kind == 4:
            return "http://127.0.0.1:" + self.value().decode("latin-1") + "/cb"
        if kind == 5:
            return ["authorization_code", "refresh_token", "code"][self.rng.randrange(3)]
        if kind == 6:
            return [self.json_value(depth + 1) for _ in range(self.rng.randint(0, 3))]
        return {self.rng.choice(("redirect_uris", "grant_types", "client_name", "x")):
                self.json_value(depth + 1) for _ in range(self.rng.randint(0, 3))}

    def json_body(self) -> bytes:
        kind = self.rng.randrange(6)
        if kind == 0:
            return self.value()
        if kind == 1:  # deeper than the decoder's recursion limit
            return b"[" * 100000 + b"]" * 100000
        if kind == 2:
            return b'{"redirect_uris": [' + b"9" * 5000 + b"]}"
        document: dict[str, Any] = {"redirect_uris": [CLAUDE_AI],
                                    "grant_types": ["authorization_code"]}
        for _ in range(self.rng.randint(1, 3)):
            name = self.rng.choice(("redirect_uris", "grant_types", "response_types",
                                    "client_name", "token_endpoint_auth_method", "scope"))
            document[name] = self.json_value()
        text = json.dumps(document, ensure_ascii=self.chance(0.5))
        return text.encode("utf-8", "surrogatepass")


Request = tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]
"""method, target, extra headers, body."""
Build = Callable[["Odd", "Sealed"], Request]


def _take(values: list[str]) -> str | None:
    return values.pop() if values else None


def authorize(odd: Odd, sealed: Sealed) -> Request:
    query = odd.pairs({
        "response_type": "code", "client_id": CLIENT_ID, "redirect_uri": CLAUDE_AI,
        "state": "client-state", "code_challenge": CHALLENGE, "code_challenge_method": "S256",
        "scope": "mcp:read", "resource": "https://mcp.example.test/mcp", "prompt": None,
        "request": None, "request_uri": None,
    })
    return b"GET", b"/authorize?" + query, [], b""


def callback(odd: Odd, sealed: Sealed) -> Request:
    query = odd.pairs({
        "state": _take(sealed.states) or "x.y", "code": "idp-code",
        "iss": sealed.issuer, "error": None, "error_description": None, "error_uri": None,
    })
    return b"GET", b"/oauth/callback?" + query, [], b""


def token(odd: Odd, sealed: Sealed) -> Request:
    grant = "authorization_code" if odd.chance(0.7) else "refresh_token"
    code = _take(sealed.codes) or "a.b"
    body = odd.pairs({
        "grant_type": grant, "code": code, "redirect_uri": CLAUDE_AI,
        "code_verifier": VERIFIER, "client_id": CLIENT_ID, "refresh_token": "rt-1",
        "client_secret": None, "scope": None, "resource": None,
    })
    content_type = ("application/x-www-form-urlencoded" if odd.chance(0.7)
                    else odd.rng.choice(CONTENT_TYPES))
    headers = [(b"Content-Type", content_type.encode())]
    if odd.chance(0.2):
        headers.append((b"Authorization", b"Basic " + odd.header_value()))
    return b"POST", b"/token", headers, body


def register(odd: Odd, sealed: Sealed) -> Request:
    path = odd.rng.choice((b"/oauth/register", b"/register"))
    content_type = "application/json" if odd.chance(0.7) else odd.rng.choice(CONTENT_TYPES)
    return b"POST", path, [(b"Content-Type", content_type.encode())], odd.json_body()


def plain_get(*paths: str) -> Build:
    def build(odd: Odd, sealed: Sealed) -> Request:
        method = b"GET" if odd.chance(0.7) else odd.rng.choice(METHODS).encode()
        target = odd.rng.choice(paths).encode()
        if odd.chance(0.6):
            target += b"?" + odd.pairs({"x": None, "token": None, "name[]": None})
        return method, target, [], odd.value() if odd.chance(0.2) else b""

    return build


def preflight(odd: Odd, sealed: Sealed) -> Request:
    path = odd.rng.choice(("/mcp", "/token", "/authorize", "/oauth/register", *METADATA))
    headers = [
        (b"Origin", odd.header_value("https://inspector.example")),
        (b"Access-Control-Request-Method", odd.header_value("POST")),
        (b"Access-Control-Request-Headers", odd.header_value("mcp-param-x, authorization")),
    ]
    return b"OPTIONS", path.encode(), headers, b""


def protected(odd: Odd, sealed: Sealed) -> Request:
    """The proxied route, with no token, a broken one, or a valid one (then the upstream)."""
    method = odd.rng.choice(METHODS).encode()
    target = b"/mcp"
    if odd.chance(0.4):
        target += b"/" + odd.encoded(odd.value())
    if odd.chance(0.3):
        target += b"?" + odd.pairs({"session": None, "access_token": None})
    headers = []
    if odd.chance(0.7):
        headers.append((b"Authorization", b"Bearer " + odd.header_value(sealed.token)))
    return method, target, headers, odd.value() if odd.chance(0.5) else b""


ENDPOINTS: dict[str, Build] = {
    "metadata": plain_get(*METADATA),
    "authorize": authorize,
    "callback": callback,
    "token": token,
    "register": register,
    "health": plain_get("/healthz", "/readyz"),
    "preflight": preflight,
    "protected": protected,
}


def raw_request(odd: Odd, build: Build, sealed: Sealed) -> bytes:
    method, target, headers, body = build(odd, sealed)
    names = {name.lower() for name, _ in headers}
    for name in odd.rng.sample(HEADERS, odd.rng.randint(0, 4)):
        if name.lower().encode() not in names:
            headers.append((name.encode(), odd.header_value()))
    head = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close",
            *(name + b": " + value for name, value in headers)]
    if body or method == b"POST":
        head.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def exchange(port: int, data: bytes) -> bytes:
    """Write one request, read until the sidecar closes (bounded); what it answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = b""
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                answer += chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return answer


async def make_sealed(client: Client, idp: FakeIdp) -> Sealed:
    states = [await sealed_state(client) for _ in range(SEALED)]
    codes = [await sealed_code(client, idp) for _ in range(SEALED)]
    return Sealed(states, codes, idp.mint(), idp.issuer)


def troubles(events: list[MutableMapping[str, Any]], records: list[logging.LogRecord]
             ) -> list[str]:
    """Errors and tracebacks among the logs."""
    found = [repr(e)[:300] for e in events
             if e.get("log_level") in ("error", "critical") or "exc_info" in e
             or "exception" in e]
    found += [f"{r.name}: {r.getMessage()[:200]} {r.exc_info[1]!r}"[:300] if r.exc_info else
              f"{r.name}: {r.getMessage()[:200]}" for r in records
              if r.levelno >= logging.ERROR or r.exc_info]
    return sorted(set(found))


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """The recording upstream, taking heads as large as the sidecar passes on: an upstream that
    refuses a long header fails the request with a 502, rightly, and that is not under test."""
    fake = FakeUpstream()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server(max_line_size=UPSTREAM_LIMIT, max_field_size=UPSTREAM_LIMIT)
    fake.server = server
    yield fake
    await server.close()


@pytest.fixture
async def token_endpoint() -> AsyncIterator[TokenEndpoint]:
    """The IdP's recording token endpoint, as lenient as the upstream (the relay passes on the
    client's Authorization header, however long)."""
    endpoint = TokenEndpoint()
    app = web.Application()
    app.router.add_post("/oauth2/token", endpoint.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(max_line_size=UPSTREAM_LIMIT, max_field_size=UPSTREAM_LIMIT)
    endpoint.server = server
    yield endpoint
    await server.close()


async def answered_below_500(port: int, cases: list[tuple[str, bytes]]) -> list[str]:
    """Send every case (a few connections at a time); the ones not answered, or answered 5xx."""
    slots = asyncio.Semaphore(CONCURRENCY)
    failures: list[str] = []

    async def run(index: int, name: str, data: bytes) -> None:
        async with slots, asyncio.timeout(BOUND):
            answer = await exchange(port, data)
        responses = parse_responses(answer)
        statuses = [response.status for response in responses]
        if not statuses or any(status >= 500 for status in statuses):
            shown = data if len(data) < 1200 else data[:400] + b"..." + data[-800:]
            failures.append(f"case {index} ({name}): {statuses} "
                            f"{[r.body[:200] for r in responses]} for {shown!r}")

    await asyncio.gather(*(run(index, *case) for index, case in enumerate(cases)))
    return failures


@pytest.mark.parametrize("mode", ["facade", "direct"])
async def test_odd_input_on_every_public_endpoint_gets_no_5xx_and_logs_no_traceback(
    make_sidecar: SidecarFactory, idp: FakeIdp, token_endpoint: TokenEndpoint,
    caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    serve_document(idp, token_endpoint=token_endpoint.url)
    metrics_port = free_port()
    client = await make_sidecar(**ENV, AUTH_SERVER_MODE=mode, METRICS_PORT=str(metrics_port))
    assert client.port is not None
    # Direct mode seals nothing: /authorize and /token pass the client's values on to the IdP.
    sealed = await make_sealed(client, idp) if mode == "facade" else Sealed(
        [], [], idp.mint(), idp.issuer)
    odd = Odd(SEED)
    names = list(ENDPOINTS)
    cases = [(names[i % len(names)], raw_request(odd, ENDPOINTS[names[i % len(names)]], sealed))
             for i in range(CASES)]
    caplog.set_level(logging.INFO)
    with capture_logs() as events:
        failures = await answered_below_500(client.port, cases)
    assert not failures, "\n".join(failures[:20])
    assert not troubles(events, caplog.records), "\n".join(troubles(events, caplog.records)[:20])
    assert len([e for e in events if e["event"] == "request"]) > CASES / 2  # handlers ran
    # The metrics listener (METRICS_HOST, loopback unless the operator opens it) is aiohttp's
    # own server: no 5xx there either; its parser refusals are aiohttp's, traceback included.
    scrapes = [("metrics", raw_request(odd, plain_get("/metrics", "/", "/metrics/x"), sealed))
               for _ in range(CASES // 10)]
    failures = await answered_below_500(metrics_port, scrapes)
    assert not failures, "\n".join(failures[:20])
