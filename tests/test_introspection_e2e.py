"""Opaque access tokens end to end: what issue 19's "done means" asks, against real things only.

The production sidecar (create_app(load(env)) on loopback) in front of the official-SDK MCP
server (tests/mcp_echo_server.py, a real child process) checks opaque access tokens that the
tests' real OpenID provider (panva's oidc-provider, tests/oidc/provider.mjs, a node child process)
really issues, by asking that provider's real RFC 7662 introspection endpoint as a resource server
of its own (an --introspection-client). The official MCP SDK client talks to the sidecar with such
a token. The provider's /_test/introspection control counts the introspection requests it got
(so a test proves a cache hit or a shared call) and makes the endpoint slow or failing.

Where a test must see or change the bytes between the sidecar and the provider (which client
authentication went out; a signed answer altered on the way), a small recording relay sits in
front of the real endpoint (INTROSPECTION_ENDPOINT names it) and forwards to it: the answers are
still the provider's own.

One provider and one echo server serve the whole module (the tests only add tokens and read the
control's counter as differences); tests that need other provider options start their own.
Needs `npm ci --prefix tests/oidc`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp_client_probe import call_echo, call_whoami, expect_unauthorized
from oauth_flow import EchoServer, Sidecar, run_echo_server, run_sidecar
from opaque_tokens import (
    authorization_code_tokens,
    is_jws,
    opaque_client_credentials_token,
    opaque_refresh_token,
)
from processes import free_port
from real_idp import (
    INTROSPECTION_JWT,
    ConfidentialClient,
    RealIdp,
    client_credentials_token,
    introspect,
    introspection_control,
    revoke,
    run_oidc_provider,
)
from structlog.testing import capture_logs

from oauth_sidecar.app import INTROSPECTOR

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

RS = ConfidentialClient("resource-server", "rs-secret")
RS_POST = ConfidentialClient("resource-server-post", "rs-post-secret", "client_secret_post")
USER = "user-1"  # the provider's --auto-login account: sub of authorization_code tokens
CLIENT = "sidecar-test"  # the provider's main client: sub of its client_credentials tokens
# Access tokens for this resource are JWTs (provider.mjs --jwt-resource): the same provider then
# issues both kinds, as Auth0 does. The sidecar lists it as a second audience where it must
# accept such a JWT (auto mode), so a refusal can only come from how the token was checked.
JWT_RESOURCE = "http://127.0.0.1:8933/jwt-mcp"
OTHER_RESOURCE = "http://127.0.0.1:8934/another-mcp"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10.0)
CLIENT_TIMEOUT = 30.0  # around each whole SDK client session
EXPIRY_WAIT = 15.0  # bound on waiting for a 3 s token to expire
REVOCATION_WINDOW = 4  # INTROSPECTION_CACHE_SECONDS of the revocation test: ample for
# the two requests and the revocation that must fall inside it
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "introspection-e2e", "version": "1"}}}
MCP_ACCEPT = "application/json, text/event-stream"


# -- the module's provider, upstream and sidecars ------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider() -> AsyncIterator[RealIdp]:
    """Opaque access tokens (JWTs for JWT_RESOURCE), the two resource-server clients, and
    --auto-login so authorization_code flows (a user's token, a refresh token) need no one."""
    async with run_oidc_provider(access_token_format="opaque", introspection_clients=[RS, RS_POST],
                                 auto_login=USER, jwt_resources=[JWT_RESOURCE]) as idp:
        yield idp


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def signing_provider() -> AsyncIterator[RealIdp]:
    """The same, with RFC 9701 signed introspection answers (--jwt-introspection)."""
    async with run_oidc_provider(access_token_format="opaque", introspection_clients=[RS],
                                 jwt_introspection=True) as idp:
        yield idp


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def echo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EchoServer]:
    async with run_echo_server(tmp_path_factory.mktemp("echo")) as server:
        yield server


def introspecting(client: ConfidentialClient = RS, **env: str) -> dict[str, str]:
    """The sidecar's environment for TOKEN_VALIDATION=introspection as `client`; both the
    user and the main client allowed, identity forwarded upstream."""
    return {"TOKEN_VALIDATION": "introspection", "INTROSPECTION_CLIENT_ID": client.client_id,
            "INTROSPECTION_CLIENT_SECRET": client.client_secret,
            "ALLOW_SUBS": f"{USER},{CLIENT}", "FORWARD_IDENTITY": "true", **env}


