"""Rate limits: a per-subject budget (memory:// per process, or one budget shared by every
replica through a real redis-server), an explicit policy when the storage fails, and a per-IP
budget of token verifications and refused credentials that only a trusted proxy's X-Forwarded-For
can split. Every budget is spent before the work it pays for, so concurrency cannot overshoot it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import (
    FakeIdp,
    FakeUpstream,
    SidecarFactory,
    as_json,
    bearer,
    clear_of_a_minute_edge,
    new_rsa,
    sidecar_env,
)
from multidict import CIMultiDictProxy
from processes import PROCESS_TIMEOUT, free_port, sidecar_process, wait_ready
from redis_server import RedisServer
from structlog.testing import capture_logs
from test_metrics import scrape

from oauth_sidecar.app import VERIFIER
from oauth_sidecar.auth import ratelimit
from oauth_sidecar.auth.window_counters import MemoryWindowCounters
from oauth_sidecar.client_ip import budget_key
from oauth_sidecar.config import RateLimitConfig
from oauth_sidecar.config.rate_limits import parse_storage_uri
from oauth_sidecar.request_keys import Principal

Client = TestClient[web.Request, web.Application]

REQUEST_TIMEOUT = 10.0  # every request in this file is bounded
WINDOW = 60  # seconds: every budget is "per minute"
TEST_NET_CLIENT = "203.0.113.7"  # RFC 5737 documentation addresses
OTHER_TEST_NET_CLIENT = "203.0.113.8"

RETRY_FAST = 0.2  # seconds: a short storage retry window so recovery tests stay quick


# -- helpers ----------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: Any


async def send(
    client: Client, token: str | None = None, headers: dict[str, str] | None = None
) -> Reply:
    """One bounded POST /mcp; the body is parsed when it is JSON."""
    all_headers = {**(bearer(token) if token is not None else {}), **(headers or {})}
    async with asyncio.timeout(REQUEST_TIMEOUT):
        response = await client.post("/mcp", data=b"{}", headers=all_headers)
        text = await response.text()
    body = as_json(text) if response.content_type == "application/json" else text
    return Reply(response.status, response.headers, body)


def assert_too_many(reply: Reply, limit: int) -> None:
    """429 JSON with delays in seconds: limits' reset_time is an epoch, never a delay."""
    assert reply.status == 429, reply
    assert reply.body["error"] == "rate_limited"
    retry_after = int(reply.headers["Retry-After"])  # an integer number of seconds
    assert 1 <= retry_after <= WINDOW, retry_after
    assert reply.headers["RateLimit-Limit"] == str(limit)
    assert reply.headers["RateLimit-Remaining"] == "0"
    assert 1 <= int(reply.headers["RateLimit-Reset"]) <= WINDOW


def bad_signature(idp: FakeIdp, sub: str = "mallory") -> str:
    """A well-formed token of the right issuer whose signature belongs to another token."""
    header, payload, _ = idp.mint(claims={"sub": sub}).split(".")
    other_signature = idp.mint(claims={"sub": "someone-else"}).split(".")[2]
    return f"{header}.{payload}.{other_signature}"


def expired(idp: FakeIdp, sub: str = "mallory") -> str:
    now = int(time.time())
    return idp.mint(claims={"sub": sub, "exp": now - 3600, "iat": now - 7200, "nbf": now - 7200})


def failing_tokens(idp: FakeIdp) -> list[str]:
    """Three tokens that each cost a verification and fail it."""
    return [bad_signature(idp), expired(idp), "garbage.not-a.jwt"]


