"""Single use of the relay's sealed state and code: in memory within one sidecar (bounded, never
forgetting an unexpired id), and through a real redis-server across replicas that share it and
STATE_SECRET; while Redis is down, sign-ins are refused (503), never let through unchecked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from conftest import FakeIdp, SidecarFactory
from redis.asyncio import Redis
from redis_server import RedisServer
from structlog.testing import capture_logs
from test_authserver import (
    FACADE,
    STATE_SECRET,
    Client,
    TokenEndpoint,
    assert_invalid_grant,
    assert_refused_without_redirect,
    call,
    code_exchange,
    form,
    idp_answers,
    running_token_endpoint,
    sealed_code,
    sealed_state,
    serve_document,
)

from oauth_sidecar.signin import redemptions
from oauth_sidecar.signin.redemptions import MemoryRedemptions, RedemptionUnavailable
from oauth_sidecar.signin.state import StateCodec

HOUR = 3600.0


@pytest.fixture
async def token_endpoint() -> AsyncIterator[TokenEndpoint]:
    async with running_token_endpoint() as endpoint:
        yield endpoint


async def replicas(
    make_sidecar: SidecarFactory, idp: FakeIdp, token_endpoint: TokenEndpoint, storage: str
) -> tuple[Client, Client]:
    """Two facade sidecars sharing STATE_SECRET and the rate-limit storage."""
    serve_document(idp, token_endpoint=token_endpoint.url)
    env = {**FACADE, "RATE_LIMIT_STORAGE_URI": storage}
    return await make_sidecar(**env), await make_sidecar(**env)


# -- in memory ------------------------------------------------------------------------------------


async def test_memory_store_at_its_bound_refuses_new_ids_and_forgets_none_early() -> None:
    """Forgetting an unexpired id would make its value replayable; refusing only delays new
    sign-ins until the oldest ids expire."""
    store = MemoryRedemptions(capacity=3)
    soon = time.time() + 0.3
    assert [await store.redeem(i, at) for i, at in (("a", HOUR + time.time()),
                                                    ("b", HOUR + time.time()), ("c", soon))] \
        == [True, True, True]
    with capture_logs() as events, pytest.raises(RedemptionUnavailable):
        await store.redeem("d", HOUR + time.time())
    assert [e["event"] for e in events] == ["redemption_store_full"]
    assert await store.redeem("a", HOUR + time.time()) is False  # still remembered
    await asyncio.sleep(0.4)  # "c" expires: its value is refused by its own exp from now on
    assert await store.redeem("d", HOUR + time.time()) is True
    assert len(store) == 3  # "c" was forgotten once expired, and only then


async def test_full_memory_store_answers_503_and_keeps_refusing_replays(
    make_sidecar: SidecarFactory, idp: FakeIdp, token_endpoint: TokenEndpoint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redemptions, "MAX_REMEMBERED", 1)
    serve_document(idp, token_endpoint=token_endpoint.url)
    client = await make_sidecar(**FACADE)
    used = await sealed_state(client)
    first = await idp_answers(client, code="c", state=used, iss=idp.issuer)
    assert first.status == 302, first.text  # the one id the store may hold
    code = dict(first.target()[1])["code"]
    replay = await idp_answers(client, code="c", state=used, iss=idp.issuer)
    assert_refused_without_redirect(replay)  # full, yet the used state is still known
    state = await sealed_state(client)
    full = await idp_answers(client, code="c", state=state, iss=idp.issuer)
    assert full.status == 503, full.text
    assert "Location" not in full.headers
    assert full.json()["error"] == "temporarily_unavailable"
    assert full.headers["Retry-After"].isdigit()
    exchange = await call(client, "POST", "/token", **form(**code_exchange(code)))
    assert exchange.status == 503, exchange.text
    assert token_endpoint.calls == []


# -- through Redis --------------------------------------------------------------------------------


@pytest.mark.slow
async def test_replicas_sharing_redis_refuse_a_value_used_on_the_other(
    make_sidecar: SidecarFactory, idp: FakeIdp, token_endpoint: TokenEndpoint,
    redis_server: RedisServer,
) -> None:
    a, b = await replicas(make_sidecar, idp, token_endpoint, redis_server.uri)
    state = await sealed_state(a)
    assert (await idp_answers(b, code="c", state=state, iss=idp.issuer)).status == 302
    assert_refused_without_redirect(await idp_answers(a, code="c", state=state, iss=idp.issuer))
    sent = code_exchange(await sealed_code(a, idp))
    assert (await call(b, "POST", "/token", **form(**sent))).status == 200
    assert_invalid_grant(await call(a, "POST", "/token", **form(**sent)))
    assert_invalid_grant(await call(b, "POST", "/token", **form(**sent)))
    assert len(token_endpoint.calls) == 1


@pytest.mark.slow
async def test_replicas_racing_on_one_code_through_redis_let_one_through(
    make_sidecar: SidecarFactory, idp: FakeIdp, token_endpoint: TokenEndpoint,
    redis_server: RedisServer,
) -> None:
    a, b = await replicas(make_sidecar, idp, token_endpoint, redis_server.uri)
    sent = code_exchange(await sealed_code(a, idp))
    replies = await asyncio.gather(*(call(replica, "POST", "/token", **form(**sent))
                                     for replica in (a, b) * 4))
    assert sorted(reply.status for reply in replies) == [200] + [400] * 7
    assert len(token_endpoint.calls) == 1


async def test_replicas_in_memory_each_remember_their_own(
    make_sidecar: SidecarFactory, idp: FakeIdp, token_endpoint: TokenEndpoint,
) -> None:
    """The control for the Redis tests (and the documented limit): without shared storage,
    single use holds per replica."""
    a, b = await replicas(make_sidecar, idp, token_endpoint, "memory://")
    state = await sealed_state(a)
    assert (await idp_answers(a, code="c", state=state, iss=idp.issuer)).status == 302
    assert (await idp_answers(b, code="c", state=state, iss=idp.issuer)).status == 302
    assert_refused_without_redirect(await idp_answers(b, code="c", state=state, iss=idp.issuer))


@pytest.mark.slow
async def test_sign_in_fails_closed_while_redis_is_down_or_hung(
    make_sidecar: SidecarFactory, idp: FakeIdp, token_endpoint: TokenEndpoint,
    redis_server: RedisServer,
) -> None:
    """Replay protection never silently disappears: 503 with Retry-After, nothing relayed,
    logged once per incident; sign-ins work again once Redis is back."""
    serve_document(idp, token_endpoint=token_endpoint.url)
    client = await make_sidecar(**FACADE, RATE_LIMIT_STORAGE_URI=redis_server.uri)
    code = await sealed_code(client, idp)
    states = [await sealed_state(client) for _ in range(3)]
    with capture_logs() as events:
        redis_server.pause()  # a hung Redis: connections accepted, nothing answers
        try:
            hung = await idp_answers(client, code="c", state=states[0], iss=idp.issuer)
        finally:
            redis_server.resume()
        await redis_server.stop()
        down = [await idp_answers(client, code="c", state=states[1], iss=idp.issuer),
                await call(client, "POST", "/token", **form(**code_exchange(code)))]
        await redis_server.start()  # a new, empty redis-server on the same port
        back = await idp_answers(client, code="c", state=states[2], iss=idp.issuer)
    for reply in (hung, *down):
        assert reply.status == 503, reply.text
        assert "Location" not in reply.headers
        assert reply.json()["error"] == "temporarily_unavailable"
        assert reply.headers["Retry-After"].isdigit()
    assert token_endpoint.calls == []
    assert back.status == 302, back.text
    names = [e["event"] for e in events if e["event"].startswith("redemption_store")]
    assert names == ["redemption_store_failed", "redemption_store_recovered"]


@pytest.mark.slow
async def test_redis_keeps_each_used_id_past_its_value_expiry_by_the_clock_skew(
    make_sidecar: SidecarFactory, idp: FakeIdp, token_endpoint: TokenEndpoint,
    redis_server: RedisServer,
) -> None:
    """A replica whose clock lags still finds the id while it would accept the value."""
    a, _ = await replicas(make_sidecar, idp, token_endpoint, redis_server.uri)
    state = await sealed_state(a)
    assert (await idp_answers(a, code="c", state=state, iss=idp.issuer)).status == 302
    opened = StateCodec(STATE_SECRET.encode()).open(state)
    assert opened is not None
    client = Redis.from_url(redis_server.uri)
    try:
        ttl = await client.ttl(redemptions.KEY_PREFIX + opened["id"])
    finally:
        await client.aclose()
    lifetime = opened["exp"] - time.time()
    assert lifetime + redemptions.CLOCK_SKEW - 5 <= ttl <= lifetime + redemptions.CLOCK_SKEW + 1
