"""A real OpenID provider for tests: panva's oidc-provider (OpenID-certified) as a child process.

Not a test module. `run_oidc_provider()` starts `node tests/oidc/provider.mjs` on 127.0.0.1 with
a free port, waits (bounded) for its one JSON ready line, and always terminates and reaps it.
The child also exits by itself when its stdin closes, so it cannot outlive a parent that was
killed. Its stdout and stderr are drained continuously (a full pipe would block node) and kept
for error messages.

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
from typing import Any
from urllib.parse import quote_plus

import aiohttp
from processes import stop_process

OIDC_DIR = Path(__file__).with_name("oidc")
PROVIDER_SCRIPT = OIDC_DIR / "provider.mjs"
INSTALLED_MARKER = OIDC_DIR / "node_modules" / "oidc-provider" / "package.json"
INSTALL_HINT = "run `npm ci --prefix tests/oidc` (from the repository root) first"

STARTUP_TIMEOUT = 20.0  # node + oidc-provider start in well under 1 s; leave room for slow CI
SHUTDOWN_TIMEOUT = 10.0
HTTP_TIMEOUT = 10.0
LOG_LINES = 200

CLIENT_ID = "sidecar-test"
CLIENT_SECRET = "sidecar-secret"


class RealIdpError(RuntimeError):
    """The real provider could not be started or refused a request."""


@dataclass(frozen=True)
class RealIdp:
    """A running provider: its issuer, port, the confidential client and its output so far."""

    issuer: str
    port: int
    client_id: str
    client_secret: str
    log: deque[str] = field(repr=False, compare=False)

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
) -> AsyncIterator[RealIdp]:
    """Run oidc-provider on 127.0.0.1 (free port) with issuer http://127.0.0.1:<port><path>.

    `auto_login="user-1"` makes every authorization_code interaction log in as user-1 and
    consent at once (see provider.mjs); the follower of the redirects must keep cookies.
    `static_clients` pre-registers confidential clients (client_secret_basic), each given as
    "<id>:<secret>:<redirect_uri>[,<redirect_uri>...]" (provider.mjs --static-client), e.g. a
    facade sidecar's http://127.0.0.1:<port>/oauth/callback. `access_token_ttl` (seconds, > 0)
    replaces the provider's default lifetime of access tokens (300 s).
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
                      client_secret=client_secret, log=log)
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
        raise RealIdpError(f"{what}: HTTP {response.status}: {text[:500]}")
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


async def client_credentials_token(idp: RealIdp, resource: str, scope: str) -> str:
    """An access token for `resource` (RFC 8707) from the token endpoint, client_secret_basic."""
    token_endpoint = (await discover(idp))["token_endpoint"]
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    form = {"grant_type": "client_credentials", "resource": resource, "scope": scope}
    # client_secret_basic, RFC 6749 §2.3.1: each part form-urlencoded, then Basic.
    basic = f"{quote_plus(idp.client_id)}:{quote_plus(idp.client_secret)}"
    headers = {"Authorization": "Basic " + base64.b64encode(basic.encode()).decode("ascii")}
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, session.post(
        token_endpoint, data=form, headers=headers
    ) as response:
        body = await _json(response, "client_credentials token request")
    token = body.get("access_token")
    if not isinstance(token, str) or body.get("token_type", "").lower() != "bearer":
        raise RealIdpError(f"token response has no bearer access_token: {body}")
    return token
