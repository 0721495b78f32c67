"""Bad input against the real sidecar on loopback, table by table: request smuggling, header
injection, path and encoding tricks on every public route in both modes, odd methods, oversize and
slow bodies.

Every case writes exact bytes to a raw socket and reads every response on the connection until
the sidecar closes it (each read bounded). Whatever aiohttp's parser makes of the bytes, three
things must hold: no 5xx from our code; no request without a valid token reaches the upstream;
and an authenticated request reaches it once, with exactly the method, path and body that were
authenticated (never a request hidden in a body or left over from a mis-framed one).

Outcomes are pinned as observed with aiohttp 3.14 and its C parser (llhttp). "Refused by the
parser" means the parser's 4xx (in our JSON shape: listener.py answers for aiohttp) or no answer,
and a closed connection, before any handler of ours ran. Token and claim attacks live in
test_tokens.py (including the Authorization scheme spellings) and the basic /mcp path tricks in
test_gate.py; they are not repeated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import http_parser, web, web_protocol
from aiohttp.test_utils import TestClient
from conftest import FakeIdp, FakeUpstream, SidecarFactory, bearer
from test_gate import METADATA_URL, assert_no_credentials_challenge

Client = TestClient[web.Request, web.Application]

RAW_TIMEOUT = 5.0  # seconds: the bound on every connect, write and read on a raw socket
LINGER_TIMEOUT = 1.0  # seconds: reads where the sidecar is expected to wait for bytes never sent
PAUSE = 0.1  # seconds between the parts of a split write, so each arrives as its own segment
MAX_RAW_BYTES = 1 << 20  # stop reading a connection that sends more than this
TOKEN = "<TOKEN>"  # replaced by a freshly minted valid token when a case is sent
AUTH = f"Authorization: Bearer {TOKEN}"
CLOSE = "Connection: close"
CHUNKED = "Transfer-Encoding: chunked"
# aiohttp's parser refuses malformed requests itself: these (as our JSON), then it closes.
PARSER_REFUSALS = frozenset({400, 411, 413, 431, 501})
FACADE = {"STATIC_CLIENT_ID": "static-client-1", "STATIC_CLIENT_SECRET": "static-secret-1",
          "STATE_SECRET": "s" * 40}
MODES: dict[str, dict[str, str]] = {"direct": {}, "facade": FACADE}
# /authorize, /token and /register spend the client IP's budget on every call; the route and
# method tables send hundreds of them from 127.0.0.1, and rate limits have their own tests.
QUIET = {"RATE_LIMIT_UNAUTHENTICATED_RPM": "0"}
# MAX_HEADER_BYTES at its minimum, aiohttp's own default, which the FakeUpstream also applies.
SMALL_HEADERS = {"MAX_HEADER_BYTES": "8190", "JWT_MAX_TOKEN_BYTES": "4096"}
BODY_LIMIT = {"MAX_REQUEST_BODY_BYTES": "1000"}
DEFAULT_BODY_LIMIT = 10 * 1024 * 1024  # MAX_REQUEST_BODY_BYTES' default (config.py)


# -- the wire -------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    version: str
    status: int
    headers: dict[str, list[str]]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        content_type = self.headers.get("content-type", [""])[0]
        assert content_type.startswith("application/json"), (self.status, self.headers)
        return json.loads(self.body)


@dataclass
class Exchange:
    responses: list[RawResponse]
    closed: bool  # the sidecar closed the connection; False: our bounded read gave up first

    @property
    def final(self) -> list[RawResponse]:
        """Responses without the interim ones (100 Continue)."""
        return [response for response in self.responses if response.status >= 200]

    def summary(self) -> list[tuple[int, bytes]]:
        return [(response.status, response.body[:160]) for response in self.responses]


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    body = b""
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        if not sep:
            return body, b""
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            _, _, rest = data.partition(b"\r\n")  # no trailers in our responses
            return body, rest
        body, data = body + data[:size], data[size + 2:]


def parse_responses(data: bytes) -> list[RawResponse]:
    """Every complete response in what the sidecar sent, in order."""
    responses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, *_ = status_line.split(" ", 2)
        headers: dict[str, list[str]] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        code = int(status)
        if code < 200 or code in (204, 304):
            body, data = b"", rest
        elif "content-length" in headers:
            size = int(headers["content-length"][0])
            body, data = rest[:size], rest[size:]
        elif "chunked" in headers.get("transfer-encoding", [""])[0].lower():
            body, data = _dechunk(rest)
        else:
            body, data = rest, b""
        responses.append(RawResponse(version, code, headers, body))
    return responses


async def send(
    port: int | None, *parts: str | bytes, token: str = "", read_bound: float = RAW_TIMEOUT,
    stop_after: int | None = None,
) -> Exchange:
    """Write the parts (a pause between them) to a fresh connection, byte for byte, then read
    every response until the sidecar closes it, `read_bound` passes without a byte, or
    `stop_after` final responses have arrived."""
    assert port is not None
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port),
                                            RAW_TIMEOUT)
    data, closed = b"", False
    try:
        for index, part in enumerate(parts):
            if index:
                await asyncio.sleep(PAUSE)
            raw = part.replace(TOKEN, token).encode("latin-1") if isinstance(part, str) else (
                part.replace(TOKEN.encode(), token.encode()))
            try:
                writer.write(raw)
                await asyncio.wait_for(writer.drain(), RAW_TIMEOUT)
            except ConnectionError:
                break  # the sidecar already refused and closed: read what it said
        while len(data) < MAX_RAW_BYTES:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), read_bound)
            except TimeoutError:
                break
            except ConnectionError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
            if stop_after is not None and len(Exchange(parse_responses(data), False).final) >= (
                    stop_after):
                break
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), RAW_TIMEOUT)
    return Exchange(parse_responses(data), closed)


def request(line: str, *headers: str, body: str = "", host: str | None = "127.0.0.1") -> str:
    """One request exactly as written: the request line, Host, the header lines, the body."""
    lines = [line, *([f"Host: {host}"] if host is not None else []), *headers]
    return "\r\n".join(lines) + "\r\n\r\n" + body


def length(body: str) -> str:
    return f"Content-Length: {len(body.encode('latin-1'))}"


def chunked(*chunks: str) -> str:
    return "".join(f"{len(c):x}\r\n{c}\r\n" for c in chunks) + "0\r\n\r\n"


# -- what must come back --------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One final response: its status, what its JSON says (the `error` code, or "echo" for the
    upstream's echo, or "ok" for /healthz) and the error code in its WWW-Authenticate challenge
    ("" for the no-credentials form, None for no challenge at all)."""

    status: int
    says: str
    challenge: str | None = None


