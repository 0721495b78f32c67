"""What the upstream learns about the caller: identity headers, its own credential, the client's
address. Always through the production app, against an upstream that records the exact header
lines it received (duplicates kept), so a forged or injected header cannot hide.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import FakeIdp, FakeUpstream, SidecarFactory, bearer, sidecar_env
from multidict import CIMultiDict, CIMultiDictProxy
from structlog.testing import capture_logs

from oauth_sidecar.client_ip import ClientAddress, forwarded_chain
from oauth_sidecar.config import ConfigError, load

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
    pytest.param("127.0.0.1", "1.2.3.4, not-an-ip, 10.0.0.1", "not-an-ip",
                 id="unparseable_hop_is_never_trusted"),
    pytest.param("127.0.0.1", "1.2.3.4, 10.0.0.1:443", "10.0.0.1:443",
                 id="hop_with_port_is_not_trusted"),
    pytest.param("127.0.0.1", " , ,1.2.3.4 , ,", "1.2.3.4", id="blank_entries_skipped"),
    pytest.param("127.0.0.1", " , , ", "127.0.0.1", id="only_blank_entries"),
    pytest.param("10.200.3.4", "1.2.3.4", "1.2.3.4", id="peer_trusted_by_cidr"),
    pytest.param("11.0.0.1", "1.2.3.4", "11.0.0.1", id="peer_outside_cidr"),
    pytest.param("2001:db8::1", "2001:db9::5", "2001:db9::5", id="ipv6_hop"),
    pytest.param("2001:db8::1", "2001:db8::7, 2001:db8:ffff::8", "2001:db8::7",
                 id="ipv6_all_trusted_leftmost"),
    pytest.param("2001:db8::1", "1.2.3.4, 2001:db8::9", "1.2.3.4", id="mixed_families"),
    pytest.param("2001:db9::1", "1.2.3.4", "2001:db9::1", id="ipv6_peer_untrusted"),
    pytest.param("::ffff:127.0.0.1", "1.2.3.4", "::ffff:127.0.0.1",
                 id="v4_mapped_peer_not_trusted_by_v4_entry"),
])
def test_client_address_is_the_rightmost_untrusted_hop(
    peer: str | None, forwarded_for: str | None, client: str
) -> None:
    assert TRUSTED.client(peer, forwarded_for) == client


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
