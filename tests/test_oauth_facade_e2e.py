"""Facade mode, end to end: the official MCP SDK signs in through the sidecar's own AS endpoints.

The sidecar runs with STATIC_CLIENT_ID / STATIC_CLIENT_SECRET / STATE_SECRET (so AUTH_SERVER_MODE
is facade), and the real oidc-provider child (tests/oidc) knows that one confidential client with
the sidecar's callback `<RESOURCE_URL origin>/oauth/callback` as its only redirect URI. The SDK's
client (mcp 2.x `OAuthClientProvider`) only ever talks to the sidecar:

    POST /mcp 401 -> GET PRM (authorization_servers = [sidecar]) -> GET the sidecar's RFC 8414
    metadata (issuer = sidecar) -> POST /oauth/register (static id, no secret, auth none)
    -> browser: sidecar /authorize -302-> IdP /auth (auto-login) -303-> sidecar /oauth/callback
       (iss = IdP) -302-> the SDK's loopback redirect (its state, iss = sidecar: RFC 9207 holds;
       the IdP's code sealed with the SDK's redirect_uri)
    -> POST sidecar /token (relayed to the IdP with the code unsealed, the secret added and the
       callback as redirect_uri)
    -> MCP through the sidecar with a JWT whose aud is RESOURCE_URL.

What the sidecar sends to the IdP's token endpoint is observed with an aiohttp TraceConfig on
the relay's own client session (test introspection: `AuthorizationServer._session`).
Everything runs on 127.0.0.1; see tests/oauth_flow.py for the harness.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp.client.auth import OAuthFlowError, OAuthRegistrationError
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull
from multidict import CIMultiDict
from oauth_flow import (
    AuthorizationDenied,
    BrowserError,
    EchoServer,
    Exchange,
    HeadlessBrowser,
    Mode,
    SdkOAuthClient,
    SdkOAuthResult,
    Sidecar,
    decode_unverified,
    find_exception,
    run_echo_server,
    run_sdk_oauth_session,
    run_sidecar,
)
from processes import free_port
from pydantic import AnyUrl
from real_idp import RealIdp, discover, run_oidc_provider

from oauth_sidecar.signin.authserver import AuthorizationServer
from oauth_sidecar.signin.state import StateCodec

# Every test here runs real processes (see the marker in pyproject.toml).
pytestmark = pytest.mark.slow

USER = "user-1"  # the provider's --auto-login account
STATIC_ID = "mcp-facade"
STATIC_SECRET = "facade-secret-kept-by-the-sidecar"
STATE_SECRET = "facade-e2e-state-secret-0123456789abcdef"  # 40 characters, shared by replicas
OTHER_STATE_SECRET = "another-replica-with-its-own-key-0123456789"
TEXT = "hello through the facade"
HTTP_TIMEOUT = 10.0  # each single HTTP request a test makes itself
FRONT_TIMEOUT = 30.0  # a whole exchange through the replicas' front, SSE streams included
ISSUER_PATHS = [
    pytest.param("", id="issuer-without-path"),
    pytest.param("/realms/demo", id="issuer-with-path"),
]
# Not relayed by the replicas' front: connection-level headers (RFC 9110 §7.6.1).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade",
})  # fmt: skip


# --- what the relay sends to the IdP ----------------------------------------------------------


@dataclass
class RelayedRequest:
    """One request the sidecar's /token relay made to the IdP."""

    method: str
    url: str
    headers: CIMultiDict[str]
    body: bytes = b""
    status: int | None = None

    @property
    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True))

    def client_authentication(self) -> tuple[str, str, str]:
        """(method, client_id, secret) of the RFC 6749 §2.3.1 client authentication sent;
        exactly one mechanism (§2.3: a client MUST NOT use more than one per request)."""
        form, authorization = self.form, self.headers.get("Authorization")
        if authorization is not None:
            assert "client_secret" not in form, "two client authentication mechanisms"
            scheme, _, value = authorization.partition(" ")
            assert scheme == "Basic", authorization
            client_id, _, secret = base64.b64decode(value).decode().partition(":")
            return "client_secret_basic", unquote_plus(client_id), unquote_plus(secret)
        assert "client_secret" in form, f"no client authentication in {self}"
        return "client_secret_post", form["client_id"], form["client_secret"]


def authorization_server(sidecar: Sidecar) -> AuthorizationServer:
    """The sidecar's AuthorizationServer, found as the owner of its /token handler."""
    for route in sidecar.app.router.routes():
        owner = getattr(route.handler, "__self__", None)
        if isinstance(owner, AuthorizationServer):
            return owner
    raise AssertionError("no AuthorizationServer behind the sidecar's routes")