CHALLENGE = Answer(401, "unauthorized", challenge="")
INVALID_TOKEN = Answer(401, "invalid_token", challenge="invalid_token")
TWO_CREDENTIALS = Answer(400, "invalid_request", challenge="invalid_request")
FORWARDED = Answer(200, "echo")
HEALTHY = Answer(200, "ok")
NOT_FOUND = Answer(404, "not_found")
NOT_ALLOWED = Answer(405, "method_not_allowed")
TOO_LARGE = Answer(413, "request_too_large")

Seen = tuple[str, str, bytes]  # method, path with query, body: what the upstream recorded


@dataclass(frozen=True)
class Case:
    """The parts to write and what must come back. `answers` None: refused by aiohttp's parser
    (its 4xx in our JSON shape, or nothing, and a close) before any handler of ours ran."""

    id: str
    parts: tuple[str | bytes, ...]
    answers: tuple[Answer, ...] | None
    upstream: tuple[Seen, ...] = ()  # exactly these reach the upstream, in order
    closed: bool | None = True  # whether the sidecar closes the connection (None: either)
    linger: bool = False  # the sidecar waits for bytes we never send: read with LINGER_TIMEOUT
    stop_after: int | None = None  # stop reading after this many final responses
    env: Mapping[str, str] = field(default_factory=dict)


def assert_answer(response: RawResponse, expected: Answer) -> None:
    assert response.status == expected.status, (response.status, response.body[:300])
    body = response.json()
    if expected.says == "echo":
        assert set(body) == {"method", "path_qs", "body"}, body
    elif expected.says == "ok":
        assert body == {"status": "ok"}
    else:
        assert body["error"] == expected.says, body
    challenges = response.headers.get("www-authenticate", [])
    if expected.challenge is None:
        assert challenges == []
    elif expected.challenge == "":
        assert_no_credentials_challenge(challenges)
    else:
        assert len(challenges) == 1, challenges
        assert challenges[0].startswith(f'Bearer error="{expected.challenge}"'), challenges
        assert f'resource_metadata="{METADATA_URL}"' in challenges[0]


def assert_parser_refusal(exchange: Exchange) -> None:
    """No handler of ours answered: at most the parser's refusal, in our JSON shape."""
    for response in exchange.final:
        assert response.status in PARSER_REFUSALS, exchange.summary()
        assert set(response.json()) == {"error", "error_description"}
        assert "www-authenticate" not in response.headers


def assert_upstream(upstream: FakeUpstream, expected: tuple[Seen, ...] | list[Seen]) -> None:
    """Exactly the expected requests, and none carrying a credential or a forged identity."""
    assert [(r.method, r.path_qs, r.body) for r in upstream.requests] == list(expected)
    for recorded in upstream.requests:
        names = {name.lower() for name in recorded.headers}
        assert "authorization" not in names
        assert "x-forwarded-user" not in names  # FORWARD_IDENTITY is off: nothing forged passes


async def check(client: Client, idp: FakeIdp, upstream: FakeUpstream, case: Case) -> None:
    exchange = await send(
        client.port, *case.parts, token=idp.mint(),
        read_bound=LINGER_TIMEOUT if case.linger else RAW_TIMEOUT, stop_after=case.stop_after,
    )
    assert all(response.status < 500 for response in exchange.responses), exchange.summary()
    if case.answers is None:
        assert_parser_refusal(exchange)
    else:
        statuses = [response.status for response in exchange.final]
        assert statuses == [answer.status for answer in case.answers], exchange.summary()
        for response, answer in zip(exchange.final, case.answers, strict=True):
            assert_answer(response, answer)
    if case.closed is not None:
        assert exchange.closed is case.closed, exchange.summary()
    assert_upstream(upstream, case.upstream)


def ids(cases: list[Case]) -> list[str]:
    assert len({case.id for case in cases}) == len(cases)
    return [case.id for case in cases]


# -- 1. request smuggling -------------------------------------------------------------------------

# A request hidden where a body belongs: parsed as a request it would get an answer of its own
# (one too many), and reaching the upstream it would be recorded there.
HIDDEN = request("POST /mcp HTTP/1.1", "Authorization: Bearer hidden", "X-Smuggled: 1",
                 "Content-Length: 0")
# A harmless last request: its 200 proves that everything before it was consumed as a body.
FOLLOW_UP = request("GET /healthz HTTP/1.1", CLOSE)
LAST_TOKENLESS = request("POST /mcp HTTP/1.1", "Content-Length: 5", CLOSE, body="world")
SPLIT_HEAD = request("POST /mcp HTTP/1.1", AUTH, CHUNKED)  # the body follows in another segment


def post(*headers: str, body: str = "") -> str:
    return request("POST /mcp HTTP/1.1", *headers, body=body)


