"""What the upstream learns about the caller: identity headers, its own credential, the client's
address. Always through the production app, against an upstream that records the exact header
lines it received (duplicates kept), so a forged or injected header cannot hide.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import FakeIdp, FakeUpstream, SidecarFactory, bearer, sidecar_env
from multidict import CIMultiDict, CIMultiDictProxy
from structlog.testing import capture_logs

from oauth_sidecar.app import PROXY
from oauth_sidecar.client_ip import ClientAddress, forwarded_chain
from oauth_sidecar.config import ConfigError, load
from oauth_sidecar.upstream.headers import MAX_REMEMBERED_NAME, MAX_VERDICTS

Client = TestClient[web.Request, web.Application]

IDENTITY_HEADERS = ("X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups",
                    "X-Forwarded-Issuer")
# Every spelling of a caller-forged identity, with varied case and duplicates.
FORGED: list[tuple[str, str]] = [
    ("X-Forwarded-User", "admin"),
    ("x-forwarded-user", "admin"),
    ("X-FORWARDED-USER", "root-forged"),
    ("X-Forwarded-Email", "admin@forged.example"),
    ("x-Forwarded-eMail", "boss@forged.example"),
    ("X-Forwarded-Groups", "admins-forged"),
    ("X-Forwarded-Groups", "root-forged"),
    ("X-Forwarded-Issuer", "https://forged.example"),
    ("X-Auth-Request-User", "admin"),
    ("x-auth-request-email", "admin@forged.example"),
    ("X-Auth-Request-Groups", "admins-forged"),
    ("X-Remote-User", "admin"),
    ("Remote-User", "admin"),
    ("REMOTE-USER", "root-forged"),
]
FORGED_NAMES = {name.lower() for name, _ in FORGED}
IDENTITY_NAMES = {name.lower() for name in IDENTITY_HEADERS}
FORGED_VALUES = ("admin", "forged")
CREDENTIAL_WAIT = 6.0  # the file is polled every 2 s: three polls at most


# --- a recording upstream -----------------------------------------------------------------------


@dataclass
class RawUpstream:
    """Records every request's header lines exactly as received."""

    seen: list[CIMultiDict[str]] = field(default_factory=list)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def last(self) -> CIMultiDict[str]:
        assert self.seen, "nothing reached the upstream"
        return self.seen[-1]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.seen.append(CIMultiDict(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers
        ))
        return web.json_response({"ok": True})


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    recorder = RawUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    recorder.server = server
    yield recorder
    await server.close()


StartSidecar = Callable[..., Awaitable[Client]]


@pytest.fixture
def start(make_sidecar: SidecarFactory, raw_upstream: RawUpstream) -> StartSidecar:
    async def start_sidecar(**env: str) -> Client:
        client: Client = await make_sidecar(MCP_UPSTREAM_URL=raw_upstream.url, **env)
        return client

    return start_sidecar


def identity_lines(headers: CIMultiDict[str]) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in headers.items()
            if k.lower() in FORGED_NAMES or k.lower() in IDENTITY_NAMES]


# --- identity forwarding off (the default) ------------------------------------------------------


