"""The tests' real provider issues opaque tokens and really introspects and revokes them.

No sidecar here: these pin what panva's oidc-provider (tests/oidc/provider.mjs, a real child
process on loopback) answers at its RFC 7662 introspection, RFC 9701 signed introspection and
RFC 7009 revocation endpoints, so the sidecar's introspection tests stand on known ground and a
change of the provider (an upgrade, a new option) that moves an answer shows up here first.
Needs `npm ci --prefix tests/oidc`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from opaque_tokens import (
    authorization_code_tokens,
    is_jws,
    opaque_client_credentials_token,
    opaque_refresh_token,
    refresh,
)
from real_idp import (
    INTROSPECTION_JWT,
    ConfidentialClient,
    IntrospectionControl,
    RealIdp,
    RealIdpError,
    client_authentication,
    client_credentials_token,
    discover,
    introspect,
    introspect_jwt,
    introspection_answer,
    introspection_control,
    revoke,
    run_oidc_provider,
)

pytestmark = pytest.mark.slow  # a node child process per test

RESOURCE = "http://127.0.0.1:8931/mcp"  # any absolute URL: the provider never calls it
RS = ConfidentialClient("resource-server", "rs-secret")
RS_POST = ConfidentialClient("resource-server-post", "rs-post-secret", "client_secret_post")
OTHER_CLIENT = ConfidentialClient("someone-else", "someone-else-secret")
EXPIRY_WAIT = 15.0  # bound on waiting for a 3 s token to expire
HTTP_TIMEOUT = 10.0


@pytest.fixture
async def opaque_idp() -> AsyncIterator[RealIdp]:
    async with run_oidc_provider(
        access_token_format="opaque", introspection_clients=[RS, RS_POST],
        auto_login="user-1",
        static_clients=[f"{OTHER_CLIENT.client_id}:{OTHER_CLIENT.client_secret}:"
                        "http://127.0.0.1/other-callback"],
    ) as idp:
        yield idp


def _active_claims(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer without its times (checked separately), to compare whole."""
    return {k: v for k, v in answer.items() if k not in {"exp", "iat"}}


async def test_an_opaque_client_credentials_token_is_not_a_jws_and_introspects_as_active(
    opaque_idp: RealIdp,
) -> None:
    before = int(time.time())
    token = await opaque_client_credentials_token(opaque_idp, RESOURCE, "mcp:read")
    assert not is_jws(token)
    assert len(token) == 43  # 256 random bits, base64url (oidc-provider's opaque format)
    assert "." not in token

    answer = await introspect(opaque_idp, token, RS)

    assert _active_claims(answer) == {
        "active": True,
        "sub": opaque_idp.client_id,  # added by provider.mjs (--client-credentials-sub)
        "client_id": opaque_idp.client_id,
        "iss": opaque_idp.issuer,
        "aud": RESOURCE,  # RFC 8707: a string, the one resource asked for
        "scope": "mcp:read",
        "token_type": "Bearer",
    }, answer
    assert before <= answer["iat"] <= int(time.time())
    assert answer["exp"] == answer["iat"] + 300  # --access-token-ttl default


async def test_the_same_answer_comes_to_a_client_secret_post_introspection_client(
    opaque_idp: RealIdp,
) -> None:
    token = await opaque_client_credentials_token(opaque_idp, RESOURCE)
    by_post = await introspect(opaque_idp, token, RS_POST)
    assert by_post == await introspect(opaque_idp, token, RS)
    assert by_post["active"] is True
    # oidc-provider takes either secret method from a client registered with one of them.
    as_basic = ConfidentialClient(RS_POST.client_id, RS_POST.client_secret)
    assert await introspect(opaque_idp, token, as_basic) == by_post


async def test_without_the_client_credentials_sub_the_answer_has_no_sub() -> None:
    async with run_oidc_provider(access_token_format="opaque", introspection_clients=[RS],
                                 client_credentials_sub="none") as idp:
        token = await opaque_client_credentials_token(idp, RESOURCE)
        answer = await introspect(idp, token, RS)
    assert answer["active"] is True
    assert "sub" not in answer, answer  # oidc-provider's own answer: no account, no sub
    assert answer["client_id"] == idp.client_id