@contextlib.asynccontextmanager
async def sidecar_for(idp: RealIdp, echo: EchoServer, env: Mapping[str, str],
                      port: int | None = None) -> AsyncIterator[Sidecar]:
    async with run_sidecar(idp.issuer, echo.url, env, port=port) as sidecar:
        try:
            yield sidecar
        except Exception as exc:
            exc.add_note(f"--- oidc-provider:\n{idp.log_tail()}\n--- echo:\n{echo.log()}")
            raise


@dataclass(frozen=True)
class Reply:
    """One MCP initialize POST through the sidecar, and its access-log line."""

    status: int
    headers: Mapping[str, str]
    body: bytes = field(repr=False)
    auth_error: str | None
    sub: str | None

    @property
    def error(self) -> Any:
        return json.loads(self.body)["error"]


async def post(sidecar: Sidecar, token: str) -> tuple[int, Mapping[str, str], bytes]:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT, trust_env=False) as session, \
            session.post(sidecar.mcp_url, json=INITIALIZE, headers={
                "Authorization": f"Bearer {token}", "Accept": MCP_ACCEPT}) as response:
        return response.status, response.headers.copy(), await response.read()


async def call(sidecar: Sidecar, token: str,
               events: list[MutableMapping[str, Any]] | None = None) -> Reply:
    """`events`: the caller's capture_logs() list (captures do not nest), else one here."""
    if events is None:
        with capture_logs() as captured:
            status, headers, body = await post(sidecar, token)
    else:
        captured = events
        status, headers, body = await post(sidecar, token)
    line = [e for e in captured if e["event"] == "request"][-1]
    assert line["status"] == status
    return Reply(status, headers, body, line["auth_error"], line["sub"])


def assert_admitted(reply: Reply, sub: str) -> None:
    """Through to the MCP server, which answered the initialize, as `sub`."""
    assert (reply.status, reply.auth_error, reply.sub) == (200, None, sub), reply
    assert b'"serverInfo"' in reply.body, reply


def assert_invalid_token(reply: Reply, reason: str) -> None:
    assert (reply.status, reply.auth_error) == (401, reason), reply
    assert 'error="invalid_token"' in reply.headers["WWW-Authenticate"], reply.headers


def assert_unavailable(reply: Reply, reason: str) -> None:
    """The IdP's trouble: 503 and Retry-After, not the caller's credential's fault, no upstream."""
    assert (reply.status, reply.auth_error) == (503, reason), reply
    assert reply.error == "temporarily_unavailable"
    assert reply.headers["Retry-After"].isdigit(), reply.headers
    assert int(reply.headers["Retry-After"]) >= 1
    assert "WWW-Authenticate" not in reply.headers


async def calls_so_far(idp: RealIdp) -> int:
    """Introspection requests the provider received so far (every answer counts)."""
    return (await introspection_control(idp)).requests


@contextlib.asynccontextmanager
async def introspection_trouble(idp: RealIdp, *, delay_ms: int = 0,
                                fail_status: int = 0) -> AsyncIterator[None]:
    """The shared provider's introspection endpoint slow or failing, and always itself again."""
    await introspection_control(idp, delay_ms=delay_ms, fail_status=fail_status)
    try:
        yield
    finally:
        await introspection_control(idp, delay_ms=0, fail_status=0)


# -- a relay in front of the real endpoint, where the bytes on the wire matter -------------------


@dataclass(frozen=True)
class Relayed:
    """What one introspection request carried and got (no secret and no token kept)."""

    basic: bool
    form_names: tuple[str, ...]
    accept: str
    status: int
    content_type: str


