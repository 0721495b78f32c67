"""`resource` and scopes toward the IdP (IDP_RESOURCE_PARAMETER, IDP_SCOPE_PREFIX), against a fake
Entra-like IdP on loopback driven through the real sidecar facade.

The fake plays what Microsoft Entra ID's v2.0 endpoints do with an MCP client's sign-in: its
/authorize and /token refuse the RFC 8707 `resource` beside an API scope (`invalid_target`,
AADSTS9010010) and any scope that names no API (`invalid_scope`, AADSTS70011: Entra would look
for it on Microsoft Graph), and issue a real JWT whose `aud` is the API app's id and whose `scp`
holds the bare scope names, as Entra does. The browser is played by the test: /authorize ->
fake IdP -> /oauth/callback -> the client's loopback redirect -> /token with PKCE.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import RESOURCE_URL, FakeIdp, FakeUpstream, SidecarFactory, SigningKey, bearer
from test_authserver import CHALLENGE, REQUEST_TIMEOUT, VERIFIER, Reply, call, form

from oauth_sidecar.config import ConfigError, load
from oauth_sidecar.config_summary import summary
from oauth_sidecar.doctor import ERROR, NOTE, WARNING, diagnose
from oauth_sidecar.signin.idp_request import idp_scope

Client = TestClient[web.Request, web.Application]

TENANT = "0b1c2d3e-0000-4000-8000-000000000000"
API_APP = "8f1d2c3b-1111-4222-8333-944455566677"  # the API app registration: aud of v2 tokens
PREFIX = f"api://{API_APP}/"
CLIENT_ID = "5e6f7a8b-2222-4333-8444-a55566677788"  # the static client's app registration
CLIENT_SECRET = "entra-client-secret-kept-by-the-sidecar"
STATE_SECRET = "e" * 40
CALLBACK = "https://mcp.example.test/oauth/callback"
REDIRECT = "http://127.0.0.1:33418/callback"  # a native client's loopback redirect
OIDC_SCOPES = ("openid", "profile", "email", "offline_access")
ENTRA_ENV = {
    "OIDC_AUDIENCE": API_APP, "STATIC_CLIENT_ID": CLIENT_ID, "STATIC_CLIENT_SECRET": CLIENT_SECRET,
    "STATE_SECRET": STATE_SECRET, "SCOPES_SUPPORTED": "mcp:read", "REQUIRED_SCOPES": "mcp:read",
}
FIXED = {"IDP_RESOURCE_PARAMETER": "omit", "IDP_SCOPE_PREFIX": PREFIX}


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(
        b"=").decode()


@dataclass
class Grant:
    scope: str
    challenge: str


@dataclass
class EntraLike:
    """Discovery and keys (FakeIdp), and an Entra-like /authorize and /token."""

    fake: FakeIdp
    authorizations: list[dict[str, str]] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    codes: dict[str, Grant] = field(default_factory=dict)
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # refresh token -> its scope

    @staticmethod
    def refusal(params: dict[str, str]) -> tuple[str, str] | None:
        """What Entra's v2.0 endpoints say to this `resource` and `scope`, if they refuse."""
        words = params.get("scope", "").split()
        if "resource" in params and any("://" in word for word in words):
            return ("invalid_target", "AADSTS9010010: The resource parameter provided in the "
                    "request doesn't match with the requested scopes.")
        unknown = [w for w in words if w not in OIDC_SCOPES and not w.startswith(PREFIX)]
        if unknown:
            return ("invalid_scope", f"AADSTS70011: The provided value for the input parameter "
                    f"'scope' is not valid. The scope '{unknown[0]}' does not exist.")
        if "resource" in params:
            return ("invalid_request",
                    "AADSTS901002: The 'resource' request parameter is not supported.")
        return None

    async def authorize(self, request: web.Request) -> web.StreamResponse:
        params = dict(request.query)
        self.authorizations.append(params)
        if params.get("client_id") != CLIENT_ID or params.get("redirect_uri") != CALLBACK:
            return web.Response(status=400, text="AADSTS50011: redirect URI mismatch")
        answer = {"state": params.get("state", "")}
        refused = self.refusal(params)
        if refused is not None:  # refused before any sign-in page, back to the callback
            answer.update(error=refused[0], error_description=refused[1])
            raise web.HTTPFound(f"{CALLBACK}?{urlencode(answer)}")
        # Accepted: on to the sign-in page, which (the user signing in and consenting) answers
        # the callback with a code for these scopes and this challenge.
        code = secrets.token_urlsafe(16)
        self.codes[code] = Grant(params["scope"], params["code_challenge"])
        answer["code"] = code
        raise web.HTTPFound(f"/login?{urlencode(answer)}")

    async def login(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{CALLBACK}?{urlencode(request.query)}")

    def _issued(self, scope: str) -> web.Response:
        words = scope.split()
        api = [w.removeprefix(PREFIX) for w in words if w.startswith(PREFIX)]
        access = self.fake.mint(claims={"aud": API_APP, "scp": " ".join(api), "azp": CLIENT_ID,
                                        "ver": "2.0", "tid": TENANT})
        body: dict[str, Any] = {"token_type": "Bearer", "scope": scope, "expires_in": 3600,
                                "access_token": access}
        if "offline_access" in words:
            body["refresh_token"] = refresh = secrets.token_urlsafe(24)
            self.refresh_tokens[refresh] = scope
        return web.json_response(body)

    async def token(self, request: web.Request) -> web.StreamResponse:
        fields = dict(parse_qsl((await request.read()).decode(), keep_blank_values=True))
        self.token_requests.append(fields)
        basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {basic}":
            return web.json_response({"error": "invalid_client", "error_description":
                                      "AADSTS7000215: Invalid client secret provided."},
                                     status=401)
        refused = self.refusal(fields)
        if refused is not None:
            return web.json_response(
                {"error": refused[0], "error_description": refused[1]}, status=400)
        if fields.get("grant_type") == "authorization_code":
            grant = self.codes.pop(fields.get("code", ""), None)
            if grant is None or fields.get("redirect_uri") != CALLBACK or (
                s256(fields.get("code_verifier", "")) != grant.challenge
            ):
                return web.json_response({"error": "invalid_grant"}, status=400)
            return self._issued(grant.scope)
        held = self.refresh_tokens.get(fields.get("refresh_token", ""))
        if held is None:
            return web.json_response({"error": "invalid_grant"}, status=400)
        asked = fields.get("scope", held)
        if not set(asked.split()) <= set(held.split()):
            return web.json_response({"error": "invalid_grant", "error_description":
                                      "AADSTS70000: scopes not granted"}, status=400)
        return self._issued(asked)


@pytest.fixture
async def entra(signing_key: SigningKey) -> AsyncIterator[EntraLike]:
    fake = FakeIdp(keys=[signing_key], issuer_suffix=f"/{TENANT}/v2.0")
    entra = EntraLike(fake)
    fake.document_changes.update({
        "scopes_supported": list(OIDC_SCOPES),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt",
                                                  "client_secret_basic"],
    })
    app = fake.app()
    app.router.add_get("/authorize", entra.authorize)
    app.router.add_get("/login", entra.login)
    app.router.add_post("/token", entra.token)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.server = server
    yield entra
    await server.close()


