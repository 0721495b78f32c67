"""A real OpenID provider for tests: panva's oidc-provider (OpenID-certified) as a child process.

Not a test module. `run_oidc_provider()` starts `node tests/oidc/provider.mjs` on 127.0.0.1 with
a free port, waits (bounded) for its one JSON ready line, and always terminates and reaps it.
The child also exits by itself when its stdin closes, so it cannot outlive a parent that was
killed. Its stdout and stderr are drained continuously (a full pipe would block node) and kept
for error messages.

Also the provider's other endpoints as a client uses them: `discover`, `client_credentials_token`,
`introspect` / `introspect_jwt` (RFC 7662 / RFC 9701) and `revoke` (RFC 7009), each one bounded
HTTP request on loopback; and `introspection_control` to count the introspection requests the
provider received, or make its introspection endpoint slow or failing (provider.mjs
/_test/introspection).

Needs Node and `npm ci --prefix tests/oidc`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote_plus

import aiohttp
from processes import stop_process

OIDC_DIR = Path(__file__).with_name("oidc")
PROVIDER_SCRIPT = OIDC_DIR / "provider.mjs"
INSTALLED_MARKER = OIDC_DIR / "node_modules" / "oidc-provider" / "package.json"
INSTALL_HINT = "run `npm ci --prefix tests/oidc` (from the repository root) first"

STARTUP_TIMEOUT = 60.0  # node + oidc-provider start in under 1 s; 20 s once ran out under load
SHUTDOWN_TIMEOUT = 10.0
HTTP_TIMEOUT = 10.0
LOG_LINES = 200

CLIENT_ID = "sidecar-test"
CLIENT_SECRET = "sidecar-secret"

INTROSPECTION_JWT = "application/token-introspection+jwt"  # RFC 9701 §4, the signed answer

AccessTokenFormat = Literal["jwt", "opaque"]
ClientAuthMethod = Literal["client_secret_basic", "client_secret_post"]


class RealIdpError(RuntimeError):
    """The real provider could not be started or refused a request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ConfidentialClient:
    """A client's credentials and how it presents them (RFC 6749 §2.3.1): the provider's main
    client, or an introspection client (a resource server's own credentials)."""

    client_id: str
    client_secret: str = field(repr=False)
    auth_method: ClientAuthMethod = "client_secret_basic"

    @property
    def spec(self) -> str:
        """As provider.mjs --introspection-client takes it."""
        return f"{self.client_id}:{self.client_secret}:{self.auth_method}"


@dataclass(frozen=True)
class RealIdp:
    """A running provider: its issuer, port, the confidential client and its output so far."""

    issuer: str
    port: int
    client_id: str
    client_secret: str
    log: deque[str] = field(repr=False, compare=False)
    access_token_format: AccessTokenFormat = "jwt"
    introspection_clients: tuple[ConfidentialClient, ...] = ()
    jwt_introspection: bool = False

    @property
    def client(self) -> ConfidentialClient:
        """The confidential client (client_secret_basic) that gets client_credentials tokens."""
        return ConfidentialClient(self.client_id, self.client_secret)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.log)[-lines:])


async def _drain(stream: asyncio.StreamReader | None, sink: deque[str], prefix: str) -> None:
    if stream is None:
        return
    while line := await stream.readline():
        sink.append(prefix + line.decode("utf-8", "replace").rstrip())


async def _read_ready_line(
    process: asyncio.subprocess.Process, log: deque[str]
) -> dict[str, Any]:
    """The first stdout line that is a JSON object with an issuer; anything else is logged."""
    assert process.stdout is not None
    while True:
        line = await process.stdout.readline()
        if not line:
            await process.wait()
            raise RealIdpError(f"oidc provider exited with {process.returncode} before it was "
                               "ready:\n" + "\n".join(log))
        text = line.decode("utf-8", "replace").strip()
        try:
            ready = json.loads(text)
        except ValueError:
            ready = None
        if isinstance(ready, dict) and isinstance(ready.get("issuer"), str):
            return ready
        log.append("stdout: " + text)


