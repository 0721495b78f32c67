"""Opaque access tokens by RFC 7662 introspection, through the real app: create_app(load(env)) on
loopback, the fake IdP's discovery naming a real fake introspection endpoint
(introspection_endpoint.py), and a real upstream. What an introspected caller gets must be what a
JWT caller gets (the same Principal), the IdP's trouble is always a 503 and never an accept, and
the IdP sees one call per token however many requests carry it."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import (
    AUDIENCE,
    FakeIdp,
    FakeUpstream,
    SidecarFactory,
    as_json,
    bearer,
    new_rsa,
    sidecar_env,
    wait_until,
)
from introspection_endpoint import CLIENT_ID, CLIENT_SECRET, SIGNED, FakeIntrospection
from processes import free_port
from structlog.testing import capture_logs
from test_metrics import scrape

from oauth_sidecar.app import INTROSPECTOR, create_app
from oauth_sidecar.auth.access_tokens import looks_like_jws
from oauth_sidecar.auth.bearer import TokenError
from oauth_sidecar.auth.idp import acceptable_url
from oauth_sidecar.config import CHILD_ENV_FORBIDDEN, ConfigError, load

Client = TestClient[web.Request, web.Application]
REQUEST_TIMEOUT = 10.0
LOGIN = {"TOKEN_VALIDATION": "introspection", "INTROSPECTION_CLIENT_ID": CLIENT_ID,
         "INTROSPECTION_CLIENT_SECRET": CLIENT_SECRET}


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: Any


async def send(client: Client, token: str) -> Reply:
    async with asyncio.timeout(REQUEST_TIMEOUT):
        response = await client.post("/mcp", data=b"{}", headers=bearer(token))
        text = await response.text()
    body = as_json(text) if response.content_type == "application/json" else text
    return Reply(response.status, response.headers, body)


async def refusal(client: Client, token: str) -> tuple[int, str | None]:
    """The status and the access log's auth_error of one request."""
    with capture_logs() as events:
        reply = await send(client, token)
    [line] = [e for e in events if e["event"] == "request"]
    return reply.status, line["auth_error"]


@pytest.fixture
async def endpoint(idp: FakeIdp) -> AsyncIterator[FakeIntrospection]:
    fake = FakeIntrospection(issuer=idp.issuer)
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.server = server
    fake.issuer = idp.issuer
    idp.document_changes["introspection_endpoint"] = fake.url
    yield fake
    if fake.hold is not None:
        fake.hold.set()
    await server.close()


async def introspecting(make_sidecar: SidecarFactory, **extra: str) -> Client:
    return await make_sidecar(**{**LOGIN, **extra})


def assert_unavailable(reply: Reply) -> None:
    assert reply.status == 503, reply
    assert reply.body["error"] == "temporarily_unavailable"
    assert reply.headers["Retry-After"].isdigit()
    assert "WWW-Authenticate" not in reply.headers  # not the caller's credential's fault


# -- accepted: the same caller as the JWT path -------------------------------------------------


async def test_an_active_opaque_token_is_admitted_as_its_jwt_twin_would_be(
    make_sidecar: SidecarFactory, idp: FakeIdp, endpoint: FakeIntrospection,
    upstream: FakeUpstream,
) -> None:
    sidecar = await introspecting(make_sidecar, TOKEN_VALIDATION="auto", FORWARD_IDENTITY="true",
                                  GROUPS_CLAIM="groups")
    claims = {"sub": "alice", "email": "alice@example.com", "email_verified": True,
              "groups": ["admins", "dev"]}
    opaque = endpoint.issue(**claims)
    twin = idp.mint(claims=claims)

    assert (await send(sidecar, opaque)).status == 200
    assert (await send(sidecar, twin)).status == 200

    introspected, verified = ({k.lower(): v for k, v in r.headers.items()}
                              for r in upstream.requests)
    assert "authorization" not in introspected
    identity = ("x-forwarded-user", "x-forwarded-email", "x-forwarded-groups",
                "x-forwarded-issuer")
    assert [introspected.get(h) for h in identity] == [
        "alice", "alice@example.com", "admins,dev", idp.issuer]
    assert [introspected.get(h) for h in identity] == [verified.get(h) for h in identity]
    [call] = endpoint.calls  # the JWT never reached the introspection endpoint
    assert call.form == {"token": opaque, "token_type_hint": "access_token"}
    assert call.authorization is not None
    assert call.authorization.startswith("Basic ")


