"""The authorization server MCP clients see, through the real sidecar: RFC 8414 facade metadata
with our own issuer, the RFC 9207-safe /authorize -> IdP -> /oauth/callback relay, the /token
relay (our callback put back, the static client's secret added), and direct mode's pass-through.

The fake IdP (conftest) serves the discovery document the test chooses; a second aiohttp app
here plays its token endpoint and records exactly what reaches it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import FakeIdp, FakeUpstream, SidecarFactory
from multidict import CIMultiDictProxy
from processes import free_port
from structlog.testing import capture_logs

from oauth_sidecar.signin import authserver
from oauth_sidecar.signin import state as relay_state

Client = TestClient[web.Request, web.Application]

REQUEST_TIMEOUT = 10.0  # every request in this file is bounded
ISSUER = "https://mcp.example.test"  # the RESOURCE_URL origin: our issuer in facade mode
CALLBACK = ISSUER + "/oauth/callback"
CLIENT_ID = "static-client-1"
STATE_SECRET = "k" * 40
FACADE = {"STATIC_CLIENT_ID": CLIENT_ID, "STATE_SECRET": STATE_SECRET}
CLAUDE_AI = "https://claude.ai/api/mcp/auth_callback"
LOOPBACK = "http://127.0.0.1:33418/callback"
AS_PATHS = (
    "/.well-known/oauth-authorization-server",
    "/.well-known/openid-configuration",
    "/.well-known/oauth-authorization-server/mcp",
    "/.well-known/openid-configuration/mcp",
)
PRM_PATH = "/.well-known/oauth-protected-resource/mcp"
BROWSER = "https://inspector.example"
IDP_CODE = "code-from-idp-123"  # the code the IdP puts in its authorization response
VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"  # S256 of VERIFIER (RFC 7636 App. B)
TOKEN_RESPONSE = {
    "access_token": "at-NEVER-LOGGED-4f1c", "refresh_token": "rt-NEVER-LOGGED-9a2b",
    "token_type": "Bearer", "expires_in": 300,
}


# -- helpers --------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    text: str

    def json(self) -> Any:
        assert self.headers.get("Content-Type", "").startswith("application/json"), self.headers
        return json.loads(self.text)

    @property
    def location(self) -> str:
        return self.headers["Location"]

    def target(self) -> tuple[str, list[tuple[str, str]]]:
        """Where the redirect goes (without query) and its query parameters, in order."""
        parts = urlsplit(self.location)
        base = parts._replace(query="", fragment="").geturl()
        return base, parse_qsl(parts.query, keep_blank_values=True)


async def call(
    client: Client, method: str, path: str, *, params: Any = None, data: Any = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One bounded request that never follows redirects."""
    async with asyncio.timeout(REQUEST_TIMEOUT):
        response = await client.request(method, path, params=params, data=data,
                                        headers=headers, allow_redirects=False)
        text = await response.text()
    return Reply(response.status, response.headers, text)


def assert_refused_without_redirect(reply: Reply, status: int = 400) -> None:
    assert reply.status == status, reply.text
    assert "Location" not in reply.headers
    assert reply.json()["error"]


def idp_document(idp: FakeIdp, **fields: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "issuer": idp.issuer,
        "jwks_uri": idp.origin + "/jwks",
        "authorization_endpoint": idp.origin + "/authorize",
        "token_endpoint": idp.origin + "/token",
        "code_challenge_methods_supported": ["S256"],
    }
    document.update(fields)
    return {k: v for k, v in document.items() if v is not None}


def serve_document(idp: FakeIdp, **fields: Any) -> None:
    """The fake IdP publishes its usual discovery document changed by fields (None drops one)."""

    async def discovery(request: web.Request) -> web.StreamResponse:
        return web.json_response(idp_document(idp, **fields))

    idp.discovery_override = discovery


@dataclass
class TokenCall:
    form: list[tuple[str, str]]
    headers: dict[str, str]


@dataclass
class TokenEndpoint:
    """The IdP's token endpoint: records every form and header set, answers what it is told."""

    calls: list[TokenCall] = field(default_factory=list)
    status: int = 200
    body: bytes = json.dumps(TOKEN_RESPONSE).encode()
    content_type: str = "application/json"
    hold: asyncio.Event | None = None  # when set, wait for it (bounded) before answering
    split: bool = False  # send the body in two writes, as a real network delivers it
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}/oauth2/token"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.calls.append(TokenCall(parse_qsl(raw.decode(), keep_blank_values=True),
                                    dict(request.headers)))
        if self.hold is not None:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await self.hold.wait()
        if not self.split:
            return web.Response(status=self.status, body=self.body,
                                content_type=self.content_type)
        response = web.StreamResponse(status=self.status, headers={
            "Content-Type": self.content_type, "Content-Length": str(len(self.body))})
        await response.prepare(request)
        half = len(self.body) // 2
        await response.write(self.body[:half])
        await asyncio.sleep(0.05)
        await response.write(self.body[half:])
        await response.write_eof()
        return response

    @property
    def last(self) -> TokenCall:
        assert len(self.calls) == 1, self.calls
        return self.calls[0]


@asynccontextmanager
async def running_token_endpoint() -> AsyncIterator[TokenEndpoint]:
    """A recording token endpoint on loopback (test_redemptions.py uses it too)."""
    endpoint = TokenEndpoint()
    app = web.Application()
    app.router.add_post("/oauth2/token", endpoint.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    endpoint.server = server
    try:
        yield endpoint
    finally:
        if endpoint.hold is not None:
            endpoint.hold.set()
        await server.close()


@pytest.fixture
async def token_endpoint() -> AsyncIterator[TokenEndpoint]:
    async with running_token_endpoint() as endpoint:
        yield endpoint


Start = Callable[..., Awaitable[Client]]


@pytest.fixture
def start(make_sidecar: SidecarFactory, idp: FakeIdp, token_endpoint: TokenEndpoint) -> Start:
    """A sidecar whose IdP publishes `document` fields, with the recording token endpoint."""

    async def run(document: dict[str, Any] | None = None, **env: str) -> Client:
        serve_document(idp, **{"token_endpoint": token_endpoint.url, **(document or {})})
        return await make_sidecar(**env)

    return run


def authorize_params(**changes: str | None) -> dict[str, str]:
    """An authorization request as an MCP client sends it."""
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": CLAUDE_AI,
        "state": "client-state-42",
        "code_challenge": CHALLENGE,
        "code_challenge_method": "S256",
        "scope": "openid mcp:read offline_access",
        "resource": "https://mcp.example.test/mcp",
        "prompt": "consent",
    }
    params.update(changes)
    return {k: v for k, v in params.items() if v is not None}


async def sealed_state(client: Client, **changes: str | None) -> str:
    """Start a sign-in at /authorize; return the state the sidecar sent to the IdP."""
    reply = await call(client, "GET", "/authorize", params=authorize_params(**changes))
    assert reply.status == 302, reply.text
    state = dict(reply.target()[1])["state"]
    assert isinstance(state, str)
    return state


async def idp_answers(client: Client, **params: str) -> Reply:
    """The browser arriving back from the IdP at our callback."""
    return await call(client, "GET", "/oauth/callback", params=params)