async def test_an_authorization_code_access_token_names_the_user_and_the_resource(
    opaque_idp: RealIdp,
) -> None:
    tokens = await authorization_code_tokens(opaque_idp, RESOURCE)
    assert not is_jws(tokens.access_token)
    assert tokens.scope == "mcp:read"  # the resource's scope; openid/offline_access are the AS's
    assert is_jws(tokens.raw["id_token"])  # the ID token stays a JWT

    answer = await introspect(opaque_idp, tokens.access_token, RS)

    assert _active_claims(answer) == {
        "active": True, "sub": "user-1", "client_id": opaque_idp.client_id,
        "iss": opaque_idp.issuer, "aud": RESOURCE, "scope": "mcp:read", "token_type": "Bearer",
    }, answer


async def test_a_wrong_client_secret_is_refused_with_401(opaque_idp: RealIdp) -> None:
    token = await opaque_client_credentials_token(opaque_idp, RESOURCE)
    wrong = ConfidentialClient(RS.client_id, "not-the-secret")

    answer = await introspection_answer(opaque_idp, token, wrong)

    assert answer.status == 401, answer
    assert json.loads(answer.text) == {
        "error": "invalid_client", "error_description": "client authentication failed",
    }
    with pytest.raises(RealIdpError) as raised:
        await introspect(opaque_idp, token, wrong)
    assert raised.value.status == 401


async def test_unknown_and_garbage_tokens_are_inactive(opaque_idp: RealIdp) -> None:
    assert await introspect(opaque_idp, "x" * 43, RS) == {"active": False}
    assert await introspect(opaque_idp, "not a token at all", RS) == {"active": False}


async def test_a_revoked_access_token_is_inactive(opaque_idp: RealIdp) -> None:
    token = await opaque_client_credentials_token(opaque_idp, RESOURCE)
    kept = await opaque_client_credentials_token(opaque_idp, RESOURCE)
    assert (await introspect(opaque_idp, token, RS))["active"] is True

    await revoke(opaque_idp, token, opaque_idp.client)  # by the client it was issued to

    assert await introspect(opaque_idp, token, RS) == {"active": False}
    assert (await introspect(opaque_idp, kept, RS))["active"] is True  # only that one
    await revoke(opaque_idp, token, opaque_idp.client)  # RFC 7009 §2.2: again is fine


async def test_an_introspection_client_may_revoke_and_another_client_may_not(
    opaque_idp: RealIdp,
) -> None:
    token = await opaque_client_credentials_token(opaque_idp, RESOURCE)

    with pytest.raises(RealIdpError) as raised:
        await revoke(opaque_idp, token, OTHER_CLIENT)
    assert raised.value.status == 400
    assert (await introspect(opaque_idp, token, RS))["active"] is True

    await revoke(opaque_idp, token, RS)
    assert await introspect(opaque_idp, token, RS) == {"active": False}


async def test_another_client_learns_nothing_about_a_token_not_issued_to_it(
    opaque_idp: RealIdp,
) -> None:
    """Only introspection clients see every token (provider.mjs allowedPolicy): a confidential
    client that is not one authenticates fine and is told active false, as RFC 7662 §2.2
    allows; the token's own client still sees it."""
    token = await opaque_client_credentials_token(opaque_idp, RESOURCE)
    assert await introspect(opaque_idp, token, OTHER_CLIENT) == {"active": False}
    assert (await introspect(opaque_idp, token, opaque_idp.client))["active"] is True