async def test_no_identity_headers_upstream_by_default_even_when_forged(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    sidecar = await start()
    token = idp.mint(claims={"email": "alice@example.com", "email_verified": True,
                             "groups": ["staff"]})
    response = await sidecar.post("/mcp", data=b"{}", headers=[*FORGED, *bearer(token).items()])
    assert response.status == 200
    seen = raw_upstream.last
    assert identity_lines(seen) == []
    for name in IDENTITY_HEADERS:
        assert name not in seen
    for value in FORGED_VALUES:
        assert not any(value in v for v in seen.values()), seen


async def test_identity_headers_absent_without_forgery_too(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    sidecar = await start(FORWARD_IDENTITY="false")
    await sidecar.get("/mcp", headers=bearer(idp.mint()))
    assert identity_lines(raw_upstream.last) == []


# --- identity forwarding on ---------------------------------------------------------------------


async def test_forwarded_identity_is_the_tokens_never_the_callers(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    sidecar = await start(FORWARD_IDENTITY="true")
    token = idp.mint(claims={"sub": "user-42", "email": "Alice@Example.COM",
                             "email_verified": True, "groups": ["mcp-users", "ops"]})
    response = await sidecar.post("/mcp", data=b"{}", headers=[*FORGED, *bearer(token).items()])
    assert response.status == 200
    seen = raw_upstream.last
    assert seen.getall("X-Forwarded-User") == ["user-42"]
    assert seen.getall("X-Forwarded-Email") == ["alice@example.com"]
    assert seen.getall("X-Forwarded-Groups") == ["mcp-users,ops"]
    assert seen.getall("X-Forwarded-Issuer") == [idp.issuer]
    for name in ("X-Auth-Request-User", "X-Auth-Request-Email", "X-Auth-Request-Groups",
                 "X-Remote-User", "Remote-User"):
        assert name not in seen
    for value in FORGED_VALUES:
        assert not any(value in v for v in seen.values()), seen


@pytest.mark.parametrize("email_verified", [False, "false", None])
async def test_unverified_email_is_not_forwarded(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream, email_verified: Any
) -> None:
    sidecar = await start(FORWARD_IDENTITY="true")
    claims: dict[str, Any] = {"email": "alice@example.com"}
    if email_verified is not None:
        claims["email_verified"] = email_verified
    response = await sidecar.get("/mcp", headers=bearer(idp.mint(claims=claims)))
    assert response.status == 200
    seen = raw_upstream.last
    assert "X-Forwarded-Email" not in seen
    assert seen.getall("X-Forwarded-User") == ["user-1"]


async def test_no_groups_header_when_the_token_has_no_groups(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    sidecar = await start(FORWARD_IDENTITY="true")
    await sidecar.get("/mcp", headers=[("X-Forwarded-Groups", "admins"),
                                       *bearer(idp.mint(claims={"groups": "admins"})).items()])
    assert "X-Forwarded-Groups" not in raw_upstream.last


@pytest.mark.parametrize(("claimed", "wanted"), [
    pytest.param(("evil\r\nX-Injected: yes", ["ok"]), ("evil%0D%0AX-Injected: yes", "ok"),
                 id="crlf_in_sub"),
    pytest.param(("evil\nX-Injected: yes", ["ok"]), ("evil%0AX-Injected: yes", "ok"),
                 id="lf_in_sub"),
    pytest.param(("José 日本", ["ok"]), ("Jos%C3%A9 %E6%97%A5%E6%9C%AC", "ok"),
                 id="non_ascii_sub"),
    pytest.param(("100%25", ["ok"]), ("100%2525", "ok"), id="percent_in_sub"),
    pytest.param(("a,b", ["ok"]), ("a%2Cb", "ok"), id="comma_in_sub"),
    pytest.param(("tab\there", ["ok"]), ("tab%09here", "ok"), id="tab_in_sub"),
    pytest.param(("user-1", ["admins,root", "ops"]), ("user-1", "admins%2Croot,ops"),
                 id="comma_in_group"),
    pytest.param(("user-1", ["g\r\nX-Injected: yes", "ops"]),
                 ("user-1", "g%0D%0AX-Injected: yes,ops"), id="crlf_in_group"),
    pytest.param(("user-1", ["Üsers", "50%"]), ("user-1", "%C3%9Csers,50%25"),
                 id="non_ascii_and_percent_in_group"),
    pytest.param(("user-1", ["nul\x00byte"]), ("user-1", "nul%00byte"), id="nul_in_group"),
])
async def test_identity_values_are_percent_encoded_on_one_line(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream,
    claimed: tuple[str, list[str]], wanted: tuple[str, str],
) -> None:
    (sub, groups), (want_user, want_groups) = claimed, wanted
    sidecar = await start(FORWARD_IDENTITY="true")
    token = idp.mint(claims={"sub": sub, "groups": groups})
    response = await sidecar.post("/mcp", data=b"{}", headers=bearer(token))
    assert response.status == 200
    seen = raw_upstream.last
    assert "X-Injected" not in seen
    assert seen.getall("X-Forwarded-User") == [want_user]
    assert seen.getall("X-Forwarded-Groups") == [want_groups]
    # Reversible: the upstream can decode exactly what the IdP said.
    assert unquote(want_user) == sub
    assert [unquote(g) for g in want_groups.split(",")] == groups
    for value in seen.values():
        assert value.isascii()
        assert not any(c in value for c in "\r\n\0")


async def test_forwarded_groups_follow_groups_claim(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    sidecar = await start(FORWARD_IDENTITY="true", GROUPS_CLAIM="realm_access.roles")
    token = idp.mint(claims={"groups": ["not-these"],
                             "realm_access": {"roles": ["offline_access", "mcp-users", 7]}})
    await sidecar.get("/mcp", headers=bearer(token))
    assert raw_upstream.last.getall("X-Forwarded-Groups") == ["offline_access,mcp-users"]


@pytest.mark.parametrize("forward_identity", ["false", "true"])
async def test_underscore_spellings_of_identity_headers_are_dropped(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream, forward_identity: str
) -> None:
    sidecar = await start(FORWARD_IDENTITY=forward_identity)
    forged = [("X_Forwarded_User", "admin"), ("X-Forwarded_Email", "admin@forged.example"),
              ("X_Auth_Request_User", "admin"), ("Remote_User", "admin")]
    response = await sidecar.get("/mcp", headers=[*forged, *bearer(idp.mint()).items()])
    assert response.status == 200
    seen = raw_upstream.last
    assert [k for k in seen if "_" in k] == []


# --- the upstream's own credential --------------------------------------------------------------


async def sent_authorization(sidecar: Client, raw_upstream: RawUpstream, token: str) -> str:
    response = await sidecar.post("/mcp", data=b"{}", headers=bearer(token))
    assert response.status == 200
    values = raw_upstream.last.getall("Authorization")
    assert len(values) == 1
    return values[0]


async def test_upstream_gets_the_file_token_never_the_callers(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream, tmp_path: Path
) -> None:
    secret = tmp_path / "upstream-token"
    secret.write_text("upstream-secret-1\n", encoding="utf-8")
    sidecar = await start(MCP_UPSTREAM_BEARER_FILE=str(secret))
    token = idp.mint()
    assert await sent_authorization(sidecar, raw_upstream, token) == "Bearer upstream-secret-1"
    assert not any(token in v for v in raw_upstream.last.values())


async def test_rotated_file_token_is_picked_up(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream, tmp_path: Path
) -> None:
    secret = tmp_path / "upstream-token"
    secret.write_text("upstream-secret-1", encoding="utf-8")
    sidecar = await start(MCP_UPSTREAM_BEARER_FILE=str(secret))
    token = idp.mint()
    assert await sent_authorization(sidecar, raw_upstream, token) == "Bearer upstream-secret-1"
    secret.write_text("rotated-secret-number-2\n", encoding="utf-8")  # another size and mtime
    deadline = time.monotonic() + CREDENTIAL_WAIT
    while (sent := await sent_authorization(sidecar, raw_upstream, token)) != (
        "Bearer rotated-secret-number-2"
    ):
        assert sent == "Bearer upstream-secret-1"  # never a torn or empty value
        assert time.monotonic() < deadline, "the rotated token was not picked up in time"
        await asyncio.sleep(0.1)


async def test_file_emptied_later_keeps_the_last_good_token(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream, tmp_path: Path
) -> None:
    secret = tmp_path / "upstream-token"
    secret.write_text("upstream-secret-1", encoding="utf-8")
    sidecar = await start(MCP_UPSTREAM_BEARER_FILE=str(secret))
    token = idp.mint()
    with capture_logs() as events:
        secret.write_text("", encoding="utf-8")
        deadline = time.monotonic() + CREDENTIAL_WAIT
        while not any(e["event"] == "upstream_credential_unreadable" for e in events):
            assert time.monotonic() < deadline, "the watcher never looked at the emptied file"
            await asyncio.sleep(0.05)
    assert await sent_authorization(sidecar, raw_upstream, token) == "Bearer upstream-secret-1"
    assert not any(token in str(e) for e in events)


async def test_file_removed_later_keeps_the_last_good_token(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream, tmp_path: Path
) -> None:
    secret = tmp_path / "upstream-token"
    secret.write_text("upstream-secret-1", encoding="utf-8")
    sidecar = await start(MCP_UPSTREAM_BEARER_FILE=str(secret))
    with capture_logs() as events:
        secret.unlink()
        deadline = time.monotonic() + CREDENTIAL_WAIT
        while not any(e["event"] == "upstream_credential_unreadable" for e in events):
            assert time.monotonic() < deadline, "the watcher never noticed the missing file"
            await asyncio.sleep(0.05)
    sent = await sent_authorization(sidecar, raw_upstream, idp.mint())
    assert sent == "Bearer upstream-secret-1"


def _bearer_file_problems(
    idp: FakeIdp, upstream: FakeUpstream, path: Path
) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(sidecar_env(idp, upstream, MCP_UPSTREAM_BEARER_FILE=str(path)))
    return caught.value.problems


@pytest.mark.parametrize("content", ["", "   \n\t\n"], ids=["empty", "whitespace_only"])
def test_empty_bearer_file_refuses_to_start(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path, content: str
) -> None:
    secret = tmp_path / "upstream-token"
    secret.write_text(content, encoding="utf-8")
    assert any("MCP_UPSTREAM_BEARER_FILE" in p and "is empty" in p
               for p in _bearer_file_problems(idp, upstream, secret))


def test_missing_bearer_file_refuses_to_start(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    problems = _bearer_file_problems(idp, upstream, tmp_path / "absent")
    assert any(p.startswith("MCP_UPSTREAM_BEARER_FILE cannot be read") for p in problems)


def test_a_bearer_file_larger_than_any_token_refuses_to_start(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    secret = tmp_path / "upstream-token"
    secret.write_bytes(b"x" * 70_000)  # a mistyped path naming a log file, say
    problems = _bearer_file_problems(idp, upstream, secret)
    assert "MCP_UPSTREAM_BEARER_FILE cannot be read: larger than 65536 bytes" in problems


def test_multi_line_bearer_file_refuses_to_start(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    secret = tmp_path / "upstream-token"
    secret.write_text("first-token\nsecond-token\n", encoding="utf-8")
    assert any("MCP_UPSTREAM_BEARER_FILE" in p
               for p in _bearer_file_problems(idp, upstream, secret))


# --- the client's address -----------------------------------------------------------------------


async def test_callers_forwarded_for_is_replaced_by_the_peer(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    sidecar = await start()
    await sidecar.get("/mcp", headers={**bearer(idp.mint()),
                                       "X-Forwarded-For": "6.6.6.6, 10.0.0.1",
                                       "X-Forwarded-Proto": "http",
                                       "X-Forwarded-Host": "evil.example",
                                       "X-Real-IP": "6.6.6.6", "Forwarded": "for=6.6.6.6"})
    seen = raw_upstream.last
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["https"]
    assert seen.getall("X-Forwarded-Host") == ["mcp.example.test"]
    assert "X-Real-IP" not in seen
    assert "Forwarded" not in seen


async def test_trusted_proxy_chain_is_kept_and_extended(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    sidecar = await start(TRUSTED_PROXIES="127.0.0.1")
    await sidecar.get("/mcp", headers={**bearer(idp.mint()),
                                       "X-Forwarded-For": "203.0.113.7, 10.0.0.2"})
    assert raw_upstream.last.getall("X-Forwarded-For") == ["203.0.113.7, 10.0.0.2, 127.0.0.1"]
    await sidecar.get("/mcp", headers=bearer(idp.mint()))
    assert raw_upstream.last.getall("X-Forwarded-For") == ["127.0.0.1"]


async def test_trusted_proxy_chain_spanning_several_header_lines_is_kept(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    sidecar = await start(TRUSTED_PROXIES="127.0.0.1")
    await sidecar.get("/mcp", headers=[*bearer(idp.mint()).items(),
                                       ("X-Forwarded-For", "6.6.6.6"),
                                       ("X-Forwarded-For", "203.0.113.7")])
    # RFC 9110 §5.3: repeated lines are one list; the proxy's own line must not be lost.
    assert raw_upstream.last.getall("X-Forwarded-For") == ["6.6.6.6, 203.0.113.7, 127.0.0.1"]


@pytest.mark.parametrize(("lines", "chain"), [
    pytest.param([], None, id="absent"),
    pytest.param(["1.2.3.4"], "1.2.3.4", id="one_line"),
    pytest.param(["6.6.6.6", "1.2.3.4, 10.0.0.1"], "6.6.6.6, 1.2.3.4, 10.0.0.1",
                 id="lines_joined_in_order"),
])
def test_forwarded_chain_reads_every_line(lines: list[str], chain: str | None) -> None:
    headers = CIMultiDictProxy(CIMultiDict(("x-forwarded-for", line) for line in lines))
    assert forwarded_chain(headers) == chain


TRUSTED = ClientAddress((
    ipaddress.ip_network("127.0.0.1"),
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("2001:db8::/32"),
))


@pytest.mark.parametrize(("peer", "forwarded_for", "client"), [
    pytest.param(None, None, "", id="no_peer"),
    pytest.param("198.51.100.1", "1.2.3.4", "198.51.100.1", id="untrusted_peer_chain_ignored"),
    pytest.param("127.0.0.1", None, "127.0.0.1", id="trusted_peer_without_chain"),
    pytest.param("127.0.0.1", "", "127.0.0.1", id="trusted_peer_empty_chain"),
    pytest.param("127.0.0.1", "1.2.3.4", "1.2.3.4", id="one_hop"),
    pytest.param("127.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.5", "1.2.3.4",
                 id="rightmost_untrusted_hop"),
    pytest.param("127.0.0.1", "6.6.6.6,1.2.3.4,10.0.0.5,10.1.2.3", "1.2.3.4",
                 id="several_trusted_hops_skipped"),
    pytest.param("127.0.0.1", "10.1.1.1, 10.2.2.2", "10.1.1.1", id="all_trusted_leftmost"),
    pytest.param("127.0.0.1", "garbage, 1.2.3.4", "1.2.3.4", id="garbage_left_ignored"),
    # A hop that is no address is never a key: the nearest trusted proxy, which passed it on, is.
    pytest.param("127.0.0.1", "1.2.3.4, not-an-ip, 10.0.0.1", "10.0.0.1",
                 id="unparseable_hop_ends_the_walk_at_the_proxy_that_passed_it"),
    pytest.param("127.0.0.1", "1.2.3.4, not-an-ip", "127.0.0.1",
                 id="unparseable_first_hop_gives_the_peer"),
    pytest.param("127.0.0.1", "x" * 30_000, "127.0.0.1", id="huge_hop_gives_the_peer"),
    pytest.param("127.0.0.1", "fe80::1%" + "x" * 100, "127.0.0.1", id="huge_zone_gives_the_peer"),
    pytest.param("127.0.0.1", "[fe80::1%eth0]:80", "127.0.0.1", id="zone_in_brackets"),
    pytest.param("127.0.0.1", "unknown", "127.0.0.1", id="rfc7239_unknown"),
    # Azure Application Gateway appends ip:port; the address is the key, never the text.
    pytest.param("127.0.0.1", "1.2.3.4:5678", "1.2.3.4", id="v4_hop_with_port"),
    pytest.param("127.0.0.1", "[2001:db8:0:0::1]:443", "2001:db8::1", id="v6_hop_with_port"),
    pytest.param("127.0.0.1", "1.2.3.4, 10.0.0.1:443", "1.2.3.4",
                 id="trusted_hop_with_port_is_skipped"),
    pytest.param("127.0.0.1", "2001:DB8:0000::0001", "2001:db8::1", id="v6_hop_canonical"),
    pytest.param("127.0.0.1", "::ffff:1.2.3.4", "1.2.3.4", id="v4_mapped_hop_keyed_as_v4"),
    pytest.param("127.0.0.1", "fe80::1%eth0", "fe80::1", id="zone_dropped"),
    pytest.param("127.0.0.1", " , ,1.2.3.4 , ,", "1.2.3.4", id="blank_entries_skipped"),
    pytest.param("127.0.0.1", " , , ", "127.0.0.1", id="only_blank_entries"),
    pytest.param("10.200.3.4", "1.2.3.4", "1.2.3.4", id="peer_trusted_by_cidr"),
    pytest.param("11.0.0.1", "1.2.3.4", "11.0.0.1", id="peer_outside_cidr"),
    pytest.param("2001:db8::1", "2001:db9::5", "2001:db9::5", id="ipv6_hop"),
    pytest.param("2001:db8::1", "2001:db8::7, 2001:db8:ffff::8", "2001:db8::7",
                 id="ipv6_all_trusted_leftmost"),
    pytest.param("2001:db8::1", "1.2.3.4, 2001:db8::9", "1.2.3.4", id="mixed_families"),
    pytest.param("2001:db9::1", "1.2.3.4", "2001:db9::1", id="ipv6_peer_untrusted"),
    pytest.param("::ffff:127.0.0.1", "1.2.3.4", "127.0.0.1",
                 id="v4_mapped_peer_not_trusted_by_v4_entry_keyed_as_v4"),
])
def test_client_address_is_the_rightmost_untrusted_hop(
    peer: str | None, forwarded_for: str | None, client: str
) -> None:
    assert TRUSTED.client(peer, forwarded_for) == client


async def test_spellings_of_one_address_share_one_failure_budget(
    make_sidecar: SidecarFactory,
) -> None:
    """The per-IP key is the address in canonical form: a client behind a trusted proxy cannot
    get a fresh budget by spelling its address another way (zeros, case, a port)."""
    sidecar: Client = await make_sidecar(TRUSTED_PROXIES="127.0.0.1",
                                         RATE_LIMIT_UNAUTHENTICATED_RPM="3")
    spellings = ["2001:db8::1", "2001:DB8:0:0::1", "[2001:0db8::0001]:443",
                 "2001:0db8:0000:0000:0000:0000:0000:0001"]
    statuses = []
    for spelling in spellings:
        answer = await sidecar.get("/mcp", headers={**bearer("not.a.token"),
                                                    "X-Forwarded-For": spelling})
        statuses.append(answer.status)
    assert statuses == [401, 401, 401, 429]


def test_nothing_trusted_means_the_peer_is_the_client() -> None:
    addresses = ClientAddress(())
    assert addresses.client("127.0.0.1", "1.2.3.4") == "127.0.0.1"
    assert addresses.forwarded_for("127.0.0.1", "1.2.3.4") == "127.0.0.1"


@pytest.mark.parametrize(("peer", "forwarded_for", "sent"), [
    pytest.param("127.0.0.1", "1.2.3.4", "1.2.3.4, 127.0.0.1", id="trusted_chain_extended"),
    pytest.param("198.51.100.1", "1.2.3.4", "198.51.100.1", id="untrusted_chain_replaced"),
    pytest.param("127.0.0.1", None, "127.0.0.1", id="no_chain"),
    pytest.param(None, "1.2.3.4", "", id="no_peer"),
])
def test_forwarded_for_sent_upstream(peer: str | None, forwarded_for: str | None,
                                     sent: str) -> None:
    assert TRUSTED.forwarded_for(peer, forwarded_for) == sent


# --- header hygiene: what a WSGI upstream reads ---------------------------------------------------


class QuietWsgiHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No request lines on stderr."""


@dataclass
class WsgiSessionServer:
    """A small MCP-style session server as a WSGI application. It issues `sess-N` to a request
    without a session (owned by its X-Forwarded-User) and serves the sessions it knows. It reads
    the session from HTTP_MCP_SESSION_ID, which WSGI servers build from `Mcp-Session-Id` and
    `Mcp_Session_Id` alike (PEP 3333 follows CGI: `-` becomes `_`)."""

    environs: list[dict[str, str]] = field(default_factory=list)
    """The HTTP_* entries of every request that arrived."""
    owners: dict[str, str] = field(default_factory=dict)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., object]
    ) -> list[bytes]:
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        self.environs.append({k: v for k, v in environ.items() if k.startswith("HTTP_")})
        user = environ.get("HTTP_X_FORWARDED_USER", "")
        session = environ.get("HTTP_MCP_SESSION_ID")
        headers = [("Content-Type", "application/json")]
        if session is None:
            session = f"sess-{len(self.owners) + 1}"
            self.owners[session] = user
            headers.append(("Mcp-Session-Id", session))
        elif session not in self.owners:
            start_response("404 Not Found", headers)
            return [b'{"error": "unknown session"}']
        start_response("200 OK", headers)
        answer = {"session": session, "owner": self.owners[session], "user": user}
        return [json.dumps(answer).encode()]


@pytest.fixture
async def wsgi_upstream() -> AsyncIterator[WsgiSessionServer]:
    """The standard library's WSGI reference server on loopback, serving in a thread."""
    application = WsgiSessionServer()
    server = make_server("127.0.0.1", 0, application, handler_class=QuietWsgiHandler)
    application.port = server.server_port
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield application
    async with asyncio.timeout(5):
        await asyncio.to_thread(server.shutdown)
    server.server_close()
    thread.join(timeout=5)


@pytest.mark.parametrize("spelling", ["Mcp_Session_Id", "MCP_SESSION_ID", "mcp_session-id",
                                      "Mcp-Session_Id"])
async def test_session_id_spelled_with_underscores_never_reaches_a_wsgi_upstream(
    make_sidecar: SidecarFactory, idp: FakeIdp, wsgi_upstream: WsgiSessionServer, spelling: str
) -> None:
    """Bob presents Alice's session id under a name the sidecar's binding did not check, but a
    WSGI server reads as Mcp-Session-Id: a visible 400, and nothing of Bob's reaches the upstream
    (before, Bob was served in Alice's session)."""
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=wsgi_upstream.url, FORWARD_IDENTITY="true")
    alice, bob = (bearer(idp.mint(claims={"sub": sub})) for sub in ("alice", "bob"))
    created = await sidecar.post("/mcp", data=b"{}", headers=alice)
    assert created.status == 200
    session = created.headers["Mcp-Session-Id"]
    reached = len(wsgi_upstream.environs)

    with capture_logs() as events:
        hijack = await sidecar.post("/mcp", data=b"{}", headers={**bob, spelling: session})
    assert hijack.status == 400, await hijack.text()
    assert (await hijack.json())["error"] == "invalid_request"
    assert len(wsgi_upstream.environs) == reached
    [line] = [e for e in events if e["event"] == "request"]
    assert (line["sub"], line["auth_error"]) == ("bob", "session_id_look_alike")
    # Alice's session still works for Alice.
    again = await sidecar.post("/mcp", data=b"{}", headers={**alice, "Mcp-Session-Id": session})
    assert (await again.json()) == {"session": session, "owner": "alice", "user": "alice"}


@pytest.mark.parametrize("spelling", ["Mcp_Session_Id", "Mcp.Session.Id", "mcp~session~id",
                                      "Mcp-Session_Id"])
async def test_session_id_look_alike_beside_the_real_header_is_refused(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream, spelling: str
) -> None:
    """Beside a session the caller owns, too: some servers merge the two lines into one value,
    others take the last. Other separators count as well (CGI servers such as Apache httpd 2.2
    turned every character that is not a letter or digit into `_`)."""
    sidecar = await start()
    token = bearer(idp.mint())
    created = await sidecar.post("/mcp", data=b"{}", headers=token)
    assert created.status == 200
    reached = len(raw_upstream.seen)
    refused = await sidecar.post("/mcp", data=b"{}", headers=[
        *token.items(), ("Mcp-Session-Id", "own-session"), (spelling, "someone-elses")])
    assert refused.status == 400
    assert len(raw_upstream.seen) == reached


# (header as the caller sends it, its value, a look-alike name, the look-alike's value)
LOOK_ALIKES = [
    ("MCP-Protocol-Version", "2025-11-25", "MCP_PROTOCOL_VERSION", "2024-11-05"),
    ("Last-Event-ID", "stream-1:42", "Last_Event_ID", "stream-9:0"),
    ("Mcp-Method", "tools/call", "Mcp_Method", "tools/list"),
    ("Mcp-Name", "get_weather", "MCP_NAME", "delete_everything"),
    ("X-Request-Id", "req-1", "X_Request_Id", "forged"),
    ("User-Agent", "mcp-client/1.0", "User_Agent", "forged-agent/6.6"),
]


@pytest.mark.parametrize("row", LOOK_ALIKES, ids=[row[2] for row in LOOK_ALIKES])
async def test_look_alike_never_merges_into_a_real_header_on_a_wsgi_upstream(
    make_sidecar: SidecarFactory, idp: FakeIdp, wsgi_upstream: WsgiSessionServer,
    row: tuple[str, str, str, str],
) -> None:
    name, value, look_alike, other = row
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=wsgi_upstream.url)
    response = await sidecar.post("/mcp", data=b"{}", headers=[
        *bearer(idp.mint()).items(), (name, value), (look_alike, other)])
    assert response.status == 200
    environ = wsgi_upstream.environs[-1]
    assert environ["HTTP_" + name.upper().replace("-", "_")] == value
    assert not any(other in seen for seen in environ.values()), environ


OVERRIDES = ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override", "X-Original-URL",
             "X-Rewrite-URL", "X-Original-Method", "X-Host", "X-HTTP-Host-Override",
             "X-Original-Host"]


async def test_method_and_url_override_headers_never_reach_the_upstream(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    """Rails, Express (method-override) and IIS/Symfony (X-Original-URL, X-Rewrite-URL) let these
    change the method or path the upstream acts on after the sidecar authenticated another one;
    others take the host they build URLs from from X-Host and its kin."""
    sidecar = await start()
    sent = [*bearer(idp.mint()).items()]
    for name in OVERRIDES:
        sent += [(name, "DELETE"), (name.upper().replace("-", "_"), "/admin")]
    response = await sidecar.post("/mcp", data=b"{}", headers=sent)
    assert response.status == 200
    seen = raw_upstream.last
    overrides = {name.lower() for name in OVERRIDES}
    assert [name for name in seen if name.lower().replace("_", "-") in overrides] == []
    assert not any(v in ("DELETE", "/admin") for v in seen.values()), seen


IDENTITY_LOOK_ALIKES = [
    ("Remote-User", "admin"), ("X-Remote-User", "admin"), ("X-User", "admin"),
    ("X-User-Id", "admin"), ("X-User-Email", "admin@forged.example"), ("X-WEBAUTH-USER", "admin"),
    ("X-Authenticated-User", "admin"), ("X-Authenticated-Users", "admin"),
    ("X-Auth-Request-Preferred-Username", "admin"),
    ("True-Client-IP", "6.6.6.6"), ("CF-Connecting-IP", "6.6.6.6"), ("X-Real-IP", "6.6.6.6"),
    ("X-Client-IP", "6.6.6.6"), ("x-user", "root-forged"), ("X_WEBAUTH_USER", "admin"),
    ("True_Client_IP", "6.6.6.6"),
]


@pytest.mark.parametrize("forward_identity", ["false", "true"])
async def test_identity_and_client_address_look_alikes_never_reach_the_upstream(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream, forward_identity: str
) -> None:
    sidecar = await start(FORWARD_IDENTITY=forward_identity)
    response = await sidecar.post("/mcp", data=b"{}",
                                  headers=[*IDENTITY_LOOK_ALIKES, *bearer(idp.mint()).items()])
    assert response.status == 200
    seen = raw_upstream.last
    sent = {name.lower() for name, _ in IDENTITY_LOOK_ALIKES}
    assert [name for name in seen if name.lower() in sent] == []
    assert not any(v in ("admin", "root-forged", "6.6.6.6", "admin@forged.example")
                   for v in seen.values()), seen
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]  # the true client address


async def test_header_names_with_separators_other_than_dash_are_dropped(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    """As nginx does by default (underscores_in_headers off, ignore_invalid_headers on): a name
    with `_`, `.` or any other separator is what WSGI, CGI and PHP servers confuse with another
    header. Mcp-Param-* names may carry them (the MCP transport allows any token character)."""
    sidecar = await start()
    odd = [("X_Custom", "1"), ("X.Custom", "2"), ("_", "3"), ("__", "4"), ("X-Custom_", "5"),
           ("x~tenant", "6"), ("Content_Length", "7"), ("Transfer_Encoding", "chunked"),
           ("Mcp_Param_Region", "8"), ("Mcp-Param_Region", "9"),
           *((f"X_Pad_{i}", "10") for i in range(100))]
    response = await sidecar.post("/mcp", data=b"{}", headers=[
        *odd, ("X-Custom", "kept"), ("Mcp-Param-region_code", "eu-west"),
        ("Mcp-Param-a.b", "dotted"), *bearer(idp.mint()).items()])
    assert response.status == 200
    seen = raw_upstream.last
    assert seen.getall("X-Custom") == ["kept"]
    assert seen.getall("Mcp-Param-region_code") == ["eu-west"]
    assert seen.getall("Mcp-Param-a.b") == ["dotted"]
    odd_names = {name.lower() for name, _ in odd}
    assert [name for name in seen if name.lower() in odd_names] == []


async def test_strip_request_headers_drops_names_and_prefixes_in_any_spelling(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    sidecar = await start(STRIP_REQUEST_HEADERS="X-Tenant, x_internal_*,Mcp-Param-Secret")
    response = await sidecar.post("/mcp", data=b"{}", headers=[
        ("X-Tenant", "t1"), ("x-tenant", "t2"), ("X-INTERNAL-Secret", "s1"),
        ("x-internal-", "s2"), ("Mcp-Param-Secret", "s3"), ("MCP-PARAM-SECRET", "s4"),
        ("X-Tenant-Id", "kept-1"), ("X-Internals", "kept-2"), ("Mcp-Param-Secrets", "kept-3"),
        *bearer(idp.mint()).items()])
    assert response.status == 200
    seen = raw_upstream.last
    assert not any(value in ("t1", "t2", "s1", "s2", "s3", "s4") for value in seen.values()), seen
    assert seen.getall("X-Tenant-Id") == ["kept-1"]
    assert seen.getall("X-Internals") == ["kept-2"]
    assert seen.getall("Mcp-Param-Secrets") == ["kept-3"]


async def test_header_verdicts_stay_bounded_whatever_names_callers_invent(
    start: StartSidecar, idp: FakeIdp, raw_upstream: RawUpstream
) -> None:
    """The filter remembers its decision per header name: invented names cannot grow that."""
    sidecar = await start()
    token = bearer(idp.mint())
    for batch in range(12):  # 1200 distinct names, more than are remembered
        invented = [(f"X-Invented-{batch}-{i}", "v") for i in range(100)]
        response = await sidecar.get("/mcp", headers=[
            *token.items(), *invented, ("X-" + "L" * 100 + str(batch), "long"),
            ("X_Invented_Late", "dropped")])
        assert response.status == 200
    seen = raw_upstream.last
    assert seen["X-Invented-11-99"] == "v"  # decided right after the table is full
    assert seen["X-" + "L" * 100 + "11"] == "long"
    assert "X_Invented_Late" not in seen
    verdicts = sidecar.app[PROXY].headers._verdicts
    assert len(verdicts) <= MAX_VERDICTS
    assert max(map(len, verdicts)) <= MAX_REMEMBERED_NAME