@dataclass
class Relay:
    """Forwards POSTs to the provider's introspection endpoint; records them; with `tamper`,
    changes the sub inside a signed answer (keeping its signature), as a forger on the path."""

    target: str
    seen: list[Relayed] = field(default_factory=list)
    tamper: bool = False
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        form = dict(parse_qsl(body.decode()))
        headers = {name: request.headers[name] for name in ("Authorization", "Content-Type",
                                                            "Accept") if name in request.headers}
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT, trust_env=False) as session, \
                session.post(self.target, data=body, headers=headers,
                             allow_redirects=False) as response:
            answer, content_type = await response.read(), response.headers["Content-Type"]
            status = response.status
        self.seen.append(Relayed(
            basic=headers.get("Authorization", "").startswith("Basic "),
            form_names=tuple(sorted(form)), accept=headers.get("Accept", ""), status=status,
            content_type=content_type))
        if self.tamper and content_type.startswith(INTROSPECTION_JWT):
            answer = forged(answer)
        return web.Response(status=status, body=answer, headers={"Content-Type": content_type})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def forged(signed: bytes) -> bytes:
    """The signed answer claiming another subject, under the original signature."""
    head, payload, signature = signed.decode().split(".")
    claims = json.loads(unb64url(payload))
    claims["token_introspection"]["sub"] = "mallory"
    return ".".join((head, b64url(json.dumps(claims).encode()), signature)).encode()