@contextlib.asynccontextmanager
async def run_oidc_provider(
    issuer_path: str = "",
    *,
    client_id: str = CLIENT_ID,
    client_secret: str = CLIENT_SECRET,
    scopes: str = "mcp:read mcp:write",
    auto_login: str | None = None,
    static_clients: Sequence[str] = (),
    access_token_ttl: int | None = None,
    access_token_format: AccessTokenFormat = "jwt",  # noqa: S107 (a format, not a secret)
    introspection_clients: Sequence[ConfidentialClient] = (),
    jwt_introspection: bool = False,
    client_credentials_sub: Literal["client_id", "none"] = "client_id",
    jwt_resources: Sequence[str] = (),
) -> AsyncIterator[RealIdp]:
    """Run oidc-provider on 127.0.0.1 (free port) with issuer http://127.0.0.1:<port><path>.

    `auto_login="user-1"` makes every authorization_code interaction log in as user-1 and
    consent at once (see provider.mjs); the follower of the redirects must keep cookies.
    `static_clients` pre-registers confidential clients (client_secret_basic), each given as
    "<id>:<secret>:<redirect_uri>[,<redirect_uri>...]" (provider.mjs --static-client), e.g. a
    facade sidecar's http://127.0.0.1:<port>/oauth/callback. `access_token_ttl` (seconds, > 0)
    replaces the provider's default lifetime of access tokens (300 s), opaque ones included.

    `access_token_format="opaque"` makes every access token for a resource an opaque reference
    token that only introspection explains. `introspection_clients` registers resource servers'
    credentials, each allowed to introspect (and revoke) every token; `jwt_introspection` turns on
    RFC 9701 signed answers for them. `client_credentials_sub="none"` keeps oidc-provider's
    introspection answer of an opaque client_credentials token without `sub` (by default sub is
    the client id, as in the JWT format). `jwt_resources` are resources whose access tokens are
    JWTs whatever the format (one provider issuing both kinds). See provider.mjs for the exact
    answers.
    """
    node = shutil.which("node")
    if node is None:
        raise RealIdpError("`node` is not on PATH: the real-IdP tests need Node.js")
    if not INSTALLED_MARKER.is_file():
        raise RealIdpError(f"oidc-provider is not installed in {OIDC_DIR}: {INSTALL_HINT}")
    args = [
        node, str(PROVIDER_SCRIPT), "--port", "0", "--issuer-path", issuer_path,
        "--client-id", client_id, "--client-secret", client_secret, "--scopes", scopes,
        "--exit-on-stdin-close",
    ]
    if auto_login:
        args += ["--auto-login", auto_login]
    for spec in static_clients:
        args += ["--static-client", spec]
    if access_token_ttl is not None:
        args += ["--access-token-ttl", str(access_token_ttl)]
    if access_token_format != "jwt":
        args += ["--access-token-format", access_token_format]
    for client in introspection_clients:
        args += ["--introspection-client", client.spec]
    if jwt_introspection:
        args.append("--jwt-introspection")
    args += [arg for resource in jwt_resources for arg in ("--jwt-resource", resource)]
    if client_credentials_sub != "client_id":
        args += ["--client-credentials-sub", client_credentials_sub]
    process = await asyncio.create_subprocess_exec(
        *args, cwd=OIDC_DIR, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    log: deque[str] = deque(maxlen=LOG_LINES)
    drains = [asyncio.create_task(_drain(process.stderr, log, ""), name="oidc-stderr")]
    try:
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                ready = await _read_ready_line(process, log)
        except TimeoutError:
            raise RealIdpError(f"oidc provider not ready after {STARTUP_TIMEOUT} s:\n"
                               + "\n".join(log)) from None
        drains.append(asyncio.create_task(_drain(process.stdout, log, "stdout: "),
                                          name="oidc-stdout"))
        yield RealIdp(issuer=ready["issuer"], port=int(ready["port"]), client_id=client_id,
                      client_secret=client_secret, log=log,
                      access_token_format=access_token_format,
                      introspection_clients=tuple(introspection_clients),
                      jwt_introspection=jwt_introspection)
    finally:
        await stop_process(process)
        # The pipes reach EOF once the child is gone; bounded anyway, then never left pending.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_TIMEOUT):
                await asyncio.gather(*drains, return_exceptions=True)
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)


async def _json(response: aiohttp.ClientResponse, what: str) -> dict[str, Any]:
    text = await response.text()
    if response.status != 200:
        raise RealIdpError(f"{what}: HTTP {response.status}: {text[:500]}", response.status)
    document = json.loads(text)
    if not isinstance(document, dict):
        raise RealIdpError(f"{what}: not a JSON object: {text[:500]}")
    return document


async def discover(idp: RealIdp) -> dict[str, Any]:
    """The provider's OpenID discovery document (OIDC Discovery §4)."""
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, session.get(
        idp.issuer + "/.well-known/openid-configuration"
    ) as response:
        return await _json(response, "discovery")


