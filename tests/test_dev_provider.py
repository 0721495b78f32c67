"""The demo's development OpenID provider, over real HTTP on loopback: discovery, registration,
the sign-in page, the code and refresh grants, and every refusal a real provider owes (bad PKCE
verifier, reused code, unknown client, redirect URI mismatch, other resources). Then the
production sidecar in front of the example MCP server validates its tokens for real."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec
from dev_browser import sign_in
from jwt.algorithms import ECAlgorithm
from mcp_client_probe import call_echo
from oauth_flow import run_sidecar
from processes import free_port

from oauth_sidecar.devtools.dev_provider import DEMO_USERS, DevProvider
from oauth_sidecar.devtools.example_mcp import ExampleMcpServer

RESOURCE = "http://127.0.0.1:8080/mcp"
REDIRECT = "http://127.0.0.1:33333/callback"
CLIENT_TIMEOUT = 20.0


@dataclass
class Provider:
    issuer: str
    provider: DevProvider
    http: aiohttp.ClientSession

    async def register(self, redirect_uris: list[str] | None = None,
                       **extra: Any) -> tuple[int, dict[str, Any]]:
        document = {"redirect_uris": redirect_uris or [REDIRECT], "client_name": "tests", **extra}
        async with self.http.post(f"{self.issuer}/register", json=document) as response:
            return response.status, await response.json()

    async def client(self) -> str:
        status, answer = await self.register()
        assert status == 201, answer
        client_id: str = answer["client_id"]
        return client_id

    def authorize_url(self, client_id: str, challenge: str, **extra: str) -> str:
        params = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT,
                  "code_challenge": challenge, "code_challenge_method": "S256",
                  "state": "st-1", "resource": RESOURCE, "scope": "openid email", **extra}
        return f"{self.issuer}/authorize?{urlencode(params)}"

    async def token(self, form: dict[str, str], headers: dict[str, str] | None = None,
                    ) -> tuple[int, dict[str, Any]]:
        async with self.http.post(f"{self.issuer}/token", data=form,
                                  headers=headers) as response:
            return response.status, await response.json()

    async def code(self, client_id: str, user: str = "alice", **extra: str) -> tuple[str, str]:
        """A fresh authorization code for `user`, and its PKCE verifier."""
        verifier, challenge = pkce()
        result = await sign_in(self.authorize_url(client_id, challenge, **extra), user)
        assert "code" in result.params, (result.page_status, result.page[:500], result.params)
        return result.params["code"], verifier

    async def redeem(self, client_id: str, code: str, verifier: str,
                     **extra: str) -> tuple[int, dict[str, Any]]:
        return await self.token({"grant_type": "authorization_code", "client_id": client_id,
                                 "code": code, "code_verifier": verifier,
                                 "redirect_uri": REDIRECT, "resource": RESOURCE, **extra})

    async def jwk(self) -> dict[str, Any]:
        async with self.http.get(f"{self.issuer}/jwks") as response:
            keys: list[dict[str, Any]] = (await response.json())["keys"]
        assert len(keys) == 1
        return keys[0]


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@pytest.fixture
async def idp() -> AsyncIterator[Provider]:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    provider = DevProvider(issuer, RESOURCE)
    server = TestServer(provider.app(), host="127.0.0.1", port=port)
    await server.start_server()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10),
                                     trust_env=False) as http:
        yield Provider(issuer, provider, http)
    await server.close()


# --- documents ------------------------------------------------------------------------------


async def test_discovery_documents_name_this_issuer_and_only_s256(idp: Provider) -> None:
    documents = []
    for path in ("openid-configuration", "oauth-authorization-server"):
        async with idp.http.get(f"{idp.issuer}/.well-known/{path}") as response:
            assert response.status == 200
            documents.append(await response.json())
    assert documents[0] == documents[1]
    document = documents[0]
    assert document["issuer"] == idp.issuer
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert document["token_endpoint_auth_methods_supported"] == ["none"]
    assert document["registration_endpoint"] == f"{idp.issuer}/register"
    assert document["authorization_response_iss_parameter_supported"] is True
    assert document["grant_types_supported"] == ["authorization_code", "refresh_token"]


def test_a_non_loopback_issuer_is_refused() -> None:
    for issuer in ("http://192.0.2.1:8080", "https://127.0.0.1:1", "http://example.com"):
        with pytest.raises(ValueError, match="loopback"):
            DevProvider(issuer, RESOURCE)


async def test_requests_under_another_host_name_are_refused(idp: Provider) -> None:
    """DNS rebinding: evil.example resolving to 127.0.0.1 gets nothing."""
    url = f"{idp.issuer}/.well-known/openid-configuration"
    async with idp.http.get(url, headers={"Host": "evil.example"}) as response:
        assert response.status == 421


# --- the whole grant ------------------------------------------------------------------------


async def test_code_flow_issues_tokens_for_the_resource_then_refresh_rotates(
    idp: Provider,
) -> None:
    client_id = await idp.client()
    code, verifier = await idp.code(client_id, nonce="n-1")
    status, tokens = await idp.redeem(client_id, code, verifier)
    assert status == 200, tokens
    assert tokens["token_type"] == "Bearer"
    assert tokens["scope"] == "openid email"
    jwk = await idp.jwk()
    key = ECAlgorithm.from_jwk(json.dumps(jwk))
    assert isinstance(key, ec.EllipticCurvePublicKey)  # the JWKS holds no private part
    header = jwt.get_unverified_header(tokens["access_token"])
    assert header == {"alg": "ES256", "typ": "at+jwt", "kid": jwk["kid"]}
    claims = jwt.decode(tokens["access_token"], key, algorithms=["ES256"], audience=RESOURCE,
                        issuer=idp.issuer)
    alice = DEMO_USERS[0]
    assert claims["sub"] == alice.sub
    assert claims["email"] == alice.email
    assert claims["email_verified"] is True
    assert claims["groups"] == list(alice.groups)
    assert claims["client_id"] == client_id
    assert claims["exp"] - claims["iat"] == idp.provider.access_token_ttl
    id_claims = jwt.decode(tokens["id_token"], key, algorithms=["ES256"], audience=client_id)
    assert id_claims["nonce"] == "n-1"

    refresh = {"grant_type": "refresh_token", "client_id": client_id,
               "refresh_token": tokens["refresh_token"]}
    status, renewed = await idp.token(refresh)
    assert status == 200, renewed
    assert renewed["refresh_token"] != tokens["refresh_token"]
    assert jwt.decode(renewed["access_token"], key, algorithms=["ES256"],
                      audience=RESOURCE)["sub"] == "alice"
    status, again = await idp.token(refresh)  # rotated: the old one is spent
    assert (status, again["error"]) == (400, "invalid_grant")
    status, narrower = await idp.token({**refresh, "refresh_token": renewed["refresh_token"],
                                        "scope": "email"})
    assert (status, narrower["scope"]) == (200, "email")


async def test_the_sign_in_page_escapes_the_client_name_and_cannot_be_framed(
    idp: Provider,
) -> None:
    status, answer = await idp.register(client_name="<script>alert(1)</script>")
    assert status == 201
    async with idp.http.get(idp.authorize_url(answer["client_id"], pkce()[1])) as response:
        page = await response.text()
        assert response.status == 200
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY"
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    for user in DEMO_USERS:
        assert user.email in page


async def test_missing_resource_means_ours_and_a_trailing_slash_is_the_same(
    idp: Provider,
) -> None:
    client_id = await idp.client()
    for resource in (None, RESOURCE + "/"):
        verifier, challenge = pkce()
        url = idp.authorize_url(client_id, challenge)
        if resource is None:
            url = url.replace("&resource=" + RESOURCE.replace(":", "%3A").replace("/", "%2F"), "")
            assert "resource=" not in url
        else:
            url = idp.authorize_url(client_id, challenge, resource=resource)
        result = await sign_in(url)
        status, tokens = await idp.token({"grant_type": "authorization_code",
                                          "client_id": client_id, "code": result.params["code"],
                                          "code_verifier": verifier, "redirect_uri": REDIRECT})
        assert status == 200, tokens
        assert jwt.decode(tokens["access_token"], options={"verify_signature": False}
                          )["aud"] == RESOURCE


# --- refusals -------------------------------------------------------------------------------


async def test_a_wrong_pkce_verifier_is_refused(idp: Provider) -> None:
    client_id = await idp.client()
    code, _ = await idp.code(client_id)
    status, answer = await idp.redeem(client_id, code, pkce()[0])
    assert (status, answer["error"]) == (400, "invalid_grant")
    assert "PKCE" in answer["error_description"]


async def test_a_reused_code_is_refused_and_revokes_its_refresh_token(idp: Provider) -> None:
    client_id = await idp.client()
    code, verifier = await idp.code(client_id)
    status, tokens = await idp.redeem(client_id, code, verifier)
    assert status == 200
    status, answer = await idp.redeem(client_id, code, verifier)
    assert (status, answer["error"]) == (400, "invalid_grant")
    status, answer = await idp.token({"grant_type": "refresh_token", "client_id": client_id,
                                      "refresh_token": tokens["refresh_token"]})
    assert (status, answer["error"]) == (400, "invalid_grant")


async def test_an_unknown_client_is_refused_everywhere(idp: Provider) -> None:
    result = await sign_in(idp.authorize_url("no-such-client", pkce()[1]))
    assert (result.page_status, result.location) == (400, None)  # never redirected
    assert "Unknown client" in result.page
    client_id = await idp.client()
    code, verifier = await idp.code(client_id)
    status, answer = await idp.redeem("no-such-client", code, verifier)
    assert (status, answer["error"]) == (401, "invalid_client")
    other = await idp.client()
    status, answer = await idp.redeem(other, code, verifier)  # a real client, not the code's
    assert (status, answer["error"]) == (400, "invalid_grant")


async def test_a_redirect_uri_mismatch_is_refused(idp: Provider) -> None:
    client_id = await idp.client()
    elsewhere = "http://127.0.0.1:44444/callback"
    result = await sign_in(idp.authorize_url(client_id, pkce()[1], redirect_uri=elsewhere))
    assert (result.page_status, result.location) == (400, None)  # never sent to elsewhere
    code, verifier = await idp.code(client_id)
    status, answer = await idp.redeem(client_id, code, verifier, redirect_uri=elsewhere)
    assert (status, answer["error"]) == (400, "invalid_grant")


@pytest.mark.parametrize(("extra", "error"), [
    ({"resource": "http://127.0.0.1:9999/other"}, "invalid_target"),
    ({"code_challenge_method": "plain"}, "invalid_request"),
    ({"code_challenge": "short"}, "invalid_request"),
    ({"response_type": "token"}, "unsupported_response_type"),
])
async def test_bad_authorization_requests_return_to_the_client_with_an_error(
    idp: Provider, extra: dict[str, str], error: str,
) -> None:
    client_id = await idp.client()
    result = await sign_in(idp.authorize_url(client_id, pkce()[1], **extra))
    assert result.location is not None
    assert result.location.startswith(REDIRECT)
    assert result.params["error"] == error
    assert result.params["state"] == "st-1"
    assert result.params["iss"] == idp.issuer  # RFC 9207 on errors too


async def test_the_token_endpoint_refuses_another_resource(idp: Provider) -> None:
    client_id = await idp.client()
    code, verifier = await idp.code(client_id)
    status, answer = await idp.redeem(client_id, code, verifier,
                                      resource="http://127.0.0.1:9999/other")
    assert (status, answer["error"]) == (400, "invalid_target")


async def test_the_sign_in_form_is_single_use_and_needs_its_request_value(
    idp: Provider,
) -> None:
    client_id = await idp.client()
    async with idp.http.get(idp.authorize_url(client_id, pkce()[1])) as response:
        page = await response.text()
    handle = page.split('name="request" value="', 1)[1].split('"', 1)[0]
    form_url = f"{idp.issuer}/authorize"
    async with idp.http.post(form_url, data={"request": "forged", "user": "alice"},
                             allow_redirects=False) as response:
        assert response.status == 400  # CSRF: a form not served by us is refused
    async with idp.http.post(form_url, data={"request": handle, "user": "alice"},
                             headers={"Origin": "https://evil.example"},
                             allow_redirects=False) as response:
        assert response.status == 403
    async with idp.http.post(form_url, data={"request": handle, "user": "alice"},
                             allow_redirects=False) as response:
        assert response.status == 302
    async with idp.http.post(form_url, data={"request": handle, "user": "alice"},
                             allow_redirects=False) as response:
        assert response.status == 400  # spent


async def test_cancel_returns_access_denied(idp: Provider) -> None:
    client_id = await idp.client()
    result = await sign_in(idp.authorize_url(client_id, pkce()[1]), deny=True)
    assert result.params["error"] == "access_denied"
    assert result.params["state"] == "st-1"


@pytest.mark.parametrize("document", [
    {"redirect_uris": ["http://192.0.2.7/callback"]},  # plain http off loopback
    {"redirect_uris": ["javascript:alert(1)"]},
    {"redirect_uris": []},
    {"redirect_uris": [REDIRECT], "grant_types": ["client_credentials"]},
    {"redirect_uris": [REDIRECT], "response_types": ["token"]},
])
async def test_registration_refuses_unsafe_clients(
    idp: Provider, document: dict[str, Any],
) -> None:
    async with idp.http.post(f"{idp.issuer}/register", json=document) as response:
        assert response.status == 400
        assert (await response.json())["error"] in ("invalid_redirect_uri",
                                                    "invalid_client_metadata")


async def test_registration_makes_public_clients_only(idp: Provider) -> None:
    status, answer = await idp.register(token_endpoint_auth_method="client_secret_basic")
    assert status == 201
    assert answer["token_endpoint_auth_method"] == "none"
    assert "client_secret" not in answer
    code, verifier = await idp.code(answer["client_id"])
    basic = base64.b64encode(f"{answer['client_id']}:x".encode()).decode()
    status, refused = await idp.token({"grant_type": "authorization_code", "code": code,
                                       "code_verifier": verifier, "redirect_uri": REDIRECT,
                                       "client_id": answer["client_id"]},
                                      headers={"Authorization": f"Basic {basic}"})
    assert (status, refused["error"]) == (401, "invalid_client")


# --- the production sidecar validates its tokens for real ----------------------------------


async def test_sidecar_accepts_a_fresh_token_and_refuses_expired_or_foreign_ones() -> None:
    port = free_port()
    idp_port = free_port()
    issuer = f"http://127.0.0.1:{idp_port}"
    provider = DevProvider(issuer, f"http://127.0.0.1:{port}/mcp")
    idp_server = TestServer(provider.app(), host="127.0.0.1", port=idp_port)
    mcp_server = TestServer(ExampleMcpServer().app(), host="127.0.0.1")
    await idp_server.start_server()
    await mcp_server.start_server()
    upstream = str(mcp_server.make_url("/mcp"))
    alice = DEMO_USERS[0]

    def mint(lifetime: int) -> str:
        return provider.mint_access_token(alice, client_id="t", scope=["email"],
                                          lifetime=lifetime)

    async def refusal(url: str, token: str) -> str:
        async with aiohttp.ClientSession(trust_env=False) as http, http.get(
            url, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert response.status == 401
            challenge = response.headers["WWW-Authenticate"]
            assert 'error="invalid_token"' in challenge
            return challenge

    try:
        async with run_sidecar(issuer, upstream, {"ALLOW_SUBS": "alice"}, port=port) as sidecar:
            async with asyncio.timeout(CLIENT_TIMEOUT):
                assert await call_echo(sidecar.mcp_url, mint(300), "hi") == "hi"
            expired = mint(-120)  # past the sidecar's 30 s leeway
            assert "has expired" in await refusal(sidecar.mcp_url, expired)
        # A sidecar for another resource: the same provider's valid token is not for it.
        other = {"ALLOW_SUBS": "alice", "OIDC_AUDIENCE": "http://127.0.0.1:1/other"}
        async with run_sidecar(issuer, upstream, other) as sidecar:
            challenge = await refusal(sidecar.mcp_url, mint(300))
            assert "not issued for this resource" in challenge
    finally:
        await mcp_server.close()
        await idp_server.close()
