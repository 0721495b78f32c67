"""Mcp-Session-Id binding: a session belongs to the identity that created it.

Unit tests pin SessionBindings (LRU bound, idle expiry on an injected clock); the rest runs the
production app in front of upstreams that script exactly which session ids they issue, accept,
echo and end, with FORWARD_IDENTITY on so the upstream can tell which user reached it.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import FakeIdp, FakeUpstream, SidecarFactory, bearer, sidecar_env, wait_until
from multidict import CIMultiDict, CIMultiDictProxy
from structlog.testing import capture_logs

from oauth_sidecar.app import SESSIONS
from oauth_sidecar.auth import sessions
from oauth_sidecar.auth.gate import Gate
from oauth_sidecar.auth.idp import IdentityProvider
from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.auth.ratelimit import RateLimiter
from oauth_sidecar.auth.sessions import SessionBindings, SessionRefused
from oauth_sidecar.auth.tokens import TokenVerifier
from oauth_sidecar.config import load
from oauth_sidecar.request_keys import SESSION, PresentedSession

Client = TestClient[web.Request, web.Application]

ALICE = ("https://idp.example.test", "alice")
BOB = ("https://idp.example.test", "bob")
ALICE_AT_OTHER_ISSUER = ("https://other-idp.example.test", "alice")


# --- SessionBindings ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Replace the sessions module's clock only (never the event loop's)."""
    fake = Clock()
    monkeypatch.setattr(sessions, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


def test_unknown_session_has_no_owner() -> None:
    bindings = SessionBindings(ttl=60)
    assert bindings.owner("nope") is None
    assert len(bindings) == 0


def test_bound_session_has_its_owner() -> None:
    bindings = SessionBindings(ttl=60)
    bindings.bind("s1", ALICE)
    bindings.bind("s2", BOB)
    assert bindings.owner("s1") == ALICE
    assert bindings.owner("s2") == BOB
    assert len(bindings) == 2


def test_owner_is_issuer_and_subject() -> None:
    bindings = SessionBindings(ttl=60)
    bindings.bind("s1", ALICE)
    assert bindings.owner("s1") != ALICE_AT_OTHER_ISSUER


def test_forget_removes_the_binding_and_ignores_unknown_ids() -> None:
    bindings = SessionBindings(ttl=60)
    bindings.bind("s1", ALICE)
    bindings.forget("s1")
    bindings.forget("s1")
    bindings.forget("never-bound")
    assert bindings.owner("s1") is None
    assert len(bindings) == 0


def test_rebinding_replaces_the_owner() -> None:
    bindings = SessionBindings(ttl=60)
    bindings.bind("s1", ALICE)
    bindings.bind("s1", BOB)
    assert bindings.owner("s1") == BOB
    assert len(bindings) == 1


def test_least_recently_used_binding_is_evicted_beyond_the_bound() -> None:
    bindings = SessionBindings(ttl=60, max_sessions=3)
    for i in range(3):
        bindings.bind(f"s{i}", ALICE)
    assert bindings.owner("s0") == ALICE  # s0 is now the most recently used
    bindings.bind("s3", BOB)
    assert len(bindings) == 3
    assert bindings.owner("s1") is None  # the least recently used went first
    assert [bindings.owner(s) for s in ("s0", "s2", "s3")] == [ALICE, ALICE, BOB]


def test_many_bindings_stay_within_the_bound() -> None:
    bindings = SessionBindings(ttl=60, max_sessions=10)
    for i in range(1000):
        bindings.bind(f"s{i}", BOB)
    assert len(bindings) == 10
    assert bindings.owner("s989") is None
    assert bindings.owner("s999") == BOB


def test_idle_binding_expires_after_ttl(clock: Clock) -> None:
    bindings = SessionBindings(ttl=10)
    bindings.bind("s1", ALICE)
    clock.now += 10
    assert bindings.owner("s1") == ALICE  # exactly ttl idle is still bound
    clock.now += 10.001
    assert bindings.owner("s1") is None
    assert len(bindings) == 0  # and the expired entry is gone


def test_use_refreshes_the_idle_timer(clock: Clock) -> None:
    bindings = SessionBindings(ttl=10)
    bindings.bind("s1", ALICE)
    for _ in range(5):
        clock.now += 8
        assert bindings.owner("s1") == ALICE
    clock.now += 11
    assert bindings.owner("s1") is None


def test_rebinding_refreshes_the_idle_timer(clock: Clock) -> None:
    bindings = SessionBindings(ttl=10)
    bindings.bind("s1", ALICE)
    clock.now += 8
    bindings.bind("s1", ALICE)
    clock.now += 8
    assert bindings.owner("s1") == ALICE


# --- through the production app: the shared FakeUpstream (always answers session-1) -------------


def token_for(idp: FakeIdp, sub: str) -> dict[str, str]:
    return bearer(idp.mint(claims={"sub": sub}))


async def test_session_is_refused_to_another_user(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar: Client = await make_sidecar()
    alice, bob = token_for(idp, "alice"), token_for(idp, "bob")

    created = await sidecar.post("/mcp", data=b"{}", headers=alice)
    assert created.status == 200
    assert created.headers["Mcp-Session-Id"] == "session-1"
    reached = len(upstream.requests)

    with capture_logs() as events:
        hijack = await sidecar.post("/mcp", data=b"{}",
                                    headers={**bob, "Mcp-Session-Id": "session-1"})
    assert hijack.status == 404
    assert hijack.content_type == "application/json"
    assert (await hijack.json())["error"] == "session_not_found"
    assert "Mcp-Session-Id" not in hijack.headers
    assert len(upstream.requests) == reached  # nothing of Bob's reached the upstream
    [line] = [e for e in events if e["event"] == "request"]
    assert line["sub"] == "bob"
    assert line["auth_error"] == "session_owned_by_another_identity"

    again = await sidecar.post("/mcp", data=b"{}",
                               headers={**alice, "Mcp-Session-Id": "session-1"})
    assert again.status == 200
    assert len(upstream.requests) == reached + 1
    assert sidecar.app[SESSIONS].owner("session-1") == (idp.issuer, "alice")


async def test_two_session_headers_are_refused_so_no_one_hides_behind_the_first(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar: Client = await make_sidecar()
    alice, bob = token_for(idp, "alice"), token_for(idp, "bob")
    assert (await sidecar.post("/mcp", data=b"{}", headers=alice)).status == 200
    reached = len(upstream.requests)
    headers = CIMultiDict(bob)
    headers.add("Mcp-Session-Id", "bob-session")
    headers.add("Mcp-Session-Id", "session-1")
    refused = await sidecar.post("/mcp", data=b"{}", headers=headers)
    assert refused.status == 400
    assert (await refused.json())["error"] == "invalid_request"
    assert len(upstream.requests) == reached


async def test_refusal_covers_every_method(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar: Client = await make_sidecar()
    await sidecar.post("/mcp", data=b"{}", headers=token_for(idp, "alice"))
    reached = len(upstream.requests)
    bob = {**token_for(idp, "bob"), "Mcp-Session-Id": "session-1"}
    for method in ("GET", "POST", "DELETE"):
        response = await sidecar.request(method, "/mcp", headers=bob)
        assert response.status == 404, method
    assert len(upstream.requests) == reached
    assert sidecar.app[SESSIONS].owner("session-1") == (idp.issuer, "alice")


# --- a scripted MCP upstream --------------------------------------------------------------------


@dataclass
class SessionUpstream:
    """Issues sess-N on a request without a session, accepts the ids it knows, answers 404 to
    others, ends sessions on DELETE. `echo` adds Mcp-Session-Id to every answer about a known
    session, as the official MCP Python SDK does (its DELETE answer included)."""

    echo: bool = False
    fail_status: int | None = None
    """When set, every request is answered with this status (and an Mcp-Session-Id)."""
    known: set[str] = field(default_factory=set)
    seen: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    """(method, Mcp-Session-Id, X-Forwarded-User) of each request that arrived."""
    server: TestServer | None = None
    issued: int = 0

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def users(self) -> list[str | None]:
        return [user for _, _, user in self.seen]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        session_id = request.headers.get("Mcp-Session-Id")
        self.seen.append((request.method, session_id, request.headers.get("X-Forwarded-User")))
        if self.fail_status is not None:
            return web.json_response({"error": "refused"}, status=self.fail_status,
                                     headers={"Mcp-Session-Id": session_id or "fresh"})
        if session_id is None:
            self.issued += 1
            issued = f"sess-{self.issued}"
            self.known.add(issued)
            return web.json_response({"ok": True}, headers={"Mcp-Session-Id": issued})
        if session_id not in self.known:
            return web.json_response({"error": "unknown session"}, status=404)
        headers = {"Mcp-Session-Id": session_id} if self.echo else {}
        if request.method == "DELETE":
            self.known.discard(session_id)
            return web.Response(status=200, headers=headers)
        return web.json_response({"ok": True}, headers=headers)


StartSessionSidecar = Callable[..., Awaitable[tuple[Client, SessionUpstream]]]


@pytest.fixture
async def start_sessions(make_sidecar: SidecarFactory) -> AsyncIterator[StartSessionSidecar]:
    servers: list[TestServer] = []

    async def start(*, echo: bool = False) -> tuple[Client, SessionUpstream]:
        scripted = SessionUpstream(echo=echo)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", scripted.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        scripted.server = server
        client: Client = await make_sidecar(MCP_UPSTREAM_URL=scripted.url, FORWARD_IDENTITY="true")
        return client, scripted

    yield start
    for server in servers:
        await server.close()


@pytest.mark.parametrize("echo", [False, True], ids=["plain", "echoing"])
async def test_issued_session_belongs_to_its_creator(
    start_sessions: StartSessionSidecar, idp: FakeIdp, echo: bool
) -> None:
    sidecar, scripted = await start_sessions(echo=echo)
    alice, bob = token_for(idp, "alice"), token_for(idp, "bob")
    created = await sidecar.post("/mcp", data=b"{}", headers=alice)
    assert created.headers["Mcp-Session-Id"] == "sess-1"
    for _ in range(3):
        used = await sidecar.post("/mcp", data=b"{}", headers={**alice, "Mcp-Session-Id": "sess-1"})
        assert used.status == 200
    hijack = await sidecar.get("/mcp", headers={**bob, "Mcp-Session-Id": "sess-1"})
    assert hijack.status == 404
    assert scripted.users() == ["alice"] * 4
    # Bob gets his own session, and Alice cannot use it either.
    own = await sidecar.post("/mcp", data=b"{}", headers=bob)
    assert own.headers["Mcp-Session-Id"] == "sess-2"
    refused = await sidecar.post("/mcp", data=b"{}", headers={**alice, "Mcp-Session-Id": "sess-2"})
    assert refused.status == 404
    assert scripted.users() == ["alice"] * 4 + ["bob"]


async def test_delete_forgets_the_binding(
    start_sessions: StartSessionSidecar, idp: FakeIdp
) -> None:
    sidecar, scripted = await start_sessions()
    alice, bob = token_for(idp, "alice"), token_for(idp, "bob")
    await sidecar.post("/mcp", data=b"{}", headers=alice)
    bindings = sidecar.app[SESSIONS]
    assert bindings.owner("sess-1") == (idp.issuer, "alice")

    ended = await sidecar.delete("/mcp", headers={**alice, "Mcp-Session-Id": "sess-1"})
    assert ended.status == 200
    assert bindings.owner("sess-1") is None
    assert len(bindings) == 0

    # The sidecar no longer stands in the way; the upstream answers for its ended session.
    late = await sidecar.post("/mcp", data=b"{}", headers={**bob, "Mcp-Session-Id": "sess-1"})
    assert late.status == 404
    assert scripted.seen[-1] == ("POST", "sess-1", "bob")
    assert bindings.owner("sess-1") is None


async def test_delete_forgets_the_binding_when_the_upstream_echoes_the_id(
    start_sessions: StartSessionSidecar, idp: FakeIdp
) -> None:
    sidecar, _ = await start_sessions(echo=True)
    alice = token_for(idp, "alice")
    await sidecar.post("/mcp", data=b"{}", headers=alice)
    ended = await sidecar.delete("/mcp", headers={**alice, "Mcp-Session-Id": "sess-1"})
    assert ended.status == 200
    assert ended.headers["Mcp-Session-Id"] == "sess-1"
    assert sidecar.app[SESSIONS].owner("sess-1") is None


async def test_failed_delete_keeps_the_binding(
    start_sessions: StartSessionSidecar, idp: FakeIdp
) -> None:
    sidecar, scripted = await start_sessions()
    alice, bob = token_for(idp, "alice"), token_for(idp, "bob")
    await sidecar.post("/mcp", data=b"{}", headers=alice)
    scripted.known.clear()  # the upstream refuses the DELETE (404)
    ended = await sidecar.delete("/mcp", headers={**alice, "Mcp-Session-Id": "sess-1"})
    assert ended.status == 404
    assert sidecar.app[SESSIONS].owner("sess-1") == (idp.issuer, "alice")
    hijack = await sidecar.get("/mcp", headers={**bob, "Mcp-Session-Id": "sess-1"})
    assert hijack.status == 404
    assert "bob" not in scripted.users()


async def test_unknown_session_accepted_by_upstream_binds_first_presenter(
    start_sessions: StartSessionSidecar, idp: FakeIdp
) -> None:
    sidecar, scripted = await start_sessions()
    scripted.known.add("restored-7")  # e.g. created before a sidecar restart
    alice, bob = token_for(idp, "alice"), token_for(idp, "bob")

    first = await sidecar.post("/mcp", data=b"{}",
                               headers={**alice, "Mcp-Session-Id": "restored-7"})
    assert first.status == 200
    assert "Mcp-Session-Id" not in first.headers  # bound although the upstream did not repeat it
    assert sidecar.app[SESSIONS].owner("restored-7") == (idp.issuer, "alice")

    hijack = await sidecar.post("/mcp", data=b"{}", headers={**bob, "Mcp-Session-Id": "restored-7"})
    assert hijack.status == 404
    again = await sidecar.get("/mcp", headers={**alice, "Mcp-Session-Id": "restored-7"})
    assert again.status == 200
    assert scripted.users() == ["alice", "alice"]


@pytest.mark.parametrize("status", [400, 404, 500])
async def test_upstream_error_for_unknown_session_does_not_bind_it(
    start_sessions: StartSessionSidecar, idp: FakeIdp, status: int
) -> None:
    sidecar, scripted = await start_sessions()
    alice, bob = token_for(idp, "alice"), token_for(idp, "bob")

    scripted.fail_status = status  # even an id in the error answer must not be bound
    guess = await sidecar.post("/mcp", data=b"{}", headers={**alice, "Mcp-Session-Id": "guessed-9"})
    assert guess.status == status
    assert sidecar.app[SESSIONS].owner("guessed-9") is None
    assert len(sidecar.app[SESSIONS]) == 0
    # Bob presenting the same id is not refused by the sidecar: the upstream decides.
    other = await sidecar.post("/mcp", data=b"{}", headers={**bob, "Mcp-Session-Id": "guessed-9"})
    assert other.status == status
    assert scripted.users() == ["alice", "bob"]


# --- bounded in bytes, whatever ids callers or the upstream choose ------------------------------


def test_a_binding_costs_the_same_whatever_the_ids_length() -> None:
    """A binding keeps a digest of its id, never the id: 2,000 ids of the longest length allowed
    take no more than 2,000 UUID-sized ones (before, each kept its 1 KB id: 1.3 KB a binding)."""

    def bytes_per_binding(length: int) -> float:
        bindings = SessionBindings(ttl=60)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(2000):
                bindings.bind(f"{i:08d}".ljust(length, "s"), ALICE)  # a fresh id string each
            return (tracemalloc.get_traced_memory()[0] - before) / 2000
        finally:
            tracemalloc.stop()

    short, longest = bytes_per_binding(36), bytes_per_binding(sessions.MAX_SESSION_ID_BYTES)
    assert longest < 400
    assert longest < short + 16


@pytest.mark.parametrize("session_id", ["", " ", "s 1", "s\x7f", "s\u00e9", "x" * 1025])
def test_only_valid_ids_are_bound(session_id: str) -> None:
    assert not sessions.valid_session_id(session_id)
    with pytest.raises(ValueError, match="session id"):
        SessionBindings(ttl=60).bind(session_id, ALICE)


async def test_an_id_longer_than_the_bound_is_refused_before_the_upstream(
    start_sessions: StartSessionSidecar, idp: FakeIdp
) -> None:
    sidecar, scripted = await start_sessions()
    alice = token_for(idp, "alice")
    longest = "s" * sessions.MAX_SESSION_ID_BYTES
    too_long = longest + "s"
    scripted.known.update({longest, too_long})

    refused = await sidecar.post("/mcp", data=b"{}", headers={**alice, "Mcp-Session-Id": too_long})
    assert refused.status == 400
    assert (await refused.json())["error"] == "invalid_request"
    assert scripted.seen == []  # nothing reached the upstream
    assert len(sidecar.app[SESSIONS]) == 0

    accepted = await sidecar.post("/mcp", data=b"{}", headers={**alice, "Mcp-Session-Id": longest})
    assert accepted.status == 200
    assert sidecar.app[SESSIONS].owner(longest) == (idp.issuer, "alice")


@pytest.mark.parametrize("issued", ["s" * (sessions.MAX_SESSION_ID_BYTES + 1), "s 1"],
                         ids=["too_long", "not_visible_ascii"])
async def test_an_issued_id_the_sidecar_cannot_bind_is_502_and_nothing_is_kept(
    make_sidecar: SidecarFactory, idp: FakeIdp, issued: str
) -> None:
    """The session could never be presented back through the sidecar: say so at once (502,
    logged with the id's length only), bind nothing, and never pass the id on."""

    async def issue(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True}, headers={"Mcp-Session-Id": issued})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", issue)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        sidecar: Client = await make_sidecar(MCP_UPSTREAM_URL=f"http://127.0.0.1:{server.port}")
        with capture_logs() as events:
            answer = await sidecar.post("/mcp", data=b"{}", headers=token_for(idp, "alice"))
        assert answer.status == 502
        assert (await answer.json())["error"] == "upstream_invalid_session"
        assert "Mcp-Session-Id" not in answer.headers
        assert len(sidecar.app[SESSIONS]) == 0
        [warning] = [e for e in events if e["event"] == "upstream_session_id_invalid"]
        assert warning["length"] == len(issued)
        assert issued not in str(events)
    finally:
        await server.close()


# --- the gate decides: the session check runs in the gate, before any handler ------------------


@dataclass
class GatedApp:
    """The Gate in front of a handler that only records what reached it (no proxy at all)."""

    client: Client
    bindings: SessionBindings
    reached: list[PresentedSession | None] = field(default_factory=list)


@pytest.fixture
async def gated(idp: FakeIdp, upstream: FakeUpstream) -> AsyncIterator[GatedApp]:
    config = load(sidecar_env(idp, upstream, ALLOW_SUBS="alice,bob",
                              ALLOW_ALL_AUTHENTICATED="false"))
    provider = IdentityProvider(config.idp, config.tokens.algorithms)
    bindings = SessionBindings(config.session_ttl)
    limiter = RateLimiter(config.rate_limits)
    gate = Gate(config, verifier=TokenVerifier(config.tokens, provider),
                policy=AccessPolicy(config.policy), limiter=limiter,
                is_public=lambda _: False, sessions=bindings)
    reached: list[PresentedSession | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        reached.append(request.get(SESSION))
        return web.Response(text="reached")

    app = web.Application(middlewares=[gate.middleware])
    app.router.add_route("*", "/{path:.*}", handler)
    async with provider.running(), limiter.running():
        await wait_until(lambda: provider.ready)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            yield GatedApp(client, bindings, reached)


async def test_gate_refuses_another_users_session_before_any_handler(
    gated: GatedApp, idp: FakeIdp
) -> None:
    gated.bindings.bind("s-alice", (idp.issuer, "alice"))
    hijack = await gated.client.post("/mcp", headers={**token_for(idp, "bob"),
                                                      "Mcp-Session-Id": "s-alice"})
    assert hijack.status == 404
    assert (await hijack.json())["error"] == "session_not_found"
    assert gated.reached == []

    own = await gated.client.post("/mcp", headers={**token_for(idp, "alice"),
                                                   "Mcp-Session-Id": "s-alice"})
    assert own.status == 200
    unknown = await gated.client.post("/mcp", headers={**token_for(idp, "bob"),
                                                       "Mcp-Session-Id": "s-new"})
    assert unknown.status == 200
    none = await gated.client.post("/mcp", headers=token_for(idp, "bob"))
    assert none.status == 200
    # What the gate leaves for the proxy: whether the caller already owns it, or nobody does.
    assert gated.reached == [PresentedSession("s-alice", bound=True),
                             PresentedSession("s-new", bound=False), None]
    assert len(gated.bindings) == 1  # the gate decides; binding is the proxy's to record


async def test_gate_checks_the_session_after_the_access_policy(
    gated: GatedApp, idp: FakeIdp
) -> None:
    """A caller the allow-lists refuse hears 403, never whether a session id exists."""
    gated.bindings.bind("s-alice", (idp.issuer, "alice"))
    refused = await gated.client.post("/mcp", headers={**token_for(idp, "mallory"),
                                                       "Mcp-Session-Id": "s-alice"})
    assert refused.status == 403
    assert gated.reached == []


@pytest.mark.parametrize(("headers", "status"), [
    ([("Mcp-Session-Id", "a"), ("Mcp-Session-Id", "b")], 400),
    ([("Mcp-Session-Id", "s 1")], 400),
    ([("Mcp_Session_Id", "s-alice")], 400),
])
async def test_gate_refuses_malformed_session_headers(
    gated: GatedApp, idp: FakeIdp, headers: list[tuple[str, str]], status: int
) -> None:
    refused = await gated.client.post(
        "/mcp", headers=CIMultiDict([*token_for(idp, "alice").items(), *headers]))
    assert refused.status == status
    assert (await refused.json())["error"] == "invalid_request"
    assert gated.reached == []


def test_session_refused_carries_what_the_gate_answers() -> None:
    bindings = SessionBindings(ttl=60)
    bindings.bind("s1", ALICE)
    with pytest.raises(SessionRefused) as refused:
        bindings.check(CIMultiDictProxy(CIMultiDict({"Mcp-Session-Id": "s1"})), BOB)
    assert (refused.value.status, refused.value.error, refused.value.reason) == (
        404, "session_not_found", "session_owned_by_another_identity")