SMUGGLING = [
    # Content-Length and Transfer-Encoding together (RFC 9112 §6.1: a server may reject it).
    Case("cl-te", (post("Content-Length: 6", CHUNKED, body="0\r\n\r\nX"),), None),
    Case("cl-te-with-token",
         (post(AUTH, "Content-Length: 6", CHUNKED, body="0\r\n\r\n" + HIDDEN),), None),
    Case("te-cl", (post(CHUNKED, "Content-Length: 3", body=chunked("SMUGGLED")),), None),
    Case("te-cl-with-token",
         (post(AUTH, CHUNKED, "Content-Length: 3", body=chunked(HIDDEN)),), None),
    # Content-Length forms that two parsers could read differently.
    Case("two-content-lengths-differing-with-token",
         (post(AUTH, "Content-Length: 5", length(HIDDEN), body="hello" + HIDDEN),), None),
    Case("two-content-lengths-equal-with-token",
         (post(AUTH, "Content-Length: 5", "Content-Length: 5", body="hello"),), None),
    Case("content-length-list-with-token", (post(AUTH, "Content-Length: 5, 5", body="hello"),),
         None),
    Case("content-length-plus-sign-with-token", (post(AUTH, "Content-Length: +5", body="hello"),),
         None),
    Case("content-length-negative", (post("Content-Length: -5", body="hello"),), None),
    Case("content-length-overflow", (post("Content-Length: 99999999999999999999999"),), None),
    # Transfer-Encoding forms that front ends and back ends are known to disagree on.
    Case("te-chunked-identity-with-token",
         (post(AUTH, "Transfer-Encoding: chunked, identity", body=chunked("hello")),), None),
    Case("te-identity-only", (post("Transfer-Encoding: identity", body="hello"),), None),
    Case("te-space-before-colon-with-token",
         (post(AUTH, "Transfer-Encoding : chunked", body=chunked("hello")),), None),
    Case("te-xchunked-with-token",
         (post(AUTH, "Transfer-Encoding: xchunked", body=chunked("hello")),), None),
    Case("te-obs-folded-with-token",
         (post(AUTH, "Transfer-Encoding:", " chunked", body=chunked("hello")),), None),
    Case("te-twice-with-token", (post(AUTH, CHUNKED, CHUNKED, body=chunked("hello")),), None),
    Case("te-upper-case-value-with-token",  # codings are case-insensitive: this one is valid
         (post(AUTH, "Transfer-Encoding: CHUNKED", CLOSE, body=chunked("hello")),),
         (FORWARDED,), (("POST", "/mcp", b"hello"),)),
    # Chunk-size and chunk-line tricks.
    Case("chunk-size-hex-overflow-with-token",
         (post(AUTH, CHUNKED, body="FFFFFFFFFFFFFFFFF1\r\nhello\r\n0\r\n\r\n"),), None),
    Case("chunk-size-negative-with-token", (post(AUTH, CHUNKED, body="-5\r\nhello\r\n0\r\n\r\n"),),
         None),
    Case("chunk-size-smaller-than-data-with-token",  # aiohttp#10596
         (post(AUTH, CHUNKED, body="4\r\nhello\r\n0\r\n\r\n"),), None),
    Case("chunk-size-larger-than-data-with-token",
         (post(AUTH, CHUNKED, body="6\r\nhello\r\n0\r\n\r\n"),), None),
    Case("chunk-extension-control-characters-with-token",
         (post(AUTH, CHUNKED, body="5;\x00\x01junk\r\nhello\r\n0\r\n\r\n"),), None),
    Case("chunk-lines-ending-in-bare-lf-with-token",
         (post(AUTH, CHUNKED, body="5\nhello\n0\n\n"),), None),
    Case("chunk-extension-well-formed-with-token",
         (post(AUTH, CHUNKED, CLOSE, body="5;name=value\r\nhello\r\n0\r\n\r\n"),),
         (FORWARDED,), (("POST", "/mcp", b"hello"),)),
    Case("chunk-trailers-carrying-credentials-with-token",  # trailers never become headers
         (post(AUTH, CHUNKED, CLOSE, body="5\r\nhello\r\n0\r\nAuthorization: Bearer garbage\r\n"
                                            "X-Forwarded-User: admin\r\n\r\n"),),
         (FORWARDED,), (("POST", "/mcp", b"hello"),)),
    # The body's framing breaks only after the gate let the request in (a later TCP segment).
    # llhttp drops the request's payload without an error (aiohttp#10596), so the handler waits
    # for the body: no answer within the linger, nothing upstream. The pure-Python parser
    # reports it: see test_malformed_chunk_with_the_pure_python_parser_is_a_4xx.
    Case("malformed-chunk-after-headers-with-token",
         (SPLIT_HEAD + "5\r\nhello\r\n", "-5\r\nhello\r\n0\r\n\r\n"), None, closed=None,
         linger=True),
    Case("chunk-size-overflow-after-headers-with-token",
         (SPLIT_HEAD, "FFFFFFFFFFFFFFFFF1\r\nhello\r\n0\r\n\r\n"), None, closed=None, linger=True),
    # ...and is answered 408 once the body is silent for REQUEST_BODY_TIMEOUT_SECONDS.
    Case("malformed-chunk-after-headers-with-token-times-out",
         (SPLIT_HEAD + "5\r\nhello\r\n", "-5\r\nhello\r\n0\r\n\r\n"),
         (Answer(408, "request_timeout"),), closed=None, stop_after=1,  # aiohttp lingers 10 s
         env={"REQUEST_BODY_TIMEOUT_SECONDS": "0.5"}),
    Case("malformed-chunk-after-headers-tokenless",
         (post(CHUNKED), "-5\r\nhello\r\n0\r\n\r\n"), (CHALLENGE,), closed=None, linger=True),
    # Requests hidden in the body of a refused one: consumed as a body, never parsed or sent.
    Case("request-in-length-body-of-a-401",
         (post(length(HIDDEN), body=HIDDEN) + FOLLOW_UP,), (CHALLENGE, HEALTHY)),
    Case("request-in-chunked-body-of-a-401",
         (post(CHUNKED, body=chunked(HIDDEN[:20], HIDDEN[20:])) + FOLLOW_UP,),
         (CHALLENGE, HEALTHY)),
    Case("request-in-get-body-of-a-401",
         (request("GET /mcp HTTP/1.1", length(HIDDEN), body=HIDDEN) + FOLLOW_UP,),
         (CHALLENGE, HEALTHY)),
    # An authenticated request never lends its token to the next one on the connection.
    Case("authenticated-post-then-pipelined-tokenless",
         (post(AUTH, "Content-Length: 5", body="hello") + LAST_TOKENLESS,),
         (FORWARDED, CHALLENGE), (("POST", "/mcp", b"hello"),)),
    Case("authenticated-post-then-pipelined-garbage-token",
         (post(AUTH, "Content-Length: 5", body="hello")
          + request("POST /mcp HTTP/1.1", "Authorization: Bearer garbage", "Content-Length: 5",
                    CLOSE, body="world"),),
         (FORWARDED, INVALID_TOKEN), (("POST", "/mcp", b"hello"),)),
    Case("authenticated-chunked-post-then-pipelined-tokenless",
         (post(AUTH, CHUNKED, body=chunked()) + LAST_TOKENLESS,),
         (FORWARDED, CHALLENGE), (("POST", "/mcp", b""),)),
    Case("authenticated-body-hiding-a-request-to-another-path",
         (post(AUTH, CLOSE, length(HIDDEN.replace("/mcp", "/admin")),
               body=HIDDEN.replace("/mcp", "/admin")),),
         (FORWARDED,), (("POST", "/mcp", HIDDEN.replace("/mcp", "/admin").encode()),)),
    Case("http10-keep-alive-then-pipelined-tokenless",
         (request("GET /mcp HTTP/1.0", AUTH, "Connection: keep-alive", host=None)
          + request("GET /mcp HTTP/1.0", host=None),),
         (FORWARDED, CHALLENGE), (("GET", "/mcp", b""),)),
    # HTTP/1.0 without Content-Length has no body; llhttp refuses bytes after it.
    Case("http10-without-length-then-bytes-with-token",
         (request("POST /mcp HTTP/1.0", AUTH, host=None) + HIDDEN,), None),
    # Upgrades: the proxy is not a tunnel; what follows a declined upgrade is a new request.
    Case("websocket-upgrade-then-pipelined-tokenless",
         (request("GET /mcp HTTP/1.1", "Connection: Upgrade", "Upgrade: websocket",
                  "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
          + request("GET /mcp HTTP/1.1", CLOSE),), (CHALLENGE, CHALLENGE)),
    Case("websocket-upgrade-with-token-then-pipelined-tokenless",
         (request("GET /mcp HTTP/1.1", AUTH, "Connection: Upgrade", "Upgrade: websocket",
                  "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
          + request("GET /mcp HTTP/1.1", CLOSE),),
         (FORWARDED, CHALLENGE), (("GET", "/mcp", b""),)),
    # h2c: llhttp stops parsing after the upgrade request; the pipelined bytes are never
    # answered nor forwarded, and the connection stays open past our read bound.
    Case("h2c-upgrade-then-pipelined-tokenless",
         (request("GET /mcp HTTP/1.1", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
                  "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA") + request("GET /mcp HTTP/1.1"),),
         (CHALLENGE,), closed=None, linger=True),
    Case("h2c-upgrade-with-token-then-pipelined-tokenless",
         (request("GET /mcp HTTP/1.1", AUTH, "Connection: Upgrade, HTTP2-Settings",
                  "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")
          + request("GET /mcp HTTP/1.1"),),
         (FORWARDED,), (("GET", "/mcp", b""),), closed=None, linger=True),
    # aiohttp sends 100 Continue before the middlewares run, even to a request the gate refuses.
    Case("expect-100-continue-tokenless",
         (post("Expect: 100-continue", "Content-Length: 5", CLOSE), "hello"), (CHALLENGE,)),
    Case("expect-100-continue-with-token",
         (post(AUTH, "Expect: 100-continue", "Content-Length: 5", CLOSE), "hello"),
         (FORWARDED,), (("POST", "/mcp", b"hello"),)),
]


@pytest.mark.parametrize("case", SMUGGLING, ids=ids(SMUGGLING))
async def test_smuggling_never_reaches_upstream_unauthenticated_or_reframed(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream, case: Case
) -> None:
    client = await make_sidecar(**case.env)
    await check(client, idp, upstream, case)


# -- 2. header injection and header limits --------------------------------------------------------


def get_mcp(*headers: str) -> str:
    return request("GET /mcp HTTP/1.1", *headers, CLOSE)


def many(count: int) -> list[str]:
    return [f"X-Filler-{i}: v" for i in range(count)]


FORWARDED_GET = (("GET", "/mcp", b""),)

HEADERS = [
    # Line breaks and control characters that would split one header into two.
    Case("bare-cr-in-value-hiding-authorization", (get_mcp(f"X-Note: a\r{AUTH}"),), None),
    Case("bare-lf-in-value-hiding-authorization", (get_mcp(f"X-Note: a\n{AUTH}"),), None),
    Case("bare-lf-line-endings-with-token",
         (f"GET /mcp HTTP/1.1\nHost: 127.0.0.1\n{AUTH}\n{CLOSE}\n\n",), None),
    Case("bare-cr-in-name", (get_mcp("X-No\rte: a"),), None),
    Case("nul-in-value", (get_mcp("X-Note: a\x00b"),), None),
    Case("nul-in-name", (get_mcp("X-No\x00te: a"),), None),
    Case("nul-between-scheme-and-token", (get_mcp(f"Authorization: Bearer\x00{TOKEN}"),), None),
    Case("del-in-value", (get_mcp("X-Note: a\x7fb"),), None),
    Case("space-before-colon-in-authorization", (get_mcp(f"Authorization : Bearer {TOKEN}"),),
         None),
    # obs-fold continuation lines (RFC 9112 §5.2: reject or replace with SP).
    Case("obs-fold-carrying-authorization", (get_mcp("X-Note: a", f" {AUTH}"),), None),
    Case("obs-fold-carrying-forwarded-user-with-token",
         (get_mcp(AUTH, "X-Note: a", "\tX-Forwarded-User: admin"),), None),
    Case("obs-fold-before-the-first-header",
         (request("GET /mcp HTTP/1.1", f" {AUTH}", "Host: 127.0.0.1", CLOSE, host=None),), None),
    # Two Authorization headers: refused whatever the order, never "first one wins".
    Case("authorization-valid-then-garbage", (get_mcp(AUTH, "Authorization: Bearer garbage"),),
         (TWO_CREDENTIALS,)),
    Case("authorization-garbage-then-valid", (get_mcp("Authorization: Bearer garbage", AUTH),),
         (TWO_CREDENTIALS,)),
    Case("authorization-empty-then-valid", (get_mcp("Authorization:", AUTH),), (TWO_CREDENTIALS,)),
    Case("authorization-valid-then-empty", (get_mcp(AUTH, "Authorization:"),), (TWO_CREDENTIALS,)),
    # Wire spellings of one valid header (the scheme spellings are in test_tokens.py).
    Case("authorization-name-upper-case", (get_mcp(f"AUTHORIZATION: Bearer {TOKEN}"),),
         (FORWARDED,), FORWARDED_GET),
    Case("authorization-without-space-after-colon", (get_mcp(f"Authorization:Bearer {TOKEN}"),),
         (FORWARDED,), FORWARDED_GET),
    Case("authorization-with-tabs-around-the-value",
         (get_mcp(f"Authorization:\t Bearer {TOKEN} \t"),), (FORWARDED,), FORWARDED_GET),
    Case("authorization-with-no-break-space-separator",
         (get_mcp("Authorization: Bearer\xa0" + TOKEN),), (CHALLENGE,)),
    Case("authorization-name-with-underscore", (get_mcp(f"Authorization_: Bearer {TOKEN}"),),
         (CHALLENGE,)),
    Case("token-in-proxy-authorization-only", (get_mcp(f"Proxy-Authorization: Bearer {TOKEN}"),),
         (CHALLENGE,)),
    Case("non-ascii-header-value-with-token", (get_mcp("X-Note: \xc3\xa9\xff", AUTH),),
         (FORWARDED,), FORWARDED_GET),
    # How many headers: aiohttp's max_headers is 128, Host and Connection included.
    Case("128-headers-tokenless", (get_mcp(*many(126)),), (CHALLENGE,)),
    Case("129-headers-tokenless", (get_mcp(*many(127)),), None),
    Case("200-headers-with-token", (get_mcp(AUTH, *many(197)),), None),
    Case("100-headers-with-token", (get_mcp(AUTH, *many(97)),), (FORWARDED,), FORWARDED_GET),
    # How long a header: MAX_HEADER_BYTES is aiohttp's max_field_size, which (except for the
    # first header) bounds the value alone. At aiohttp's default, so the upstream takes it too:
    Case("value-at-MAX_HEADER_BYTES-8190-with-token", (get_mcp(AUTH, "X-Pad: " + "a" * 8190),),
         (FORWARDED,), FORWARDED_GET, env=SMALL_HEADERS),
    Case("value-over-MAX_HEADER_BYTES-8190-with-token", (get_mcp(AUTH, "X-Pad: " + "a" * 8191),),
         None, env=SMALL_HEADERS),
    Case("value-over-MAX_HEADER_BYTES-8190-tokenless", (get_mcp("X-Pad: " + "a" * 8191),), None,
         env=SMALL_HEADERS),
    # ... and at the sidecar's default of 32 KiB.
    Case("value-at-default-MAX_HEADER_BYTES-tokenless", (get_mcp("X-Pad: " + "a" * 32768),),
         (CHALLENGE,)),
    Case("value-over-default-MAX_HEADER_BYTES-tokenless", (get_mcp("X-Pad: " + "a" * 32769),),
         None),
    Case("value-over-default-MAX_HEADER_BYTES-with-token",
         (get_mcp(AUTH, "X-Pad: " + "a" * 32769),), None),
    Case("request-line-over-8190-bytes", (request(f"GET /mcp?{'a' * 9000} HTTP/1.1", CLOSE),),
         None),
]


@pytest.mark.parametrize("case", HEADERS, ids=ids(HEADERS))
async def test_header_injection_and_limits_never_reach_upstream_unauthenticated(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream, case: Case
) -> None:
    client = await make_sidecar(**case.env)
    await check(client, idp, upstream, case)


# -- 3. every public route, both modes: path and encoding tricks ----------------------------------


@dataclass(frozen=True)
class Route:
    """A public route: the methods it answers and the status its own handler gives a bare
    request (no query, empty body) in each mode; None: not public in that mode (authenticated)."""

    path: str
    methods: tuple[str, ...]
    direct: int | None
    facade: int

    def bare_status(self, mode: str) -> int | None:
        return self.direct if mode == "direct" else self.facade


GET_HEAD = ("GET", "HEAD")
AS_METADATA = "/.well-known/oauth-authorization-server"
OIDC_METADATA = "/.well-known/openid-configuration"
ROUTES = [
    Route("/healthz", GET_HEAD, 200, 200),
    Route("/readyz", GET_HEAD, 200, 200),
    Route("/.well-known/oauth-protected-resource", GET_HEAD, 200, 200),
    Route("/.well-known/oauth-protected-resource/mcp", GET_HEAD, 200, 200),
    Route("/authorize", GET_HEAD, 400, 400),  # no redirect_uri: refused, never redirected
    Route("/token", ("POST",), 400, 400),  # not a form
    Route("/oauth/register", ("POST",), 404, 400),  # direct: no static client; facade: not JSON
    Route("/register", ("POST",), 404, 400),
    Route("/oauth/callback", GET_HEAD, None, 400),  # no state
    Route(AS_METADATA, GET_HEAD, None, 200),
    Route(AS_METADATA + "/mcp", GET_HEAD, None, 200),
    Route(OIDC_METADATA, GET_HEAD, None, 200),
    Route(OIDC_METADATA + "/mcp", GET_HEAD, None, 200),
]


def escapes(path: str) -> list[str]:
    """Targets that are not this route, however some parser might resolve them: traversal out
    of it, encoded separators and dots, case, slash and dot-segment variants, parameters
    (less those that are another route: the path-inserted metadata documents)."""
    targets = [
        f"{path}/../mcp", f"{path}/../../mcp", f"{path}/../../../mcp", f"{path}%2F..%2Fmcp",
        f"{path}/..%2fmcp", f"{path}/%2e%2e/mcp", f"{path}%2f%2e%2e%2fmcp", f"{path}\\..\\mcp",
        f"{path}%5c..%5cmcp", f"{path}%252f..%252fmcp", f"{path}%c0%af..%c0%afmcp",
        f"{path}%ef%bc%8f..%ef%bc%8fmcp", f"/{path}", f"/.{path}", f"{path}/", f"{path}/.",
        f"{path}.", f"{path}%2e", f"{path}/mcp", f"{path};x", f"{path};/../mcp", f"{path}%00",
        f"{path}%20", f"{path}%09", f"{path}%23/../mcp", f"{path}%3f/../mcp", path.upper(),
    ]
    return [target for target in targets if target not in {route.path for route in ROUTES}]


def same_route(path: str) -> list[str]:
    """Targets that are this route: the query and the fragment are never part of the path."""
    return [f"{path}?x=/mcp", f"{path}?/../mcp", f"{path}#", f"{path}#/../../mcp"]


def bare(method: str, target: str) -> str:
    return request(f"{method} {target} HTTP/1.1", "Content-Length: 0", CLOSE)


@pytest.mark.parametrize("route", ROUTES, ids=[route.path for route in ROUTES])
@pytest.mark.parametrize("mode", MODES)
async def test_path_tricks_on_public_routes_never_skip_auth_or_reach_upstream(
    make_sidecar: SidecarFactory, upstream: FakeUpstream, mode: str, route: Route
) -> None:
    """One sidecar per route and mode; GET and POST of the route itself, of every escape from
    it (each 401 from the gate) and of every query/fragment form (the route's own answer)."""
    client = await make_sidecar(**QUIET, **MODES[mode])
    bare_status = route.bare_status(mode)
    for method in ("GET", "POST"):
        [baseline] = (await send(client.port, bare(method, route.path))).final
        if bare_status is None:
            assert_answer(baseline, CHALLENGE)
        elif method in route.methods:
            assert baseline.status == bare_status, (method, baseline.body)
            assert "www-authenticate" not in baseline.headers
        else:
            assert_answer(baseline, NOT_ALLOWED)
            assert baseline.headers["allow"] == [", ".join(route.methods)]
        for target in escapes(route.path):
            exchange = await send(client.port, bare(method, target))
            assert len(exchange.final) == 1, (method, target, exchange.summary())
            assert_answer(exchange.final[0], CHALLENGE)
            assert upstream.requests == [], (method, target)
        for target in same_route(route.path):
            [answer] = (await send(client.port, bare(method, target))).final
            assert (answer.status, answer.json()) == (baseline.status, baseline.json()), target
    assert upstream.requests == []


REQUEST_LINES = [
    Case("mcp-with-empty-fragment", (bare("POST", "/mcp#"),), (CHALLENGE,)),
    Case("mcp-with-empty-fragment-with-token",
         (request("POST /mcp# HTTP/1.1", AUTH, "Content-Length: 0", CLOSE),), (FORWARDED,),
         (("POST", "/mcp", b""),)),
    # Absolute form: the authority never chooses where the proxy sends the request.
    Case("absolute-form-loopback-mcp", (bare("GET", "http://127.0.0.1/mcp"),), (CHALLENGE,)),
    Case("absolute-form-foreign-host-mcp", (bare("GET", "http://evil.test/mcp"),), (CHALLENGE,)),
    Case("absolute-form-foreign-host-mcp-with-token",
         (request("GET http://evil.test/mcp HTTP/1.1", AUTH, CLOSE),), (FORWARDED,),
         FORWARDED_GET),
    Case("absolute-form-public-route-other-method", (bare("POST", "http://evil.test/healthz"),),
         (NOT_ALLOWED,)),
    Case("absolute-form-traversal-from-public-route",
         (bare("POST", "http://evil.test/healthz/../mcp"),), (CHALLENGE,)),
    Case("absolute-form-https-traversal-from-token",
         (bare("POST", "https://127.0.0.1/token/../mcp"),), (CHALLENGE,)),
    # Asterisk and authority forms never match a route: 401 without a token, 404 with one.
    Case("asterisk-form-options", (bare("OPTIONS", "*"),), (CHALLENGE,)),
    Case("asterisk-form-options-with-token", (request("OPTIONS * HTTP/1.1", AUTH, CLOSE),),
         (NOT_FOUND,)),
    Case("asterisk-form-get", (bare("GET", "*"),), None),
    Case("connect-authority-form", (request("CONNECT 127.0.0.1:80 HTTP/1.1", CLOSE),),
         (CHALLENGE,)),
    Case("connect-authority-form-with-token",
         (request("CONNECT 127.0.0.1:80 HTTP/1.1", AUTH, CLOSE),), (NOT_FOUND,)),
    Case("connect-foreign-authority-with-token",
         (request("CONNECT evil.test:443 HTTP/1.1", AUTH, CLOSE, host="evil.test:443"),),
         (NOT_FOUND,)),
    Case("connect-then-pipelined-tokenless",
         (request("CONNECT 127.0.0.1:80 HTTP/1.1") + request("GET /mcp HTTP/1.1", CLOSE),),
         (CHALLENGE, CHALLENGE)),
    # Protocol versions.
    Case("http10-without-host", (request("GET /mcp HTTP/1.0", host=None),), (CHALLENGE,)),
    Case("http10-with-token", (request("POST /mcp HTTP/1.0", AUTH, "Content-Length: 5",
                                       host=None, body="hello"),),
         (FORWARDED,), (("POST", "/mcp", b"hello"),)),
    Case("http09-style-request-line", ("GET /mcp\r\n\r\n",), (CHALLENGE,)),  # llhttp takes it
    Case("http09-style-public-route", ("GET /healthz\r\n\r\n",), (HEALTHY,)),
    Case("http2-version-in-request-line", (request("GET /mcp HTTP/2.0"),), (CHALLENGE,)),
    Case("unknown-http-version", (request("GET /mcp HTTP/1.9", CLOSE),), None),
    # Host.
    Case("missing-host", (request("GET /mcp HTTP/1.1", CLOSE, host=None),), None),
    Case("missing-host-with-token", (request("GET /mcp HTTP/1.1", AUTH, CLOSE, host=None),),
         None),
    Case("two-hosts", (get_mcp("Host: evil.test"),), None),
    Case("two-hosts-with-token", (get_mcp(AUTH, "Host: evil.test"),), None),
    Case("host-with-path", (request("GET /mcp HTTP/1.1", CLOSE, host="127.0.0.1/healthz"),),
         (CHALLENGE,)),
    Case("host-with-path-with-token",
         (request("GET /mcp HTTP/1.1", AUTH, CLOSE, host="127.0.0.1/healthz"),), (FORWARDED,),
         FORWARDED_GET),
    Case("host-with-userinfo", (request("GET /mcp HTTP/1.1", CLOSE, host="user@evil.test"),),
         (CHALLENGE,)),
    Case("host-empty", (request("GET /mcp HTTP/1.1", CLOSE, host=""),), (CHALLENGE,)),
    # Request-line whitespace and targets.
    Case("tab-in-request-line", (request("GET\t/mcp HTTP/1.1", CLOSE),), None),
    Case("double-space-in-request-line", (request("POST  /mcp HTTP/1.1", CLOSE),),
         (CHALLENGE,)),
    Case("empty-line-before-request-line", ("\r\n" + bare("POST", "/mcp"),), (CHALLENGE,)),
    Case("target-without-leading-slash", (bare("GET", "mcp"),), None),
    Case("target-only-a-query", (bare("GET", "?x"),), None),
    Case("raw-space-in-target", (bare("GET", "/mcp x"),), None),
    Case("raw-cr-in-target", (bare("GET", "/mcp\rx"),), None),
    Case("raw-non-ascii-in-target-with-token",
         (request("GET /mcp/\xc3\xa9 HTTP/1.1", AUTH, CLOSE),), None),
    # An encoded CRLF never becomes a line break upstream: in the path it matches no route
    # (the catch-all's `.*` stops at a newline: 404 once authenticated), in the query it is
    # forwarded still encoded.
    Case("encoded-crlf-in-path", (bare("GET", "/mcp%0d%0aX-Injected:%20yes"),), (CHALLENGE,)),
    Case("encoded-crlf-in-path-with-token",
         (request("GET /mcp%0d%0aX-Injected:%20yes HTTP/1.1", AUTH, CLOSE),), (NOT_FOUND,)),
    Case("encoded-crlf-in-query-with-token",
         (request("GET /mcp?x=%0d%0aX-Injected:%20yes HTTP/1.1", AUTH, CLOSE),), (FORWARDED,),
         (("GET", "/mcp?x=%0d%0aX-Injected:%20yes", b""),)),
]


@pytest.mark.parametrize("case", REQUEST_LINES, ids=ids(REQUEST_LINES))
@pytest.mark.parametrize("mode", MODES)
async def test_request_line_and_host_forms_never_reach_upstream_unauthenticated(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream, mode: str, case: Case
) -> None:
    client = await make_sidecar(**QUIET, **MODES[mode], **case.env)
    await check(client, idp, upstream, case)


# -- 4. methods -----------------------------------------------------------------------------------

METHODS = ["TRACE", "TRACK", "CONNECT", "PROPFIND", "PATCH", "PUT", "get", "FOO"]
NOT_PARSEABLE = {"TRACK", "get", "FOO"}  # not methods llhttp knows: refused before routing


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
async def test_odd_methods_on_every_route_are_refused_or_authenticated(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream, method: str, mode: str
) -> None:
    """Public routes answer only their own methods (405 otherwise, with or without a token, never
    proxied); the MCP path and routes not public in this mode need a token; CONNECT's target is
    an authority, never a route; methods llhttp does not know never reach a handler."""
    client = await make_sidecar(**QUIET, **MODES[mode])
    token = idp.mint()
    routes: dict[str, Route | None] = {"/mcp": None, **{route.path: route for route in ROUTES}}
    for path, route in routes.items():
        public = route is not None and route.bare_status(mode) is not None
        for credentials in ((), (AUTH,)):
            upstream.requests.clear()
            exchange = await send(client.port, request(
                f"{method} {path} HTTP/1.1", *credentials, "Content-Length: 2", CLOSE, body="{}"
            ), token=token)
            where = (method, path, bool(credentials), exchange.summary())
            assert exchange.closed, where
            expected: list[Seen] = []
            if method in NOT_PARSEABLE:
                assert_parser_refusal(exchange)
            elif method == "CONNECT":
                [answer] = exchange.final
                assert_answer(answer, NOT_FOUND if credentials else CHALLENGE)
            elif public:
                assert route is not None
                [answer] = exchange.final
                assert_answer(answer, NOT_ALLOWED)
                assert answer.headers["allow"] == [", ".join(route.methods)], where
            elif method == "TRACE" and credentials:  # would echo the upstream credential
                [answer] = exchange.final
                assert_answer(answer, NOT_ALLOWED)
            elif credentials:  # authenticated: the upstream decides about its methods
                [answer] = exchange.final
                assert_answer(answer, FORWARDED)
                expected = [(method, path, b"{}")]
            else:
                [answer] = exchange.final
                assert_answer(answer, CHALLENGE)
            assert_upstream(upstream, expected)


# -- 5. oversize and slow bodies ------------------------------------------------------------------

PADDED = HIDDEN + "x" * (2000 - len(HIDDEN))  # 2000 bytes, over BODY_LIMIT, a request inside
AT_LIMIT = "y" * 1000

BODIES = [
    Case("length-over-limit-tokenless", (post(length(PADDED), body=PADDED) + FOLLOW_UP,),
         (CHALLENGE, HEALTHY), env=BODY_LIMIT),
    Case("length-over-limit-with-token", (post(AUTH, length(PADDED), body=PADDED) + FOLLOW_UP,),
         (TOO_LARGE, HEALTHY), env=BODY_LIMIT),
    Case("length-at-limit-with-token", (post(AUTH, length(AT_LIMIT), CLOSE, body=AT_LIMIT),),
         (FORWARDED,), (("POST", "/mcp", AT_LIMIT.encode()),), env=BODY_LIMIT),
    Case("chunked-over-limit-tokenless",
         (post(CHUNKED, body=chunked(PADDED[:1000], PADDED[1000:])) + FOLLOW_UP,),
         (CHALLENGE, HEALTHY), env=BODY_LIMIT),
    Case("chunked-over-limit-with-token",
         (post(AUTH, CHUNKED, body=chunked(PADDED[:1000], PADDED[1000:])) + FOLLOW_UP,),
         (TOO_LARGE, HEALTHY), env=BODY_LIMIT),
    Case("chunked-at-limit-with-token",
         (post(AUTH, CHUNKED, CLOSE, body=chunked(AT_LIMIT[:600], AT_LIMIT[600:])),),
         (FORWARDED,), (("POST", "/mcp", AT_LIMIT.encode()),), env=BODY_LIMIT),
    # The default limit, claimed but never sent: refused on the header alone, and the
    # connection half-closed at once (the body is never waited for, nor read).
    Case("length-over-default-limit-claimed-with-token",
         (post(AUTH, f"Content-Length: {DEFAULT_BODY_LIMIT + 1}"),), (TOO_LARGE,)),
    Case("length-over-default-limit-claimed-tokenless",
         (post(f"Content-Length: {DEFAULT_BODY_LIMIT + 1}"),), (CHALLENGE,)),
    # Slow body with a token: a silence of REQUEST_BODY_TIMEOUT_SECONDS, then 408.
    Case("slow-length-body-with-token-times-out",
         (post(AUTH, "Content-Length: 1000", body="0123456789"),),
         (Answer(408, "request_timeout"),), closed=None, stop_after=1,
         env={"REQUEST_BODY_TIMEOUT_SECONDS": "0.5"}),
    # Slow loris without a token: refused at once, before the body, and closed (aiohttp would
    # read the body for up to its 10 s lingering time; listener.py does not let it).
    Case("slow-body-tokenless", (post("Content-Length: 1000", body="0123456789"),),
         (CHALLENGE,)),
]


@pytest.mark.parametrize("case", BODIES, ids=ids(BODIES))
async def test_oversize_bodies_are_refused_and_consumed_as_bodies(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream, case: Case
) -> None:
    client = await make_sidecar(**case.env)
    await check(client, idp, upstream, case)


async def test_slow_body_with_token_never_completes_upstream_or_poisons_the_next_request(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    """Content-Length 1000, 10 bytes sent, then silence: the proxy waits for the whole (small)
    body before it calls the upstream, up to REQUEST_BODY_TIMEOUT_SECONDS (then 408, see
    slow-length-body-with-token-times-out); our bound ends it first. Nothing reaches the upstream,
    and the next request on another connection is served normally."""
    client = await make_sidecar()
    slow = await send(client.port, post(AUTH, "Content-Length: 1000", body="0123456789"),
                      token=idp.mint(), read_bound=LINGER_TIMEOUT)
    assert slow.final == []
    assert not slow.closed
    assert upstream.requests == []
    async with asyncio.timeout(RAW_TIMEOUT):
        response = await client.post("/mcp", data=b"second", headers=bearer(idp.mint()))
        assert response.status == 200
        assert (await response.json())["body"] == "second"
    assert_upstream(upstream, [("POST", "/mcp", b"second")])


# -- known bugs -----------------------------------------------------------------------------------


@dataclass
class RawUpstream:
    """An upstream that keeps the exact bytes of each request: its head, and a body of the length
    the head announces (waited for at most LINGER_TIMEOUT), then answers 200 and closes."""

    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_TIMEOUT)
            announced = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    announced = int(value)
            body = b""
            with contextlib.suppress(TimeoutError):
                while len(body) < announced:
                    chunk = await asyncio.wait_for(reader.read(announced - len(body)),
                                                   LINGER_TIMEOUT)
                    if not chunk:
                        break
                    body += chunk
            self.requests.append((head, body))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
            await asyncio.wait_for(writer.drain(), RAW_TIMEOUT)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # the sidecar gave up on this request: nothing complete to keep
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    raw = RawUpstream()
    server = await asyncio.start_server(raw.serve, "127.0.0.1", 0)
    raw.port = server.sockets[0].getsockname()[1]
    yield raw
    server.close()
    await asyncio.wait_for(server.wait_closed(), RAW_TIMEOUT)


JSONRPC = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"pad":"' + b"A" * 200 + b'"}}'
COMPRESSED_BODIES = {
    "grows-when-decoded": gzip.compress(JSONRPC),  # 200+ bytes decoded from about 80
    "shrinks-when-decoded": gzip.compress(b"hi"),  # 2 bytes decoded from 22
    "not-really-gzip": b"\x1f\x8bnot gzip at all",
}
# Regression: aiohttp's server decompressed request bodies by default while the proxy forwarded
# the client's Content-Encoding and Content-Length, so the upstream got a decoded, truncated or
# short body under the original framing (or a 502/500). Bodies are now relayed as sent.


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("name", COMPRESSED_BODIES)
async def test_compressed_body_reaches_the_upstream_byte_for_byte(
    make_sidecar: SidecarFactory, idp: FakeIdp, raw_upstream: RawUpstream, name: str,
    framing: str,
) -> None:
    body = COMPRESSED_BODIES[name]
    client = await make_sidecar(MCP_UPSTREAM_URL=raw_upstream.url)
    head = request("POST /mcp HTTP/1.1", AUTH, "Content-Encoding: gzip",
                   "Content-Type: application/json", CLOSE,
                   length(body.decode("latin-1")) if framing == "length" else CHUNKED)
    framed = body if framing == "length" else (
        f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    exchange = await send(client.port, head.encode("latin-1") + framed, token=idp.mint())
    assert [response.status for response in exchange.final] == [200], exchange.summary()
    [(upstream_head, upstream_body)] = raw_upstream.requests
    assert b"\r\ncontent-encoding: gzip\r\n" in upstream_head.lower()
    assert upstream_body == body


@pytest.mark.parametrize(("mode", "path"), [
    ("facade", "/oauth/register"), ("facade", "/register"), ("facade", "/token"),
    ("direct", "/token"),
])
async def test_undecodable_compressed_body_on_a_public_endpoint_is_a_4xx(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream, mode: str, path: str
) -> None:
    client = await make_sidecar(**QUIET, **MODES[mode])
    body = COMPRESSED_BODIES["not-really-gzip"].decode("latin-1")
    content_type = "application/json" if "register" in path else (
        "application/x-www-form-urlencoded")
    exchange = await send(client.port, request(
        f"POST {path} HTTP/1.1", f"Content-Type: {content_type}", "Content-Encoding: gzip",
        length(body), CLOSE, body=body))
    [answer] = exchange.final
    assert 400 <= answer.status < 500, exchange.summary()
    assert isinstance(answer.json()["error"], str)
    assert upstream.requests == []


async def test_malformed_chunk_with_the_pure_python_parser_is_a_4xx(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(web_protocol, "HttpRequestParser", http_parser.HttpRequestParserPy)
    client = await make_sidecar()
    exchange = await send(client.port, SPLIT_HEAD + "5\r\nhello\r\n", "-5\r\nhello\r\n0\r\n\r\n",
                          token=idp.mint(), read_bound=LINGER_TIMEOUT)
    assert upstream.requests == []
    assert [response.status for response in exchange.final] == [400], exchange.summary()