async def test_an_expired_opaque_token_is_inactive() -> None:
    # 3 s, not 1: a token must still be active when introspected right after it was issued,
    # even across a second boundary on a busy machine (oidc-provider compares whole seconds).
    async with run_oidc_provider(access_token_format="opaque", introspection_clients=[RS],
                                 access_token_ttl=3) as idp:
        token = await opaque_client_credentials_token(idp, RESOURCE)
        answer = await introspect(idp, token, RS)
        assert answer["active"] is True
        exp = answer["exp"]
        assert exp == answer["iat"] + 3

        deadline = time.monotonic() + EXPIRY_WAIT
        while (later := await introspect(idp, token, RS))["active"]:
            assert time.monotonic() < deadline, f"still active {EXPIRY_WAIT} s later: {later}"
            await asyncio.sleep(0.2)
        assert time.time() >= exp  # inactive because it expired, not earlier
        assert later == {"active": False}


async def test_a_refresh_token_introspects_without_aud_and_without_token_type(
    opaque_idp: RealIdp,
) -> None:
    """oidc-provider's answer for a refresh token: active, with sub, client_id, iss, the
    grant's whole scope, but no `aud` and no `token_type` (it sets token_type only for access
    tokens). A resource server must refuse it: no audience of its own, and not a bearer token."""
    refresh_token = await opaque_refresh_token(opaque_idp, RESOURCE)
    assert not is_jws(refresh_token)

    answer = await introspect(opaque_idp, refresh_token, RS)
    hinted = await introspect(opaque_idp, refresh_token, RS, token_type_hint="refresh_token")

    assert _active_claims(answer) == {
        "active": True, "sub": "user-1", "client_id": opaque_idp.client_id,
        "iss": opaque_idp.issuer, "scope": "openid offline_access mcp:read",
    }, answer
    assert answer["exp"] == answer["iat"] + 3600  # ttl.RefreshToken
    assert hinted == answer

    # It really is the refresh token: it refreshes, to an opaque access token for the resource.
    tokens = await refresh(opaque_idp, refresh_token, RESOURCE)
    assert not is_jws(tokens.access_token)
    assert (await introspect(opaque_idp, tokens.access_token, RS))["aud"] == RESOURCE


async def test_revoking_a_refresh_token_ends_its_access_tokens_too(opaque_idp: RealIdp) -> None:
    """RFC 7009 §2.1: oidc-provider revokes the whole grant, so the access tokens issued with
    the refresh token become inactive at once."""
    tokens = await authorization_code_tokens(opaque_idp, RESOURCE)
    assert tokens.refresh_token is not None
    assert (await introspect(opaque_idp, tokens.access_token, RS))["active"] is True

    await revoke(opaque_idp, tokens.refresh_token, opaque_idp.client,
                 token_type_hint="refresh_token")

    assert await introspect(opaque_idp, tokens.refresh_token, RS) == {"active": False}
    assert await introspect(opaque_idp, tokens.access_token, RS) == {"active": False}


async def test_revoking_an_authorization_code_access_token_ends_its_refresh_token_too(
    opaque_idp: RealIdp,
) -> None:
    tokens = await authorization_code_tokens(opaque_idp, RESOURCE)
    assert tokens.refresh_token is not None

    await revoke(opaque_idp, tokens.access_token, opaque_idp.client)

    assert await introspect(opaque_idp, tokens.access_token, RS) == {"active": False}
    assert await introspect(opaque_idp, tokens.refresh_token, RS) == {"active": False}


async def test_a_signed_introspection_answer_verifies_with_the_providers_keys() -> None:
    async with run_oidc_provider(access_token_format="opaque", introspection_clients=[RS],
                                 jwt_introspection=True) as idp:
        metadata = await discover(idp)
        token = await opaque_client_credentials_token(idp, RESOURCE)
        plain = await introspect(idp, token, RS)  # without the Accept: plain JSON still
        signed = await introspect_jwt(idp, token, RS)
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, \
                session.get(metadata["jwks_uri"]) as response:
            jwks = jwt.PyJWKSet.from_dict(await response.json())

    assert metadata["introspection_signing_alg_values_supported"] == ["RS256"]
    header = jwt.get_unverified_header(signed)
    assert header["typ"] == "token-introspection+jwt"  # RFC 9701 §5
    assert header["alg"] == "RS256"
    key = next(k for k in jwks.keys if k.key_id == header["kid"])
    claims = jwt.decode(signed, key, algorithms=["RS256"], audience=RS.client_id,
                        issuer=idp.issuer, options={"require": ["iss", "aud", "iat"]})
    assert set(claims) == {"iss", "aud", "iat", "token_introspection"}, claims
    assert claims["aud"] == RS.client_id  # the introspecting client, not the resource
    assert claims["token_introspection"] == plain
    assert plain["active"] is True
    assert plain["aud"] == RESOURCE

    # A single flipped bit of the payload breaks it: the signature covers the answer.
    head, body, signature = signed.split(".")
    tampered = ".".join((head, body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1],
                         signature))
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tampered, key, algorithms=["RS256"], audience=RS.client_id)