def record_relay(sidecar: Sidecar) -> list[RelayedRequest]:
    """Every request the running sidecar's token relay makes from now on (method, URL, headers,
    body, status), through a TraceConfig added to the relay's own aiohttp session."""
    session = authorization_server(sidecar)._session
    assert session is not None, "the sidecar is not running"
    recorded: list[RelayedRequest] = []

    async def started(
        _: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        context.request = RelayedRequest(
            params.method, str(params.url), CIMultiDict(params.headers)
        )
        recorded.append(context.request)

    async def chunk(
        _: aiohttp.ClientSession, context: SimpleNamespace,
        params: aiohttp.TraceRequestChunkSentParams,
    ) -> None:
        context.request.body += params.chunk

    async def ended(
        _: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        context.request.status = params.response.status

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(started)
    trace.on_request_chunk_sent.append(chunk)
    trace.on_request_end.append(ended)
    trace.freeze()
    session.trace_configs.append(trace)
    return recorded


# --- the stacks -------------------------------------------------------------------------------


def facade_env(**extra: str) -> dict[str, str]:
    """STATIC_CLIENT_ID set, AUTH_SERVER_MODE unset: facade is the default."""
    return {"STATIC_CLIENT_ID": STATIC_ID, "STATIC_CLIENT_SECRET": STATIC_SECRET,
            "STATE_SECRET": STATE_SECRET, **extra}


def static_client_spec(public_origin: str) -> str:
    """provider.mjs --static-client: the facade's client, bound to the sidecar's callback only."""
    return f"{STATIC_ID}:{STATIC_SECRET}:{public_origin}/oauth/callback"


@dataclass
class FacadeStack:
    idp: RealIdp
    echo: EchoServer
    sidecar: Sidecar
    relay: list[RelayedRequest]
    idp_metadata: dict[str, Any]


@contextlib.asynccontextmanager
async def facade_stack(
    tmp_path: Path, issuer_path: str = "", *, access_token_ttl: int | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[FacadeStack]:
    """oidc-provider (auto-login as user-1, the static client bound to the sidecar's callback)
    <- sidecar in facade mode -> SDK echo server."""
    port = free_port()  # RESOURCE_URL and the IdP-registered callback both name it
    async with (
        run_oidc_provider(
            issuer_path, auto_login=USER, access_token_ttl=access_token_ttl,
            static_clients=[static_client_spec(f"http://127.0.0.1:{port}")],
        ) as idp,
        run_echo_server(tmp_path) as echo,
        run_sidecar(idp.issuer, echo.url, facade_env(**(env or {})), port=port) as sidecar,
    ):
        try:
            yield FacadeStack(idp, echo, sidecar, record_relay(sidecar), await discover(idp))
        except Exception as exc:
            exc.add_note(f"--- oidc-provider:\n{idp.log_tail()}")
            raise


# --- shared assertions ------------------------------------------------------------------------


def query_of(url: str) -> dict[str, str]:
    pairs = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    values = dict(pairs)
    assert len(values) == len(pairs), f"a repeated parameter in {url}"
    return values


def endpoint(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def assert_facade_discovery(result: SdkOAuthResult, sidecar: Sidecar) -> None:
    """401 -> PRM naming the sidecar -> the sidecar's RFC 8414 metadata, with its own issuer."""
    origin, mcp_url = sidecar.origin, sidecar.mcp_url
    first = result.exchanges[0]
    assert first.short() == ("POST", mcp_url, 401), result.describe()
    assert first.authorization is None
    prm_url = origin + "/.well-known/oauth-protected-resource/mcp"
    assert f'resource_metadata="{prm_url}"' in (first.www_authenticate or ""), first
    assert result.summary()[1:3] == [
        ("GET", prm_url, 200),
        ("GET", origin + "/.well-known/oauth-authorization-server", 200),
    ], result.describe()
    prm = result.protected_resource_metadata
    assert prm is not None
    assert str(prm.resource) == mcp_url
    assert [str(server) for server in prm.authorization_servers] == [origin]
    metadata = result.authorization_server_metadata
    assert metadata is not None
    assert str(metadata.issuer) == origin  # RFC 8414 §3.3: the issuer the SDK discovered
    assert str(metadata.authorization_endpoint) == origin + "/authorize"
    assert str(metadata.token_endpoint) == origin + "/token"
    assert str(metadata.registration_endpoint) == origin + "/oauth/register"
    assert metadata.token_endpoint_auth_methods_supported == ["none"]
    assert metadata.code_challenge_methods_supported == ["S256"]
    assert metadata.authorization_response_iss_parameter_supported is True


def assert_only_the_sidecar(result: SdkOAuthResult, sidecar: Sidecar) -> None:
    """The SDK never talks to the IdP in facade mode; its bearer goes to the MCP URL only."""
    for exchange in result.exchanges:
        assert exchange.origin == sidecar.origin, result.describe()
        if exchange.authorization is not None:
            assert exchange.authorization == "Bearer", exchange
            assert exchange.origin + exchange.path == sidecar.mcp_url, exchange


def assert_mcp_tail(exchanges: list[Exchange], sidecar: Sidecar) -> None:
    assert exchanges, "no MCP request after the sign-in"
    for exchange in exchanges:
        assert exchange.origin + exchange.path == sidecar.mcp_url, exchange
        assert exchange.authorization == "Bearer", exchange
        assert exchange.status < 400, exchange


def assert_secret_added(relayed: RelayedRequest, idp_metadata: Mapping[str, Any]) -> str:
    """The relay authenticated as the static client, with a method the IdP lists; returns it."""
    method, client_id, secret = relayed.client_authentication()
    assert (client_id, secret) == (STATIC_ID, STATIC_SECRET), relayed
    assert method in idp_metadata["token_endpoint_auth_methods_supported"], relayed
    return method


async def register(sidecar: Sidecar, redirect_uri: str) -> dict[str, Any]:
    """The sidecar's raw RFC 7591 answer to a registration like the SDK's."""
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    document = {"redirect_uris": [redirect_uri], "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"]}
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, session.post(
        sidecar.origin + "/oauth/register", json=document
    ) as response:
        assert response.status == 201, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


def open_sealed(value: str, secret: str = STATE_SECRET) -> dict[str, Any]:
    """A value the sidecar sealed (state for the IdP, code for the client), opened with its
    STATE_SECRET; `exp` and the random redemption `id` dropped."""
    opened = StateCodec(secret.encode()).open(value)
    assert opened is not None, f"not sealed with this STATE_SECRET: {value}"
    opened.pop("exp")
    assert len(opened.pop("id")) >= 22  # 128 random bits: what single use is keyed on
    return opened


def pkce_challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, pkce_challenge(verifier)


# --- (a), (b): the whole flow, issuer with and without a path ---------------------------------


@pytest.mark.parametrize("issuer_path", ISSUER_PATHS)
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_sdk_signs_in_through_the_facade_and_calls_echo(  # noqa: PLR0915 (one sign-in, step by step)
    tmp_path: Path, issuer_path: str, mode: Mode
) -> None:
    async with facade_stack(tmp_path, issuer_path) as stack:
        client = SdkOAuthClient(stack.sidecar.mcp_url)
        result = await client.session([("echo", {"text": TEXT}), ("whoami", {})], mode=mode)
        raw_registration = await register(stack.sidecar, client.redirect_uri)
    idp, sidecar, relay = stack.idp, stack.sidecar, stack.relay
    origin, mcp_url, callback_url = sidecar.origin, sidecar.mcp_url, sidecar.origin + (
        "/oauth/callback"
    )

    # 1. Discovery ends at the sidecar; the SDK never learns of the IdP.
    assert_facade_discovery(result, sidecar)
    assert_only_the_sidecar(result, sidecar)

    # 2. Registration at the sidecar: the static client id, no secret, a public client.
    registration = result.exchanges[3]
    assert registration.short() == ("POST", origin + "/oauth/register", 201), result.describe()
    assert registration.json()["redirect_uris"] == [client.redirect_uri]
    info = result.client_info
    assert info is not None
    assert info.client_id == STATIC_ID
    assert info.client_secret is None
    assert info.token_endpoint_auth_method == "none"
    assert info.issuer == origin  # the SDK binds the credentials to the AS it registered at
    assert "client_secret" not in raw_registration, raw_registration  # served to anyone
    assert STATIC_SECRET not in json.dumps(raw_registration)

    # 3. The SDK's authorization request goes to the sidecar, which sends the browser on to the
    #    IdP with its own callback and a sealed state, keeping PKCE and the resource unchanged.
    [authorization_url] = result.authorization_urls
    assert endpoint(authorization_url) == origin + "/authorize"
    asked = result.authorization_params()
    assert (asked["client_id"], asked["redirect_uri"]) == (STATIC_ID, client.redirect_uri)
    assert asked["code_challenge_method"] == "S256"
    assert asked["resource"] == mcp_url
    hops = result.hops
    assert (hops[0].url, hops[0].status) == (authorization_url, 302), result.describe()
    assert hops[0].location is not None
    to_idp = query_of(hops[0].location)
    assert endpoint(hops[0].location) == idp.issuer + "/auth"
    assert to_idp["client_id"] == STATIC_ID
    assert to_idp["redirect_uri"] == callback_url
    assert to_idp["state"] != asked["state"]  # sealed: the client's state rides inside it
    for name in ("code_challenge", "code_challenge_method", "resource", "scope", "response_type"):
        assert to_idp[name] == asked[name], name
    # Only the browser visits the IdP, then comes back through the sidecar's callback.
    assert all(hop.url.startswith(idp.issuer + "/") for hop in hops[1:-1]), result.describe()
    from_idp, relayed_back = hops[-2], hops[-1]
    assert from_idp.location == relayed_back.url
    assert endpoint(relayed_back.url) == callback_url
    idp_response = query_of(relayed_back.url)
    assert idp_response["iss"] == idp.issuer  # RFC 9207 from the IdP, checked by the sidecar
    assert idp_response["state"] == to_idp["state"]
    assert relayed_back.status == 302
    assert relayed_back.location is not None
    assert endpoint(relayed_back.location) == client.redirect_uri
    to_client = query_of(relayed_back.location)
    assert (to_client["state"], to_client["iss"]) == (asked["state"], origin)
    assert set(to_client) == {"code", "state", "iss"}
    # The client gets the IdP's code sealed with its own redirect_uri (RFC 6749 §4.1.3 binding).
    # Both also carry the client and its PKCE challenge, which /token checks itself.
    bound = {"r": client.redirect_uri, "cid": STATIC_ID, "pc": asked["code_challenge"]}
    assert open_sealed(to_client["code"]) == {"kind": "code", "c": idp_response["code"], **bound}
    assert open_sealed(to_idp["state"]) == {"kind": "state", "s": asked["state"], **bound}
    [callback] = result.callbacks
    assert callback.iss == origin  # what the SDK's RFC 9207 check compared with the issuer
    assert callback.state == asked["state"]
    assert callback.code == to_client["code"]

    # 4. The SDK redeems the code at the sidecar as a public client; the relay adds the secret
    #    and puts back the callback the IdP bound the code to.
    token = result.exchanges[4]
    assert token.short() == ("POST", origin + "/token", 200), result.describe()
    assert token.authorization is None
    sent = token.form
    assert sent["grant_type"] == "authorization_code"
    assert (sent["client_id"], sent["redirect_uri"]) == (STATIC_ID, client.redirect_uri)
    assert "client_secret" not in sent
    [relayed] = relay
    assert (relayed.method, relayed.url, relayed.status) == (
        "POST", stack.idp_metadata["token_endpoint"], 200
    )
    assert_secret_added(relayed, stack.idp_metadata)
    forwarded = relayed.form
    assert forwarded["redirect_uri"] == callback_url
    assert forwarded["code"] == idp_response["code"]  # unsealed for the IdP
    for name in ("grant_type", "code_verifier", "resource", "client_id"):
        assert forwarded[name] == sent[name], name
    tokens = result.tokens
    assert tokens is not None
    assert tokens.refresh_token
    claims = result.claims
    assert claims is not None, "the access token is not a JWT"
    assert (claims["aud"], claims["sub"], claims["iss"]) == (mcp_url, USER, idp.issuer)
    assert claims["client_id"] == STATIC_ID

    # 5. MCP through the sidecar with that token; the upstream never sees it.
    assert_mcp_tail(result.exchanges[5:], sidecar)
    if mode == "legacy":
        assert ("DELETE", mcp_url, 200) in result.summary(), result.describe()
    assert result.results[0] == TEXT
    seen = json.loads(result.results[1])
    assert "authorization" not in seen, seen
    assert tokens.access_token not in repr(seen)
    assert seen["host"] == f"127.0.0.1:{stack.echo.port}", seen


class IdpIssuerClient(SdkOAuthClient):
    """Hands the SDK the IdP's `iss` instead of the relayed one: what a facade that only
    rewrote the metadata's issuer (no relay) would deliver."""

    def __init__(self, mcp_url: str, idp_issuer: str) -> None:
        super().__init__(mcp_url)
        self.idp_issuer = idp_issuer

    async def _callback(self) -> AuthorizationCodeResult:
        result = await super()._callback()
        return result.model_copy(update={"iss": self.idp_issuer})


async def test_without_the_relay_the_sdk_would_refuse_the_idp_iss(tmp_path: Path) -> None:
    """Why the relay exists: the SDK compares RFC 9207 `iss` with the issuer it discovered (the
    sidecar), so the IdP's own `iss` ends the sign-in before the code is redeemed."""
    async with facade_stack(tmp_path) as stack:
        client = IdpIssuerClient(stack.sidecar.mcp_url, stack.idp.issuer)
        result = await client.session(allow_failure=True)
    refused = find_exception(result.error, OAuthFlowError)
    assert refused is not None, result.describe()
    assert "iss mismatch" in str(refused), refused
    assert result.callbacks[-1].iss == stack.sidecar.origin  # what the relay did deliver
    assert not any(e.path == "/token" for e in result.exchanges), result.describe()
    assert stack.relay == []


async def test_relay_authenticates_with_basic_when_the_idp_lists_it(tmp_path: Path) -> None:
    """RFC 6749 §2.3.1: every AS MUST support HTTP Basic, client_secret_post is NOT RECOMMENDED;
    the static client is registered at the IdP as client_secret_basic, and IdPs such as Authelia
    (or Keycloak with client.secret.authentication.allowed.method) refuse another method."""
    async with facade_stack(tmp_path) as stack:
        await run_sdk_oauth_session(stack.sidecar.mcp_url)
    listed = stack.idp_metadata["token_endpoint_auth_methods_supported"]
    assert {"client_secret_basic", "client_secret_post"} <= set(listed), listed
    [relayed] = stack.relay
    assert assert_secret_added(relayed, stack.idp_metadata) == "client_secret_basic", relayed


# --- (c): refresh through the sidecar ---------------------------------------------------------


async def test_expired_access_token_is_refreshed_through_the_facade(tmp_path: Path) -> None:
    ttl = 1
    async with facade_stack(tmp_path, "/realms/demo", access_token_ttl=ttl) as stack:
        sidecar, relay = stack.sidecar, stack.relay
        client = SdkOAuthClient(sidecar.mcp_url)
        sessions = [await client.session()]
        assert len(relay) == 1
        for _ in range(2):  # twice: the refreshed grant keeps working
            previous = sessions[-1].tokens
            assert previous is not None
            assert previous.expires_in == ttl
            assert previous.refresh_token
            await asyncio.sleep(ttl + 0.2)  # the SDK now holds an expired access token
            sessions.append(await client.session())

    origin, mcp_url = sidecar.origin, sidecar.mcp_url
    assert len(relay) == 3, relay
    for i, session in enumerate(sessions[1:], start=1):
        # No new sign-in: the SDK refreshed at the sidecar before its first MCP request.
        assert session.authorization_urls == [], session.describe()
        assert session.hops == []
        refresh = session.exchanges[0]
        assert refresh.short() == ("POST", origin + "/token", 200), session.describe()
        assert refresh.authorization is None
        sent = refresh.form
        assert sent["grant_type"] == "refresh_token"
        assert sent["client_id"] == STATIC_ID
        assert sent["resource"] == mcp_url
        assert "client_secret" not in sent
        previous = sessions[i - 1].tokens
        assert previous is not None
        assert sent["refresh_token"] == previous.refresh_token
        relayed = relay[i]
        assert (relayed.url, relayed.status) == (stack.idp_metadata["token_endpoint"], 200)
        assert_secret_added(relayed, stack.idp_metadata)
        forwarded = relayed.form
        assert "redirect_uri" not in forwarded  # only the code grant's is swapped
        for name in ("grant_type", "refresh_token", "resource", "client_id"):
            assert forwarded[name] == sent[name], name
        assert_only_the_sidecar(session, sidecar)
        assert_mcp_tail(session.exchanges[1:], sidecar)
        assert session.text == "hello through the sidecar"
        tokens = session.tokens
        assert tokens is not None
        assert tokens.access_token != previous.access_token
        claims = session.claims
        assert claims is not None
        assert (claims["aud"], claims["sub"], claims["client_id"]) == (mcp_url, USER, STATIC_ID)


# --- (d): a redirect URI outside the allow-list -----------------------------------------------


async def test_redirect_uri_outside_the_allow_list_is_refused_before_the_idp(
    tmp_path: Path,
) -> None:
    allowed = f"http://127.0.0.1:{free_port()}/callback"
    env = {"ALLOW_LOOPBACK_REDIRECTS": "false", "ALLOWED_REDIRECT_URIS": allowed}
    async with facade_stack(tmp_path, env=env) as stack:
        sidecar = stack.sidecar
        # The SDK's usual loopback redirect, on another port: registration refuses it.
        refused = await run_sdk_oauth_session(sidecar.mcp_url, allow_failure=True)
        # A client that skips registration (given the static id) meets the same list at
        # /authorize: 400, never a redirect, so the browser never reaches the IdP.
        other = f"http://127.0.0.1:{free_port()}/callback"
        preconfigured = await run_sdk_oauth_session(
            sidecar.mcp_url, redirect_uri=other, allow_failure=True,
            client_info=OAuthClientInformationFull(
                client_id=STATIC_ID, redirect_uris=[AnyUrl(other)],
                token_endpoint_auth_method="none",
            ),
        )
        # Control: the exact URI the operator allowed signs in.
        accepted = await run_sdk_oauth_session(sidecar.mcp_url, redirect_uri=allowed)
    origin = sidecar.origin

    assert find_exception(refused.error, OAuthRegistrationError) is not None, refused.describe()
    assert_facade_discovery(refused, sidecar)
    assert refused.summary()[3:] == [("POST", origin + "/oauth/register", 400)], refused.describe()
    error = refused.exchanges[3].error()
    assert isinstance(error, dict)
    assert error["error"] == "invalid_redirect_uri", error
    assert refused.authorization_urls == []
    assert refused.hops == []

    assert find_exception(preconfigured.error, BrowserError) is not None, preconfigured.describe()
    assert [(endpoint(h.url), h.status, h.location) for h in preconfigured.hops] == [
        (origin + "/authorize", 400, None)
    ], preconfigured.describe()
    assert not any(e.path == "/token" for e in preconfigured.exchanges), preconfigured.describe()
    assert_only_the_sidecar(preconfigured, sidecar)

    assert accepted.text == "hello through the sidecar"
    assert accepted.iss == origin
    assert len(stack.relay) == 1  # the IdP's token endpoint saw the accepted sign-in only


# --- (e): the IdP's authorization response, tampered with -------------------------------------


@dataclass
class RelayedSignIn:
    """A sign-in driven over plain HTTP as a client and its browser would, up to the moment
    the IdP redirects back to the sidecar's callback (not yet delivered)."""

    client_redirect: str
    client_state: str
    verifier: str
    idp_callback: str
    """The IdP's redirect to <sidecar>/oauth/callback: code, sealed state, iss."""

    @property
    def params(self) -> dict[str, str]:
        return query_of(self.idp_callback)

    def callback_with(self, **changes: str | None) -> str:
        """The IdP's callback URL with parameters replaced (None: removed)."""
        params = {**self.params, **changes}
        kept = {name: value for name, value in params.items() if value is not None}
        return endpoint(self.idp_callback) + "?" + urlencode(kept)


async def start_sign_in(
    sidecar: Sidecar, via: str | None = None, *, prompt: str | None = None
) -> RelayedSignIn:
    """GET <via or the sidecar>/authorize as the static client with PKCE, follow the browser
    through the IdP's auto-login, stop at the IdP's redirect to the sidecar's callback."""
    client_redirect = f"http://127.0.0.1:{free_port()}/callback"
    client_state = secrets.token_urlsafe(16)
    verifier, challenge = pkce_pair()
    query = {
        "response_type": "code", "client_id": STATIC_ID, "redirect_uri": client_redirect,
        "state": client_state, "code_challenge": challenge, "code_challenge_method": "S256",
        "resource": sidecar.mcp_url, "scope": "openid mcp:read",
    }
    if prompt is not None:
        query["prompt"] = prompt
    browser = HeadlessBrowser(sidecar.origin + "/oauth/callback", timeout=HTTP_TIMEOUT)
    url = (via or sidecar.origin) + "/authorize?" + urlencode(query)
    with contextlib.suppress(AuthorizationDenied):  # an IdP error is still a callback
        await browser.authorize(url)
    assert browser.redirect_url is not None
    return RelayedSignIn(client_redirect, client_state, verifier, browser.redirect_url)


async def get(url: str) -> tuple[int, str | None, Any]:
    """(status, Location, JSON body or None) of one GET, redirects not followed."""
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, session.get(
        url, allow_redirects=False
    ) as response:
        body = await response.read()
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        return response.status, response.headers.get("Location"), document


async def redeem(
    sidecar: Sidecar, sign_in: RelayedSignIn, code: str, redirect_uri: str | None = None
) -> tuple[int, dict[str, Any]]:
    """POST <sidecar>/token as the public client would after the relayed callback."""
    form = {
        "grant_type": "authorization_code", "code": code, "client_id": STATIC_ID,
        "redirect_uri": redirect_uri or sign_in.client_redirect,
        "code_verifier": sign_in.verifier, "resource": sidecar.mcp_url,
    }
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, session.post(
        sidecar.origin + "/token", data=form
    ) as response:
        document: dict[str, Any] = await response.json(content_type=None)
        return response.status, document


async def test_tampered_authorization_response_is_refused(tmp_path: Path) -> None:
    async with facade_stack(tmp_path, "/realms/demo") as stack:
        sidecar, idp = stack.sidecar, stack.idp
        sign_in = await start_sign_in(sidecar)
        genuine = sign_in.params
        assert genuine["iss"] == idp.issuer
        assert endpoint(sign_in.idp_callback) == sidecar.origin + "/oauth/callback"
        payload, _, signature = genuine["state"].partition(".")
        forged_signature = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
        attempts = {
            "another iss (mix-up)": sign_in.callback_with(iss="http://evil"),
            "the sidecar's own iss": sign_in.callback_with(iss=sidecar.origin),
            "no iss although the IdP advertises it": sign_in.callback_with(iss=None),
            "a forged state": sign_in.callback_with(state=f"{payload}.{forged_signature}"),
            "no state": sign_in.callback_with(state=None),
        }
        answers = {what: await get(url) for what, url in attempts.items()}
        # The untouched response still goes through afterwards (nothing was used up), and its
        # code redeems at the sidecar: the refusals above were about the tampering only.
        status, location, _ = await get(sign_in.idp_callback)
        assert status == 302
        assert location is not None
        delivered = query_of(location)
        sealed_code = delivered["code"]
        # The code is bound to the client's redirect_uri, and only codes relayed by the
        # callback are accepted: neither reaches the IdP.
        other_redirect = f"http://127.0.0.1:{free_port()}/callback"
        wrong_redirect = await redeem(sidecar, sign_in, sealed_code, other_redirect)
        raw_code = await redeem(sidecar, sign_in, genuine["code"])
        assert stack.relay == []
        status, tokens = await redeem(sidecar, sign_in, sealed_code)
        assert status == 200, tokens

    for what, (status, refused_location, error) in answers.items():
        assert (status, refused_location) == (400, None), what  # never a redirect to the client
        assert isinstance(error, dict), what
        assert error["error"] == "invalid_request", (what, error)
        # Refused for the reason at hand: the issuer check, or the state's signature.
        about_iss = "iss" in what
        assert ("issuer" in error["error_description"]) is about_iss, (what, error)
    assert endpoint(location) == sign_in.client_redirect
    assert delivered == {"code": sealed_code, "state": sign_in.client_state, "iss": sidecar.origin}
    assert open_sealed(sealed_code) == {
        "kind": "code", "c": genuine["code"], "r": sign_in.client_redirect, "cid": STATIC_ID,
        "pc": pkce_challenge(sign_in.verifier),
    }
    for status, error in (wrong_redirect, raw_code):
        assert (status, error["error"]) == (400, "invalid_grant"), error
    claims = decode_unverified(tokens["access_token"])
    assert claims is not None
    assert (claims["aud"], claims["iss"], claims["sub"]) == (sidecar.mcp_url, idp.issuer, USER)
    [relayed] = stack.relay
    assert relayed.form["redirect_uri"] == sidecar.origin + "/oauth/callback"
    assert relayed.form["code"] == genuine["code"]


async def test_idp_error_is_relayed_with_the_client_state_and_the_sidecar_iss(
    tmp_path: Path,
) -> None:
    """prompt=none without a session at the IdP: RFC 6749 §4.1.2.1 error redirect (OIDC
    login_required), relayed to the client like a code, with its own state and our iss."""
    async with facade_stack(tmp_path) as stack:
        sign_in = await start_sign_in(stack.sidecar, prompt="none")
        from_idp = sign_in.params
        status, location, _ = await get(sign_in.idp_callback)
    assert from_idp["error"] == "login_required", from_idp
    assert from_idp["iss"] == stack.idp.issuer
    assert status == 302
    assert location is not None
    assert endpoint(location) == sign_in.client_redirect
    relayed = query_of(location)
    assert relayed["error"] == "login_required"
    assert relayed["state"] == sign_in.client_state
    assert relayed["iss"] == stack.sidecar.origin
    assert "code" not in relayed
    assert stack.relay == []


# --- (f): replicas sharing STATE_SECRET -------------------------------------------------------


@dataclass
class Front:
    """A load balancer on the public port: routes each request to a named replica."""

    route: Callable[[web.Request], str]
    backends: dict[str, Sidecar]
    served: list[tuple[str, str, str, int]] = field(default_factory=list)
    """(replica, method, path, status) per request, in arrival order of the answers."""

    def by(self, path: str) -> list[tuple[str, int]]:
        return [(name, status) for name, _, p, status in self.served if p == path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = self.route(request)
        backend = self.backends[name]
        headers = CIMultiDict(
            (key, value) for key, value in request.headers.items()
            if key.lower() not in HOP_BY_HOP
        )
        body = await request.read()
        timeout = aiohttp.ClientTimeout(total=FRONT_TIMEOUT)
        async with aiohttp.ClientSession(
            timeout=timeout, trust_env=False, auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session, session.request(
            request.method, backend.listen_origin + request.path_qs, headers=headers,
            data=body or None, allow_redirects=False,
        ) as upstream:
            self.served.append((name, request.method, request.path, upstream.status))
            response = web.StreamResponse(status=upstream.status, headers=CIMultiDict(
                (key, value) for key, value in upstream.headers.items()
                if key.lower() not in HOP_BY_HOP
            ))
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


def split_sign_in(request: web.Request) -> str:
    """The sign-in starts on replica a, the IdP's answer comes back to replica b, and the code
    b sealed is redeemed on a again: each hand-over needs the shared STATE_SECRET."""
    return "b" if request.path == "/oauth/callback" else "a"


@contextlib.asynccontextmanager
async def replicated_stack(
    tmp_path: Path, secret_b: str
) -> AsyncIterator[tuple[Front, list[RelayedRequest], list[RelayedRequest]]]:
    """oidc-provider <- two facade sidecars (same RESOURCE_URL, STATE_SECRET of a: STATE_SECRET,
    of b: secret_b) behind a front on the public port -> one SDK echo server."""
    public = free_port()
    async with AsyncExitStack() as stack:
        idp = await stack.enter_async_context(run_oidc_provider(
            auto_login=USER, static_clients=[static_client_spec(f"http://127.0.0.1:{public}")],
        ))
        echo = await stack.enter_async_context(run_echo_server(tmp_path))
        replicas = {}
        for name, secret in (("a", STATE_SECRET), ("b", secret_b)):
            replicas[name] = await stack.enter_async_context(run_sidecar(
                idp.issuer, echo.url, facade_env(STATE_SECRET=secret), port=public,
                listen_port=free_port(),
            ))
        front = Front(split_sign_in, replicas)
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", front.handle)
        server = TestServer(app, host="127.0.0.1", port=public)
        await server.start_server()
        stack.push_async_callback(server.close)
        try:
            yield front, record_relay(replicas["a"]), record_relay(replicas["b"])
        except Exception as exc:
            exc.add_note(f"--- served: {front.served}\n--- oidc-provider:\n{idp.log_tail()}")
            raise


async def test_sign_in_started_on_one_replica_completes_on_another(tmp_path: Path) -> None:
    async with replicated_stack(tmp_path, STATE_SECRET) as (front, relay_a, relay_b):
        sidecar = front.backends["a"]
        result = await run_sdk_oauth_session(sidecar.mcp_url, [("echo", {"text": TEXT})])
    assert front.backends["a"].origin == front.backends["b"].origin == sidecar.origin
    assert front.by("/authorize") == [("a", 302)]
    assert front.by("/oauth/callback") == [("b", 302)]  # b opened the state a sealed
    assert front.by("/token") == [("a", 200)]  # a opened the code b sealed
    assert {name for name, _ in front.by("/mcp")} == {"a"}
    assert result.text == TEXT
    assert result.iss == sidecar.origin
    assert_only_the_sidecar(result, sidecar)
    assert relay_b == []
    [relayed] = relay_a
    assert relayed.form["redirect_uri"] == sidecar.origin + "/oauth/callback"


async def test_replica_with_another_state_secret_refuses_the_callback(tmp_path: Path) -> None:
    """The control for the test above: without a shared STATE_SECRET, b cannot open a's state
    (what happens with the default per-process key), and nothing reaches the client."""
    async with replicated_stack(tmp_path, OTHER_STATE_SECRET) as (front, relay_a, relay_b):
        sidecar = front.backends["a"]
        result = await run_sdk_oauth_session(sidecar.mcp_url, allow_failure=True)
    refused = find_exception(result.error, BrowserError)
    assert refused is not None, result.describe()
    assert "did not start here" in str(refused), refused
    assert front.by("/authorize") == [("a", 302)]
    assert front.by("/oauth/callback") == [("b", 400)]
    last = result.hops[-1]
    assert (endpoint(last.url), last.status) == (sidecar.origin + "/oauth/callback", 400)
    assert result.callbacks == []
    assert front.by("/token") == []
    assert relay_a == relay_b == []


# --- (g): the relay lends the static secret to nothing else; each value is used once ------------

LEAKY_GRANTS = ["client_credentials", "password", "Client_Credentials",
                "urn:ietf:params:oauth:grant-type:token-exchange"]


async def post_form(
    url: str, form: Mapping[str, str], headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, Any], CIMultiDict[str]]:
    """(status, JSON body, headers) of one form POST."""
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, session.post(
        url, data=dict(form), headers=dict(headers or {})
    ) as response:
        document: dict[str, Any] = await response.json(content_type=None)
        return response.status, document, CIMultiDict(response.headers)


async def mcp_status(sidecar: Sidecar, access_token: str) -> int:
    """The status of an MCP initialize request through the sidecar with this token."""
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    message = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "probe", "version": "1"}}}
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, session.post(
        sidecar.mcp_url, json=message, headers={
            "Authorization": f"Bearer {access_token}",
            "Accept": "application/json, text/event-stream"},
    ) as response:
        await response.read()
        return response.status


async def test_token_relay_lends_the_static_secret_to_no_other_grant(tmp_path: Path) -> None:
    """The credential leak of the first release, against the real IdP. Its static client may use
    client_credentials (confidential clients often may), and the relay used to add the secret
    to any grant: any caller, any web page (`*`), got a token for the static client."""
    env = {"ALLOW_SUBS": "", "ALLOW_ALL_AUTHENTICATED": "true"}  # the IdP decides who signs in
    async with facade_stack(tmp_path, env=env) as stack:
        sidecar = stack.sidecar
        # Control: what the secret is worth. The IdP grants the static client a token for
        # the resource without any user, and /mcp accepts it.
        pair = base64.b64encode(f"{STATIC_ID}:{STATIC_SECRET}".encode()).decode()
        granted, control, _ = await post_form(stack.idp_metadata["token_endpoint"], {
            "grant_type": "client_credentials", "resource": sidecar.mcp_url,
            "scope": "mcp:read"}, {"Authorization": f"Basic {pair}"})
        assert granted == 200, control
        assert await mcp_status(sidecar, control["access_token"]) == 200
        answers = {grant: await post_form(sidecar.origin + "/token", {
            "grant_type": grant, "client_id": STATIC_ID, "resource": sidecar.mcp_url,
            "scope": "mcp:read", "username": USER, "password": "guess",
        }, {"Origin": "https://any-page.example"}) for grant in LEAKY_GRANTS}
    for grant, (status, body, headers) in answers.items():
        assert (status, body.get("error")) == (400, "unsupported_grant_type"), (grant, body)
        assert "access_token" not in body, grant
        assert headers["Cache-Control"] == "no-store"
    assert stack.relay == []  # the IdP's token endpoint never heard of them


async def test_each_authorization_response_and_code_is_used_once(tmp_path: Path) -> None:
    """RFC 6749 §4.1.2 at the sidecar, with the real IdP: a replayed callback mints no second
    code, a replayed code and a stolen code with a wrong verifier never reach the IdP."""
    async with facade_stack(tmp_path) as stack:
        sidecar = stack.sidecar
        sign_in = await start_sign_in(sidecar)
        first = await get(sign_in.idp_callback)
        replayed = await get(sign_in.idp_callback)
        assert first[1] is not None
        code = query_of(first[1])["code"]
        thief = dataclasses.replace(sign_in, verifier=pkce_pair()[0])
        stolen = await redeem(sidecar, thief, code)
        relayed_before = len(stack.relay)
        redeemed = await redeem(sidecar, sign_in, code)
        replayed_code = await redeem(sidecar, sign_in, code)
    assert first[0] == 302
    assert replayed[:2] == (400, None)  # refused, and no redirect to the client
    assert (stolen[0], stolen[1]["error"]) == (400, "invalid_grant")
    assert relayed_before == 0
    assert redeemed[0] == 200, redeemed
    assert (replayed_code[0], replayed_code[1]["error"]) == (400, "invalid_grant")
    assert "already used" in replayed_code[1]["error_description"]
    [relayed] = stack.relay
    assert relayed.status == 200