def count_verifications(client: Client, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Tokens the app's verifier was asked to verify (cache hits never get here)."""
    verifier = client.app[VERIFIER]
    original = verifier.verify
    verified: list[str] = []

    async def counting(token: str) -> Principal:
        verified.append(token)
        return await original(token)

    monkeypatch.setattr(verifier, "verify", counting)
    return verified


def events_named(
    events: list[MutableMapping[str, Any]], name: str
) -> list[MutableMapping[str, Any]]:
    return [event for event in events if event["event"] == name]


# -- per-subject budget (memory://) -------------------------------------------------------------


async def test_subject_gets_its_budget_then_429_with_retry_after_and_nothing_reaches_upstream(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar = await make_sidecar(RATE_LIMIT_RPM="5")
    token = idp.mint(claims={"sub": "alice"})
    for _ in range(5):
        assert (await send(sidecar, token)).status == 200
    assert len(upstream.requests) == 5

    reply = await send(sidecar, token)

    assert_too_many(reply, limit=5)
    assert reply.headers["Content-Type"].startswith("application/json")
    assert len(upstream.requests) == 5  # the refused request never went upstream


async def test_each_subject_has_its_own_budget(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar = await make_sidecar(RATE_LIMIT_RPM="5")
    alice, bob = idp.mint(claims={"sub": "alice"}), idp.mint(claims={"sub": "bob"})
    for _ in range(5):
        assert (await send(sidecar, alice)).status == 200
    assert (await send(sidecar, alice)).status == 429

    for _ in range(5):
        assert (await send(sidecar, bob)).status == 200
    assert_too_many(await send(sidecar, bob), limit=5)
    assert len(upstream.requests) == 10


async def test_different_tokens_of_one_subject_share_its_budget(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    sidecar = await make_sidecar(RATE_LIMIT_RPM="5")
    for _ in range(5):  # each mint has its own jti: a new token every time
        assert (await send(sidecar, idp.mint(claims={"sub": "alice"}))).status == 200

    assert_too_many(await send(sidecar, idp.mint(claims={"sub": "alice"})), limit=5)


async def test_zero_rpm_disables_the_subject_limit(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar = await make_sidecar(RATE_LIMIT_RPM="0")
    token = idp.mint(claims={"sub": "alice"})
    for _ in range(30):
        reply = await send(sidecar, token)
        assert reply.status == 200
        assert "RateLimit-Limit" not in reply.headers
    assert len(upstream.requests) == 30


async def test_access_log_attributes_the_429_to_the_subject(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    sidecar = await make_sidecar(RATE_LIMIT_RPM="1")
    token = idp.mint(claims={"sub": "alice"})
    with capture_logs() as events:
        assert (await send(sidecar, token)).status == 200
        assert (await send(sidecar, token)).status == 429
    passed, refused = events_named(events, "request")
    assert (passed["status"], passed["sub"], passed["auth_error"]) == (200, "alice", None)
    assert (refused["status"], refused["sub"]) == (429, "alice")
    assert refused["auth_error"] == "rate_limited_subject"
    assert token not in str(events)


async def test_a_subject_the_allow_lists_refuse_spends_its_budget_then_gets_429(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    """Mallory signs in at the IdP but is on no allow-list: her token is valid (and cached), so
    each refusal would cost her nothing; she gets RATE_LIMIT_RPM refusals, then 429s."""
    sidecar = await make_sidecar(RATE_LIMIT_RPM="3", ALLOW_ALL_AUTHENTICATED="false",
                                 ALLOW_SUBS="alice")
    mallory = idp.mint(claims={"sub": "mallory"})
    with capture_logs() as events:
        for _ in range(3):
            reply = await send(sidecar, mallory)
            assert (reply.status, reply.body["error"]) == (403, "access_denied")
        assert_too_many(await send(sidecar, mallory), limit=3)
        # A fresh token of hers shares the budget: the subject pays, not the token.
        assert_too_many(await send(sidecar, idp.mint(claims={"sub": "mallory"})), limit=3)
        for _ in range(3):  # other subjects keep their own budget
            assert (await send(sidecar, idp.mint(claims={"sub": "alice"}))).status == 200
    assert len(upstream.requests) == 3
    attributed = [(line["status"], line["sub"], line["auth_error"])
                  for line in events_named(events, "request")]
    assert attributed == [
        *[(403, "mallory", "not_allowed")] * 3,
        *[(429, "mallory", "rate_limited_subject")] * 2,
        *[(200, "alice", None)] * 3,
    ]


# -- one budget shared through Redis --------------------------------------------------------------


async def alternate(replicas: tuple[Client, Client], token: str, requests: int) -> list[int]:
    """Send `requests` requests of one token, alternating between two replicas."""
    return [(await send(replicas[i % 2], token)).status for i in range(requests)]


@pytest.mark.slow
async def test_replicas_share_one_budget_through_redis_but_each_has_its_own_in_memory(
    redis_server: RedisServer, make_sidecar: SidecarFactory, idp: FakeIdp,
    upstream: FakeUpstream,
) -> None:
    shared = (
        await make_sidecar(RATE_LIMIT_RPM="6", RATE_LIMIT_STORAGE_URI=redis_server.uri),
        await make_sidecar(RATE_LIMIT_RPM="6", RATE_LIMIT_STORAGE_URI=redis_server.uri),
    )
    separate = (
        await make_sidecar(RATE_LIMIT_RPM="6", RATE_LIMIT_STORAGE_URI="memory://"),
        await make_sidecar(RATE_LIMIT_RPM="6", RATE_LIMIT_STORAGE_URI="memory://"),
    )
    token = idp.mint(claims={"sub": "alice"})

    through_redis = await alternate(shared, token, 20)
    in_memory = await alternate(separate, token, 20)

    assert through_redis == [200] * 6 + [429] * 14  # one budget for the whole deployment
    assert in_memory.count(200) == 12  # each replica's own budget of 6
    assert in_memory[12:] == [429] * 8
    assert len(upstream.requests) == 18
    assert_too_many(await send(shared[0], token), limit=6)
    assert_too_many(await send(shared[1], token), limit=6)


@pytest.mark.slow
async def test_concurrent_requests_never_exceed_the_shared_budget(
    redis_server: RedisServer, make_sidecar: SidecarFactory, idp: FakeIdp,
    upstream: FakeUpstream,
) -> None:
    replicas = (
        await make_sidecar(RATE_LIMIT_RPM="6", RATE_LIMIT_STORAGE_URI=redis_server.uri),
        await make_sidecar(RATE_LIMIT_RPM="6", RATE_LIMIT_STORAGE_URI=redis_server.uri),
    )
    token = idp.mint(claims={"sub": "alice"})
    for replica in replicas:  # verified once each, so the burst below only counts
        await send(replica, idp.mint(claims={"sub": "warm-up"}))
    before = len(upstream.requests)

    replies = await asyncio.gather(*(send(replicas[i % 2], token) for i in range(24)))

    assert sorted(reply.status for reply in replies) == [200] * 6 + [429] * 18
    assert len(upstream.requests) == before + 6


async def test_concurrent_requests_never_exceed_the_memory_budget(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    sidecar = await make_sidecar(RATE_LIMIT_RPM="6")
    tokens = [idp.mint(claims={"sub": "alice"}) for _ in range(24)]  # uncached: interleaved

    replies = await asyncio.gather(*(send(sidecar, token) for token in tokens))

    assert sorted(reply.status for reply in replies) == [200] * 6 + [429] * 18


# -- the storage fails ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_redis_outage_fails_open_logs_once_and_limits_resume_when_it_returns(
    redis_server: RedisServer, make_sidecar: SidecarFactory, idp: FakeIdp,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ratelimit, "RETRY_STORAGE_AFTER", RETRY_FAST)
    sidecar = await make_sidecar(
        RATE_LIMIT_RPM="3", RATE_LIMIT_STORAGE_URI=redis_server.uri,
        RATE_LIMIT_ON_STORAGE_ERROR="allow",
    )
    token = idp.mint(claims={"sub": "alice"})
    assert (await send(sidecar, token)).status == 200

    await redis_server.stop()
    with capture_logs() as outage:
        statuses = [(await send(sidecar, token)).status for _ in range(8)]
        statuses += [(await send(sidecar, idp.mint(claims={"sub": "alice"}))).status
                     for _ in range(2)]  # uncached tokens also consult the per-IP budget
    assert statuses == [200] * 10  # past the budget of 3: auth still enforced, limits are not
    [failed] = events_named(outage, "rate_limit_storage_failed")
    assert failed["policy"] == "allow"
    assert failed["log_level"] == "error"
    assert events_named(outage, "rate_limit_storage_recovered") == []

    await redis_server.start()  # a new, empty redis-server on the same port
    await asyncio.sleep(RETRY_FAST * 1.5)  # past the window in which storage is not retried
    with capture_logs() as recovery:
        statuses = [(await send(sidecar, token)).status for _ in range(6)]
    assert statuses == [200] * 3 + [429] * 3  # the budget applies again
    assert len(events_named(recovery, "rate_limit_storage_recovered")) == 1
    assert events_named(recovery, "rate_limit_storage_failed") == []


@pytest.mark.slow
async def test_redis_outage_with_deny_policy_answers_503_never_500(
    redis_server: RedisServer, make_sidecar: SidecarFactory, idp: FakeIdp,
    upstream: FakeUpstream,
) -> None:
    sidecar = await make_sidecar(
        RATE_LIMIT_RPM="3", RATE_LIMIT_STORAGE_URI=redis_server.uri,
        RATE_LIMIT_ON_STORAGE_ERROR="deny",
    )
    token = idp.mint(claims={"sub": "alice"})
    assert (await send(sidecar, token)).status == 200

    await redis_server.stop()
    with capture_logs() as events:
        replies = [await send(sidecar, token) for _ in range(5)]
        replies.append(await send(sidecar, idp.mint(claims={"sub": "bob"})))  # uncached
    for reply in replies:
        assert reply.status == 503, reply
        assert reply.body["error"] == "temporarily_unavailable"
        assert 1 <= int(reply.headers["Retry-After"]) <= WINDOW
    [failed] = events_named(events, "rate_limit_storage_failed")
    assert failed["policy"] == "deny"
    assert {e["auth_error"] for e in events_named(events, "request")} == {"rate_limit_unavailable"}
    assert len(upstream.requests) == 1


@pytest.mark.slow
async def test_hung_redis_holds_requests_no_longer_than_the_storage_timeout(
    redis_server: RedisServer, make_sidecar: SidecarFactory, idp: FakeIdp,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ratelimit, "RETRY_STORAGE_AFTER", RETRY_FAST)
    sidecar = await make_sidecar(
        RATE_LIMIT_RPM="3", RATE_LIMIT_STORAGE_URI=redis_server.uri,
        RATE_LIMIT_ON_STORAGE_ERROR="allow",
    )
    alice = idp.mint(claims={"sub": "alice"})
    assert (await send(sidecar, alice)).status == 200

    redis_server.pause()
    with capture_logs() as events:
        started = time.monotonic()
        statuses = [(await send(sidecar, alice)).status for _ in range(2)]
        elapsed = time.monotonic() - started
        redis_server.resume()
        await asyncio.sleep(RETRY_FAST * 1.5)
        bob = idp.mint(claims={"sub": "bob"})
        statuses += [(await send(sidecar, bob)).status for _ in range(5)]

    assert statuses[:2] == [200, 200]  # fail open after STORAGE_TIMEOUT (1 s), not 300 s
    assert elapsed < 2 * 2.5, elapsed
    # Answers of the abandoned commands must not be read as answers to bob's: his own budget.
    assert statuses[2:] == [200] * 3 + [429] * 2
    assert len(events_named(events, "rate_limit_storage_failed")) == 1
    assert len(events_named(events, "rate_limit_storage_recovered")) == 1


@pytest.mark.slow
async def test_during_an_outage_only_one_request_waits_for_the_storage_timeout(
    redis_server: RedisServer, make_sidecar: SidecarFactory, idp: FakeIdp,
) -> None:
    sidecar = await make_sidecar(
        RATE_LIMIT_RPM="3", RATE_LIMIT_STORAGE_URI=redis_server.uri,
        RATE_LIMIT_ON_STORAGE_ERROR="allow",
    )
    alice = idp.mint(claims={"sub": "alice"})
    assert (await send(sidecar, alice)).status == 200
    redis_server.pause()
    try:
        started = time.monotonic()
        assert (await send(sidecar, alice)).status == 200  # pays the 1 s storage timeout
        first = time.monotonic() - started
        started = time.monotonic()
        statuses = [(await send(sidecar, alice)).status for _ in range(10)]
        rest = time.monotonic() - started
    finally:
        redis_server.resume()
    assert statuses == [200] * 10
    # Not a speed assertion: ten requests that each waited for the storage would take >= 10 s.
    assert first >= ratelimit.STORAGE_TIMEOUT * 0.9
    assert rest < ratelimit.STORAGE_TIMEOUT * 5


@pytest.mark.parametrize(("policy", "status"), [("allow", 200), ("deny", 503)])
async def test_unreachable_redis_at_start_up_does_not_stop_the_app(
    make_sidecar: SidecarFactory, idp: FakeIdp, policy: str, status: int
) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with capture_logs() as events:
        sidecar = await make_sidecar(
            RATE_LIMIT_RPM="2", RATE_LIMIT_STORAGE_URI=closed, RATE_LIMIT_ON_STORAGE_ERROR=policy,
        )
        async with asyncio.timeout(REQUEST_TIMEOUT):
            assert (await sidecar.get("/healthz")).status == 200
        token = idp.mint(claims={"sub": "alice"})
        replies = [await send(sidecar, token) for _ in range(5)]
    assert [reply.status for reply in replies] == [status] * 5
    if status == 503:
        assert all(reply.headers["Retry-After"].isdigit() for reply in replies)
    [failed] = events_named(events, "rate_limit_storage_failed")
    assert failed["policy"] == policy


async def down_storage_sidecar(make_sidecar: SidecarFactory, policy: str) -> Client:
    """A sidecar with every budget on, whose Redis is not there (nothing listens on the port)."""
    return await make_sidecar(
        RATE_LIMIT_RPM="3", RATE_LIMIT_UNAUTHENTICATED_RPM="3",
        RATE_LIMIT_STORAGE_URI=f"redis://127.0.0.1:{free_port()}/0",
        RATE_LIMIT_ON_STORAGE_ERROR=policy,
    )


def assert_unavailable(reply: Reply) -> None:
    """The one answer of every budget while its storage is down and the policy is deny."""
    assert reply.status == 503, reply
    assert reply.body == {"error": "temporarily_unavailable",
                          "error_description": "Rate limiting is unavailable"}
    assert reply.headers["Retry-After"].isdigit()


# Each unauthenticated route the limiter guards, and a request it would otherwise serve.
GUARDED = [("GET", "/authorize"), ("POST", "/token"), ("POST", "/oauth/register"),
           ("POST", "/register")]


@pytest.mark.parametrize(("method", "path"), GUARDED)
async def test_every_guarded_route_answers_503_while_the_storage_is_down_with_deny(
    make_sidecar: SidecarFactory, method: str, path: str
) -> None:
    sidecar = await down_storage_sidecar(make_sidecar, "deny")
    async with asyncio.timeout(REQUEST_TIMEOUT):
        response = await sidecar.request(method, path, data=b"{}",
                                         headers={"Content-Type": "application/json"})
        reply = Reply(response.status, response.headers, await response.json())
    assert_unavailable(reply)


@pytest.mark.parametrize(("method", "path"), GUARDED)
async def test_guarded_routes_are_served_while_the_storage_is_down_with_allow(
    make_sidecar: SidecarFactory, method: str, path: str
) -> None:
    sidecar = await down_storage_sidecar(make_sidecar, "allow")
    async with asyncio.timeout(REQUEST_TIMEOUT):
        response = await sidecar.request(method, path, data=b"{}", allow_redirects=False,
                                         headers={"Content-Type": "application/json"})
    assert response.status not in (429, 503), await response.text()


async def test_gate_budgets_answer_503_while_the_storage_is_down_with_deny(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    """Both budgets the gate spends: a new token's verification (per client IP) and a
    signed-in subject's request (per subject, its token already verified)."""
    sidecar = await down_storage_sidecar(make_sidecar, "deny")
    with capture_logs() as events:
        unverified = await send(sidecar, idp.mint(claims={"sub": "alice"}))
        refused_credential = await send(sidecar, "Bearer-less garbage")
    assert_unavailable(unverified)
    # A refusal already decided is not turned into a 503: the storage does not matter to it.
    assert refused_credential.status == 401
    first, _ = events_named(events, "request")
    assert first["auth_error"] == "rate_limit_unavailable"
    assert upstream.requests == []


async def test_subject_budget_answers_503_while_the_storage_is_down_with_deny(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    """Only the subject's budget: the per-IP budget is off, so the token is verified."""
    sidecar = await make_sidecar(
        RATE_LIMIT_RPM="3", RATE_LIMIT_UNAUTHENTICATED_RPM="0",
        RATE_LIMIT_STORAGE_URI=f"redis://127.0.0.1:{free_port()}/0",
        RATE_LIMIT_ON_STORAGE_ERROR="deny",
    )
    assert_unavailable(await send(sidecar, idp.mint(claims={"sub": "alice"})))
    assert upstream.requests == []


# -- per-IP budget of verifications and refused credentials ------------------------------------


async def test_verifications_exhaust_the_ip_budget_and_new_tokens_get_429_unverified(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sidecar = await make_sidecar(RATE_LIMIT_UNAUTHENTICATED_RPM="4")
    verified_before = idp.mint(claims={"sub": "alice"})
    assert (await send(sidecar, verified_before)).status == 200  # now in the token cache
    for _ in range(3):  # its one verification spent one unit; cache hits spend nothing
        assert (await send(sidecar, verified_before)).status == 200
    verifications = count_verifications(sidecar, monkeypatch)

    for token in failing_tokens(idp):
        assert (await send(sidecar, token)).status == 401
    assert len(verifications) == 3

    fresh = idp.mint(claims={"sub": "bob"})
    with capture_logs() as events:
        reply = await send(sidecar, fresh)
    assert_too_many(reply, limit=4)
    assert len(verifications) == 3  # refused before spending CPU on the signature
    [entry] = events_named(events, "request")
    assert entry["auth_error"] == "rate_limited_client_ip"
    assert entry["sub"] is None
    assert (await send(sidecar, "garbage.again.jwt")).status == 429

    before = len(upstream.requests)
    assert (await send(sidecar, verified_before)).status == 200  # cached: no verification cost
    assert len(upstream.requests) == before + 1


FLOOD = 400  # concurrent connections, each with one request: more than the budget, bounded
FLOOD_BUDGET = 50
FLOOD_EDGE_MARGIN = 25.0  # seconds clear of a minute edge before a flood (seen taking ~10 s)
COOLDOWN = 0.1  # seconds between key-set fetches for unknown kids: the least allowed
SLOW_JWKS = 0.3  # seconds the IdP takes to serve its keys in the flood tests


async def flood_of_failing_tokens(port: int | None, tokens: list[str]) -> list[int]:
    """One connection per request, all at once (the 500-connection overshoot, scaled down)."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=PROCESS_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(token: str) -> int:
            async with session.post(f"http://127.0.0.1:{port}/mcp", data=b"{}",
                                    headers=bearer(token)) as response:
                await response.read()
                return response.status

        async with asyncio.timeout(PROCESS_TIMEOUT):
            return await asyncio.gather(*(one(token) for token in tokens))


def unknown_kid_tokens(idp: FakeIdp, count: int) -> list[str]:
    """Distinct tokens (each its own jti) whose kid the IdP does not publish: each verification
    waits for a key refresh. One unpublished key signs them all: generating an RSA key per
    token would cost the test far more than the flood itself."""
    unpublished = new_rsa("not-published")
    return [idp.mint(unpublished) for _ in range(count)]


async def slow_key_set(idp: FakeIdp) -> None:
    """From now on the IdP takes a moment to serve its keys, as a remote one does: requests
    with unknown kids wait for the refresh together."""

    async def slowly(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(SLOW_JWKS)
        return web.json_response({"keys": [key.jwk() for key in idp.keys]})

    idp.jwks_override = slowly
    await asyncio.sleep(COOLDOWN * 2)  # the start-up fetch's cooldown is over: unknown kids fetch


async def assert_ip_budget_holds_under_concurrency(
    make_sidecar: SidecarFactory, idp: FakeIdp, tokens: list[str], storage_uri: str,
) -> None:
    """Counting comes first and is atomic (limits' hit): no more verifications run than the
    budget allows, however many requests are in flight when it runs out."""
    metrics_port = free_port()
    sidecar = await make_sidecar(RATE_LIMIT_UNAUTHENTICATED_RPM=str(FLOOD_BUDGET),
                                 RATE_LIMIT_STORAGE_URI=storage_uri,
                                 METRICS_PORT=str(metrics_port),
                                 JWKS_COOLDOWN_SECONDS=str(COOLDOWN))
    await slow_key_set(idp)
    # A flood on a loaded machine can take many seconds: it must not straddle a minute edge,
    # where the sliding window's last minute starts to weigh less than whole (conftest).
    await clear_of_a_minute_edge(FLOOD_EDGE_MARGIN)

    statuses = await flood_of_failing_tokens(sidecar.port, tokens)

    result = await scrape(metrics_port)
    failures = result.series("auth_failures_total")
    verified = sum(count for labels, count in failures.items()
                   if labels != (("reason", "rate_limited_client_ip"),))
    assert verified <= FLOOD_BUDGET, failures  # verifications actually performed
    assert statuses.count(401) == verified
    assert statuses.count(429) == len(tokens) - verified
    assert result.value("rate_limited_total", scope="client_ip") == len(tokens) - verified


async def test_concurrent_failed_verifications_never_exceed_the_ip_budget_in_memory(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    tokens = unknown_kid_tokens(idp, FLOOD)
    await assert_ip_budget_holds_under_concurrency(make_sidecar, idp, tokens, "memory://")


@pytest.mark.slow
async def test_concurrent_failed_verifications_never_exceed_the_ip_budget_through_redis(
    redis_server: RedisServer, make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    tokens = [bad_signature(idp) for _ in range(FLOOD)]
    await assert_ip_budget_holds_under_concurrency(make_sidecar, idp, tokens, redis_server.uri)


async def test_requests_without_credentials_never_spend_the_ip_budget(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    sidecar = await make_sidecar(RATE_LIMIT_UNAUTHENTICATED_RPM="3")
    for _ in range(20):  # every MCP client's first request, e.g. many users behind one NAT
        assert (await send(sidecar)).status == 401
    for _ in range(5):
        assert (await send(sidecar, headers={"Authorization": "Basic dXNlcjpwYXNz"})).status == 401

    assert (await send(sidecar, idp.mint(claims={"sub": "alice"}))).status == 200


async def test_zero_unauthenticated_rpm_disables_the_ip_budget(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    sidecar = await make_sidecar(RATE_LIMIT_UNAUTHENTICATED_RPM="0")
    for _ in range(4):
        for token in failing_tokens(idp):
            assert (await send(sidecar, token)).status == 401

    assert (await send(sidecar, idp.mint(claims={"sub": "alice"}))).status == 200


async def test_trusted_proxy_forwarded_for_gives_each_client_its_own_failure_budget(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    sidecar = await make_sidecar(RATE_LIMIT_UNAUTHENTICATED_RPM="3", TRUSTED_PROXIES="127.0.0.1")
    flooder = {"X-Forwarded-For": TEST_NET_CLIENT}
    for token in failing_tokens(idp):
        assert (await send(sidecar, token, flooder)).status == 401

    assert_too_many(await send(sidecar, idp.mint(claims={"sub": "x"}), flooder), limit=3)
    # The caller writes the leftmost entries: prepending one does not escape the budget.
    spoofed = {"X-Forwarded-For": f"198.51.100.1, {TEST_NET_CLIENT}"}
    assert (await send(sidecar, idp.mint(claims={"sub": "x"}), spoofed)).status == 429
    neighbour = {"X-Forwarded-For": OTHER_TEST_NET_CLIENT}
    assert (await send(sidecar, idp.mint(claims={"sub": "y"}), neighbour)).status == 200
    assert (await send(sidecar, idp.mint(claims={"sub": "z"}))).status == 200  # the proxy itself


async def test_an_ipv6_client_has_one_budget_for_its_whole_slash_64(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    """A host is given a whole /64: counting single IPv6 addresses would give a flooder 2^64
    budgets for verifications (and each address its own counter in memory). Documentation
    addresses (RFC 3849), reported by a trusted proxy; no traffic leaves loopback."""
    sidecar = await make_sidecar(RATE_LIMIT_UNAUTHENTICATED_RPM="3", TRUSTED_PROXIES="127.0.0.1")
    for i, token in enumerate(failing_tokens(idp)):  # each from another address of one /64
        assert (await send(sidecar, token, {"X-Forwarded-For": f"2001:db8:0:1::{i + 1:x}"})
                ).status == 401
    same_64 = {"X-Forwarded-For": "2001:db8:0:1:ffff:ffff:ffff:ffff"}
    assert_too_many(await send(sidecar, idp.mint(claims={"sub": "x"}), same_64), limit=3)
    next_64 = {"X-Forwarded-For": "2001:db8:0:2::1"}
    assert (await send(sidecar, idp.mint(claims={"sub": "y"}), next_64)).status == 200


@pytest.mark.parametrize(("client", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:0:1::5", "2001:db8:0:1::/64"),
    ("2001:db8:0:1:abcd:ef01:2345:6789", "2001:db8:0:1::/64"),
    ("unix-socket-peer", "unix-socket-peer"),
])
def test_budget_keys_name_an_ipv4_address_or_an_ipv6_slash_64(client: str, key: str) -> None:
    assert budget_key(client) == key


async def test_trusted_proxy_line_wins_over_a_caller_written_forwarded_for_line(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    sidecar = await make_sidecar(RATE_LIMIT_UNAUTHENTICATED_RPM="3", TRUSTED_PROXIES="127.0.0.1")
    for i, token in enumerate(failing_tokens(idp)):
        # The caller rotates its own line; the trusted proxy adds a second line with the truth.
        lines = [("X-Forwarded-For", f"198.51.100.{i + 1}"), ("X-Forwarded-For", TEST_NET_CLIENT)]
        async with asyncio.timeout(REQUEST_TIMEOUT):
            response = await sidecar.post("/mcp", headers=[*bearer(token).items(), *lines])
            assert response.status == 401
            await response.read()

    flooder = {"X-Forwarded-For": TEST_NET_CLIENT}
    assert_too_many(await send(sidecar, idp.mint(claims={"sub": "x"}), flooder), limit=3)


async def test_forwarded_for_is_ignored_without_trusted_proxies(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    sidecar = await make_sidecar(RATE_LIMIT_UNAUTHENTICATED_RPM="3")
    for token in failing_tokens(idp):
        assert (await send(sidecar, token, {"X-Forwarded-For": TEST_NET_CLIENT})).status == 401

    neighbour = {"X-Forwarded-For": OTHER_TEST_NET_CLIENT}  # claimed, not believed: 127.0.0.1
    assert_too_many(await send(sidecar, idp.mint(claims={"sub": "y"}), neighbour), limit=3)
    assert (await send(sidecar, idp.mint(claims={"sub": "z"}))).status == 429


@pytest.mark.slow
async def test_two_sidecar_processes_sharing_one_redis_hold_a_subject_to_one_budget(
    redis_server: RedisServer, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    """The replica setup for real: two `python -m oauth_sidecar` processes, one redis-server.

    (With RATE_LIMIT_STORAGE_URI=memory:// the same run lets 12 through: a budget each.)
    """
    budget = 6
    ports = [free_port(), free_port()]
    timeout = aiohttp.ClientTimeout(total=PROCESS_TIMEOUT)
    envs = [
        sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(port), RATE_LIMIT_RPM=str(budget),
                    RATE_LIMIT_STORAGE_URI=redis_server.uri)
        for port in ports
    ]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    token = idp.mint(claims={"sub": "alice"})
    async with (
        sidecar_process(envs[0]) as first, sidecar_process(envs[1]) as second,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        await wait_ready(session, bases[0], first)
        await wait_ready(session, bases[1], second)
        await clear_of_a_minute_edge()
        statuses: list[int] = []
        for i in range(20):  # alternate between the replicas
            async with session.post(bases[i % 2] + "/mcp", data=b"{}",
                                    headers=bearer(token)) as response:
                statuses.append(response.status)
    assert statuses.count(200) == budget, statuses
    assert statuses.count(429) == 20 - budget
    assert statuses[:budget] == [200] * budget  # the budget is spent first, across both


async def _keys_and_sizes(limiter: ratelimit.RateLimiter, uri: str) -> dict[str, int]:
    """Each stored key and how many values it holds (1 for a counter, n for a list of n)."""
    if uri.startswith("async+memory"):
        counters = limiter._strategy  # the product's own counters, read, not changed
        assert isinstance(counters, MemoryWindowCounters)
        return {"/".join(key): count for key, count in counters._current.items()}
    import redis.asyncio as redis_client

    client = redis_client.Redis.from_url(uri.removeprefix("async+"))
    try:
        sizes: dict[str, int] = {}
        for key in await client.keys("*"):
            kind = (await client.type(key)).decode()
            sizes[key.decode()] = int(await client.llen(key)) if kind == "list" else 1  # type: ignore[misc]
        return sizes
    finally:
        await client.aclose()


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["memory", "redis"])
async def test_a_subjects_budget_is_two_counters_however_fast_it_spends(
    storage: str, redis_server: RedisServer,
) -> None:
    """O(1) per request: a sliding-window counter keeps this window's and the last one's count
    per key, where a moving window kept one entry per hit (its cost grew with the rate)."""
    uri = parse_storage_uri("memory://" if storage == "memory" else redis_server.uri).limits_form
    limiter = ratelimit.RateLimiter(RateLimitConfig(
        per_subject_rpm=1_000_000, unauthenticated_rpm=0, storage_uri=uri, fail_open=False))
    async with limiter.running():
        for _ in range(3000):
            await limiter.admit(ratelimit.PER_SUBJECT, "https://idp.example.test", "alice")
        sizes = await _keys_and_sizes(limiter, uri)
    assert 1 <= len(sizes) <= 2, sizes
    if storage == "redis":
        assert max(sizes.values()) == 1, sizes  # counters, not one stored entry per request
    else:
        assert sum(sizes.values()) == 3000  # one counter holding every request