async def test_basic_credentials_are_form_urlencoded_before_base64(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    sidecar = await introspecting(make_sidecar)
    assert (await send(sidecar, endpoint.issue())).status == 200
    [call] = endpoint.calls
    assert call.authorization is not None
    sent = base64.b64decode(call.authorization.removeprefix("Basic ")).decode()
    assert sent == f"{quote_plus(CLIENT_ID)}:{quote_plus(CLIENT_SECRET)}"  # RFC 6749 §2.3.1
    assert "client_secret" not in call.form


@pytest.mark.parametrize("source", ["configured", "introspection", "token endpoint"])
async def test_client_secret_post_is_configured_or_chosen_from_the_metadata(
    make_sidecar: SidecarFactory, idp: FakeIdp, endpoint: FakeIntrospection, source: str,
) -> None:
    """Without introspection_endpoint_auth_methods_supported (oidc-provider lists none) the
    token endpoint's methods decide: the same client authentication (RFC 8414 §2)."""
    endpoint.method = "client_secret_post"
    extra: dict[str, str] = {}
    if source == "configured":
        extra = {"INTROSPECTION_AUTH_METHOD": "client_secret_post"}
        idp.document_changes["token_endpoint_auth_methods_supported"] = ["client_secret_basic"]
    elif source == "introspection":
        idp.document_changes["introspection_endpoint_auth_methods_supported"] = [
            "private_key_jwt", "client_secret_post"]
        idp.document_changes["token_endpoint_auth_methods_supported"] = ["client_secret_basic"]
    else:
        idp.document_changes["token_endpoint_auth_methods_supported"] = [
            "private_key_jwt", "client_secret_post"]
    sidecar = await introspecting(make_sidecar, **extra)
    assert (await send(sidecar, endpoint.issue())).status == 200
    [call] = endpoint.calls
    assert call.authorization is None
    assert (call.form["client_id"], call.form["client_secret"]) == (CLIENT_ID, CLIENT_SECRET)


async def test_audience_is_read_from_the_configured_claim(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    sidecar = await introspecting(make_sidecar, JWT_AUDIENCE_CLAIM="client_id")
    assert (await send(sidecar, endpoint.issue(aud=None, client_id=AUDIENCE))).status == 200
    assert await refusal(sidecar, endpoint.issue(aud=AUDIENCE, client_id="other")) == (
        401, "wrong_audience")


async def test_with_the_audience_in_client_id_an_answer_must_mark_an_access_token(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    """client_id names the client, which a refresh token names too: an answer that marks
    neither kind (oidc-provider's refresh tokens: no token_type, no aud) is refused."""
    sidecar = await introspecting(make_sidecar, JWT_AUDIENCE_CLAIM="client_id")
    unmarked = endpoint.issue(aud=None, client_id=AUDIENCE, token_type=None)
    assert await refusal(sidecar, unmarked) == (401, "token_type_missing")
    used = endpoint.issue(aud=None, client_id=AUDIENCE, token_type=None,
                          token_use="access_token")
    assert (await send(sidecar, used)).status == 200
    refresh = endpoint.issue(aud=None, client_id=AUDIENCE, token_type=None,
                             token_use="refresh_token")
    assert await refusal(sidecar, refresh) == (401, "refresh_token")
    # With the audience in aud, the resource itself is named: no mark is needed.
    by_aud = await introspecting(make_sidecar)
    assert (await send(by_aud, endpoint.issue(token_type=None))).status == 200


async def test_a_keycloak_offline_token_is_a_refresh_token(
    make_sidecar: SidecarFactory, idp: FakeIdp, endpoint: FakeIntrospection,
) -> None:
    """Keycloak introspects its refresh tokens too, answering their claims and client_id (their
    azp): typ "Refresh", or "Offline" for one issued with offline_access (it outlives the
    session). With the audience read from client_id, which a refresh token names as its access
    token does, only typ tells them apart."""
    sidecar = await introspecting(make_sidecar, JWT_AUDIENCE_CLAIM="client_id")
    access = endpoint.issue(aud="account", client_id=AUDIENCE, typ="Bearer", token_type=None)
    assert (await send(sidecar, access)).status == 200
    for typ in ("Offline", "Refresh"):
        refresh = endpoint.issue(aud=idp.issuer, client_id=AUDIENCE, typ=typ, token_type=None)
        assert await refusal(sidecar, refresh) == (401, "refresh_token"), typ


async def test_an_answer_without_exp_is_refused_unless_allowed(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    strict = await introspecting(make_sidecar)
    assert await refusal(strict, endpoint.issue(exp=None)) == (401, "claim_missing")
    lenient = await introspecting(make_sidecar, INTROSPECTION_REQUIRE_EXP="false")
    assert (await send(lenient, endpoint.issue(exp=None))).status == 200


async def test_an_exp_of_null_is_refused_never_a_500(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection, upstream: FakeUpstream,
) -> None:
    """An IdP that writes absent fields as null: `"exp": null` is no expiry to accept, even
    where INTROSPECTION_REQUIRE_EXP=false lets an answer without exp in (as a null nbf or iat
    is refused: pyjwt's int(None))."""
    for strictness, reason in (("true", "claim_missing"), ("false", "invalid")):
        sidecar = await introspecting(make_sidecar, INTROSPECTION_REQUIRE_EXP=strictness)
        token = endpoint.issue()
        endpoint.answers[token]["exp"] = None
        assert await refusal(sidecar, token) == (401, reason)
    assert upstream.requests == []


# -- refused: the same rules as a JWT's claims ---------------------------------------------------

NOW = int(time.time())
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("inactive", {"active": False}, "inactive"),
    ("active as a string", {"active": "true"}, "inactive"),
    ("expired", {"exp": NOW - 3600}, "expired"),
    ("not yet valid", {"nbf": NOW + 3600}, "not_yet_valid"),
    ("issued in the future", {"iat": NOW + 3600}, "not_yet_valid"),
    ("another audience", {"aud": ["https://other.example/mcp"]}, "wrong_audience"),
    ("no audience", {"aud": None}, "claim_missing"),
    ("another issuer", {"iss": "https://evil.example"}, "wrong_issuer"),
    ("a refresh token", {"token_type": "refresh_token"}, "refresh_token"),
    ("a Keycloak refresh token", {"token_type": None, "typ": "Refresh"}, "refresh_token"),
    ("an ID token", {"token_type": None, "typ": "ID"}, "id_token"),
    ("sender-constrained", {"cnf": {"jkt": "abc"}}, "sender_constrained"),
    ("no sub", {"sub": None}, "claim_missing"),
    ("a sub that is no string", {"sub": 42}, "claim_invalid"),
    ("exp as a string", {"exp": str(NOW + 300)}, "claim_invalid"),
]


@pytest.mark.parametrize(("claims", "reason"), [
    pytest.param(claims, reason, id=what) for what, claims, reason in REFUSED])
async def test_an_answer_that_fails_a_claim_rule_is_a_401(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection, upstream: FakeUpstream,
    claims: dict[str, Any], reason: str,
) -> None:
    sidecar = await introspecting(make_sidecar)
    token = endpoint.issue(**claims)
    reply = await send(sidecar, token)
    assert reply.status == 401
    assert 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
    assert await refusal(sidecar, token) == (401, reason)  # replayed from the negative cache
    assert len(endpoint.calls) == 1
    assert upstream.requests == []


async def test_an_unknown_token_is_inactive_and_an_unsupported_token_type_too(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    sidecar = await introspecting(make_sidecar)
    assert await refusal(sidecar, "never-issued-token") == (401, "inactive")
    endpoint.status, endpoint.error_code = 400, "unsupported_token_type"
    assert await refusal(sidecar, "another-token") == (401, "inactive")


async def test_an_answer_from_no_issuer_is_ours_and_the_principal_names_our_issuer(
    make_sidecar: SidecarFactory, idp: FakeIdp, endpoint: FakeIntrospection,
    upstream: FakeUpstream,
) -> None:
    sidecar = await introspecting(make_sidecar, FORWARD_IDENTITY="true")
    assert (await send(sidecar, endpoint.issue(iss=None))).status == 200
    headers = {k.lower(): v for k, v in upstream.requests[0].headers.items()}
    assert headers["x-forwarded-issuer"] == idp.issuer


async def test_lone_surrogates_in_an_answer_are_forwarded_percent_encoded(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection, upstream: FakeUpstream,
) -> None:
    """JSON lets an IdP answer "\\ud800", which no UTF-8 text holds: an identity header
    carries its bytes percent-encoded (as any non-ASCII), never a 500."""
    sidecar = await introspecting(make_sidecar, FORWARD_IDENTITY="true", GROUPS_CLAIM="groups")
    token = endpoint.issue(email="a\udc00@example.com", groups=["g\ud800", "ok"])
    assert (await send(sidecar, token)).status == 200
    headers = {k.lower(): v for k, v in upstream.requests[0].headers.items()}
    assert headers["x-forwarded-email"] == "a%ED%B0%80@example.com"
    assert headers["x-forwarded-groups"] == "g%ED%A0%80,ok"


# -- the cache: one call per token, revocation after the window ----------------------------------


async def test_repeated_requests_with_one_token_make_one_call(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    sidecar = await introspecting(make_sidecar)
    token = endpoint.issue()
    for _ in range(5):
        assert (await send(sidecar, token)).status == 200
    assert len(endpoint.calls) == 1


async def test_a_revoked_token_works_until_the_cache_window_ends_then_is_refused(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    sidecar = await introspecting(make_sidecar, INTROSPECTION_CACHE_SECONDS="1")
    token = endpoint.issue()
    assert (await send(sidecar, token)).status == 200
    endpoint.answers[token] = {"active": False}  # revoked at the IdP
    assert (await send(sidecar, token)).status == 200  # within the window: the cached answer
    await asyncio.sleep(1.1)
    assert await refusal(sidecar, token) == (401, "inactive")
    assert len(endpoint.calls) == 2


async def test_the_cache_never_outlives_the_tokens_exp(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    sidecar = await introspecting(make_sidecar, JWT_LEEWAY_SECONDS="0")
    exp = int(time.time()) + 2  # at least a second ahead, whatever the fraction now
    token = endpoint.issue(exp=exp)
    assert (await send(sidecar, token)).status == 200
    await asyncio.sleep(max(0.0, exp - time.time()) + 0.05)
    endpoint.answers[token] = {"active": False}  # what an IdP answers for an expired token
    assert await refusal(sidecar, token) == (401, "inactive")
    assert len(endpoint.calls) == 2  # asked again, not the cached answer


async def test_a_refusal_is_replayed_for_the_negative_window_then_asked_again(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    sidecar = await introspecting(make_sidecar, INTROSPECTION_NEGATIVE_CACHE_SECONDS="1")
    token = endpoint.issue(aud="https://other.example/mcp")
    for _ in range(3):
        assert await refusal(sidecar, token) == (401, "wrong_audience")
    assert len(endpoint.calls) == 1
    endpoint.answers[token]["aud"] = AUDIENCE
    await asyncio.sleep(1.1)
    assert (await send(sidecar, token)).status == 200
    assert len(endpoint.calls) == 2


async def test_concurrent_requests_with_one_token_share_one_call(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    sidecar = await introspecting(make_sidecar)
    token = endpoint.issue()
    endpoint.hold = asyncio.Event()
    requests = [asyncio.create_task(send(sidecar, token)) for _ in range(8)]
    await wait_until(lambda: endpoint.in_flight == 1)
    await asyncio.sleep(0.1)  # the other seven are waiting for that call, not making theirs
    endpoint.hold.set()
    replies = await asyncio.gather(*requests)
    assert [r.status for r in replies] == [200] * 8
    assert len(endpoint.calls) == 1


async def test_calls_in_flight_are_bounded(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    sidecar = await introspecting(make_sidecar, INTROSPECTION_MAX_CONCURRENCY="2")
    endpoint.delay = 0.2
    tokens = [endpoint.issue(sub=f"user-{i}") for i in range(6)]
    replies = await asyncio.gather(*(send(sidecar, token) for token in tokens))
    assert [r.status for r in replies] == [200] * 6
    assert len(endpoint.calls) == 6
    assert endpoint.most_in_flight == 2


async def test_a_quarter_of_the_slots_is_kept_for_re_checks_of_admitted_tokens(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    """Made-up or new tokens fill at most three of four slots: a caller already signed in
    whose answer went stale is re-checked on the fourth while they wait."""
    sidecar = await introspecting(make_sidecar, INTROSPECTION_MAX_CONCURRENCY="4",
                                  INTROSPECTION_CACHE_SECONDS="1",
                                  RATE_LIMIT_UNAUTHENTICATED_RPM="100")
    known = endpoint.issue(sub="known")
    assert (await send(sidecar, known)).status == 200
    await asyncio.sleep(1.1)  # its answer is stale now; it still vouches until exp
    endpoint.hold = asyncio.Event()
    strangers = [asyncio.create_task(send(sidecar, endpoint.issue(sub=f"new-{i}")))
                 for i in range(5)]
    try:
        await wait_until(lambda: endpoint.in_flight == 3)
        recheck = asyncio.create_task(send(sidecar, known))
        await wait_until(lambda: endpoint.in_flight == 4)
        assert endpoint.calls[-1].form["token"] == known  # not a fourth stranger
    finally:
        endpoint.hold.set()
    assert (await recheck).status == 200
    assert [(await task).status for task in strangers] == [200] * 5
    assert endpoint.most_in_flight == 4


async def test_the_timeout_counts_the_wait_for_a_free_slot(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    """One slot; each call takes 0.7 s, under the 1 s timeout. The second token waits about
    0.7 s for the slot, then 0.7 s for its call: past the timeout, so a 503."""
    sidecar = await introspecting(make_sidecar, INTROSPECTION_MAX_CONCURRENCY="1",
                                  INTROSPECTION_TIMEOUT_SECONDS="1")
    endpoint.delay = 0.7
    first, second = endpoint.issue(sub="first"), endpoint.issue(sub="second")
    ahead = asyncio.create_task(send(sidecar, first))
    await wait_until(lambda: endpoint.in_flight == 1)
    behind = await send(sidecar, second)
    assert (await ahead).status == 200
    assert_unavailable(behind)
    assert endpoint.most_in_flight == 1
    endpoint.delay = 0.0
    assert (await send(sidecar, second)).status == 200  # the timeout was not cached


# -- the IdP's trouble: 503, never an accept, never cached ---------------------------------------


async def test_a_slow_idp_is_a_503_with_retry_after(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection, upstream: FakeUpstream,
) -> None:
    sidecar = await introspecting(make_sidecar, INTROSPECTION_TIMEOUT_SECONDS="0.3")
    endpoint.delay = 2.0
    token = endpoint.issue()
    assert await refusal(sidecar, token) == (503, "introspection_timeout")
    endpoint.delay = 0.0
    assert (await send(sidecar, token)).status == 200
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(("status", "body"), [(500, None), (502, None), (200, b"<html>oops"),
                                              (200, b"[1, 2]"), (302, None)])
async def test_an_idp_error_or_garbage_is_a_503_and_not_remembered(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection, status: int, body: bytes | None,
) -> None:
    sidecar = await introspecting(make_sidecar)
    token = endpoint.issue()
    endpoint.status, endpoint.body = status, body
    reply = await send(sidecar, token)
    assert_unavailable(reply)
    endpoint.status, endpoint.body = 200, None
    assert (await send(sidecar, token)).status == 200


async def test_an_idp_that_is_down_is_a_503(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    sidecar = await introspecting(
        make_sidecar, INTROSPECTION_ENDPOINT=f"http://127.0.0.1:{free_port()}/introspect")
    assert await refusal(sidecar, endpoint.issue()) == (503, "introspection_unavailable")


async def test_no_known_endpoint_is_a_503_and_one_clear_log_event(
    make_sidecar: SidecarFactory, idp: FakeIdp, endpoint: FakeIntrospection,
) -> None:
    idp.document_changes["introspection_endpoint"] = None
    sidecar = await introspecting(make_sidecar)
    with capture_logs() as events:
        for _ in range(3):
            assert_unavailable(await send(sidecar, endpoint.issue()))
    [event] = [e for e in events if e["event"] == "introspection_failed"]
    assert event["reason"] == "introspection_endpoint_unknown"
    assert "INTROSPECTION_ENDPOINT" in event["detail"]
    assert endpoint.calls == []


async def test_refused_client_credentials_are_a_503_logged_once_without_the_secret(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    endpoint.client_secret = "what the IdP really has"
    sidecar = await introspecting(make_sidecar)
    tokens = [endpoint.issue() for _ in range(3)]
    with capture_logs() as events:
        for token in tokens:
            assert_unavailable(await send(sidecar, token))
    [event] = [e for e in events if e["event"] == "introspection_client_refused"]
    assert "401" in event["detail"]
    assert "invalid_client" in event["detail"]
    assert len(endpoint.calls) == 3  # not cached: a fixed secret works at once
    logged = str(events)
    basic = endpoint.calls[0].authorization
    assert basic is not None
    for secret in (*tokens, CLIENT_SECRET, quote_plus(CLIENT_SECRET), basic,
                   basic.removeprefix("Basic ")):
        assert secret not in logged


async def test_no_token_or_secret_is_ever_logged(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    with capture_logs() as events:
        sidecar = await introspecting(make_sidecar)
        good, bad = endpoint.issue(), endpoint.issue(aud="https://other.example/mcp")
        assert (await send(sidecar, good)).status == 200
        assert (await send(sidecar, bad)).status == 401
        endpoint.status = 500
        assert (await send(sidecar, endpoint.issue())).status == 503
    logged = str(events)
    assert "introspection_failed" in logged  # the log did see the trouble
    basic = endpoint.calls[0].authorization
    assert basic is not None
    for secret in (good, bad, CLIENT_SECRET, basic.removeprefix("Basic ")):
        assert secret not in logged


# -- auto mode: the shape decides, a JWT never falls through ------------------------------------


async def test_auto_verifies_jwts_here_and_introspects_the_rest(
    make_sidecar: SidecarFactory, idp: FakeIdp, endpoint: FakeIntrospection,
) -> None:
    sidecar = await introspecting(make_sidecar, TOKEN_VALIDATION="auto")
    assert (await send(sidecar, idp.mint())).status == 200
    forged = idp.mint(new_rsa("rsa-1"))  # the published kid, another key
    assert await refusal(sidecar, forged) == (401, "bad_signature")
    expired = idp.mint(claims={"exp": int(time.time()) - 3600})
    assert await refusal(sidecar, expired) == (401, "expired")
    assert endpoint.calls == []  # no failing JWT was handed to the IdP for a second opinion
    opaque = endpoint.issue()
    assert (await send(sidecar, opaque)).status == 200
    assert [call.form["token"] for call in endpoint.calls] == [opaque]


async def test_introspection_mode_introspects_jwts_too(
    make_sidecar: SidecarFactory, idp: FakeIdp, endpoint: FakeIntrospection,
) -> None:
    sidecar = await introspecting(make_sidecar)
    jwt_token = idp.mint()
    assert await refusal(sidecar, jwt_token) == (401, "inactive")  # the IdP does not know it
    assert [call.form["token"] for call in endpoint.calls] == [jwt_token]


def test_what_looks_like_a_jws() -> None:
    assert looks_like_jws("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln")  # {"alg":"RS256"}
    assert not looks_like_jws("eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiJ4In0.c2ln")  # {"typ":"JWT"}: no alg
    assert not looks_like_jws("a.b.c")  # not JSON
    assert not looks_like_jws("2YotnFZFEjr1zCsicMWpAA")  # RFC 6749's opaque example
    assert not looks_like_jws("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0")  # two segments
    assert not looks_like_jws("eyJhbGciOiJSUzI1NiJ9..c2ln")  # an empty segment
    assert not looks_like_jws("WyJhbGciXQ.eyJzdWIiOiJ4In0.c2ln")  # ["alg"]: not an object


# -- the gate's budgets and the policy apply to introspected callers -----------------------------


async def test_the_ip_budget_is_spent_before_any_call_to_the_idp(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    sidecar = await introspecting(make_sidecar, RATE_LIMIT_UNAUTHENTICATED_RPM="3")
    for i in range(3):
        assert (await send(sidecar, f"unknown-token-{i}")).status == 401
    assert len(endpoint.calls) == 3
    assert (await send(sidecar, "unknown-token-4")).status == 429
    assert len(endpoint.calls) == 3  # refused before the IdP was asked


async def test_a_re_check_of_an_admitted_token_is_not_charged_to_the_ip_budget(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    """An opaque token is asked about again each time its answer leaves the cache; like a JWT
    (one unit in its lifetime) it pays the client IP's budget once: the re-checks of a token the
    IdP vouched for are free, so many users behind one egress IP are not throttled by their own
    valid tokens. New tokens still pay, and a revoked token is refused at its re-check."""
    sidecar = await introspecting(make_sidecar, RATE_LIMIT_UNAUTHENTICATED_RPM="2",
                                  INTROSPECTION_CACHE_SECONDS="1")
    token = endpoint.issue()
    for _ in range(3):
        assert (await send(sidecar, token)).status == 200
        assert (await send(sidecar, token)).status == 200  # a hit: free
        await asyncio.sleep(1.1)  # the answer leaves the cache
    assert len(endpoint.calls) == 3  # asked again each window, paid once
    endpoint.answers[token] = {"active": False}  # revoked at the IdP
    assert await refusal(sidecar, token) == (401, "inactive")  # the re-check, still free
    assert (await send(sidecar, endpoint.issue())).status == 200  # the second unit
    assert (await send(sidecar, endpoint.issue())).status == 429  # a stranger's guess pays
    assert len(endpoint.calls) == 5


async def test_allow_lists_and_the_subject_budget_judge_introspected_callers(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection, upstream: FakeUpstream,
) -> None:
    sidecar = await introspecting(make_sidecar, ALLOW_ALL_AUTHENTICATED="false",
                                  ALLOW_SUBS="alice", RATE_LIMIT_RPM="2")
    alice, bob = endpoint.issue(sub="alice"), endpoint.issue(sub="bob")
    assert await refusal(sidecar, bob) == (403, "not_allowed")
    assert [(await send(sidecar, alice)).status for _ in range(3)] == [200, 200, 429]
    assert len(upstream.requests) == 2


# -- RFC 9701 signed answers --------------------------------------------------------------------


@pytest.fixture
def signing(idp: FakeIdp, endpoint: FakeIntrospection) -> FakeIntrospection:
    idp.document_changes["introspection_signing_alg_values_supported"] = ["RS256"]
    endpoint.signing_key = idp.keys[0]
    return endpoint


async def test_a_signed_answer_verified_with_the_jwks_is_accepted(
    make_sidecar: SidecarFactory, signing: FakeIntrospection,
) -> None:
    sidecar = await introspecting(make_sidecar)
    assert (await send(sidecar, signing.issue())).status == 200
    assert SIGNED in signing.calls[0].accept
    assert await refusal(sidecar, signing.issue(aud="https://other.example/mcp")) == (
        401, "wrong_audience")  # the signed answer's content is judged like any other


BAD_SIGNED: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("another typ", {"typ": "JWT"}, {}),
    ("an access token's typ", {"typ": "at+jwt"}, {}),
    ("for another client", {}, {"aud": "someone-else"}),
    ("from another issuer", {}, {"iss": "https://evil.example"}),
    ("stale", {}, {"iat": int(time.time()) - 3600}),
    ("no token_introspection", {}, {"token_introspection": None}),
]


@pytest.mark.parametrize(("header", "claims"), [
    pytest.param(header, claims, id=what) for what, header, claims in BAD_SIGNED])
async def test_a_signed_answer_that_does_not_check_out_is_a_503(
    make_sidecar: SidecarFactory, signing: FakeIntrospection, upstream: FakeUpstream,
    header: dict[str, Any], claims: dict[str, Any],
) -> None:
    sidecar = await introspecting(make_sidecar)
    signing.signed_header, signing.signed_claims = header, claims
    assert await refusal(sidecar, signing.issue()) == (503, "introspection_bad_signature")
    assert upstream.requests == []


async def test_a_signed_answer_by_an_unpublished_key_is_a_503(
    make_sidecar: SidecarFactory, signing: FakeIntrospection, upstream: FakeUpstream,
) -> None:
    sidecar = await introspecting(make_sidecar)
    signing.signing_key = new_rsa("rsa-1")  # the published kid, another key
    assert await refusal(sidecar, signing.issue()) == (503, "introspection_bad_signature")
    assert upstream.requests == []


# -- configuration and metrics --------------------------------------------------------------------


def test_configuration_problems_are_listed_together(
    idp: FakeIdp, upstream: FakeUpstream,
) -> None:
    with pytest.raises(ConfigError) as raised:
        load(sidecar_env(idp, upstream, TOKEN_VALIDATION="auto",
                         INTROSPECTION_ENDPOINT="http://idp.example/introspect",
                         INTROSPECTION_CACHE_SECONDS="soon",
                         INTROSPECTION_MAX_CONCURRENCY="0"))
    problems = "\n".join(raised.value.problems)
    for expected in ("INTROSPECTION_ENDPOINT=", "plain http off loopback",
                     "needs INTROSPECTION_CLIENT_ID", "needs INTROSPECTION_CLIENT_SECRET",
                     "INTROSPECTION_CACHE_SECONDS='soon' is not a number",
                     "INTROSPECTION_MAX_CONCURRENCY=0 is out of range"):
        assert expected in problems
    with pytest.raises(ConfigError, match="TOKEN_VALIDATION='opaque' is not one of"):
        load(sidecar_env(idp, upstream, TOKEN_VALIDATION="opaque"))
    none = load(sidecar_env(idp, upstream, TOKEN_VALIDATION="introspection",
                            INTROSPECTION_CLIENT_ID="x", INTROSPECTION_AUTH_METHOD="none"))
    assert none.tokens.introspection is not None
    # An endpoint that takes no client authentication needs no client id either.
    anonymous = load(sidecar_env(idp, upstream, TOKEN_VALIDATION="introspection",
                                 INTROSPECTION_AUTH_METHOD="none"))
    assert anonymous.tokens.introspection is not None
    assert anonymous.tokens.introspection.client_id == ""


def test_introspection_variables_in_jwt_mode_are_warned_about(
    idp: FakeIdp, upstream: FakeUpstream,
) -> None:
    config = load(sidecar_env(idp, upstream, INTROSPECTION_CLIENT_ID="x"))
    assert config.tokens.validation == "jwt"
    assert config.tokens.introspection is None
    assert any("INTROSPECTION_CLIENT_ID set, but TOKEN_VALIDATION=jwt" in warning
               for warning in config.warnings)


def test_the_secret_is_masked_and_never_given_to_a_child(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Any,
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    config = load(sidecar_env(idp, upstream, **{**LOGIN, "INTROSPECTION_CLIENT_SECRET": ""},
                              INTROSPECTION_CLIENT_SECRET_FILE=str(secret_file)))
    assert config.tokens.introspection is not None
    assert config.tokens.introspection.client_secret == "from-a-file"
    assert "from-a-file" in config.secrets
    assert {"INTROSPECTION_CLIENT_SECRET", "INTROSPECTION_CLIENT_SECRET_FILE"} <= (
        CHILD_ENV_FORBIDDEN)
    with pytest.raises(ConfigError, match="MCP_SPAWN_ENV lists INTROSPECTION_CLIENT_SECRET"):
        load({**sidecar_env(idp, upstream, **LOGIN), "MCP_UPSTREAM_URL": "",
              "MCP_SPAWN_CMD": "true", "MCP_SPAWN_ENV": "INTROSPECTION_CLIENT_SECRET"})


async def test_calls_cache_lookups_and_call_time_are_counted(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    port = free_port()
    sidecar = await introspecting(make_sidecar, METRICS_PORT=str(port))
    token = endpoint.issue()
    for _ in range(3):
        assert (await send(sidecar, token)).status == 200
    assert (await send(sidecar, "unknown")).status == 401
    assert (await send(sidecar, "unknown")).status == 401
    found = await scrape(port)
    assert found.value("introspection_calls_total", outcome="active") == 1
    assert found.value("introspection_calls_total", outcome="inactive") == 1
    assert found.value("introspection_calls_total", outcome="timeout") == 0
    assert found.value("introspection_cache_total", result="hit") == 2
    assert found.value("introspection_cache_total", result="negative_hit") == 1
    assert found.value("introspection_cache_total", result="miss") == 2
    assert found.value("introspection_seconds_count") == 2
    assert found.value("auth_failures_total", reason="inactive") == 2


def test_jwt_mode_builds_no_introspector(idp: FakeIdp, upstream: FakeUpstream) -> None:
    assert INTROSPECTOR not in create_app(load(sidecar_env(idp, upstream)))
    assert INTROSPECTOR in create_app(load(sidecar_env(idp, upstream, **LOGIN)))


async def test_a_metadata_endpoint_that_breaks_the_url_rule_is_never_posted_to(
    make_sidecar: SidecarFactory, idp: FakeIdp, endpoint: FakeIntrospection,
) -> None:
    idp.document_changes["introspection_endpoint"] = endpoint.url.replace("http://", "ftp://")
    sidecar = await introspecting(make_sidecar)
    assert await refusal(sidecar, endpoint.issue()) == (503, "introspection_endpoint_unknown")
    assert endpoint.calls == []
    assert not acceptable_url("http://idp.example/introspect", "https://idp.example")
    assert acceptable_url("https://idp.example/introspect", "https://idp.example")
    assert acceptable_url("http://127.0.0.1:9/introspect", "http://127.0.0.1:8")


async def test_explain_reports_every_check_of_the_answer_and_keeps_it(
    make_sidecar: SidecarFactory, endpoint: FakeIntrospection,
) -> None:
    sidecar = await introspecting(make_sidecar)
    introspector = sidecar.app[INTROSPECTOR]
    token = endpoint.issue(aud="https://other.example/mcp", nbf=int(time.time()) + 3600)
    explained = await introspector.explain(token)
    assert explained.error is not None
    assert explained.error.reason == "not_yet_valid"  # the first failure, as verify() raises
    failed = {name: error.reason for name, error in explained.outcomes.items() if error}
    assert failed == {"nbf": "not_yet_valid", "aud": "wrong_audience"}
    assert explained.outcomes["active"] is None
    assert explained.outcomes["sub"] is None
    assert explained.answer == endpoint.answers[token]
    assert explained.endpoint == endpoint.url
    with pytest.raises(TokenError) as raised:
        await introspector.verify(token)
    assert raised.value.reason == "not_yet_valid"
    endpoint.status = 500
    unavailable = await introspector.explain(token)
    assert unavailable.error is not None
    assert unavailable.outcomes == {"introspection": unavailable.error}
    assert unavailable.error.status == 503