@contextlib.asynccontextmanager
async def relay_to(idp: RealIdp) -> AsyncIterator[Relay]:
    relay = Relay(idp.issuer + "/token/introspection")
    app = web.Application()
    app.router.add_post("/introspect", relay.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    relay.url = str(server.make_url("/introspect"))
    try:
        yield relay
    finally:
        await server.close()


# -- accepted: the caller the JWT path would make, the token kept from upstream ------------------


@pytest.mark.parametrize("client", [RS, RS_POST], ids=lambda c: c.auth_method)
async def test_an_opaque_token_is_accepted_with_either_client_authentication(
    provider: RealIdp, echo: EchoServer, client: ConfidentialClient,
) -> None:
    async with relay_to(provider) as relay, sidecar_for(provider, echo, introspecting(
        client, INTROSPECTION_ENDPOINT=relay.url,
        INTROSPECTION_AUTH_METHOD=client.auth_method)) as sidecar:
        token = await opaque_client_credentials_token(provider, sidecar.mcp_url)
        assert not is_jws(token)
        assert_admitted(await call(sidecar, token), CLIENT)

    [relayed] = relay.seen
    assert relayed.status == 200
    assert relayed.content_type.startswith("application/json")
    if client.auth_method == "client_secret_basic":
        assert relayed.basic
        assert relayed.form_names == ("token", "token_type_hint")
    else:
        assert not relayed.basic
        assert relayed.form_names == ("client_id", "client_secret", "token", "token_type_hint")


async def test_without_introspection_auth_methods_the_token_endpoints_decide(
    provider: RealIdp, echo: EchoServer,
) -> None:
    """oidc-provider lists no introspection_endpoint_auth_methods_supported; its
    token_endpoint_auth_methods_supported (basic, post, none) decide: basic first."""
    async with relay_to(provider) as relay, sidecar_for(
            provider, echo, introspecting(INTROSPECTION_ENDPOINT=relay.url)) as sidecar:
        token = await opaque_client_credentials_token(provider, sidecar.mcp_url)
        assert_admitted(await call(sidecar, token), CLIENT)
    assert [(r.basic, r.status) for r in relay.seen] == [(True, 200)]


async def test_an_issuer_with_a_path_is_introspected_at_its_own_endpoint(echo: EchoServer) -> None:
    """Keycloak-style issuer path: the endpoint comes from that issuer's discovery document."""
    async with run_oidc_provider("/realms/demo", access_token_format="opaque",
                                 introspection_clients=[RS]) as idp, \
            sidecar_for(idp, echo, introspecting()) as sidecar:
        token = await opaque_client_credentials_token(idp, sidecar.mcp_url)
        assert_admitted(await call(sidecar, token), CLIENT)
        assert await calls_so_far(idp) == 1
        assert sidecar.app[INTROSPECTOR].target().url == idp.issuer + "/token/introspection"


async def test_the_upstream_sees_the_users_identity_and_never_the_token(
    provider: RealIdp, echo: EchoServer,
) -> None:
    async with sidecar_for(provider, echo, introspecting()) as sidecar:
        tokens = await authorization_code_tokens(provider, sidecar.mcp_url)
        assert not is_jws(tokens.access_token)
        async with asyncio.timeout(CLIENT_TIMEOUT):
            seen = await call_whoami(sidecar.mcp_url, tokens.access_token)
    assert "authorization" not in seen, seen
    assert tokens.access_token not in json.dumps(seen)
    assert seen["x-forwarded-user"] == USER
    assert seen["x-forwarded-issuer"] == provider.issuer


# -- the official MCP SDK client with an opaque token --------------------------------------------


@pytest.mark.parametrize("validation", ["introspection", "auto"])
async def test_the_official_sdk_client_works_through_the_sidecar_with_an_opaque_token(
    provider: RealIdp, echo: EchoServer, validation: str,
) -> None:
    """initialize, tools/list and tools/call (and the session's other requests: the initialized
    notification, the SSE stream, the closing DELETE) on one token: one introspection call."""
    port = free_port()
    resource = f"http://127.0.0.1:{port}/mcp"
    env = introspecting(TOKEN_VALIDATION=validation, OIDC_AUDIENCE=f"{resource},{JWT_RESOURCE}")
    async with sidecar_for(provider, echo, env, port):
        tokens = await authorization_code_tokens(provider, resource)
        statuses: list[int] = []

        async def record(response: Any) -> None:
            statuses.append(response.status_code)

        before = await calls_so_far(provider)
        async with asyncio.timeout(CLIENT_TIMEOUT):
            text = await call_echo(resource, tokens.access_token, "opaque and fine",
                                   on_response=record)
            seen = await call_whoami(resource, tokens.access_token)
        assert await calls_so_far(provider) - before == 1
    assert text == "opaque and fine"
    assert len(statuses) >= 4, statuses
    assert all(status < 400 for status in statuses), statuses
    assert seen["x-forwarded-user"] == USER
    assert "authorization" not in seen


async def test_the_official_sdk_client_with_a_revoked_opaque_token_gets_only_401s(
    provider: RealIdp, echo: EchoServer,
) -> None:
    async with sidecar_for(provider, echo, introspecting()) as sidecar:
        token = (await authorization_code_tokens(provider, sidecar.mcp_url)).access_token
        await revoke(provider, token, provider.client)
        challenges: list[tuple[int, str]] = []

        async def record(response: Any) -> None:
            challenges.append((response.status_code,
                               response.headers.get("www-authenticate", "")))

        async with asyncio.timeout(CLIENT_TIMEOUT):
            await expect_unauthorized(sidecar.mcp_url, token=token, on_response=record)
    assert challenges, "the SDK client made no request"
    for status, challenge in challenges:
        assert status == 401, challenges
        assert 'error="invalid_token"' in challenge, challenges


# -- refused: the caller's token is not good here ------------------------------------------------


async def test_a_revoked_token_is_accepted_within_the_cache_window_and_refused_after(
    provider: RealIdp, echo: EchoServer,
) -> None:
    env = introspecting(INTROSPECTION_CACHE_SECONDS=str(REVOCATION_WINDOW))
    async with sidecar_for(provider, echo, env) as sidecar:
        token = await opaque_client_credentials_token(provider, sidecar.mcp_url)
        before = await calls_so_far(provider)
        admitted_at = time.monotonic()
        assert_admitted(await call(sidecar, token), CLIENT)
        await revoke(provider, token, provider.client)

        # The revocation lag the operator chose: the cached answer, no new call.
        reply = await call(sidecar, token)
        elapsed = time.monotonic() - admitted_at
        assert reply.status == 200, f"{elapsed:.1f} s after the first call: {reply}"
        assert_admitted(reply, CLIENT)
        assert await calls_so_far(provider) - before == 1

        deadline = time.monotonic() + REVOCATION_WINDOW + 10.0
        while (reply := await call(sidecar, token)).status == 200:
            assert time.monotonic() < deadline, "a revoked token still accepted"
            await asyncio.sleep(0.2)
        refused_after = time.monotonic() - admitted_at
        assert_invalid_token(reply, "inactive")
        assert await calls_so_far(provider) - before == 2
    assert refused_after >= REVOCATION_WINDOW - 0.5  # the window was kept (timer granularity)


async def test_an_expired_token_is_refused(echo: EchoServer) -> None:
    async with run_oidc_provider(access_token_format="opaque", introspection_clients=[RS],
                                 access_token_ttl=3) as idp, \
            sidecar_for(idp, echo, introspecting(JWT_LEEWAY_SECONDS="0")) as sidecar:
        used = await opaque_client_credentials_token(idp, sidecar.mcp_url)
        unused = await opaque_client_credentials_token(idp, sidecar.mcp_url)
        assert_admitted(await call(sidecar, used), CLIENT)  # cached until its exp
        exp = (await introspect(idp, used, RS))["exp"]

        deadline = time.monotonic() + EXPIRY_WAIT
        while (reply := await call(sidecar, used)).status == 200:
            assert time.monotonic() < deadline, f"still accepted {EXPIRY_WAIT} s later"
            await asyncio.sleep(0.2)
        assert time.time() >= exp  # refused because it expired, not earlier
        # Asked again once the cached answer's exp passed: the provider says inactive (or, in
        # its last second, active with an exp the sidecar's own check finds passed).
        assert reply.auth_error in ("inactive", "expired"), reply
        assert_invalid_token(reply, reply.auth_error or "")
        assert_invalid_token(await call(sidecar, unused), "inactive")


async def test_a_token_for_another_resource_is_refused(
    provider: RealIdp, echo: EchoServer,
) -> None:
    async with sidecar_for(provider, echo, introspecting()) as sidecar:
        token = await opaque_client_credentials_token(provider, OTHER_RESOURCE)
        assert_invalid_token(await call(sidecar, token), "wrong_audience")


async def test_a_refresh_token_is_refused(provider: RealIdp, echo: EchoServer) -> None:
    """oidc-provider says active for a refresh token, with no aud and no token_type."""
    async with sidecar_for(provider, echo, introspecting()) as sidecar:
        refresh_token = await opaque_refresh_token(provider, sidecar.mcp_url)
        assert_invalid_token(await call(sidecar, refresh_token), "claim_missing")


async def test_an_unmarked_refresh_token_is_refused_when_the_audience_is_the_client_id(
    provider: RealIdp, echo: EchoServer,
) -> None:
    """oidc-provider marks a refresh token by nothing but the missing aud and token_type, so
    with JWT_AUDIENCE_CLAIM=client_id its client_id matches like its access token's: the
    sidecar then requires the answer to mark an access token (token_type or token_use)."""
    env = introspecting(JWT_AUDIENCE_CLAIM="client_id", OIDC_AUDIENCE=CLIENT)
    async with sidecar_for(provider, echo, env) as sidecar:
        tokens = await authorization_code_tokens(provider, sidecar.mcp_url)
        assert tokens.refresh_token is not None
        assert_admitted(await call(sidecar, tokens.access_token), USER)
        assert_invalid_token(await call(sidecar, tokens.refresh_token), "token_type_missing")


async def test_a_jwt_in_introspection_mode_is_an_invalid_token_not_the_idps_trouble(
    provider: RealIdp, echo: EchoServer,
) -> None:
    """oidc-provider answers 400 unsupported_token_type for a JWT: "not a token I know", so a
    401 for the caller, not a 503 nor a complaint about the sidecar's own client."""
    env = introspecting(OIDC_AUDIENCE=JWT_RESOURCE)
    async with sidecar_for(provider, echo, env) as sidecar:
        token = await client_credentials_token(provider, JWT_RESOURCE, "mcp:read")
        assert is_jws(token)
        before = await calls_so_far(provider)
        with capture_logs() as events:
            reply = await call(sidecar, token, events)
        assert await calls_so_far(provider) - before == 1
    assert_invalid_token(reply, "inactive")
    assert [e["event"] for e in events if e["event"].startswith("introspection")] == []


# -- auto mode: the token's shape decides --------------------------------------------------------


async def test_auto_verifies_a_jwt_here_and_introspects_an_opaque_token(
    provider: RealIdp, echo: EchoServer,
) -> None:
    port = free_port()
    resource = f"http://127.0.0.1:{port}/mcp"
    env = introspecting(TOKEN_VALIDATION="auto", OIDC_AUDIENCE=f"{resource},{JWT_RESOURCE}")
    async with sidecar_for(provider, echo, env, port) as sidecar:
        structured = await client_credentials_token(provider, JWT_RESOURCE, "mcp:read")
        opaque = await opaque_client_credentials_token(provider, resource)
        id_token = (await authorization_code_tokens(provider, resource)).raw["id_token"]
        head, payload, signature = structured.split(".")
        bad_signature = ".".join((head, payload, signature[:-4] + (
            "AAAA" if signature[-4:] != "AAAA" else "BBBB")))
        before = await calls_so_far(provider)

        assert_admitted(await call(sidecar, structured), CLIENT)
        # A failing JWT stays with the JWT verifier: no second opinion from the IdP.
        assert_invalid_token(await call(sidecar, bad_signature), "bad_signature")
        assert_invalid_token(await call(sidecar, id_token), "wrong_audience")  # aud: the client
        assert await calls_so_far(provider) == before

        assert_admitted(await call(sidecar, opaque), CLIENT)
        assert await calls_so_far(provider) - before == 1


async def test_the_callers_failure_budget_is_spent_before_the_idp_is_asked(
    provider: RealIdp, echo: EchoServer,
) -> None:
    env = introspecting(RATE_LIMIT_UNAUTHENTICATED_RPM="2")
    async with sidecar_for(provider, echo, env) as sidecar:
        before = await calls_so_far(provider)
        for i in range(2):
            assert_invalid_token(await call(sidecar, f"never-issued-{i}"), "inactive")
        assert await calls_so_far(provider) - before == 2
        limited = await call(sidecar, "never-issued-3")
        assert limited.status == 429, limited
        assert await calls_so_far(provider) - before == 2  # refused before any call


# -- the IdP's trouble: 503 with Retry-After, never a 500, never an accept -----------------------


async def test_wrong_introspection_credentials_are_a_503_logged_once(
    provider: RealIdp, echo: EchoServer,
) -> None:
    wrong = ConfidentialClient(RS.client_id, "not-the-secret")
    async with sidecar_for(provider, echo, introspecting(wrong)) as sidecar:
        tokens = [await opaque_client_credentials_token(provider, sidecar.mcp_url)
                  for _ in range(3)]
        before = await calls_so_far(provider)
        with capture_logs() as events:
            for token in tokens:
                assert_unavailable(await call(sidecar, token, events), "introspection_refused")
        assert await calls_so_far(provider) - before == 3  # not remembered: a fix works at once
    [event] = [e for e in events if e["event"].startswith("introspection")]
    assert event["event"] == "introspection_client_refused"
    assert "HTTP 401 invalid_client" in event["detail"]
    logged = repr(events)
    for secret in (*tokens, wrong.client_secret):
        assert secret not in logged


@pytest.mark.parametrize("fail_status", [503, 500, 404])
async def test_a_failing_introspection_endpoint_is_a_503_and_not_remembered(
    provider: RealIdp, echo: EchoServer, fail_status: int,
) -> None:
    async with sidecar_for(provider, echo, introspecting()) as sidecar:
        token = await opaque_client_credentials_token(provider, sidecar.mcp_url)
        async with introspection_trouble(provider, fail_status=fail_status):
            assert_unavailable(await call(sidecar, token), "introspection_failed")
            assert_unavailable(await call(sidecar, token), "introspection_failed")
        assert_admitted(await call(sidecar, token), CLIENT)


async def test_a_slow_introspection_endpoint_is_a_503_timeout(
    provider: RealIdp, echo: EchoServer,
) -> None:
    env = introspecting(INTROSPECTION_TIMEOUT_SECONDS="0.5")
    async with sidecar_for(provider, echo, env) as sidecar:
        token = await opaque_client_credentials_token(provider, sidecar.mcp_url)
        async with introspection_trouble(provider, delay_ms=3000):
            assert_unavailable(await call(sidecar, token), "introspection_timeout")
        assert_admitted(await call(sidecar, token), CLIENT)


async def test_a_stopped_provider_is_a_503_never_an_accept(echo: EchoServer) -> None:
    async with contextlib.AsyncExitStack() as idp_running:
        idp = await idp_running.enter_async_context(run_oidc_provider(
            access_token_format="opaque", introspection_clients=[RS]))
        async with sidecar_for(idp, echo, introspecting()) as sidecar:
            cached = await opaque_client_credentials_token(idp, sidecar.mcp_url)
            fresh = await opaque_client_credentials_token(idp, sidecar.mcp_url)
            assert_admitted(await call(sidecar, cached), CLIENT)

            await idp_running.aclose()  # the provider process is stopped and reaped

            for _ in range(2):
                assert_unavailable(await call(sidecar, fresh), "introspection_unavailable")
            # An answer cached before the IdP went away still holds for its window.
            assert_admitted(await call(sidecar, cached), CLIENT)


# -- load on the IdP: one call per token ---------------------------------------------------------


async def test_concurrent_and_repeated_requests_with_one_token_make_one_call(
    provider: RealIdp, echo: EchoServer,
) -> None:
    async with sidecar_for(provider, echo, introspecting()) as sidecar:
        token = await opaque_client_credentials_token(provider, sidecar.mcp_url)
        before = await calls_so_far(provider)
        async with introspection_trouble(provider, delay_ms=300):  # all eight arrive meanwhile
            replies = await asyncio.gather(*(post(sidecar, token) for _ in range(8)))
        for _ in range(4):
            assert_admitted(await call(sidecar, token), CLIENT)
        assert await calls_so_far(provider) - before == 1
        assert sidecar.app[INTROSPECTOR].counts.calls["active"] == 1
    assert [status for status, _, _ in replies] == [200] * 8


# -- RFC 9701 signed answers ----------------------------------------------------------------------


async def test_signed_answers_are_asked_for_verified_and_a_forged_one_is_refused(
    signing_provider: RealIdp, echo: EchoServer,
) -> None:
    async with relay_to(signing_provider) as relay, sidecar_for(
            signing_provider, echo, introspecting(INTROSPECTION_ENDPOINT=relay.url)) as sidecar:
        token = await opaque_client_credentials_token(signing_provider, sidecar.mcp_url)
        elsewhere = await opaque_client_credentials_token(signing_provider, OTHER_RESOURCE)
        forged_for = await opaque_client_credentials_token(signing_provider, sidecar.mcp_url)

        assert_admitted(await call(sidecar, token), CLIENT)
        assert_invalid_token(await call(sidecar, elsewhere), "wrong_audience")
        relay.tamper = True
        assert_unavailable(await call(sidecar, forged_for), "introspection_bad_signature")
        relay.tamper = False
        assert_admitted(await call(sidecar, forged_for), CLIENT)  # the forgery was not kept

    assert len(relay.seen) == 4
    for relayed in relay.seen:
        assert relayed.accept.startswith(INTROSPECTION_JWT), relayed
        assert relayed.content_type.startswith(INTROSPECTION_JWT), relayed


# -- the gate's policy and budgets judge introspected callers ------------------------------------


async def test_the_allow_list_and_the_subject_rate_limit_apply_to_introspected_callers(
    provider: RealIdp, echo: EchoServer,
) -> None:
    env = introspecting(ALLOW_SUBS=USER, RATE_LIMIT_RPM="2")
    async with sidecar_for(provider, echo, env) as sidecar:
        machine = await opaque_client_credentials_token(provider, sidecar.mcp_url)
        user = (await authorization_code_tokens(provider, sidecar.mcp_url)).access_token
        refused = await call(sidecar, machine)
        assert (refused.status, refused.auth_error, refused.sub) == (403, "not_allowed", CLIENT)
        assert_admitted(await call(sidecar, user), USER)
        assert_admitted(await call(sidecar, user), USER)
        limited = await call(sidecar, user)
    assert (limited.status, limited.sub) == (429, USER), limited
    assert limited.headers["Retry-After"].isdigit()


# -- the explainer (`check --token`) on the real provider's answers ------------------------------


async def test_the_explainer_names_the_claim_a_refresh_token_fails_and_the_signed_answer(
    provider: RealIdp, signing_provider: RealIdp, echo: EchoServer,
) -> None:
    async with sidecar_for(provider, echo, introspecting()) as sidecar:
        tokens = await authorization_code_tokens(provider, sidecar.mcp_url)
        assert tokens.refresh_token is not None
        introspector = sidecar.app[INTROSPECTOR]
        access = await introspector.explain(tokens.access_token)
        refresh = await introspector.explain(tokens.refresh_token)
    assert access.error is None, access.outcomes
    assert access.answer is not None
    assert (access.answer["sub"], access.signed) == (USER, False)
    assert access.endpoint == provider.issuer + "/token/introspection"
    assert refresh.error is not None
    assert refresh.error.reason == "claim_missing"
    assert refresh.outcomes["aud"] is refresh.error
    assert refresh.outcomes["active"] is None  # the provider did say active

    async with sidecar_for(signing_provider, echo, introspecting()) as sidecar:
        token = await opaque_client_credentials_token(signing_provider, sidecar.mcp_url)
        signed = await sidecar.app[INTROSPECTOR].explain(token)
    assert (signed.error, signed.signed) == (None, True), signed.outcomes
    assert signed.answer is not None
    assert signed.answer["aud"] == sidecar.mcp_url