def client_authentication(
    client: ConfidentialClient, form: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """The headers and the form of a request authenticated as `client` (RFC 6749 §2.3.1)."""
    if client.auth_method == "client_secret_post":
        return {}, {**form, "client_id": client.client_id, "client_secret": client.client_secret}
    # client_secret_basic: each part form-urlencoded, then Basic.
    basic = f"{quote_plus(client.client_id)}:{quote_plus(client.client_secret)}"
    return {"Authorization": "Basic " + base64.b64encode(basic.encode()).decode("ascii")}, form


@dataclass(frozen=True)
class EndpointAnswer:
    """One answer of an endpoint, as it came: status, content type (no parameters) and body."""

    status: int
    content_type: str
    text: str


async def post_form(
    url: str, form: dict[str, str], client: ConfidentialClient,
    headers: dict[str, str] | None = None,
) -> EndpointAnswer:
    """POST `form` to `url` authenticated as `client`; one bounded request, any status."""
    auth_headers, body = client_authentication(client, form)
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, session.post(
        url, data=body, headers={**auth_headers, **(headers or {})}
    ) as response:
        return EndpointAnswer(response.status, response.content_type, await response.text())


async def token_request(idp: RealIdp, form: dict[str, str], what: str) -> dict[str, Any]:
    """A token endpoint request as the main client (client_secret_basic): its JSON answer."""
    token_endpoint = (await discover(idp))["token_endpoint"]
    answer = await post_form(token_endpoint, form, idp.client)
    if answer.status != 200:
        raise RealIdpError(f"{what}: HTTP {answer.status}: {answer.text[:500]}", answer.status)
    body = json.loads(answer.text)
    if not isinstance(body, dict):
        raise RealIdpError(f"{what}: not a JSON object: {answer.text[:500]}")
    token = body.get("access_token")
    if not isinstance(token, str) or str(body.get("token_type", "")).lower() != "bearer":
        raise RealIdpError(f"{what}: no bearer access_token: {sorted(body)}")
    return body


async def client_credentials_token(idp: RealIdp, resource: str, scope: str) -> str:
    """An access token for `resource` (RFC 8707) from the token endpoint, client_secret_basic."""
    form = {"grant_type": "client_credentials", "resource": resource, "scope": scope}
    body = await token_request(idp, form, "client_credentials token request")
    token: str = body["access_token"]
    return token


async def introspection_answer(
    idp: RealIdp, token: str, client: ConfidentialClient, *,
    token_type_hint: str | None = None, accept: str = "application/json",
) -> EndpointAnswer:
    """What the introspection endpoint (RFC 7662 §2.1) answers `client`, whatever the status."""
    endpoint = (await discover(idp))["introspection_endpoint"]
    form = {"token": token}
    if token_type_hint is not None:
        form["token_type_hint"] = token_type_hint
    return await post_form(endpoint, form, client, {"Accept": accept})


async def introspect(
    idp: RealIdp, token: str, client: ConfidentialClient, *, token_type_hint: str | None = None
) -> dict[str, Any]:
    """The provider's RFC 7662 answer about `token`, asked as `client` (HTTP 200 or RealIdpError
    with the status, e.g. 401 for bad client credentials)."""
    answer = await introspection_answer(idp, token, client, token_type_hint=token_type_hint)
    if answer.status != 200 or answer.content_type != "application/json":
        raise RealIdpError(f"introspection: HTTP {answer.status} {answer.content_type}: "
                           f"{answer.text[:500]}", answer.status)
    document = json.loads(answer.text)
    if not isinstance(document, dict):
        raise RealIdpError(f"introspection: not a JSON object: {answer.text[:500]}")
    return document


async def introspect_jwt(idp: RealIdp, token: str, client: ConfidentialClient) -> str:
    """The provider's signed RFC 9701 answer about `token` (a compact JWS, not verified here)."""
    answer = await introspection_answer(idp, token, client, accept=INTROSPECTION_JWT)
    if answer.status != 200 or answer.content_type != INTROSPECTION_JWT:
        raise RealIdpError(f"signed introspection: HTTP {answer.status} {answer.content_type}: "
                           f"{answer.text[:500]}", answer.status)
    return answer.text


async def revoke(
    idp: RealIdp, token: str, client: ConfidentialClient, *, token_type_hint: str | None = None
) -> None:
    """Revoke `token` (RFC 7009 §2.1) as `client`: the token's own client or an introspection
    client. The provider answers 200 even for an unknown token (§2.2); anything else raises."""
    endpoint = (await discover(idp))["revocation_endpoint"]
    form = {"token": token}
    if token_type_hint is not None:
        form["token_type_hint"] = token_type_hint
    answer = await post_form(endpoint, form, client)
    if answer.status != 200:
        raise RealIdpError(f"revocation: HTTP {answer.status}: {answer.text[:500]}",
                           answer.status)


@dataclass(frozen=True)
class IntrospectionControl:
    """provider.mjs's /_test/introspection state: requests received so far (whatever their
    answer), and how the endpoint behaves now."""

    requests: int
    revocations: int
    delay_ms: int
    fail_status: int


async def introspection_control(
    idp: RealIdp, *, delay_ms: int | None = None, fail_status: int | None = None
) -> IntrospectionControl:
    """Read, or with `delay_ms` / `fail_status` (0 = off) change, how the provider's
    introspection endpoint behaves: held `delay_ms` before it is handled (a slow IdP), or
    answered `fail_status` at once (a broken one). Returns the state after the change."""
    url = f"http://127.0.0.1:{idp.port}/_test/introspection"
    query = {name: str(value) for name, value in
             (("delay_ms", delay_ms), ("fail_status", fail_status)) if value is not None}
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        request = session.post(url, params=query) if query else session.get(url)
        async with request as response:
            state = await _json(response, "introspection control")
    return IntrospectionControl(
        requests=int(state["requests"]), revocations=int(state["revocations"]),
        delay_ms=int(state["delay_ms"]), fail_status=int(state["fail_status"]),
    )