@pytest.fixture
def idp(entra: EntraLike) -> FakeIdp:
    """make_sidecar's IdP is the Entra-like one."""
    return entra.fake


def authorization(scope: str) -> dict[str, str]:
    """An MCP client's authorization request: bare scopes from the metadata, and `resource`."""
    return {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT,
            "state": "client-state-7", "code_challenge": CHALLENGE,
            "code_challenge_method": "S256", "scope": scope, "resource": RESOURCE_URL}


async def sign_in(sidecar: Client, scope: str = "openid mcp:read offline_access") -> dict[str, str]:
    """/authorize -> the IdP -> /oauth/callback; the parameters the client's redirect gets."""
    start = await call(sidecar, "GET", "/authorize", params=authorization(scope))
    assert start.status == 302, start.text
    back = start.location
    async with aiohttp.ClientSession() as browser, asyncio.timeout(REQUEST_TIMEOUT):
        for _ in range(2):  # the IdP's /authorize, then its sign-in page
            async with browser.get(back, allow_redirects=False) as at_idp:
                assert at_idp.status == 302, await at_idp.text()
                back = str(at_idp.url.join(yarl.URL(at_idp.headers["Location"])))
            if back.startswith(CALLBACK + "?"):
                break
    assert back.startswith(CALLBACK + "?")
    returned = await call(sidecar, "GET", "/oauth/callback" + back.removeprefix(CALLBACK))
    assert returned.status == 302, returned.text
    base, query = returned.target()
    assert base == REDIRECT
    return dict(query)


async def redeem(sidecar: Client, code: str) -> Reply:
    return await call(sidecar, "POST", "/token", **form(
        grant_type="authorization_code", code=code, redirect_uri=REDIRECT, client_id=CLIENT_ID,
        code_verifier=VERIFIER, resource=RESOURCE_URL))


