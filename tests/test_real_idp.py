"""Tokens minted by a real, OpenID-certified provider (panva/oidc-provider) pass the sidecar.

The fake IdP in conftest mints tokens with pyjwt, i.e. with the same library the sidecar verifies
with; here the discovery document, the JWKS and the RS256 `at+jwt` access tokens (RFC 9068,
audience from RFC 8707 resource indicators) come from an independent implementation running as
a real child process on loopback. Needs `npm ci --prefix tests/oidc`.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import AUDIENCE, RESOURCE_URL, FakeUpstream, bearer, new_rsa, wait_until
from real_idp import RealIdp, client_credentials_token, run_oidc_provider

from oauth_sidecar.app import IDP, create_app
from oauth_sidecar.config import load

# Every test here runs real processes (see the marker in pyproject.toml).
pytestmark = pytest.mark.slow

OTHER_RESOURCE = "https://other.example.test/mcp"
KEYS_TIMEOUT = 10.0
INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {},
               "clientInfo": {"name": "test", "version": "1"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}

Client = TestClient[web.Request, web.Application]


@pytest.fixture(params=[""], ids=["no-path"])
async def real_idp(request: pytest.FixtureRequest) -> AsyncIterator[RealIdp]:
    issuer_path: str = request.param
    async with run_oidc_provider(issuer_path) as idp:
        yield idp


@pytest.fixture
async def real_sidecar(real_idp: RealIdp, upstream: FakeUpstream) -> AsyncIterator[Client]:
    """The production app in front of the recording upstream, trusting the real provider."""
    app = create_app(load({
        "OIDC_ISSUER_URL": real_idp.issuer,
        "OIDC_AUDIENCE": AUDIENCE,
        "RESOURCE_URL": RESOURCE_URL,
        "MCP_UPSTREAM_URL": upstream.url,
        "ALLOW_SUBS": real_idp.client_id,  # client_credentials tokens name the client
    }))
    client: Client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        try:
            await wait_until(lambda: app[IDP].ready, within=KEYS_TIMEOUT)
        except AssertionError:
            pytest.fail(f"sidecar did not load the provider's keys: {app[IDP].last_error}\n"
                        f"{real_idp.log_tail()}")
        yield client
    finally:
        await client.close()


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload = (jwt.get_unverified_header(token),
                       jwt.decode(token, options={"verify_signature": False}))
    return header, payload


def _flip_signature_byte(token: str) -> str:
    head, body, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01
    return ".".join((head, body, base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()))


async def _post_mcp(client: Client, token: str) -> tuple[int, str, str]:
    async with client.post("/mcp", json=INITIALIZE, headers={**MCP_HEADERS, **bearer(token)}) as r:
        return r.status, r.headers.get("WWW-Authenticate", ""), await r.text()


@pytest.mark.parametrize(
    "real_idp", ["", "/realms/demo"], ids=["issuer-without-path", "issuer-with-path"],
    indirect=True,
)
async def test_real_client_credentials_token_reaches_upstream(
    real_idp: RealIdp, real_sidecar: Client, upstream: FakeUpstream
) -> None:
    token = await client_credentials_token(real_idp, AUDIENCE, "mcp:read")
    header, claims = _parts(token)
    # What the real provider minted, not what our fake would: RFC 9068 JWT, RS256, RFC 8707 aud.
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "RS256"
    assert claims["iss"] == real_idp.issuer
    assert claims["aud"] == AUDIENCE
    assert claims["sub"] == claims["client_id"] == real_idp.client_id
    assert claims["scope"] == "mcp:read"

    status, challenge, text = await _post_mcp(real_sidecar, token)

    assert status == 200, (status, challenge, text)
    assert len(upstream.requests) == 1
    seen = upstream.requests[0]
    assert (seen.method, seen.path_qs) == ("POST", "/mcp")
    assert json.loads(seen.body) == INITIALIZE
    assert "authorization" not in {name.lower() for name in seen.headers}
    assert token not in repr(seen.headers)
    assert json.loads(text)["path_qs"] == "/mcp"


async def test_real_token_for_another_resource_is_refused(
    real_idp: RealIdp, real_sidecar: Client, upstream: FakeUpstream
) -> None:
    token = await client_credentials_token(real_idp, OTHER_RESOURCE, "mcp:read")
    assert _parts(token)[1]["aud"] == OTHER_RESOURCE  # valid, just not for us

    status, challenge, text = await _post_mcp(real_sidecar, token)

    assert status == 401, (status, text)
    assert challenge.startswith("Bearer "), challenge
    assert 'error="invalid_token"' in challenge, challenge
    assert "not issued for this resource" in challenge, challenge  # tokens.py wrong_audience
    assert upstream.requests == []


async def test_tampered_real_token_is_refused(
    real_idp: RealIdp, real_sidecar: Client, upstream: FakeUpstream
) -> None:
    token = await client_credentials_token(real_idp, AUDIENCE, "mcp:read")
    tampered = _flip_signature_byte(token)
    assert tampered != token

    status, challenge, text = await _post_mcp(real_sidecar, tampered)
    assert status == 401, (status, text)
    assert 'error="invalid_token"' in challenge, challenge
    assert "signature is invalid" in challenge, challenge  # tokens.py bad_signature
    assert upstream.requests == []

    # The untampered token still works: the refusal was about the signature, nothing else.
    status, challenge, text = await _post_mcp(real_sidecar, token)
    assert status == 200, (status, challenge, text)
    assert len(upstream.requests) == 1


async def test_provider_process_gone_while_running_keeps_serving_with_the_cached_keys(
    upstream: FakeUpstream,
) -> None:
    """The IdP process dies after start-up: tokens it already signed keep working from the
    cached key set, a token with an unknown kid is refused in bounded time (one failed fetch,
    connection refused) and the sidecar stays ready: an IdP outage is not an MCP outage."""
    async with run_oidc_provider() as provider:
        app = create_app(load({
            "OIDC_ISSUER_URL": provider.issuer, "OIDC_AUDIENCE": AUDIENCE,
            "RESOURCE_URL": RESOURCE_URL, "MCP_UPSTREAM_URL": upstream.url,
            "ALLOW_SUBS": provider.client_id, "IDP_TIMEOUT_SECONDS": "2",
            "JWKS_COOLDOWN_SECONDS": "0.1",
        }))
        client: Client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        try:
            await wait_until(lambda: app[IDP].ready, within=KEYS_TIMEOUT)
            token = await client_credentials_token(provider, AUDIENCE, "mcp:read")
        except BaseException:
            await client.close()
            raise
    try:  # the provider process has been stopped and reaped here
        header, claims = _parts(token)
        stranger = new_rsa("never-published")
        unknown_kid = jwt.encode(claims, stranger.private, algorithm="RS256",
                                 headers={"kid": stranger.kid})
        status, _, text = await _post_mcp(client, token)
        assert status == 200, text
        await asyncio.sleep(0.2)  # past JWKS_COOLDOWN_SECONDS, so the unknown kid may fetch
        status, challenge, _ = await _post_mcp(client, unknown_kid)
        assert status == 401
        assert 'error="invalid_token"' in challenge
        assert app[IDP].last_error is not None  # the refresh it caused failed...
        assert app[IDP].ready  # ...and the last good keys were kept
        readyz = await client.get("/readyz")
        assert readyz.status == 200, await readyz.text()
        status, _, text = await _post_mcp(client, token)
        assert status == 200, text
        assert len(upstream.requests) == 2
        assert header["kid"] != "never-published"
    finally:
        await client.close()