async def test_a_signed_answer_for_a_revoked_token_says_only_inactive() -> None:
    async with run_oidc_provider(access_token_format="opaque", introspection_clients=[RS],
                                 jwt_introspection=True) as idp:
        token = await opaque_client_credentials_token(idp, RESOURCE)
        await revoke(idp, token, idp.client)
        signed = await introspect_jwt(idp, token, RS)
    claims = jwt.decode(signed, options={"verify_signature": False})
    assert claims["token_introspection"] == {"active": False}
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == RS.client_id


async def test_without_flags_tokens_stay_jwts_that_introspection_refuses() -> None:
    """The default provider is today's: JWT access tokens, no signed introspection; and its
    introspection endpoint refuses structured tokens outright (oidc-provider's rule)."""
    async with run_oidc_provider() as idp:
        metadata = await discover(idp)
        token = await client_credentials_token(idp, RESOURCE, "mcp:read")
        answer = await introspection_answer(idp, token, idp.client)
        with pytest.raises(RealIdpError):
            await opaque_client_credentials_token(idp, RESOURCE)

    assert is_jws(token)
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    assert "introspection_signing_alg_values_supported" not in metadata
    # oidc-provider lists no *_endpoint_auth_methods_supported for these two endpoints: a
    # client takes token_endpoint_auth_methods_supported (the same client authentication).
    assert "introspection_endpoint_auth_methods_supported" not in metadata
    assert "revocation_endpoint_auth_methods_supported" not in metadata
    assert metadata["token_endpoint_auth_methods_supported"] == [
        "client_secret_basic", "client_secret_post", "none"]
    assert metadata["introspection_endpoint"] == idp.issuer + "/token/introspection"
    assert metadata["revocation_endpoint"] == idp.issuer + "/token/revocation"
    assert answer.status == 400, answer
    assert json.loads(answer.text) == {
        "error": "unsupported_token_type",
        "error_description":
            "Structured JWT Tokens cannot be introspected via the introspection_endpoint",
    }


async def test_any_client_that_asks_gets_a_signed_answer_addressed_to_it() -> None:
    """oidc-provider signs for every client (its default introspection_signed_response_alg is
    RS256), not only the introspection clients; the answer's aud is whoever asked."""
    async with run_oidc_provider(access_token_format="opaque", introspection_clients=[RS],
                                 jwt_introspection=True) as idp:
        token = await opaque_client_credentials_token(idp, RESOURCE)
        answer = await introspection_answer(idp, token, idp.client, accept=INTROSPECTION_JWT)
    assert answer.status == 200
    assert answer.content_type == INTROSPECTION_JWT
    claims = jwt.decode(answer.text, options={"verify_signature": False})
    assert claims["aud"] == idp.client_id
    assert claims["token_introspection"]["active"] is True