async def refresh(sidecar: Client, refresh_token: str, scope: str) -> Reply:
    return await call(sidecar, "POST", "/token", **form(
        grant_type="refresh_token", refresh_token=refresh_token, client_id=CLIENT_ID,
        scope=scope, resource=RESOURCE_URL))


# -- the mapping -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("scope", "expected"), [
    ("mcp:read", PREFIX + "mcp:read"),
    ("openid profile email offline_access", "openid profile email offline_access"),
    ("openid mcp:read  offline_access", f"openid {PREFIX}mcp:read offline_access"),
    (f"{PREFIX}mcp:read mcp:write", f"{PREFIX}mcp:read {PREFIX}mcp:write"),
    ("https://graph.microsoft.com/User.Read .default", f"https://graph.microsoft.com/User.Read "
                                                       f"{PREFIX}.default"),
    ("", ""),
])
def test_scopes_get_the_prefix_except_oidc_and_those_naming_an_api(
    scope: str, expected: str
) -> None:
    assert idp_scope(scope, PREFIX) == expected
    assert idp_scope(scope, "") == scope


BASE = {"OIDC_ISSUER_URL": f"https://login.microsoftonline.com/{TENANT}/v2.0",
        "OIDC_AUDIENCE": API_APP, "RESOURCE_URL": RESOURCE_URL,
        "MCP_UPSTREAM_URL": "http://127.0.0.1:9", "ALLOW_SUBS": "u"}


def test_configuration_reads_both_settings_in_facade_mode() -> None:
    config = load({**BASE, "STATIC_CLIENT_ID": CLIENT_ID, **FIXED})
    assert (config.auth_server.send_resource, config.auth_server.scope_prefix) == (False, PREFIX)
    shown = summary(config)
    assert (shown["idp_resource_parameter"], shown["idp_scope_prefix"]) == ("omit", PREFIX)
    default = load({**BASE, "STATIC_CLIENT_ID": CLIENT_ID})
    assert (default.auth_server.send_resource, default.auth_server.scope_prefix) == (True, "")
    assert load({**BASE, "STATIC_CLIENT_ID": CLIENT_ID,
                 "IDP_SCOPE_PREFIX": "https://api.example.com/mcp/"}).auth_server.scope_prefix