def form(**fields: str) -> dict[str, Any]:
    return {"data": urlencode(fields),
            "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


async def sealed_code(
    client: Client, idp: FakeIdp, redirect_uri: str = CLAUDE_AI, idp_code: str = IDP_CODE,
    **changes: str | None,
) -> str:
    """A real sign-in through the facade: /authorize, then the IdP answering our callback with
    idp_code; return the code the sidecar hands the client at redirect_uri."""
    state = await sealed_state(client, redirect_uri=redirect_uri, **changes)
    reply = await idp_answers(client, code=idp_code, state=state, iss=idp.issuer)
    assert reply.status == 302, reply.text
    base, query = reply.target()
    assert base == urlsplit(redirect_uri)._replace(query="").geturl()
    code = dict(query)["code"]
    assert code != idp_code
    assert code.count(".") == 1
    return code


def code_exchange(code: str = IDP_CODE, **changes: str) -> dict[str, str]:
    """An authorization-code token request; in facade mode pass a code from sealed_code()."""
    return {
        "grant_type": "authorization_code", "code": code,
        "redirect_uri": CLAUDE_AI, "code_verifier": VERIFIER, "client_id": CLIENT_ID, **changes,
    }


def refresh(**changes: str) -> dict[str, str]:
    """A refresh-token request: the relay's generic behaviour, with no code to unseal."""
    return {"grant_type": "refresh_token", "refresh_token": "rt-1", "client_id": CLIENT_ID,
            **changes}


def as_idp_receives(sent: dict[str, str]) -> list[tuple[str, str]]:
    """What the IdP must get for a facade code exchange: its own code and our callback."""
    return list({**sent, "code": IDP_CODE, "redirect_uri": CALLBACK}.items())


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


# -- facade metadata ------------------------------------------------------------------------------


async def test_facade_prm_names_the_sidecar_as_authorization_server(start: Start) -> None:
    client = await start(**FACADE)
    prm = (await call(client, "GET", PRM_PATH)).json()
    assert prm["authorization_servers"] == [ISSUER]


async def test_facade_metadata_carries_our_issuer_and_endpoints_at_every_discovery_path(
    start: Start, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    client = await start({
        "pushed_authorization_request_endpoint": idp.origin + "/par",
        "require_pushed_authorization_requests": True,
        "client_id_metadata_document_supported": True,
        "registration_endpoint": idp.origin + "/register",
        "mtls_endpoint_aliases": {"token_endpoint": "https://mtls.idp.example/token"},
        "userinfo_endpoint": idp.origin + "/userinfo",
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "token", "id_token"],
        "grant_types_supported": ["authorization_code", "implicit", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
    }, **FACADE)
    replies = [await call(client, "GET", path) for path in AS_PATHS]
    for path, reply in zip(AS_PATHS, replies, strict=True):
        assert reply.status == 200, (path, reply.text)
        assert reply.headers["Content-Type"].startswith("application/json")
        assert "max-age" in reply.headers["Cache-Control"]
    assert len({reply.text for reply in replies}) == 1
    document = replies[0].json()
    assert document["issuer"] == ISSUER  # RFC 8414 §3.3: exactly the issuer in the PRM
    assert document["authorization_endpoint"] == ISSUER + "/authorize"
    assert document["token_endpoint"] == ISSUER + "/token"
    assert document["registration_endpoint"] == ISSUER + "/oauth/register"
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert document["authorization_response_iss_parameter_supported"] is True
    assert document["response_types_supported"] == ["code"]
    assert document["grant_types_supported"] == ["authorization_code", "refresh_token"]
    assert document["token_endpoint_auth_methods_supported"] == ["none"]
    assert document["jwks_uri"] == idp.origin + "/jwks"
    assert document["userinfo_endpoint"] == idp.origin + "/userinfo"
    assert document["id_token_signing_alg_values_supported"] == ["RS256"]
    for dropped in ("pushed_authorization_request_endpoint",
                    "require_pushed_authorization_requests", "mtls_endpoint_aliases"):
        assert dropped not in document
    # The IdP's own CIMD support is not ours to offer; the facade resolves documents itself
    # (CIMD on by default), and says so whatever the IdP said.
    assert document["client_id_metadata_document_supported"] is True
    # Nothing that would send a client around the relay.
    assert "/par" not in replies[0].text
    assert idp.origin + "/register" not in replies[0].text
    assert idp.origin + "/authorize" not in replies[0].text
    assert upstream.requests == []


@pytest.mark.parametrize("idp_methods", [["plain"], None, []], ids=repr)
async def test_s256_advertised_whatever_the_idp_lists(start: Start, idp_methods: Any) -> None:
    client = await start({"code_challenge_methods_supported": idp_methods}, **FACADE)
    document = (await call(client, "GET", AS_PATHS[0])).json()
    assert document["code_challenge_methods_supported"] == ["S256"]


async def test_published_secret_adds_client_secret_post_to_auth_methods(start: Start) -> None:
    client = await start(**FACADE, STATIC_CLIENT_SECRET="sec", STATIC_CLIENT_CONFIDENTIAL="true")
    document = (await call(client, "GET", AS_PATHS[0])).json()
    assert document["token_endpoint_auth_methods_supported"] == ["none", "client_secret_post"]


@pytest.mark.parametrize(("idp_scopes", "expected"), [
    (["openid", "profile", "offline_access"], ["mcp:read", "offline_access"]),
    (["openid", "profile"], ["mcp:read"]),
    (None, ["mcp:read"]),
], ids=["idp-offers-offline_access", "idp-does-not", "idp-lists-nothing"])
async def test_scopes_supported_adds_offline_access_only_when_the_idp_offers_it(
    start: Start, idp_scopes: Any, expected: list[str]
) -> None:
    client = await start({"scopes_supported": idp_scopes}, **FACADE, SCOPES_SUPPORTED="mcp:read")
    document = (await call(client, "GET", AS_PATHS[0])).json()
    assert document["scopes_supported"] == expected
    prm = (await call(client, "GET", PRM_PATH)).json()
    assert prm["scopes_supported"] == ["mcp:read"]


async def test_operator_listed_offline_access_stays_out_of_the_prm(start: Start) -> None:
    client = await start({"scopes_supported": ["openid", "offline_access"]}, **FACADE,
                         SCOPES_SUPPORTED="mcp:read offline_access")
    prm = (await call(client, "GET", PRM_PATH)).json()
    assert "offline_access" not in prm["scopes_supported"]
    document = (await call(client, "GET", AS_PATHS[0])).json()
    assert document["scopes_supported"].count("offline_access") == 1


async def test_metadata_is_503_until_the_idp_document_is_fetched(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    idp.down = True
    client = await make_sidecar(wait_ready=False, **FACADE)
    for path in AS_PATHS:
        reply = await call(client, "GET", path)
        assert reply.status == 503, reply.text
        assert reply.json()["error"] == "temporarily_unavailable"
        assert reply.headers["Retry-After"].isdigit()
    assert_refused_without_redirect(
        await call(client, "GET", "/authorize", params=authorize_params()), 503)
    assert (await call(client, "POST", "/token", **form(**code_exchange()))).status == 503
    idp.down = False
    deadline = time.monotonic() + 8.0  # the refresher retries after ~1 s
    while (reply := await call(client, "GET", AS_PATHS[0])).status != 200:
        assert time.monotonic() < deadline, "metadata never recovered"
        await asyncio.sleep(0.1)
    assert reply.json()["issuer"] == ISSUER


# -- direct mode ----------------------------------------------------------------------------------

DIRECT_MODES = [{}, {"STATIC_CLIENT_ID": CLIENT_ID, "AUTH_SERVER_MODE": "direct"}]


@pytest.mark.parametrize("env", DIRECT_MODES, ids=["no-static-client", "explicit-direct"])
async def test_direct_mode_names_the_idp_and_keeps_as_paths_private(
    start: Start, idp: FakeIdp, upstream: FakeUpstream, env: dict[str, str]
) -> None:
    client = await start(**env)
    prm = (await call(client, "GET", PRM_PATH)).json()
    assert prm["authorization_servers"] == [idp.issuer]
    for path in (*AS_PATHS, "/oauth/callback"):
        reply = await call(client, "GET", path, params={"code": "x", "state": "y"})
        assert reply.status == 401, (path, reply.text)
        assert reply.headers["WWW-Authenticate"].startswith("Bearer ")
    assert upstream.requests == []


@pytest.mark.parametrize("env", DIRECT_MODES, ids=["no-static-client", "explicit-direct"])
async def test_direct_authorize_sends_the_query_to_the_idp_unchanged(
    start: Start, idp: FakeIdp, env: dict[str, str]
) -> None:
    client = await start(**env)
    params = authorize_params(client_id="client-registered-at-the-idp", redirect_uri=LOOPBACK)
    reply = await call(client, "GET", "/authorize", params=params)
    assert reply.status == 302, reply.text
    base, query = reply.target()
    assert base == idp.origin + "/authorize"
    assert query == list(params.items())


async def test_direct_authorize_refuses_a_disallowed_redirect_without_location(
    start: Start,
) -> None:
    client = await start()
    for uri in ("https://evil.example/cb", "javascript:alert(1)", None):
        reply = await call(client, "GET", "/authorize", params=authorize_params(redirect_uri=uri))
        assert_refused_without_redirect(reply)


@pytest.mark.parametrize("env", [{}, {**FACADE, "AUTH_SERVER_MODE": "direct"}],
                         ids=["no-static-client", "explicit-direct-with-state-secret"])
async def test_direct_token_relay_forwards_codes_and_the_form_unchanged(
    start: Start, token_endpoint: TokenEndpoint, env: dict[str, str]
) -> None:
    client = await start(**env)
    # In direct mode the IdP issued the code to the client itself: nothing to unseal, whatever
    # the code looks like, and the client's own redirect_uri is the one the IdP saw.
    sealed_looking = relay_state.StateCodec(STATE_SECRET.encode()).seal(
        {"kind": "code", "c": "inner", "r": LOOPBACK})
    sent_forms = [code_exchange(client_id="client-registered-at-the-idp"),
                  code_exchange(sealed_looking, client_id="client-registered-at-the-idp")]
    for sent in sent_forms:
        reply = await call(client, "POST", "/token", **form(**sent))
        assert reply.status == 200, reply.text
    assert [c.form for c in token_endpoint.calls] == [list(s.items()) for s in sent_forms]
    for recorded in token_endpoint.calls:
        assert "Authorization" not in recorded.headers


# -- facade /authorize ----------------------------------------------------------------------------


async def test_facade_authorize_sends_our_callback_and_a_sealed_state_to_the_idp(
    start: Start, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    client = await start(**FACADE)
    params = authorize_params()
    reply = await call(client, "GET", "/authorize", params=params)
    assert reply.status == 302, reply.text  # never 307/308: Claude.ai broke on those
    assert "no-store" in reply.headers["Cache-Control"]
    base, query = reply.target()
    assert base == idp.origin + "/authorize"
    sent = dict(query)
    assert len(sent) == len(query)
    assert sent["redirect_uri"] == CALLBACK
    assert sent["state"] != params["state"]
    assert sent["state"].count(".") == 1
    expected = {**params, "redirect_uri": CALLBACK, "state": sent["state"]}
    assert sent == expected
    assert upstream.requests == []


async def test_authorize_keeps_the_idp_endpoints_own_query(start: Start, idp: FakeIdp) -> None:
    endpoint = idp.origin + "/oauth2/v2.0/authorize?p=b2c_1_signin"
    client = await start({"authorization_endpoint": endpoint}, **FACADE)
    reply = await call(client, "GET", "/authorize", params=authorize_params())
    assert reply.status == 302, reply.text
    base, query = reply.target()
    assert base == idp.origin + "/oauth2/v2.0/authorize"
    assert query[0] == ("p", "b2c_1_signin")
    assert dict(query)["redirect_uri"] == CALLBACK


async def test_facade_authorize_accepts_loopback_redirects(start: Start) -> None:
    client = await start(**FACADE)
    for uri in (LOOPBACK, "http://localhost:9/cb", "http://[::1]:8080/cb"):
        reply = await call(client, "GET", "/authorize", params=authorize_params(redirect_uri=uri))
        assert reply.status == 302, (uri, reply.text)
        assert dict(reply.target()[1])["redirect_uri"] == CALLBACK


BAD_AUTHORIZE_REDIRECTS: list[str | None] = [
    None,
    "",
    "https://evil.example/cb",
    "http://evil.example/cb",
    "javascript:alert(1)",
    "JAVASCRIPT:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "https://claude.ai/api/mcp/auth_callback/../x",
    "https://claude.ai.evil.example/api/mcp/auth_callback",
    "https://claude.ai/api/mcp/auth_callback#frag",
    "http://user@127.0.0.1/cb",
    "http://127.0.0.1.evil.example/cb",
    "http://127.0.0.1/" + "a" * 3000,
]


async def test_facade_authorize_refuses_bad_redirects_with_no_location_at_all(
    start: Start, upstream: FakeUpstream
) -> None:
    client = await start(**FACADE)
    for uri in BAD_AUTHORIZE_REDIRECTS:
        reply = await call(client, "GET", "/authorize", params=authorize_params(redirect_uri=uri))
        assert_refused_without_redirect(reply)
        assert reply.json()["error"] == "invalid_request", uri
    assert upstream.requests == []


@pytest.mark.parametrize("client_id", ["another-client", "", None], ids=repr)
async def test_facade_authorize_refuses_another_client_id(
    start: Start, client_id: str | None
) -> None:
    client = await start(**FACADE)
    reply = await call(client, "GET", "/authorize", params=authorize_params(client_id=client_id))
    assert_refused_without_redirect(reply)


@pytest.mark.parametrize("repeated", ["redirect_uri", "state", "client_id", "scope",
                                      "code_challenge"])
async def test_authorize_refuses_a_repeated_parameter(start: Start, repeated: str) -> None:
    client = await start(**FACADE)
    pairs = [*authorize_params().items()]
    extra = {"redirect_uri": LOOPBACK}.get(repeated, dict(pairs)[repeated])
    query = urlencode([*pairs, (repeated, extra)])
    reply = await call(client, "GET", "/authorize?" + query)
    assert_refused_without_redirect(reply)


# -- /oauth/callback ------------------------------------------------------------------------------


async def test_callback_relays_a_sealed_code_with_the_client_state_and_our_issuer(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE)
    redirect = LOOPBACK + "?keep=1"
    state = await sealed_state(client, redirect_uri=redirect, state="client-state-42")
    reply = await idp_answers(client, code=IDP_CODE, state=state, iss=idp.issuer)
    assert reply.status == 302, reply.text
    assert "no-store" in reply.headers["Cache-Control"]
    base, query = reply.target()
    assert base == LOOPBACK
    assert [name for name, _ in query] == ["keep", "code", "state", "iss"]
    received = dict(query)
    assert received["keep"] == "1"
    assert received["state"] == "client-state-42"
    assert received["iss"] == ISSUER
    code = received["code"]
    assert code != IDP_CODE  # the client gets a sealed code, not the IdP's
    assert code.count(".") == 1
    # Exchanging it (with the redirect_uri exactly as authorized) gets the IdP its own code.
    sent = code_exchange(code, redirect_uri=redirect)
    exchanged = await call(client, "POST", "/token", **form(**sent))
    assert exchanged.status == 200, exchanged.text
    assert token_endpoint.last.form == as_idp_receives(sent)


@pytest.mark.parametrize("redirect", [
    "cursor://anysphere.cursor-mcp/oauth/callback", "com.example.app:/oauth2redirect"])
async def test_facade_signs_in_a_native_app_with_a_listed_private_use_scheme(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint, redirect: str
) -> None:
    """RFC 8252 §7.1: the relay's final 302 goes to the app's own scheme, code and iss added."""
    client = await start(**FACADE, ALLOWED_REDIRECT_URIS=redirect)
    state = await sealed_state(client, redirect_uri=redirect)
    reply = await idp_answers(client, code=IDP_CODE, state=state, iss=idp.issuer)
    assert reply.status == 302, reply.text
    assert reply.location.startswith(redirect + "?code=")
    received = dict(reply.target()[1])
    assert (received["state"], received["iss"]) == ("client-state-42", ISSUER)
    sent = code_exchange(received["code"], redirect_uri=redirect)
    exchanged = await call(client, "POST", "/token", **form(**sent))
    assert exchanged.status == 200, exchanged.text
    assert token_endpoint.last.form == as_idp_receives(sent)


async def test_callback_relays_idp_errors_the_same_way(start: Start, idp: FakeIdp) -> None:
    client = await start(**FACADE)
    state = await sealed_state(client)
    reply = await idp_answers(client, error="access_denied",
                              error_description="The user said no & meant it",
                              error_uri="https://idp.example/errors/denied",
                              state=state, iss=idp.issuer)
    assert reply.status == 302, reply.text
    base, query = reply.target()
    assert base == CLAUDE_AI
    assert dict(query) == {
        "error": "access_denied", "error_description": "The user said no & meant it",
        "error_uri": "https://idp.example/errors/denied", "state": "client-state-42",
        "iss": ISSUER,
    }


async def test_callback_without_client_state_sends_none_back(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE)
    state = await sealed_state(client, state=None)
    reply = await idp_answers(client, code="c", state=state, iss=idp.issuer)
    assert reply.status == 302, reply.text
    query = reply.target()[1]
    assert [name for name, _ in query] == ["code", "iss"]
    code, iss = dict(query)["code"], dict(query)["iss"]
    assert iss == ISSUER
    assert code != "c"
    exchanged = await call(client, "POST", "/token", **form(**code_exchange(code)))
    assert exchanged.status == 200, exchanged.text
    assert dict(token_endpoint.last.form)["code"] == "c"
    assert dict(token_endpoint.last.form)["redirect_uri"] == CALLBACK


async def test_callback_refuses_a_response_from_another_issuer(
    start: Start, idp: FakeIdp
) -> None:
    client = await start(**FACADE)
    state = await sealed_state(client)
    for iss in ("https://evil.example", ISSUER, idp.issuer + "/other", idp.issuer + "x",
                idp.issuer.upper(), ""):
        reply = await idp_answers(client, code="c", state=state, iss=iss)
        assert_refused_without_redirect(reply)


async def test_callback_accepts_the_idp_issuer_with_one_trailing_slash(
    start: Start, idp: FakeIdp
) -> None:
    client = await start(**FACADE)
    state = await sealed_state(client)
    reply = await idp_answers(client, code="c", state=state, iss=idp.issuer + "/")
    assert reply.status == 302, reply.text


async def test_callback_requires_iss_when_the_idp_says_it_sends_one(
    start: Start, idp: FakeIdp
) -> None:
    client = await start({"authorization_response_iss_parameter_supported": True}, **FACADE)
    state = await sealed_state(client)
    assert_refused_without_redirect(await idp_answers(client, code="c", state=state))
    accepted = await idp_answers(client, code="c", state=state, iss=idp.issuer)
    assert accepted.status == 302, accepted.text


async def test_callback_without_iss_accepted_when_the_idp_does_not_send_one(
    start: Start,
) -> None:
    client = await start(**FACADE)
    state = await sealed_state(client)
    reply = await idp_answers(client, code="c", state=state)
    assert reply.status == 302, reply.text
    assert dict(reply.target()[1])["iss"] == ISSUER


class Clock:
    """Stands in for authserver's `time` module, offset seconds in the future."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset


def flipped(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1:]


async def test_callback_refuses_missing_garbage_or_tampered_state(
    start: Start, idp: FakeIdp
) -> None:
    client = await start(**FACADE)
    state = await sealed_state(client)
    payload, signature = state.split(".")
    forged_payload = base64.urlsafe_b64encode(json.dumps(
        {"r": "https://evil.example/cb", "s": "x", "exp": int(time.time()) + 600}
    ).encode()).rstrip(b"=").decode()
    bad_states: list[str | None] = [
        None, "", "garbage", "a.b", "a.b.c", ".", state + ".", "x" * 8000, "x." * 3000,
        flipped(state, 0), flipped(state, len(payload) // 2), flipped(state, len(state) - 2),
        flipped(state, len(payload) + 1), payload, signature, f"{forged_payload}.{signature}",
        state.replace(".", "%2E"),
    ]
    for bad in bad_states:
        params = {"code": "c", "iss": idp.issuer, **({"state": bad} if bad is not None else {})}
        reply = await idp_answers(client, **params)
        assert_refused_without_redirect(reply)
    assert (await idp_answers(client, code="c", state=state, iss=idp.issuer)).status == 302


async def test_callback_refuses_a_sealed_code_presented_as_state(
    start: Start, idp: FakeIdp
) -> None:
    client = await start(**FACADE)
    code = await sealed_code(client, idp)
    # Same key, same shape, and it names an allowed redirect_uri: only its kind tells it apart.
    assert_refused_without_redirect(await idp_answers(client, code="c", state=code,
                                                      iss=idp.issuer))
    forged_kinds = relay_state.StateCodec(STATE_SECRET.encode())
    fields = {"r": CLAUDE_AI, "s": "x", "cid": CLIENT_ID, "pc": CHALLENGE}
    for values in (fields, {"kind": "code", **fields}, {"kind": "STATE", **fields}):
        reply = await idp_answers(client, code="c", state=forged_kinds.seal(values),
                                  iss=idp.issuer)
        assert_refused_without_redirect(reply)
    genuine = forged_kinds.seal({"kind": "state", **fields})
    assert (await idp_answers(client, code="c", state=genuine, iss=idp.issuer)).status == 302


async def test_callback_refuses_a_state_past_its_lifetime(
    start: Start, idp: FakeIdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await start(**FACADE)
    with monkeypatch.context() as patch:
        patch.setattr(relay_state, "STATE_TTL", -1)
        expired = await sealed_state(client)
    assert_refused_without_redirect(await idp_answers(client, code="c", state=expired,
                                                      iss=idp.issuer))


async def test_callback_state_expires_after_ten_minutes(
    start: Start, idp: FakeIdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await start(**FACADE)
    state, twin = await sealed_state(client), await sealed_state(client)  # each used once

    monkeypatch.setattr(relay_state, "time", Clock(590))
    assert (await idp_answers(client, code="c", state=state, iss=idp.issuer)).status == 302
    monkeypatch.setattr(relay_state, "time", Clock(relay_state.STATE_TTL + 5))
    assert_refused_without_redirect(await idp_answers(client, code="c", state=twin,
                                                      iss=idp.issuer))


async def test_state_is_accepted_by_replicas_sharing_the_state_secret_only(
    start: Start, make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    first = await start(**FACADE)
    replica = await make_sidecar(**FACADE)
    stranger = await make_sidecar(STATIC_CLIENT_ID=CLIENT_ID, STATE_SECRET="z" * 40)
    state = await sealed_state(first)
    assert_refused_without_redirect(await idp_answers(stranger, code="c", state=state,
                                                      iss=idp.issuer))
    reply = await idp_answers(replica, code="c", state=state, iss=idp.issuer)
    assert reply.status == 302, reply.text
    assert reply.target()[0] == CLAUDE_AI


async def test_without_state_secret_each_process_has_its_own_key(
    start: Start, make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    first = await start(STATIC_CLIENT_ID=CLIENT_ID)
    second = await make_sidecar(STATIC_CLIENT_ID=CLIENT_ID)
    state = await sealed_state(first)
    assert (await idp_answers(first, code="c", state=state, iss=idp.issuer)).status == 302
    assert_refused_without_redirect(await idp_answers(second, code="c", state=state,
                                                      iss=idp.issuer))


async def test_state_for_a_redirect_this_replica_no_longer_allows_is_refused(
    start: Start, make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    first = await start(**FACADE)
    stricter = await make_sidecar(**FACADE, ALLOW_LOOPBACK_REDIRECTS="false")
    state = await sealed_state(first, redirect_uri=LOOPBACK)
    assert_refused_without_redirect(await idp_answers(stricter, code="c", state=state,
                                                      iss=idp.issuer))


async def test_callback_without_code_or_error_is_refused(start: Start, idp: FakeIdp) -> None:
    client = await start(**FACADE)
    state = await sealed_state(client)
    assert_refused_without_redirect(await idp_answers(client, state=state, iss=idp.issuer))
    assert_refused_without_redirect(await idp_answers(client, state=state, iss=idp.issuer,
                                                      session_state="abc"))


# -- /token relay ---------------------------------------------------------------------------------


async def test_facade_token_relay_unseals_the_code_puts_our_callback_back_and_relays_the_answer(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint, upstream: FakeUpstream
) -> None:
    client = await start(**FACADE)
    sent = code_exchange(await sealed_code(client, idp))
    reply = await call(client, "POST", "/token", **form(**sent))
    assert reply.status == 200, reply.text
    assert reply.json() == TOKEN_RESPONSE
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["Cache-Control"] == "no-store"
    # Every other field in the client's order; the IdP's own code and the callback it saw.
    assert token_endpoint.last.form == as_idp_receives(sent)
    assert "Authorization" not in token_endpoint.last.headers  # a public client: no secret
    assert upstream.requests == []


def assert_invalid_grant(reply: Reply) -> None:
    assert reply.status == 400, reply.text
    assert reply.json()["error"] == "invalid_grant"
    assert reply.headers["Cache-Control"] == "no-store"
    assert "Location" not in reply.headers


async def test_facade_token_refuses_codes_it_did_not_seal_and_tells_the_idp_nothing(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE)
    genuine = await sealed_code(client, idp)
    payload, signature = genuine.split(".")
    made_up = [IDP_CODE, "", "a.b", ".", genuine + ".", genuine + "x", payload, signature,
               flipped(genuine, 3), flipped(genuine, len(payload) + 2), "x" * 9000]
    for code in made_up:
        assert_invalid_grant(await call(client, "POST", "/token",
                                        **form(**code_exchange(code))))
    without_code = {k: v for k, v in code_exchange().items() if k != "code"}
    assert_invalid_grant(await call(client, "POST", "/token", **form(**without_code)))
    assert token_endpoint.calls == []
    # The genuine code was never the problem.
    sent = code_exchange(genuine)
    assert (await call(client, "POST", "/token", **form(**sent))).status == 200
    assert token_endpoint.last.form == as_idp_receives(sent)


async def test_facade_token_refuses_a_code_with_another_redirect_uri(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE)
    code = await sealed_code(client, idp, redirect_uri=LOOPBACK + "?keep=1")
    # RFC 6749 §4.1.3: identical to the authorization request's, even our own callback is not.
    for other in (CLAUDE_AI, LOOPBACK, LOOPBACK + "?keep=1&x=2", LOOPBACK + "?keep=2",
                  "http://127.0.0.1:33418/callback/?keep=1", CALLBACK, ""):
        reply = await call(client, "POST", "/token",
                           **form(**code_exchange(code, redirect_uri=other)))
        assert_invalid_grant(reply)
    without_redirect = {k: v for k, v in code_exchange(code).items() if k != "redirect_uri"}
    assert_invalid_grant(await call(client, "POST", "/token", **form(**without_redirect)))
    assert token_endpoint.calls == []
    sent = code_exchange(code, redirect_uri=LOOPBACK + "?keep=1")
    assert (await call(client, "POST", "/token", **form(**sent))).status == 200
    assert token_endpoint.last.form == as_idp_receives(sent)


async def test_facade_token_refuses_a_sealed_state_presented_as_a_code(
    start: Start, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE)
    state = await sealed_state(client)  # same key, names CLAUDE_AI: only its kind differs
    assert_invalid_grant(await call(client, "POST", "/token", **form(**code_exchange(state))))
    assert token_endpoint.calls == []


CODE_FIELDS = {"c": IDP_CODE, "r": CLAUDE_AI, "cid": CLIENT_ID, "pc": CHALLENGE}


def code_without(*names: str, **changes: Any) -> dict[str, Any]:
    return {k: v for k, v in {"kind": "code", **CODE_FIELDS, **changes}.items()
            if k not in names}


@pytest.mark.parametrize("values", [
    code_without("kind"),
    code_without(kind="state"),
    code_without(kind="CODE"),
    code_without("c"),
    code_without(c=123),
    code_without(c=None),
    code_without(c=[IDP_CODE]),
    code_without("r"),
    code_without("cid"),
    code_without("pc"),
    code_without(pc=None),
    {"kind": "code", "c": IDP_CODE, "r": CLAUDE_AI},
], ids=["no-kind", "kind-state", "kind-CODE", "no-c", "int-c", "null-c", "list-c", "no-r",
        "no-client", "no-challenge", "null-challenge", "sealed-before-pkce-and-binding"])
async def test_facade_token_refuses_sealed_values_that_are_not_a_code(
    start: Start, token_endpoint: TokenEndpoint, values: dict[str, Any]
) -> None:
    client = await start(**FACADE)
    sealed = relay_state.StateCodec(STATE_SECRET.encode()).seal(values)
    assert_invalid_grant(await call(client, "POST", "/token", **form(**code_exchange(sealed))))
    assert token_endpoint.calls == []


async def test_facade_token_accepts_a_code_sealed_with_the_state_secret(
    start: Start, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE)
    sealed = relay_state.StateCodec(STATE_SECRET.encode()).seal(
        {"kind": "code", "c": "inner-code", "r": CLAUDE_AI, "cid": CLIENT_ID, "pc": CHALLENGE})
    sent = code_exchange(sealed)
    assert (await call(client, "POST", "/token", **form(**sent))).status == 200
    assert token_endpoint.last.form == list(
        {**sent, "code": "inner-code", "redirect_uri": CALLBACK}.items())


async def test_code_is_accepted_by_replicas_sharing_the_state_secret_only(
    start: Start, make_sidecar: SidecarFactory, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    first = await start(**FACADE)
    replica = await make_sidecar(**FACADE)
    stranger = await make_sidecar(STATIC_CLIENT_ID=CLIENT_ID, STATE_SECRET="z" * 40)
    unkeyed = await make_sidecar(STATIC_CLIENT_ID=CLIENT_ID)
    sent = code_exchange(await sealed_code(first, idp))
    for other in (stranger, unkeyed):
        assert_invalid_grant(await call(other, "POST", "/token", **form(**sent)))
    assert token_endpoint.calls == []
    reply = await call(replica, "POST", "/token", **form(**sent))
    assert reply.status == 200, reply.text
    assert token_endpoint.last.form == as_idp_receives(sent)


async def test_facade_token_refuses_a_code_past_its_lifetime(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await start(**FACADE)
    state = await sealed_state(client)  # sealed with the normal lifetime
    with monkeypatch.context() as patch:
        patch.setattr(relay_state, "STATE_TTL", -1)
        reply = await idp_answers(client, code=IDP_CODE, state=state, iss=idp.issuer)
    assert reply.status == 302, reply.text
    expired = dict(reply.target()[1])["code"]
    assert_invalid_grant(await call(client, "POST", "/token", **form(**code_exchange(expired))))
    assert token_endpoint.calls == []


async def test_facade_code_expires_after_ten_minutes(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await start(**FACADE)
    sent = code_exchange(await sealed_code(client, idp))
    twin = code_exchange(await sealed_code(client, idp))  # each code is used once

    monkeypatch.setattr(relay_state, "time", Clock(590))
    assert (await call(client, "POST", "/token", **form(**sent))).status == 200
    monkeypatch.setattr(relay_state, "time", Clock(relay_state.STATE_TTL + 5))
    assert_invalid_grant(await call(client, "POST", "/token", **form(**twin)))
    assert len(token_endpoint.calls) == 1


@pytest.mark.parametrize("idp_methods", [["client_secret_post"],
                                         ["private_key_jwt", "client_secret_post"]], ids=repr)
async def test_static_secret_added_as_client_secret_post_when_the_idp_offers_only_that(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint, idp_methods: list[str]
) -> None:
    client = await start({"token_endpoint_auth_methods_supported": idp_methods},
                         **FACADE, STATIC_CLIENT_SECRET="p@ss:w/rd+ x%")
    sent = code_exchange(await sealed_code(client, idp))
    reply = await call(client, "POST", "/token", **form(**sent))
    assert reply.status == 200, reply.text
    assert token_endpoint.last.form == [*as_idp_receives(sent),
                                        ("client_secret", "p@ss:w/rd+ x%")]
    assert "Authorization" not in token_endpoint.last.headers


@pytest.mark.parametrize("idp_methods", [
    ["client_secret_basic"], None, ["private_key_jwt"],
    # IdPs that enforce the registered method (Authelia, Keycloak) expect Basic: it wins.
    ["client_secret_basic", "client_secret_post"], ["client_secret_post", "client_secret_basic"],
], ids=repr)
async def test_static_secret_added_as_form_encoded_basic_otherwise(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint, idp_methods: Any
) -> None:
    client = await start({"token_endpoint_auth_methods_supported": idp_methods},
                         STATIC_CLIENT_ID="client:one", STATE_SECRET=STATE_SECRET,
                         STATIC_CLIENT_SECRET="p@ss:w/rd+ x%")
    code = await sealed_code(client, idp, client_id="client:one")
    sent = code_exchange(code, client_id="client:one")
    reply = await call(client, "POST", "/token", **form(**sent))
    assert reply.status == 200, reply.text
    # RFC 6749 §2.3.1: id and secret are form-encoded before the Basic encoding.
    expected = basic("client%3Aone", "p%40ss%3Aw%2Frd%2B+x%25")
    assert token_endpoint.last.headers["Authorization"] == expected
    assert token_endpoint.last.form == as_idp_receives(sent)  # no client_secret in the form


async def test_client_with_its_own_authorization_keeps_it_and_gets_no_secret(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    client = await start({"token_endpoint_auth_methods_supported": ["client_secret_post"]},
                         **FACADE, STATIC_CLIENT_SECRET="static-secret")
    own = basic(CLIENT_ID, "what-the-client-holds")
    sent = code_exchange(await sealed_code(client, idp))
    reply = await call(client, "POST", "/token", data=urlencode(sent),
                       headers={"Content-Type": "application/x-www-form-urlencoded",
                                "Authorization": own})
    assert reply.status == 200, reply.text
    assert token_endpoint.last.headers["Authorization"] == own
    assert token_endpoint.last.form == as_idp_receives(sent)  # no client_secret added


async def test_client_sending_its_own_client_secret_is_not_overridden(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    client = await start({"token_endpoint_auth_methods_supported": ["client_secret_post"]},
                         **FACADE, STATIC_CLIENT_SECRET="static-secret")
    sent = code_exchange(await sealed_code(client, idp), client_secret="client-held")
    reply = await call(client, "POST", "/token", **form(**sent))
    assert reply.status == 200, reply.text
    assert token_endpoint.last.form == as_idp_receives(sent)
    assert dict(token_endpoint.last.form)["client_secret"] == "client-held"
    assert "Authorization" not in token_endpoint.last.headers


@pytest.mark.parametrize("idp_methods", [["client_secret_post"], None], ids=repr)
async def test_a_code_presented_by_another_client_is_refused_before_the_idp(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint, idp_methods: Any
) -> None:
    """RFC 6749 §4.1.3: the code was issued to the client of the authorization request. The
    sidecar checks it itself (it used to leave it to the IdP, relaying the code unauthenticated)."""
    client = await start({"token_endpoint_auth_methods_supported": idp_methods},
                         **FACADE, STATIC_CLIENT_SECRET="static-secret")
    code = await sealed_code(client, idp)
    without_client_id = {k: v for k, v in code_exchange(code).items() if k != "client_id"}
    for sent, headers, error in [
        (code_exchange(code, client_id="someone-else"), {}, "invalid_grant"),
        (without_client_id, {}, "invalid_request"),
        (without_client_id, {"Authorization": basic("someone-else", "theirs")}, "invalid_grant"),
        (code_exchange(code), {"Authorization": basic("someone-else", "theirs")},
         "invalid_grant"),
    ]:
        reply = await call(client, "POST", "/token", data=urlencode(sent), headers={
            "Content-Type": "application/x-www-form-urlencoded", **headers})
        assert (reply.status, reply.json()["error"]) == (400, error), (sent, headers)
    assert token_endpoint.calls == []
    # The client the code was issued to, naming itself in Basic only, still redeems it.
    own = basic(CLIENT_ID, "what-the-client-holds")
    reply = await call(client, "POST", "/token", data=urlencode(without_client_id), headers={
        "Content-Type": "application/x-www-form-urlencoded", "Authorization": own})
    assert reply.status == 200, reply.text
    assert token_endpoint.last.headers["Authorization"] == own
    assert "static-secret" not in json.dumps(token_endpoint.last.form)


async def test_refresh_grant_forwarded_unchanged_apart_from_the_secret(
    start: Start, token_endpoint: TokenEndpoint
) -> None:
    client = await start({"token_endpoint_auth_methods_supported": ["client_secret_post"]},
                         **FACADE, STATIC_CLIENT_SECRET="static-secret")
    sent = refresh(scope="mcp:read", resource="https://mcp.example.test/mcp",
                   redirect_uri=CLAUDE_AI, code="not-unsealed-for-refresh")
    reply = await call(client, "POST", "/token", **form(**sent))
    assert reply.status == 200, reply.text
    assert token_endpoint.last.form == [*sent.items(), ("client_secret", "static-secret")]


async def test_control_characters_in_a_relayed_form_reach_the_idp_instead_of_a_500(
    start: Start, token_endpoint: TokenEndpoint
) -> None:
    """Found by tests/test_fuzz.py: aiohttp's FormData refuses a field name with a control
    character (its header-injection check), so relaying the parsed form raised a 500."""
    client = await start(**FACADE)
    sent = refresh(**{"x\x08\x00y": "v\x1b[2K", "scope": "a\rb"})
    reply = await call(client, "POST", "/token", **form(**sent))
    assert reply.status == 200, reply.text
    assert token_endpoint.last.form == list(sent.items())


async def test_idp_error_status_body_and_content_type_come_back_uncached(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    token_endpoint.status = 400
    token_endpoint.body = b'{"error": "invalid_grant", "error_description": "code used"}'
    client = await start(**FACADE)
    code = await sealed_code(client, idp)
    reply = await call(client, "POST", "/token", **form(**code_exchange(code)))
    assert reply.status == 400
    assert reply.text == token_endpoint.body.decode()
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["Cache-Control"] == "no-store"
    token_endpoint.status, token_endpoint.content_type = 401, "text/plain"
    token_endpoint.body = b"unauthorized client"
    other = await call(client, "POST", "/token", **form(**refresh()))
    assert (other.status, other.text) == (401, "unauthorized client")
    assert other.headers["Content-Type"].startswith("text/plain")
    assert other.headers["Cache-Control"] == "no-store"
    assert len(token_endpoint.calls) == 2


async def test_form_with_a_charset_parameter_is_accepted(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE)
    sent = code_exchange(await sealed_code(client, idp))
    reply = await call(client, "POST", "/token", data=urlencode(sent), headers={
        "Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"})
    assert reply.status == 200, reply.text
    assert token_endpoint.last.form == as_idp_receives(sent)


async def test_token_requests_that_are_not_forms_are_refused(
    start: Start, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE)
    for content_type, body in [
        ("application/json", json.dumps(code_exchange())),
        ("text/plain", urlencode(code_exchange())),
        ("multipart/form-data; boundary=x", "--x--"),
        ("", urlencode(code_exchange())),
    ]:
        headers = {"Content-Type": content_type} if content_type else {}
        reply = await call(client, "POST", "/token", data=body.encode(), headers=headers)
        assert reply.status == 400, (content_type, reply.text)
        assert reply.json()["error"] == "invalid_request"
    assert token_endpoint.calls == []


async def test_token_request_over_64_kb_is_413(
    start: Start, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE)
    big = urlencode(code_exchange(padding="x" * (64 * 1024))).encode()
    reply = await call(client, "POST", "/token", data=io.BytesIO(big),
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 413, reply.text
    assert reply.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"a=" + b"x" * 30_000 + b"&"

    chunked = await call(client, "POST", "/token", data=chunks(),
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert chunked.status == 413, chunked.text
    assert token_endpoint.calls == []


async def stalled_body(port: int | None, path: str, content_type: str) -> bytes:
    """Send a head announcing 100 bytes of body, then 10 of them, then nothing: the answer, once
    the sidecar has also closed the connection (bounded)."""
    assert port is not None
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}"
                     "\r\nContent-Length: 100\r\n\r\ngrant_type".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(head.lower().partition(b"content-length: ")[2].partition(b"\r\n")[0])
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        # The connection is unusable (where would the body end?): it is closed after at most
        # aiohttp's lingering time (10 s), not held.
        assert await asyncio.wait_for(reader.read(), 15) == b""
        return head + body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize(("path", "content_type"), [
    ("/token", "application/x-www-form-urlencoded"),
    ("/oauth/register", "application/json"),  # /register is the same handler
])
async def test_a_public_body_that_stops_arriving_is_408_and_frees_the_connection(
    start: Start, token_endpoint: TokenEndpoint, path: str, content_type: str
) -> None:
    """Before: the handler waited for the rest of the body forever, so MAX_CONNECTIONS such
    connections from one client would have locked everyone out of the sidecar."""
    client = await start(**FACADE, REQUEST_BODY_TIMEOUT_SECONDS="0.5")
    answer = await stalled_body(client.port, path, content_type)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"error": "request_timeout"' in answer
    assert token_endpoint.calls == []


async def test_repeated_or_too_many_token_parameters_are_refused(
    start: Start, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE)
    pairs = [*code_exchange().items()]
    for body in (urlencode([*pairs, ("code", "second-code")]),
                 urlencode([*pairs, ("client_id", "other")]),
                 urlencode([*pairs, ("grant_type", "client_credentials")]),
                 urlencode([("grant_type", "client_credentials"), *pairs]),
                 urlencode([*pairs, *((f"p{i}", "v") for i in range(120))])):
        reply = await call(client, "POST", "/token", data=body.encode(),
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert reply.status == 400, reply.text
        assert reply.json()["error"] == "invalid_request"
    assert token_endpoint.calls == []


async def test_unreachable_idp_token_endpoint_is_502_json(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    serve_document(idp, token_endpoint=f"http://127.0.0.1:{free_port()}/token")
    client = await make_sidecar(**FACADE)
    reply = await call(client, "POST", "/token", **form(**code_exchange(
        await sealed_code(client, idp))))
    assert reply.status == 502, reply.text
    assert reply.json()["error"] == "temporarily_unavailable"
    assert "127.0.0.1" not in reply.text


async def test_slow_idp_token_endpoint_is_502_json(
    start: Start, token_endpoint: TokenEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(authserver, "TOKEN_TIMEOUT", 0.3)
    token_endpoint.hold = asyncio.Event()
    client = await start(**FACADE)
    started = time.monotonic()
    reply = await call(client, "POST", "/token", **form(**refresh()))
    assert reply.status == 502, reply.text
    assert reply.json()["error"] == "temporarily_unavailable"
    assert len(token_endpoint.calls) == 1  # it did reach the IdP, which never answered
    assert time.monotonic() - started < 3.0


async def test_idp_token_answer_arriving_in_pieces_is_relayed_whole(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    # Entra and Keycloak answers with many groups run to tens of KB: several TLS records.
    token_endpoint.body = json.dumps({**TOKEN_RESPONSE, "id_token": "i" * 20_000}).encode()
    token_endpoint.split = True
    client = await start(**FACADE)
    reply = await call(client, "POST", "/token", **form(**code_exchange(
        await sealed_code(client, idp))))
    assert reply.status == 200
    assert reply.text == token_endpoint.body.decode()


async def test_oversized_idp_token_answer_is_502(
    start: Start, token_endpoint: TokenEndpoint
) -> None:
    token_endpoint.body = b'{"access_token": "' + b"a" * (1 << 20) + b'"}'
    client = await start(**FACADE)
    reply = await call(client, "POST", "/token", **form(**refresh()))
    assert reply.status == 502
    assert reply.json()["error"] == "server_error"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_other_methods_on_token_are_405_and_never_proxied(
    start: Start, upstream: FakeUpstream, token_endpoint: TokenEndpoint, method: str
) -> None:
    client = await start(**FACADE)
    reply = await call(client, method, "/token")
    assert reply.status == 405, reply.text
    assert reply.headers["Allow"] == "POST"
    assert upstream.requests == []
    assert token_endpoint.calls == []


async def test_token_answer_and_secrets_never_reach_the_logs(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await start({"token_endpoint_auth_methods_supported": ["client_secret_post"]},
                         **FACADE, STATIC_CLIENT_SECRET="static-secret-LOGCHECK")
    caplog.set_level(logging.DEBUG)
    with capture_logs() as events:
        code = await sealed_code(client, idp)  # the callback must not log either code
        ok = await call(client, "POST", "/token", **form(**code_exchange(code)))
        token_endpoint.status = 400
        refused = await call(client, "POST", "/token", **form(**refresh()))
        forged = await call(client, "POST", "/token", **form(**code_exchange()))
    assert ok.status == 200
    assert refused.status == 400
    assert forged.json()["error"] == "invalid_grant"
    assert any(e.get("path") == "/token" for e in events), events  # capture really worked
    assert any(e.get("path") == "/oauth/callback" for e in events), events
    # aiohttp's own access log (query strings and all) is the test server's: __main__ runs
    # with access_log=None, and our access_log middleware logs the path only.
    logged = repr(events) + "\n".join(
        record.getMessage() for record in caplog.records if record.name != "aiohttp.access")
    for secret in (*TOKEN_RESPONSE.values(), "static-secret-LOGCHECK", IDP_CODE, code,
                   code.split(".")[1], VERIFIER, "rt-1"):
        if isinstance(secret, str):
            assert secret not in logged


# -- shared budgets and browsers ------------------------------------------------------------------


async def test_authorize_spends_the_client_ip_budget(start: Start) -> None:
    client = await start(**FACADE, RATE_LIMIT_UNAUTHENTICATED_RPM="2")
    statuses = [
        (await call(client, "GET", "/authorize", params=authorize_params())).status
        for _ in range(3)
    ]
    assert statuses == [302, 302, 429]
    limited = await call(client, "GET", "/authorize", params=authorize_params())
    assert_refused_without_redirect(limited, 429)
    assert 1 <= int(limited.headers["Retry-After"]) <= 60


async def test_token_spends_the_client_ip_budget(
    start: Start, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE, RATE_LIMIT_UNAUTHENTICATED_RPM="2")
    replies = [await call(client, "POST", "/token", **form(**refresh())) for _ in range(3)]
    assert [r.status for r in replies] == [200, 200, 429]
    assert replies[2].json()["error"] == "rate_limited"
    assert replies[2].headers["Retry-After"].isdigit()
    assert len(token_endpoint.calls) == 2


async def test_authorize_token_and_registration_share_one_budget(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE, RATE_LIMIT_UNAUTHENTICATED_RPM="2")
    code = await sealed_code(client, idp)  # one /authorize (the IdP's callback is not budgeted)
    assert (await call(client, "POST", "/token", **form(**code_exchange(code)))).status == 200
    registration = await call(client, "POST", "/oauth/register",
                              data=json.dumps({"redirect_uris": [CLAUDE_AI]}),
                              headers={"Content-Type": "application/json"})
    assert registration.status == 429


async def test_browser_origin_can_read_token_and_metadata_answers(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE)
    preflight = await call(client, "OPTIONS", "/token", headers={
        "Origin": BROWSER, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status == 204, preflight.text
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "content-type" in preflight.headers["Access-Control-Allow-Headers"].lower()
    sent = code_exchange(await sealed_code(client, idp))
    token = await call(client, "POST", "/token", data=urlencode(sent), headers={
        "Origin": BROWSER, "Content-Type": "application/x-www-form-urlencoded"})
    assert token.status == 200, token.text
    assert token.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in token.headers
    for path in AS_PATHS:
        reply = await call(client, "GET", path, headers={"Origin": BROWSER})
        assert reply.status == 200, (path, reply.text)
        assert reply.headers["Access-Control-Allow-Origin"] == "*"
    assert token_endpoint.last.form == as_idp_receives(sent)


# -- /token relays only the advertised grants, and lends the secret to nothing else ---------------

UNADVERTISED_GRANTS = [
    "client_credentials", "password", "implicit", "Client_Credentials", "CLIENT_CREDENTIALS",
    "Authorization_Code", "REFRESH_TOKEN", "refresh_token ", " authorization_code",
    "refresh_token\x00", "authorization_code,refresh_token", "refresh_token client_credentials",
    "urn:ietf:params:oauth:grant-type:token-exchange",
    "urn:ietf:params:oauth:grant-type:jwt-bearer",
    "urn:ietf:params:oauth:grant-type:device_code", "urn:openid:params:grant-type:ciba",
]


@pytest.mark.parametrize("mode", ["facade", "direct"])
async def test_token_relays_only_the_advertised_grants_and_never_asks_the_idp_otherwise(
    start: Start, token_endpoint: TokenEndpoint, mode: str
) -> None:
    """The credential leak: `grant_type=client_credentials client_id=<static>` used to reach the
    IdP with the static secret attached, handing any caller a token for the static client."""
    env = {**FACADE, "STATIC_CLIENT_SECRET": "static-secret-1"}
    client = await start(**env, **({"AUTH_SERVER_MODE": "direct"} if mode == "direct" else {}))
    common = {"client_id": CLIENT_ID, "resource": "https://mcp.example.test/mcp",
              "scope": "mcp:read", "username": "alice", "password": "guess"}
    for grant in UNADVERTISED_GRANTS:
        reply = await call(client, "POST", "/token", **form(**common, grant_type=grant))
        assert (reply.status, reply.json()["error"]) == (400, "unsupported_grant_type"), grant
        assert reply.headers["Cache-Control"] == "no-store"
        assert "access_token" not in reply.text
    for missing in (common, {**common, "grant_type": ""}):  # RFC 6749 §3.1: empty = omitted
        reply = await call(client, "POST", "/token", **form(**missing))
        assert (reply.status, reply.json()["error"]) == (400, "invalid_request"), missing
    assert token_endpoint.calls == []
    # Control: an advertised grant does reach the IdP.
    assert (await call(client, "POST", "/token", **form(**refresh()))).status == 200
    assert len(token_endpoint.calls) == 1


async def test_direct_mode_lends_the_secret_to_refresh_tokens_only(
    start: Start, token_endpoint: TokenEndpoint
) -> None:
    """In direct mode the IdP issued the code to the client itself, not through the sidecar:
    the sidecar cannot know the code is its static client's, so it adds no secret to it."""
    client = await start(**FACADE, AUTH_SERVER_MODE="direct", STATIC_CLIENT_SECRET="static-1")
    code = await call(client, "POST", "/token", **form(**code_exchange()))
    refreshed = await call(client, "POST", "/token", **form(**refresh()))
    assert (code.status, refreshed.status) == (200, 200)
    relayed_code, relayed_refresh = token_endpoint.calls
    assert relayed_code.form == list(code_exchange().items())  # passed on untouched
    assert "Authorization" not in relayed_code.headers
    assert relayed_refresh.headers["Authorization"] == basic(CLIENT_ID, "static-1")


async def test_facade_lends_the_secret_only_once_the_sealed_code_passed_every_check(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE, STATIC_CLIENT_SECRET="static-1")
    code = await sealed_code(client, idp)
    for refused in (code_exchange(code, code_verifier="x" * 43), code_exchange(IDP_CODE),
                    code_exchange(code, redirect_uri=LOOPBACK)):
        reply = await call(client, "POST", "/token", **form(**refused))
        assert_invalid_grant(reply)
    assert token_endpoint.calls == []
    assert (await call(client, "POST", "/token", **form(**code_exchange(code)))).status == 200
    assert token_endpoint.last.headers["Authorization"] == basic(CLIENT_ID, "static-1")


# -- PKCE: required at /authorize, checked at /token -----------------------------------------------

BAD_PKCE: list[tuple[str, dict[str, str | None]]] = [
    ("no challenge", {"code_challenge": None}),
    ("empty challenge", {"code_challenge": ""}),
    ("no method means plain", {"code_challenge_method": None}),
    ("plain", {"code_challenge_method": "plain"}),
    ("lowercase s256", {"code_challenge_method": "s256"}),
    ("another method", {"code_challenge_method": "S512"}),
    ("42 characters", {"code_challenge": CHALLENGE[:42]}),
    ("129 characters", {"code_challenge": "a" * 129}),
    ("padded", {"code_challenge": CHALLENGE + "="}),
    ("plain base64", {"code_challenge": "+/" + CHALLENGE[2:]}),
    ("a space", {"code_challenge": CHALLENGE[:20] + " " + CHALLENGE[21:]}),
    ("trailing newline", {"code_challenge": CHALLENGE + "\n"}),
    ("fullwidth letters", {"code_challenge": "\uff21" * 43}),
    ("non-ASCII digits", {"code_challenge": "\u0661" * 43}),
]


@pytest.mark.parametrize("mode", ["facade", "direct"])
async def test_authorize_without_pkce_s256_is_told_to_the_client_and_never_relayed(
    start: Start, idp: FakeIdp, upstream: FakeUpstream, mode: str
) -> None:
    """OAuth 2.1 §4.1.1: PKCE with S256, checked by the sidecar (RFC 6749 §4.1.2.1: once the
    redirect_uri is known to be allowed, the error goes back to it with state and iss)."""
    client = await start(**FACADE, **({"AUTH_SERVER_MODE": "direct"} if mode == "direct" else {}))
    iss = ISSUER if mode == "facade" else idp.issuer  # the issuer the client discovered
    for what, changes in BAD_PKCE:
        reply = await call(client, "GET", "/authorize", params=authorize_params(**changes))
        assert reply.status == 302, (what, reply.text)
        base, query = reply.target()
        assert base == CLAUDE_AI, what  # back to the client, not on to the IdP
        received = dict(query)
        assert [name for name, _ in query] == ["error", "error_description", "state", "iss"]
        assert (received["error"], received["state"], received["iss"]) == (
            "invalid_request", "client-state-42", iss), what
        assert "code_challenge" in received["error_description"], what
    without_state = await call(client, "GET", "/authorize", params=authorize_params(
        state=None, code_challenge=None))
    assert [name for name, _ in without_state.target()[1]] == ["error", "error_description", "iss"]
    # Before the redirect_uri (and in facade mode the client) is known good: never a redirect.
    too_early: list[dict[str, str | None]] = [
        {"redirect_uri": "https://evil.example/cb"}, {"redirect_uri": None}]
    if mode == "facade":
        too_early.append({"client_id": "another"})
    for changes in too_early:
        reply = await call(client, "GET", "/authorize", params=authorize_params(
            code_challenge=None, **changes))
        assert_refused_without_redirect(reply)
    # Control: both ends of the allowed length go through to the IdP.
    for challenge in (CHALLENGE, "A-._~" * 25 + "abc"):
        reply = await call(client, "GET", "/authorize", params=authorize_params(
            code_challenge=challenge))
        assert reply.target()[0] == idp.origin + "/authorize", challenge
    assert upstream.requests == []


@pytest.mark.parametrize(("changes", "error"), [
    ({"response_type": None}, "invalid_request"),
    ({"response_type": "token"}, "unsupported_response_type"),
    ({"response_type": "code id_token"}, "unsupported_response_type"),
    ({"request": "eyJhbGciOiJub25lIn0.eyJyZWRpcmVjdF91cmkiOiJodHRwczovL2V2aWwifQ."},
     "request_not_supported"),
    ({"request_uri": "https://evil.example/request.jwt"}, "request_uri_not_supported"),
], ids=["no-response-type", "implicit", "hybrid", "request-object", "request-uri"])
async def test_facade_authorize_relays_only_code_requests_it_can_see_whole(
    start: Start, idp: FakeIdp, changes: dict[str, str | None], error: str
) -> None:
    """A request object (RFC 9101) would override, at the IdP, the redirect_uri, state and
    challenge the relay checked; an implicit or hybrid response would bypass the callback."""
    client = await start(**FACADE)
    reply = await call(client, "GET", "/authorize", params=authorize_params(**changes))
    assert reply.status == 302, reply.text
    base, query = reply.target()
    assert base == CLAUDE_AI
    assert dict(query)["error"] == error
    assert (dict(query)["state"], dict(query)["iss"]) == ("client-state-42", ISSUER)


async def test_facade_authorize_refuses_a_state_too_long_to_come_back(
    start: Start, idp: FakeIdp
) -> None:
    """A client state that would seal beyond what the callback accepts is refused up front,
    instead of after the user signed in at the IdP."""
    client = await start(**FACADE)
    reply = await call(client, "GET", "/authorize", params=authorize_params(state="s" * 6500))
    assert reply.status == 302, reply.text
    base, query = reply.target()
    assert base == CLAUDE_AI
    assert dict(query)["error"] == "invalid_request"
    accepted = await call(client, "GET", "/authorize", params=authorize_params(state="s" * 2000))
    assert accepted.target()[0] == idp.origin + "/authorize"
    sealed = dict(accepted.target()[1])["state"]
    assert (await idp_answers(client, code="c", state=sealed, iss=idp.issuer)).status == 302


async def test_callback_tells_the_client_at_once_when_the_idp_code_cannot_be_sealed(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    """A code too long to come back through /token is an error for the client now, not a
    sealed code that every exchange would refuse."""
    client = await start(**FACADE)
    state = await sealed_state(client)
    reply = await idp_answers(client, code="c" * 6500, state=state, iss=idp.issuer)
    assert reply.status == 302, reply.text
    base, query = reply.target()
    assert base == CLAUDE_AI
    assert dict(query) == {"error": "server_error", "state": "client-state-42", "iss": ISSUER,
                           "error_description": "The identity provider's code is too long"}


def readable_parts(sealed: str) -> str:
    """Everything a holder of a sealed value can decode from it without the key."""
    decoded = []
    for part in sealed.split("."):
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        decoded.append(raw.decode("latin-1"))
    return "\n".join(decoded)


async def test_sealed_values_are_unreadable_without_the_state_secret(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    """A sealed code holds the IdP's own code. With a public static client (no secret) that code
    alone buys a token at the IdP's token endpoint, past the sidecar's PKCE and single-use
    checks, if the IdP does not enforce PKCE: so it must not be readable from the sealed code."""
    client = await start(**FACADE)  # no STATIC_CLIENT_SECRET: the IdP's client is public
    redirect = LOOPBACK + "?private=yes"
    state = await sealed_state(client, redirect_uri=redirect, state="client-state-42")
    reply = await idp_answers(client, code=IDP_CODE, state=state, iss=idp.issuer)
    code = dict(reply.target()[1])["code"]
    for sealed in (state, code):
        visible = readable_parts(sealed)
        for secret in (IDP_CODE, "client-state-42", "private=yes", CLIENT_ID):
            assert secret not in visible, (secret, visible)
    sent = code_exchange(code, redirect_uri=redirect)
    assert (await call(client, "POST", "/token", **form(**sent))).status == 200
    assert token_endpoint.last.form == as_idp_receives(sent)


BAD_VERIFIERS: list[tuple[str, str | None]] = [
    ("missing", None),
    ("empty", ""),
    ("another valid verifier", "x" * 43),
    ("the challenge itself", CHALLENGE),
    ("one character short", VERIFIER[:-1]),
    ("129 characters", VERIFIER + "a" * 86),
    ("trailing newline", VERIFIER + "\n"),
    ("a space inside", VERIFIER[:10] + " " + VERIFIER[11:]),
    ("case changed", VERIFIER.swapcase()),
    ("non-ASCII", VERIFIER[:-1] + "\u00e9"),
]


async def test_facade_token_checks_the_code_verifier_itself_when_the_idp_ignores_pkce(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    """The recording token endpoint answers 200 to anything, like an IdP that ignores PKCE:
    only the sidecar's own RFC 7636 §4.6 check stands between a stolen code and a token."""
    client = await start(**FACADE)
    code = await sealed_code(client, idp)
    for what, verifier in BAD_VERIFIERS:
        sent = code_exchange(code, code_verifier=verifier or "")
        if verifier is None:
            del sent["code_verifier"]
        reply = await call(client, "POST", "/token", **form(**sent))
        assert_invalid_grant(reply)
        assert "code_verifier" in reply.json()["error_description"], what
    assert token_endpoint.calls == []
    sent = code_exchange(code)
    assert (await call(client, "POST", "/token", **form(**sent))).status == 200
    assert dict(token_endpoint.last.form)["code_verifier"] == VERIFIER  # the IdP checks too


async def test_the_challenge_travels_to_the_idp_and_into_the_code(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    """IdPs that require PKCE keep working: the challenge and the verifier reach them; and the
    code carries the challenge of its own authorization request, not another one's."""
    client = await start(**FACADE)
    other_verifier = "o" * 50
    other_challenge = base64.urlsafe_b64encode(
        hashlib.sha256(other_verifier.encode()).digest()).rstrip(b"=").decode()
    reply = await call(client, "GET", "/authorize", params=authorize_params(
        code_challenge=other_challenge))
    assert dict(reply.target()[1])["code_challenge"] == other_challenge
    code = await sealed_code(client, idp)  # a second sign-in, with CHALLENGE
    assert_invalid_grant(await call(client, "POST", "/token", **form(**code_exchange(
        code, code_verifier=other_verifier))))
    assert token_endpoint.calls == []


# -- single use ------------------------------------------------------------------------------------


async def test_a_state_is_redeemed_once_at_the_callback(start: Start, idp: FakeIdp) -> None:
    client = await start(**FACADE)
    state = await sealed_state(client)
    first = await idp_answers(client, code="c", state=state, iss=idp.issuer)
    assert first.status == 302, first.text
    for replay in ({"code": "c"}, {"code": "another"}, {"error": "access_denied"}):
        reply = await idp_answers(client, state=state, iss=idp.issuer, **replay)
        assert_refused_without_redirect(reply)
        assert reply.json()["error_description"].startswith("The sign-in took too long")


async def test_a_code_is_redeemed_once_at_token(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE)
    sent = code_exchange(await sealed_code(client, idp))
    assert (await call(client, "POST", "/token", **form(**sent))).status == 200
    replay = await call(client, "POST", "/token", **form(**sent))
    assert_invalid_grant(replay)
    assert "already used" in replay.json()["error_description"]
    assert len(token_endpoint.calls) == 1


async def test_concurrent_redemptions_of_one_code_let_exactly_one_through(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**FACADE)
    sent = code_exchange(await sealed_code(client, idp))
    replies = await asyncio.gather(*(call(client, "POST", "/token", **form(**sent))
                                     for _ in range(8)))
    assert sorted(r.status for r in replies) == [200] + [400] * 7
    assert len(token_endpoint.calls) == 1


async def test_a_refused_attempt_does_not_use_the_value_up(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    """Only a value that passed every check is redeemed: a tampered callback or a wrong
    verifier cannot burn the genuine user's sign-in."""
    client = await start({"authorization_response_iss_parameter_supported": True}, **FACADE)
    state = await sealed_state(client)
    for tampered in ({"iss": "https://evil.example"}, {}, {"iss": idp.issuer, "x": "1",
                                                           "code": None}):
        params = {"code": "c", "state": state, **tampered}
        assert_refused_without_redirect(await idp_answers(
            client, **{k: v for k, v in params.items() if v is not None}))
    reply = await idp_answers(client, code=IDP_CODE, state=state, iss=idp.issuer)
    assert reply.status == 302, reply.text
    code = dict(reply.target()[1])["code"]
    assert_invalid_grant(await call(client, "POST", "/token", **form(**code_exchange(
        code, code_verifier="x" * 43))))
    assert (await call(client, "POST", "/token", **form(**code_exchange(code)))).status == 200


@pytest.mark.parametrize("repeated", [
    [("iss", "https://evil.example")], [("code", "second")], [("state", "x")],
], ids=["iss", "code", "state"])
async def test_callback_refuses_a_repeated_parameter(
    start: Start, idp: FakeIdp, repeated: list[tuple[str, str]]
) -> None:
    """RFC 6749 §3.1: `iss=<idp>&iss=<evil>` would pass a first-value issuer check."""
    client = await start(**FACADE)
    state = await sealed_state(client)
    genuine = [("code", "c"), ("state", state), ("iss", idp.issuer)]
    for pairs in ([*genuine, *repeated], [*repeated, *genuine]):
        reply = await call(client, "GET", "/oauth/callback?" + urlencode(pairs))
        assert_refused_without_redirect(reply)
    assert (await idp_answers(client, code="c", state=state, iss=idp.issuer)).status == 302


# -- CORS of the authorization-server endpoints ---------------------------------------------------


async def test_sign_in_pages_are_navigations_without_cors_while_as_endpoints_answer_any_origin(
    start: Start, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    """/token, registration and the metadata: `*` without credentials, for browser-based
    clients. /authorize and /oauth/callback: no CORS at all, no page may read them."""
    client = await start(**FACADE)
    page = {"Origin": "https://evil.example"}
    for path in ("/authorize", "/oauth/callback"):
        preflight = await call(client, "OPTIONS", path, headers={
            **page, "Access-Control-Request-Method": "GET"})
        assert preflight.status == 403, (path, preflight.text)
        assert "Access-Control-Allow-Origin" not in preflight.headers
    state = await sealed_state(client)
    for path, params in (("/authorize", authorize_params()),
                         ("/oauth/callback", {"code": "c", "state": state, "iss": idp.issuer})):
        reply = await call(client, "GET", path, params=params, headers=page)
        assert reply.status == 302, (path, reply.text)
        assert not any(h.startswith("Access-Control-") for h in reply.headers), reply.headers
    readable = [("POST", "/token"), ("POST", "/oauth/register"), ("POST", "/register"),
                *(("GET", path) for path in (*AS_PATHS, PRM_PATH))]
    for method, path in readable:
        preflight = await call(client, "OPTIONS", path, headers={
            **page, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status == 204, (path, preflight.text)
        assert preflight.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in preflight.headers
    answer = await call(client, "POST", "/token", data=urlencode(refresh()), headers={
        "Content-Type": "application/x-www-form-urlencoded", **page})
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in answer.headers