@pytest.mark.parametrize("issuer_path", ["", "/realms/demo"])
async def test_the_control_counts_introspection_calls_and_can_fail_them(issuer_path: str) -> None:
    async with run_oidc_provider(issuer_path, access_token_format="opaque",
                                 introspection_clients=[RS]) as idp:
        token = await opaque_client_credentials_token(idp, RESOURCE)
        assert await introspection_control(idp) == IntrospectionControl(0, 0, 0, 0)
        await introspect(idp, token, RS)
        await introspection_answer(idp, token, ConfidentialClient(RS.client_id, "wrong"))
        assert (await introspection_control(idp)).requests == 2  # refused ones count too

        failing = await introspection_control(idp, fail_status=503)
        assert failing == IntrospectionControl(2, 0, 0, 503)
        answer = await introspection_answer(idp, token, RS)
        assert (answer.status, json.loads(answer.text)) == (
            503, {"error": "temporarily_unavailable"})

        await introspection_control(idp, fail_status=0)
        assert (await introspect(idp, token, RS))["active"] is True
        await revoke(idp, token, RS)
        assert await introspection_control(idp) == IntrospectionControl(4, 1, 0, 0)


async def test_a_slow_introspection_endpoint_holds_the_answer() -> None:
    """delay_ms really holds the request: a client that gives up sooner times out, one that
    waits gets the real answer. (Bounded by the client's timeouts, not by measuring speed.)"""
    async with run_oidc_provider(access_token_format="opaque", introspection_clients=[RS]) as idp:
        token = await opaque_client_credentials_token(idp, RESOURCE)
        endpoint = (await discover(idp))["introspection_endpoint"]
        assert (await introspection_control(idp, delay_ms=1500)).delay_ms == 1500
        headers, form = client_authentication(RS, {"token": token})
        async with aiohttp.ClientSession(trust_env=False, headers=headers) as session:
            with pytest.raises(TimeoutError):
                async with session.post(endpoint, data=form,
                                        timeout=aiohttp.ClientTimeout(total=0.3)) as response:
                    await response.read()
            async with session.post(endpoint, data=form,
                                    timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as response:
                assert response.status == 200
                assert (await response.json())["active"] is True


async def test_a_provider_that_does_not_sign_answers_json_to_a_request_for_a_signed_answer(
    opaque_idp: RealIdp,
) -> None:
    token = await opaque_client_credentials_token(opaque_idp, RESOURCE)
    for accept in (INTROSPECTION_JWT, f"{INTROSPECTION_JWT}, application/json"):
        answer = await introspection_answer(opaque_idp, token, RS, accept=accept)
        assert (answer.status, answer.content_type) == (200, "application/json"), answer
        assert json.loads(answer.text)["active"] is True


async def test_a_signing_provider_prefers_the_signed_answer_when_both_are_acceptable() -> None:
    async with run_oidc_provider(access_token_format="opaque", introspection_clients=[RS],
                                 jwt_introspection=True) as idp:
        token = await opaque_client_credentials_token(idp, RESOURCE)
        both = await introspection_answer(
            idp, token, RS, accept=f"{INTROSPECTION_JWT}, application/json;q=0.9")
        json_first = await introspection_answer(
            idp, token, RS, accept=f"application/json, {INTROSPECTION_JWT}")
    assert both.content_type == INTROSPECTION_JWT
    assert json_first.content_type == "application/json"


async def test_a_jwt_resource_gets_jwts_from_a_provider_that_issues_opaque_tokens() -> None:
    """--jwt-resource: one provider, both kinds (as Auth0 with and without an API audience);
    its JWT is refused by the introspection endpoint like any structured token."""
    jwt_resource = "http://127.0.0.1:8932/jwt-mcp"
    async with run_oidc_provider(access_token_format="opaque", introspection_clients=[RS],
                                 jwt_resources=[jwt_resource]) as idp:
        opaque = await opaque_client_credentials_token(idp, RESOURCE)
        structured = await client_credentials_token(idp, jwt_resource, "mcp:read")
        introspected = await introspect(idp, opaque, RS)
        refused = await introspection_answer(idp, structured, RS)

    assert not is_jws(opaque)
    assert introspected["aud"] == RESOURCE
    assert jwt.get_unverified_header(structured)["typ"] == "at+jwt"
    claims = jwt.decode(structured, options={"verify_signature": False})
    assert (claims["aud"], claims["iss"], claims["scope"]) == (jwt_resource, idp.issuer,
                                                                "mcp:read")
    assert refused.status == 400, refused
    assert json.loads(refused.text)["error"] == "unsupported_token_type"