@pytest.mark.parametrize(("extra", "problem"), [
    ({"IDP_RESOURCE_PARAMETER": "omit"}, "IDP_RESOURCE_PARAMETER=omit applies to the facade's "
                                         "relay only"),
    ({"IDP_SCOPE_PREFIX": PREFIX}, f"IDP_SCOPE_PREFIX={PREFIX} applies to the facade's relay "
                                   "only"),
    ({"STATIC_CLIENT_ID": CLIENT_ID, "IDP_SCOPE_PREFIX": f"api://{API_APP}"},
     "must be an api:// or https:// identifier ending with /"),
    ({"STATIC_CLIENT_ID": CLIENT_ID, "IDP_SCOPE_PREFIX": "http://api.example.com/"},
     "must be an api:// or https:// identifier ending with /"),
    ({"STATIC_CLIENT_ID": CLIENT_ID, "IDP_SCOPE_PREFIX": "api:///"},
     "must be an api:// or https:// identifier ending with /"),
    ({"STATIC_CLIENT_ID": CLIENT_ID, "IDP_RESOURCE_PARAMETER": "drop"},
     "IDP_RESOURCE_PARAMETER='drop' is not one of pass, omit"),
], ids=["omit-direct", "prefix-direct", "no-slash", "http", "no-host", "unknown-choice"])
def test_settings_that_could_not_work_stop_the_start(extra: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load({**BASE, **extra})
    assert any(problem in p for p in refused.value.problems), refused.value.problems


# -- against the Entra-like IdP --------------------------------------------------------------------


@pytest.mark.parametrize(("env", "scope", "refused"), [
    ({}, "openid mcp:read offline_access", ("invalid_scope", "AADSTS70011")),
    ({}, f"openid {PREFIX}mcp:read offline_access", ("invalid_target", "AADSTS9010010")),
    ({"IDP_SCOPE_PREFIX": PREFIX}, "openid mcp:read offline_access",
     ("invalid_target", "AADSTS9010010")),
    ({"IDP_RESOURCE_PARAMETER": "omit"}, "openid mcp:read offline_access",
     ("invalid_scope", "AADSTS70011")),
], ids=["defaults", "defaults-client-prefixes", "prefix-only", "omit-only"])
async def test_without_both_settings_sign_in_fails_the_way_entra_fails(
    make_sidecar: SidecarFactory, entra: EntraLike, env: dict[str, str], scope: str,
    refused: tuple[str, str],
) -> None:
    sidecar = await make_sidecar(**ENTRA_ENV, **env)
    answer = await sign_in(sidecar, scope)
    error, code = refused
    assert answer["error"] == error
    assert answer["error_description"].startswith(code + ":")
    assert answer["state"] == "client-state-7"
    assert "code" not in answer
    assert entra.codes == {}


async def test_with_omit_and_the_prefix_a_client_signs_in_calls_and_refreshes(
    make_sidecar: SidecarFactory, entra: EntraLike, upstream: FakeUpstream
) -> None:
    sidecar = await make_sidecar(**ENTRA_ENV, **FIXED)
    answer = await sign_in(sidecar)
    [sent] = entra.authorizations
    assert "resource" not in sent
    assert sent["scope"] == f"openid {PREFIX}mcp:read offline_access"  # OIDC scopes bare

    reply = await redeem(sidecar, answer["code"])
    assert reply.status == 200, reply.text
    [relayed] = entra.token_requests
    assert "resource" not in relayed
    assert "scope" not in relayed  # the code carries its scopes; nothing added
    tokens = reply.json()
    assert tokens["scope"] == f"openid {PREFIX}mcp:read offline_access"

    # The token's scp holds the bare name: REQUIRED_SCOPES=mcp:read admits it unchanged.
    mcp = await call(sidecar, "POST", "/mcp", headers=bearer(tokens["access_token"]), data=b"{}")
    assert mcp.status == 200, mcp.text
    assert upstream.requests

    again = await refresh(sidecar, tokens["refresh_token"], "mcp:read offline_access")
    assert again.status == 200, again.text
    relayed = entra.token_requests[-1]
    assert relayed["grant_type"] == "refresh_token"
    assert relayed["scope"] == f"{PREFIX}mcp:read offline_access"
    assert "resource" not in relayed
    renewed = again.json()
    mcp = await call(sidecar, "POST", "/mcp", headers=bearer(renewed["access_token"]), data=b"{}")
    assert mcp.status == 200, mcp.text


async def test_a_relay_that_passes_resource_has_its_refresh_refused_like_entra(
    make_sidecar: SidecarFactory, entra: EntraLike
) -> None:
    fixed = await make_sidecar(**ENTRA_ENV, **FIXED)
    tokens = (await redeem(fixed, (await sign_in(fixed))["code"])).json()
    passing = await make_sidecar(**ENTRA_ENV, IDP_SCOPE_PREFIX=PREFIX)
    reply = await refresh(passing, tokens["refresh_token"], "mcp:read offline_access")
    assert reply.status == 400
    assert reply.json()["error"] == "invalid_target"
    assert reply.json()["error_description"].startswith("AADSTS9010010:")
    assert entra.token_requests[-1]["resource"] == RESOURCE_URL


async def test_metadata_and_prm_keep_advertising_the_bare_scopes(
    make_sidecar: SidecarFactory,
) -> None:
    sidecar = await make_sidecar(**ENTRA_ENV, **FIXED)
    document = (await call(sidecar, "GET", "/.well-known/oauth-authorization-server")).json()
    assert document["scopes_supported"] == ["mcp:read", "offline_access"]
    prm = (await call(sidecar, "GET", "/.well-known/oauth-protected-resource/mcp")).json()
    assert prm["scopes_supported"] == ["mcp:read"]
    assert prm["resource"] == RESOURCE_URL  # clients still send it; the relay drops it


async def test_the_doctor_probes_the_relay_with_the_mapped_request(
    entra: EntraLike, upstream: FakeUpstream
) -> None:
    env = {"OIDC_ISSUER_URL": entra.fake.issuer, "RESOURCE_URL": RESOURCE_URL,
           "MCP_UPSTREAM_URL": upstream.url, "ALLOW_ALL_AUTHENTICATED": "true", **ENTRA_ENV}
    broken = await diagnose(load(env))
    severity, message = next((f.severity, f.message) for f in broken.findings
                             if f.code == "relay_refused")
    assert severity == ERROR
    assert "AADSTS70011" in message
    fixed = await diagnose(load({**env, **FIXED}))
    assert [f.severity for f in fixed.findings if f.code == "relay_ok"] == [NOTE]
    assert "resource" not in entra.authorizations[-1]
    assert entra.authorizations[-1]["scope"] == PREFIX + "mcp:read"
    # The API's scopes are not in the IdP's own scopes_supported, and need not be.
    assert "scope_not_offered" in broken.codes(WARNING)
    assert "scope_not_offered" not in fixed.codes(WARNING)
