"""The official MCP SDK signs in through the sidecar's metadata and calls a tool, no person needed.

Direct mode: the sidecar's protected-resource metadata names the IdP's issuer, so the SDK's
client (mcp 2.x `OAuthClientProvider`) discovers the real oidc-provider child process (tests/oidc),
registers itself there (RFC 7591), runs authorization code + PKCE with a `resource` indicator
through a headless browser (the provider's --auto-login answers login and consent), checks the
RFC 9207 `iss`, exchanges the code, and talks MCP to the official-SDK echo server behind the
sidecar.
Everything runs on 127.0.0.1; see tests/oauth_flow.py for the harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mcp.shared.auth import OAuthClientInformationFull, TokenEndpointAuthMethod
from oauth_flow import (
    BrowserError,
    EchoServer,
    Exchange,
    Mode,
    SdkOAuthClient,
    SdkOAuthResult,
    Sidecar,
    find_exception,
    run_echo_server,
    run_sdk_oauth_session,
    run_sidecar,
)
from processes import free_port
from pydantic import AnyUrl
from real_idp import RealIdp, run_oidc_provider

# Every test here runs real processes (see the marker in pyproject.toml).
pytestmark = pytest.mark.slow

TEXT = "hello through the sidecar, signed in"
USER = "user-1"  # the provider's --auto-login account
ISSUER_PATHS = [
    pytest.param("", id="issuer-without-path"),
    pytest.param("/realms/demo", id="issuer-with-path"),
]


@dataclass(frozen=True)
class Stack:
    idp: RealIdp
    echo: EchoServer
    sidecar: Sidecar


@contextlib.asynccontextmanager
async def direct_stack(
    tmp_path: Path, issuer_path: str = "", *, static_clients: Sequence[str] = (),
    access_token_ttl: int | None = None, **env: str,
) -> AsyncIterator[Stack]:
    """oidc-provider (auto-login as user-1) <- sidecar (PRM names the IdP) -> SDK echo server."""
    async with (
        run_oidc_provider(
            issuer_path, auto_login=USER, static_clients=static_clients,
            access_token_ttl=access_token_ttl,
        ) as idp,
        run_echo_server(tmp_path) as echo,
        run_sidecar(idp.issuer, echo.url, env) as sidecar,
    ):
        try:
            yield Stack(idp, echo, sidecar)
        except Exception as exc:
            exc.add_note(f"--- oidc-provider:\n{idp.log_tail()}")
            raise


def as_discovery(issuer: str) -> list[tuple[str, str, int]]:
    """What the SDK GETs to find the AS metadata of `issuer` (mcp-auth.md §3) and oidc-provider's
    answers: it serves /.well-known/oauth-authorization-server only below a path-less issuer."""
    parts = urlsplit(issuer)
    origin, path = f"{parts.scheme}://{parts.netloc}", parts.path
    if not path:
        return [("GET", origin + "/.well-known/oauth-authorization-server", 200)]
    return [
        ("GET", origin + "/.well-known/oauth-authorization-server" + path, 404),
        ("GET", origin + "/.well-known/openid-configuration" + path, 404),
        ("GET", origin + path + "/.well-known/openid-configuration", 200),
    ]


def index_of(result: SdkOAuthResult, method: str, url: str) -> int:
    for i, exchange in enumerate(result.exchanges):
        if (exchange.method, exchange.origin + exchange.path) == (method, url):
            return i
    raise AssertionError(f"no {method} {url} among:\n{result.describe()}")


def assert_discovery(result: SdkOAuthResult, sidecar: Sidecar, issuer: str) -> int:
    """401 first, then the RFC 9728 document it names, then the AS metadata of the issuer the
    document lists. Returns the index of the first exchange after discovery."""
    flow = result.summary()
    prm_url = sidecar.origin + "/.well-known/oauth-protected-resource/mcp"
    first = result.exchanges[0]
    assert first.short() == ("POST", sidecar.mcp_url, 401), result.describe()
    assert first.authorization is None
    challenge = first.www_authenticate or ""
    assert challenge.startswith("Bearer "), first
    assert f'resource_metadata="{prm_url}"' in challenge, first
    assert "error=" not in challenge, first  # RFC 6750 §3.1: no token, no error code
    assert flow[1] == ("GET", prm_url, 200), result.describe()
    prm = result.protected_resource_metadata
    assert prm is not None
    assert str(prm.resource) == sidecar.mcp_url
    assert [str(server) for server in prm.authorization_servers] == [issuer]
    expected = as_discovery(issuer)
    assert flow[2 : 2 + len(expected)] == expected, result.describe()
    metadata = result.authorization_server_metadata
    assert metadata is not None
    assert str(metadata.issuer) == issuer
    assert metadata.authorization_response_iss_parameter_supported is True
    assert metadata.code_challenge_methods_supported == ["S256"]
    return 2 + len(expected)


def assert_bearer_only_to_the_resource(result: SdkOAuthResult, sidecar: Sidecar) -> None:
    """The access token goes to the MCP endpoint and nowhere else."""
    for exchange in result.exchanges:
        if exchange.authorization == "Bearer":
            assert exchange.origin + exchange.path == sidecar.mcp_url, exchange


def assert_mcp_tail(exchanges: list[Exchange], sidecar: Sidecar) -> None:
    assert exchanges, "no MCP request after the sign-in"
    for exchange in exchanges:
        assert exchange.origin + exchange.path == sidecar.mcp_url, exchange
        assert exchange.authorization == "Bearer", exchange
        assert exchange.status < 400, exchange


@pytest.mark.parametrize("issuer_path", ISSUER_PATHS)
@pytest.mark.parametrize(
    ("mode", "auth_method"),
    [
        pytest.param("legacy", None, id="legacy-sdk-default-client"),
        pytest.param("auto", "none", id="auto-public-client"),
    ],
)
async def test_sdk_signs_in_at_the_idp_and_calls_echo(  # noqa: PLR0915 (one sign-in, step by step)
    tmp_path: Path, issuer_path: str, mode: Mode, auth_method: TokenEndpointAuthMethod | None
) -> None:
    async with direct_stack(tmp_path, issuer_path) as stack:
        client = SdkOAuthClient(stack.sidecar.mcp_url, token_endpoint_auth_method=auth_method)
        result = await client.session([("echo", {"text": TEXT}), ("whoami", {})], mode=mode)
    idp, sidecar, mcp_url = stack.idp, stack.sidecar, stack.sidecar.mcp_url
    flow = result.summary()

    # 1. Discovery: 401 -> PRM -> the IdP's metadata.
    i = assert_discovery(result, sidecar, idp.issuer)

    # 2. Dynamic client registration at the IdP's registration_endpoint.
    metadata = result.authorization_server_metadata
    assert metadata is not None
    assert str(metadata.registration_endpoint) == idp.issuer + "/reg"
    registration = result.exchanges[i]
    assert registration.short() == ("POST", idp.issuer + "/reg", 201), result.describe()
    assert registration.authorization is None
    sent = registration.json()
    assert sent["redirect_uris"] == [client.redirect_uri]
    assert sent["grant_types"] == ["authorization_code", "refresh_token"]
    assert sent.get("token_endpoint_auth_method") == auth_method
    info = result.client_info
    assert info is not None
    assert info.client_id
    assert info.issuer == idp.issuer  # SDK's SEP-2352 binding of the credentials to the AS
    assert info.token_endpoint_auth_method == (auth_method or "client_secret_basic")
    assert (info.client_secret is None) == (auth_method == "none")

    # 3. Authorization code + PKCE + resource indicator, through the headless browser.
    assert len(result.authorization_urls) == 1
    assert result.authorization_urls[0].startswith(idp.issuer + "/auth?")
    params = result.authorization_params()
    assert params["response_type"] == "code"
    assert params["client_id"] == info.client_id
    assert params["redirect_uri"] == client.redirect_uri
    assert params["code_challenge_method"] == "S256"
    assert params["resource"] == mcp_url  # RFC 8707, from the PRM's `resource`
    # No scope in the challenge nor the PRM: the SDK asks for the AS's scopes_supported.
    assert params["scope"] == "openid offline_access mcp:read mcp:write"
    assert params["prompt"] == "consent"  # the SDK's rule for offline_access
    assert all(hop.url.startswith(idp.issuer + "/") for hop in result.hops), result.describe()
    [callback] = result.callbacks
    assert callback.iss == idp.issuer  # RFC 9207: present, and the issuer the SDK discovered
    assert callback.state == params["state"]

    # 4. The token request: PKCE verifier, resource again, client authentication as registered.
    token = result.exchanges[i + 1]
    assert token.short() == ("POST", idp.issuer + "/token", 200), result.describe()
    form = token.form
    assert form["grant_type"] == "authorization_code"
    assert form["code"] == callback.code
    assert form["redirect_uri"] == client.redirect_uri
    assert len(form["code_verifier"]) >= 43
    assert form["resource"] == mcp_url
    assert token.authorization == ("Basic" if auth_method is None else None)
    tokens = result.tokens
    assert tokens is not None
    assert tokens.refresh_token  # offline_access was granted
    claims = result.claims
    assert claims is not None, "the access token is not a JWT"
    assert claims["aud"] == mcp_url
    assert claims["sub"] == USER
    assert claims["iss"] == idp.issuer
    assert claims["client_id"] == info.client_id

    # 5. The MCP request that was refused is retried with the token, and the session goes on.
    assert result.exchanges[i + 2].short()[:2] == ("POST", mcp_url), result.describe()
    assert_mcp_tail(result.exchanges[i + 2 :], sidecar)
    assert_bearer_only_to_the_resource(result, sidecar)
    if mode == "legacy":
        assert ("DELETE", mcp_url, 200) in flow, result.describe()

    # 6. The tools ran behind the sidecar, which kept the credentials to itself.
    assert {"echo", "whoami"} <= set(result.tool_names)
    assert result.results[0] == TEXT
    seen = json.loads(result.results[1])
    assert "authorization" not in seen, seen
    assert tokens.access_token not in repr(seen)
    assert seen["host"] == f"127.0.0.1:{stack.echo.port}", seen


async def test_advertised_scopes_are_requested_granted_and_required(tmp_path: Path) -> None:
    """SCOPES_SUPPORTED reaches the SDK through the challenge and the PRM; it registers and
    authorizes with exactly those (plus offline_access, which the AS offers), the token carries
    them for the resource, and REQUIRED_SCOPES is satisfied."""
    async with direct_stack(
        tmp_path, SCOPES_SUPPORTED="mcp:read mcp:write", REQUIRED_SCOPES="mcp:read"
    ) as stack:
        result = await run_sdk_oauth_session(stack.sidecar.mcp_url)
    first = result.exchanges[0]
    assert first.status == 401
    assert first.www_authenticate is not None
    assert 'scope="mcp:read mcp:write"' in first.www_authenticate, first
    prm = result.protected_resource_metadata
    assert prm is not None
    assert prm.scopes_supported == ["mcp:read", "mcp:write"]
    i = assert_discovery(result, stack.sidecar, stack.idp.issuer)
    registration = result.exchanges[i]
    assert registration.short()[::2] == ("POST", 201), result.describe()
    assert registration.json()["scope"] == "mcp:read mcp:write offline_access"
    assert result.authorization_params()["scope"] == "mcp:read mcp:write offline_access"
    claims = result.claims
    assert claims is not None
    assert claims["scope"] == "mcp:read mcp:write"  # the resource's share of the grant
    assert claims["aud"] == stack.sidecar.mcp_url
    assert result.text == "hello through the sidecar"


async def test_subject_outside_the_allow_list_signs_in_but_is_refused(tmp_path: Path) -> None:
    async with direct_stack(tmp_path, ALLOW_SUBS="someone-else") as stack:
        result = await run_sdk_oauth_session(stack.sidecar.mcp_url, allow_failure=True)
    idp, sidecar = stack.idp, stack.sidecar
    assert result.error is not None, result.describe()

    # The whole flow at the IdP succeeded: the refusal is the sidecar's policy, not the sign-in.
    i = assert_discovery(result, sidecar, idp.issuer)
    assert result.summary()[i : i + 2] == [
        ("POST", idp.issuer + "/reg", 201), ("POST", idp.issuer + "/token", 200),
    ], result.describe()
    assert result.iss == idp.issuer
    claims = result.claims
    assert claims is not None
    assert (claims["sub"], claims["aud"]) == (USER, sidecar.mcp_url)

    refused = result.exchanges[i + 2]
    assert refused.short() == ("POST", sidecar.mcp_url, 403), result.describe()
    assert refused.authorization == "Bearer"
    error = refused.error()
    assert isinstance(error, dict)
    assert error["error"] == "access_denied", error
    assert refused.www_authenticate is None  # 403 access_denied is no step-up challenge
    # The SDK gives up there: no second authorization, nothing reached the upstream.
    assert len(result.authorization_urls) == 1
    assert result.exchanges[i + 3 :] == [], result.describe()
    assert result.results == []


async def test_expired_access_token_is_refreshed_with_the_resource(tmp_path: Path) -> None:
    ttl = 1
    async with direct_stack(tmp_path, access_token_ttl=ttl) as stack:
        mcp_url, issuer = stack.sidecar.mcp_url, stack.idp.issuer
        client = SdkOAuthClient(mcp_url)
        first = await client.session()
        assert first.tokens is not None
        assert first.tokens.expires_in == ttl
        assert first.tokens.refresh_token
        await asyncio.sleep(ttl + 0.2)  # the SDK now holds an expired access token
        second = await client.session()

    # No new sign-in: the SDK refreshed before its first MCP request of the session.
    assert second.authorization_urls == []
    refresh = second.exchanges[0]
    assert refresh.short() == ("POST", issuer + "/token", 200), second.describe()
    assert refresh.form["grant_type"] == "refresh_token"
    assert refresh.form["resource"] == mcp_url
    assert refresh.authorization == "Basic"
    assert_mcp_tail(second.exchanges[1:], stack.sidecar)
    assert second.text == "hello through the sidecar"
    assert second.tokens is not None
    assert second.tokens.access_token != first.tokens.access_token
    claims = second.claims
    assert claims is not None
    assert (claims["aud"], claims["sub"], claims["iss"]) == (mcp_url, USER, issuer)


def static_client(client_id: str, secret: str, redirect_uri: str) -> OAuthClientInformationFull:
    return OAuthClientInformationFull(
        client_id=client_id, client_secret=secret, redirect_uris=[AnyUrl(redirect_uri)],
        token_endpoint_auth_method="client_secret_basic",
        grant_types=["authorization_code", "refresh_token"], response_types=["code"],
    )


async def test_static_confidential_client_skips_registration(tmp_path: Path) -> None:
    """provider.mjs --static-client (what a facade would use): the SDK, given the client,
    registers nothing and signs in with client_secret_basic at the pre-registered redirect URI."""
    redirect_uri = f"http://127.0.0.1:{free_port()}/oauth/callback"
    spec = f"mcp-static:static-secret:{redirect_uri}"
    async with direct_stack(tmp_path, "/realms/demo", static_clients=[spec]) as stack:
        result = await run_sdk_oauth_session(
            stack.sidecar.mcp_url, redirect_uri=redirect_uri,
            client_info=static_client("mcp-static", "static-secret", redirect_uri),
        )
    issuer = stack.idp.issuer
    i = assert_discovery(result, stack.sidecar, issuer)
    assert not any(e.path.endswith("/reg") for e in result.exchanges), result.describe()
    token = result.exchanges[i]
    assert token.short() == ("POST", issuer + "/token", 200), result.describe()
    assert token.authorization == "Basic"
    assert result.iss == issuer
    claims = result.claims
    assert claims is not None
    assert (claims["client_id"], claims["aud"]) == ("mcp-static", stack.sidecar.mcp_url)
    assert result.text == "hello through the sidecar"


async def test_static_client_is_bound_to_its_redirect_uris(tmp_path: Path) -> None:
    """The IdP refuses a static client's authorization to any other redirect URI (the binding a
    facade's one static client relies on), before any redirect to that URI."""
    registered = f"http://127.0.0.1:{free_port()}/oauth/callback"
    other = f"http://127.0.0.1:{free_port()}/callback"
    spec = f"mcp-static:static-secret:{registered}"
    async with direct_stack(tmp_path, static_clients=[spec]) as stack:
        result = await run_sdk_oauth_session(
            stack.sidecar.mcp_url, redirect_uri=other, allow_failure=True,
            client_info=static_client("mcp-static", "static-secret", other),
        )
    refused = find_exception(result.error, BrowserError)
    assert refused is not None, result.describe()
    assert "invalid_redirect_uri" in str(refused), refused
    assert [hop.status for hop in result.hops] == [400], result.describe()
    assert result.callbacks == []
    assert not any(e.path.endswith("/token") for e in result.exchanges), result.describe()

