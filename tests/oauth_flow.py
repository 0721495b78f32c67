"""End-to-end sign-in harness: the official MCP SDK's OAuth client, driven without a person.

Not a test module. The pieces, each usable on its own:

* `HeadlessBrowser`: plays the user agent of an authorization-code flow. It GETs the authorization
  URL with an aiohttp session (cookies kept for IP hosts), follows every redirect by hand across
  origins (the provider's `--auto-login` interaction, or a sidecar relaying /authorize to the IdP
  and back through its own callback), and stops at the first redirect to the client's loopback
  redirect_uri, which it never connects to: it parses `code`, `state` and `iss` (RFC 9207) from
  that URL's query instead.
* `SdkOAuthClient`: the SDK's `OAuthClientProvider` (an `httpx2.Auth`) with an in-memory
  `TokenStorage`, whose redirect_handler runs the browser and whose callback_handler hands the
  parsed redirect back to the SDK, plus an httpx2 response hook that records every HTTP exchange
  the SDK makes (MCP requests and the OAuth flow's own discovery, registration and token
  requests). `session()` connects with the SDK's `Client`, lists the tools and calls some.
* `run_sdk_oauth_session(mcp_url, ...)`: one client, one session; returns what was observed.
* `run_echo_server()` and `run_sidecar(env)`: the official-SDK echo server as a child process, and
  the production sidecar app on a loopback port chosen before `create_app` (its RESOURCE_URL must
  be byte-equal to the URL the SDK uses).

Nothing here assumes where the authorization server lives: the SDK finds it in the protected
resource metadata, so the same helpers serve "direct mode" (the IdP is the AS) and a sidecar that
serves the AS endpoints itself. Every wait is bounded; child processes are always reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
import httpx2
import jwt
from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthMetadata,
    OAuthToken,
    ProtectedResourceMetadata,
    TokenEndpointAuthMethod,
)
from mcp_types import CallToolResult, TextContent
from processes import free_port, stop_process
from pydantic import AnyUrl

from oauth_sidecar.app import IDP, create_app
from oauth_sidecar.config import Config, load

ECHO_SERVER = Path(__file__).with_name("mcp_echo_server.py")
ECHO_STARTUP_TIMEOUT = 20.0  # the SDK server needs ~0.8 s; leave room for a loaded CI machine
SIDECAR_READY_TIMEOUT = 10.0  # the sidecar fetches the IdP's discovery document and keys
SESSION_TIMEOUT = 30.0  # one whole sign-in plus MCP session
HTTP_TIMEOUT = 10.0  # each single HTTP request
MAX_BROWSER_HOPS = 20
REDIRECTS = (301, 302, 303, 307, 308)
MAX_RECORDED_BODY = 4096  # bytes of an error response's body kept per exchange

Mode = Literal["legacy", "auto"]
ToolCall = tuple[str, dict[str, Any]]
OnResponse = Callable[[httpx2.Response], Awaitable[None]]
E = TypeVar("E", bound=BaseException)


class AuthorizationDenied(RuntimeError):
    """The authorization server redirected back to the client with `error=...`."""

    def __init__(self, params: Mapping[str, str]) -> None:
        super().__init__(f"authorization response carries an error: {dict(params)}")
        self.params = dict(params)


class BrowserError(RuntimeError):
    """The user agent could not reach the client's redirect_uri."""


# --- the user agent -------------------------------------------------------------------------


@dataclass(frozen=True)
class Hop:
    """One request the browser made, and what came back."""

    method: str
    url: str
    status: int
    location: str | None


def _same_endpoint(url: str, redirect_uri: str) -> bool:
    """Whether `url` is the redirect_uri (scheme, authority and path), whatever its query."""
    a, b = urlsplit(url), urlsplit(redirect_uri)
    return (a.scheme.lower(), a.netloc.lower(), a.path or "/") == (
        b.scheme.lower(), b.netloc.lower(), b.path or "/"
    )


def _single_values(query: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, items in parse_qs(query, keep_blank_values=True).items():
        if len(items) != 1:  # RFC 6749 §3.1: parameters must not be repeated
            raise BrowserError(f"authorization response repeats {name!r}: {items}")
        values[name] = items[0]
    return values


@dataclass
class HeadlessBrowser:
    """Follows an authorization URL to the client's redirect_uri, as a browser with no user would.

    Only GET redirects are followed (302/303/307 of a GET stay GETs); a page that would need a
    person (the provider without --auto-login answers 501) ends the walk with `BrowserError`, unless
    a subclass's `answer_page` knows the page (the sidecar's consent page, say).
    """

    redirect_uri: str
    timeout: float = HTTP_TIMEOUT
    max_hops: int = MAX_BROWSER_HOPS
    hops: list[Hop] = field(default_factory=list)
    redirect_url: str | None = None
    """The final redirect to redirect_uri, as the authorization server (or a relay) sent it."""
    params: dict[str, str] = field(default_factory=dict)
    """Its query parameters: code, state, iss; or error, error_description."""

    async def authorize(self, authorization_url: str) -> AuthorizationCodeResult:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        jar = aiohttp.CookieJar(unsafe=True)  # the hosts are IP addresses
        async with aiohttp.ClientSession(
            cookie_jar=jar, timeout=timeout, trust_env=False
        ) as session:
            url = authorization_url
            for _ in range(self.max_hops):
                if _same_endpoint(url, self.redirect_uri):
                    return self._arrived(url)
                async with session.get(url, allow_redirects=False) as response:
                    status, location = response.status, response.headers.get("Location")
                    self.hops.append(Hop("GET", url, status, location))
                    page = None
                    if status not in REDIRECTS or not location:
                        page = await response.text(errors="replace")
                if page is None and location:
                    url = urljoin(url, location)  # the interaction redirect is relative
                else:
                    url = urljoin(url, await self.answer_page(session, url, status, page or ""))
        raise BrowserError(f"more than {self.max_hops} redirects: {[h.url for h in self.hops]}")

    async def answer_page(
        self, session: aiohttp.ClientSession, url: str, status: int, body: str
    ) -> str:
        """A page that is not a redirect: where a person would go from it (a subclass answers
        pages it knows, in the same session and so with its cookies, recording its own hops).
        This browser has no person: it stops."""
        raise BrowserError(
            f"GET {url} answered {status} without a redirect; "
            f"expected to end at {self.redirect_uri}: {body[:1000]}"
        )

    def _arrived(self, url: str) -> AuthorizationCodeResult:
        self.redirect_url = url
        parts = urlsplit(url)
        if parts.fragment:
            raise BrowserError(f"authorization response in the fragment, not the query: {url}")
        self.params = _single_values(parts.query)
        if "error" in self.params:
            raise AuthorizationDenied(self.params)
        if not self.params.get("code"):
            raise BrowserError(f"redirect to the client without a code: {url}")
        return AuthorizationCodeResult(
            code=self.params["code"], state=self.params.get("state"), iss=self.params.get("iss")
        )


# --- the SDK client ---------------------------------------------------------------------------


class MemoryTokenStorage:
    """The SDK's `TokenStorage`, in memory, keeping every value it was given."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None
        self.token_history: list[OAuthToken] = []

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens
        self.token_history.append(tokens)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


@dataclass(frozen=True)
class Exchange:
    """One HTTP exchange the SDK made, as its httpx2 client saw it."""

    method: str
    url: str
    status: int
    authorization: str | None
    """The scheme of the request's Authorization header ("Bearer", "Basic"), if it had one."""
    www_authenticate: str | None
    request_body: bytes
    """The request's body (form, JSON); empty for a streamed one."""
    response_body: bytes
    """The start of the response's body when the status is 400 or more, else empty."""

    @property
    def form(self) -> dict[str, str]:
        """The request's application/x-www-form-urlencoded parameters (token requests)."""
        return _single_values(self.request_body.decode("utf-8", "replace"))

    def json(self) -> Any:
        """The request's JSON body (registration, MCP messages)."""
        return json.loads(self.request_body)

    def error(self) -> Any:
        """The JSON error body of a refused request (None if not JSON)."""
        try:
            return json.loads(self.response_body)
        except ValueError:
            return None

    @property
    def origin(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def path(self) -> str:
        return urlsplit(self.url).path

    def short(self) -> tuple[str, str, int]:
        """(method, origin + path, status): what a test compares, without query strings."""
        return self.method, self.origin + self.path, self.status


@dataclass
class SdkOAuthResult:
    """What one SDK session observed, whether it succeeded or not."""

    exchanges: list[Exchange] = field(default_factory=list)
    tool_names: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    """The text of each tool call's result, in call order."""
    authorization_urls: list[str] = field(default_factory=list)
    callbacks: list[AuthorizationCodeResult] = field(default_factory=list)
    """What the redirect to the client carried (code, state, iss), per authorization."""
    hops: list[Hop] = field(default_factory=list)
    client_info: OAuthClientInformationFull | None = None
    tokens: OAuthToken | None = None
    protected_resource_metadata: ProtectedResourceMetadata | None = None
    """The RFC 9728 document the SDK used."""
    authorization_server_metadata: OAuthMetadata | None = None
    """The RFC 8414 / OIDC discovery document the SDK used (its AS is whatever the PRM named)."""
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def text(self) -> str:
        """The first tool call's text (by default the echo)."""
        assert self.results, f"no tool result; error: {self.error!r}"
        return self.results[0]

    @property
    def claims(self) -> dict[str, Any] | None:
        """The access token's JWT claims, decoded WITHOUT verification (None if opaque)."""
        if self.tokens is None:
            return None
        return decode_unverified(self.tokens.access_token)

    @property
    def iss(self) -> str | None:
        """The RFC 9207 `iss` of the last authorization response."""
        return self.callbacks[-1].iss if self.callbacks else None

    def summary(self) -> list[tuple[str, str, int]]:
        return [e.short() for e in self.exchanges]

    def authorization_params(self) -> dict[str, str]:
        """The query of the last authorization URL the SDK built (client_id, resource, ...)."""
        assert self.authorization_urls, "the SDK never sent the user to authorize"
        return _single_values(urlsplit(self.authorization_urls[-1]).query)

    def describe(self) -> str:
        lines = [f"{m} {u} -> {s}" for m, u, s in self.summary()]
        lines += [f"browser: {h.method} {h.url} -> {h.status} {h.location or ''}"
                  for h in self.hops]
        if self.error is not None:
            lines.append(f"error: {self.error!r}")
        return "\n".join(lines)


def find_exception(exc: BaseException | None, kind: type[E]) -> E | None:
    """The first `kind` in exc, its causes and contexts, and inside (nested) exception groups:
    the SDK's client surfaces a failure as task-group ExceptionGroups around the real one."""
    seen: list[BaseException] = []
    pending = [exc] if exc is not None else []
    while pending:
        current = pending.pop(0)
        if any(current is other for other in seen):
            continue
        seen.append(current)
        if isinstance(current, kind):
            return current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


def decode_unverified(token: str) -> dict[str, Any] | None:
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.DecodeError:
        return None
    return claims


def _text_of(result: CallToolResult) -> str:
    if result.is_error:
        raise AssertionError(f"tool call failed: {result.content!r}")
    texts = [block.text for block in result.content if isinstance(block, TextContent)]
    if len(texts) != 1:
        raise AssertionError(f"expected exactly one text block, got {result.content!r}")
    return texts[0]


class SdkOAuthClient:
    """One OAuth client identity (its storage, registration and tokens) across MCP sessions.

    `token_endpoint_auth_method=None` registers as the SDK does by default (the AS then picks,
    oidc-provider: client_secret_basic with a minted secret); "none" registers a public client
    like Claude Code. `client_info` pre-registers the client (no DCR), e.g. a static client.
    `client_metadata_url` is the SDK's Client ID Metadata Document URL: used as the client id
    instead of DCR when the authorization server's metadata says it supports CIMD. `browser` is
    the user agent each authorization runs in (a subclass may answer pages such as a consent).
    """

    browser: type[HeadlessBrowser] = HeadlessBrowser

    def __init__(
        self,
        mcp_url: str,
        *,
        redirect_uri: str | None = None,
        client_name: str = "oauth-sidecar e2e",
        token_endpoint_auth_method: TokenEndpointAuthMethod | None = None,
        scope: str | None = None,
        client_info: OAuthClientInformationFull | None = None,
        http_timeout: float = HTTP_TIMEOUT,
        client_metadata_url: str | None = None,
    ) -> None:
        self.mcp_url = mcp_url
        self.redirect_uri = redirect_uri or f"http://127.0.0.1:{free_port()}/callback"
        self.http_timeout = http_timeout
        self.storage = MemoryTokenStorage()
        if client_info is not None:
            self.storage.client_info = client_info
        self.metadata = OAuthClientMetadata(
            redirect_uris=[AnyUrl(self.redirect_uri)],
            client_name=client_name,
            token_endpoint_auth_method=token_endpoint_auth_method,
            scope=scope,
        )
        self._pending: AuthorizationCodeResult | None = None
        self._current: SdkOAuthResult | None = None
        self.provider = OAuthClientProvider(
            server_url=mcp_url,
            client_metadata=self.metadata,
            storage=self.storage,
            redirect_handler=self._redirect,
            callback_handler=self._callback,
            client_metadata_url=client_metadata_url,
        )

    async def _redirect(self, authorization_url: str) -> None:
        observed = self._current
        assert observed is not None, "an authorization outside of session()"
        observed.authorization_urls.append(authorization_url)
        browser = self.browser(self.redirect_uri, timeout=self.http_timeout)
        try:
            self._pending = await browser.authorize(authorization_url)
        finally:
            observed.hops.extend(browser.hops)

    async def _callback(self) -> AuthorizationCodeResult:
        result, self._pending = self._pending, None
        assert result is not None, "callback_handler called before redirect_handler"
        assert self._current is not None
        self._current.callbacks.append(result)
        return result

    async def session(
        self,
        calls: Sequence[ToolCall] = (("echo", {"text": "hello through the sidecar"}),),
        *,
        mode: Mode = "legacy",
        within: float = SESSION_TIMEOUT,
        allow_failure: bool = False,
    ) -> SdkOAuthResult:
        """Connect (signing in when challenged), list the tools, make the calls.

        A failure is raised (with everything observed in the message) unless `allow_failure`,
        in which case it is returned in `result.error`.
        """
        observed = SdkOAuthResult()
        self._current = observed

        async def record(response: httpx2.Response) -> None:
            request = response.request
            authorization = request.headers.get("authorization")
            try:
                body = request.content
            except httpx2.RequestNotRead:
                body = b""
            error_body = b""
            if response.status_code >= 400:
                # The body is cached, so the SDK reads it again afterwards; errors are small.
                error_body = (await response.aread())[:MAX_RECORDED_BODY]
            observed.exchanges.append(Exchange(
                request.method, str(request.url), response.status_code,
                authorization.split(" ", 1)[0] if authorization else None,
                response.headers.get("www-authenticate"), body, error_body,
            ))

        started = time.monotonic()
        try:
            async with asyncio.timeout(within):
                await self._run(observed, calls, mode, record)
        except Exception as exc:
            observed.error = exc
        finally:
            observed.seconds = time.monotonic() - started
            observed.client_info = self.storage.client_info
            observed.tokens = self.storage.tokens
            context = self.provider.context
            observed.protected_resource_metadata = context.protected_resource_metadata
            observed.authorization_server_metadata = context.oauth_metadata
            self._current = None
        if observed.error is not None and not allow_failure:
            raise AssertionError(f"SDK OAuth session failed:\n{observed.describe()}") from (
                observed.error
            )
        return observed

    async def _run(
        self, observed: SdkOAuthResult, calls: Sequence[ToolCall], mode: Mode,
        record: OnResponse,
    ) -> None:
        # trust_env=False: never route 127.0.0.1 test traffic via *_PROXY env vars.
        async with httpx2.AsyncClient(
            auth=self.provider,
            timeout=httpx2.Timeout(self.http_timeout),
            trust_env=False,
            event_hooks={"response": [record]},
        ) as http_client:
            transport = streamable_http_client(self.mcp_url, http_client=http_client)
            async with Client(
                transport, mode=mode, cache=None, read_timeout_seconds=self.http_timeout
            ) as client:
                tools = await client.list_tools()
                observed.tool_names = sorted(tool.name for tool in tools.tools)
                for name, arguments in calls:
                    observed.results.append(_text_of(await client.call_tool(name, arguments)))


async def run_sdk_oauth_session(
    mcp_url: str,
    calls: Sequence[ToolCall] = (("echo", {"text": "hello through the sidecar"}),),
    *,
    mode: Mode = "legacy",
    redirect_uri: str | None = None,
    token_endpoint_auth_method: TokenEndpointAuthMethod | None = None,
    scope: str | None = None,
    client_info: OAuthClientInformationFull | None = None,
    within: float = SESSION_TIMEOUT,
    allow_failure: bool = False,
) -> SdkOAuthResult:
    """A fresh SDK client signs in through whatever the MCP server's metadata names, then calls.

    Returns the tool results, the registered client, the token (claims decoded without
    verification), every HTTP exchange of the SDK, the browser's hops and the callback's `iss`.
    """
    client = SdkOAuthClient(
        mcp_url, redirect_uri=redirect_uri, token_endpoint_auth_method=token_endpoint_auth_method,
        scope=scope, client_info=client_info,
    )
    return await client.session(calls, mode=mode, within=within, allow_failure=allow_failure)


# --- the servers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EchoServer:
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def run_echo_server(log_dir: Path) -> AsyncIterator[EchoServer]:
    """tests/mcp_echo_server.py (official SDK, Streamable HTTP at /mcp) on a free loopback port."""
    port = free_port()
    log_path = log_dir / f"mcp_echo_server-{port}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(ECHO_SERVER), "--host", "127.0.0.1", "--port", str(port),
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
        )
    server = EchoServer(port, log_path)
    try:
        deadline = time.monotonic() + ECHO_STARTUP_TIMEOUT
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"echo server exited with {process.returncode}:\n{server.log()}")
            try:
                async with asyncio.timeout(1.0):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"echo server not listening on {port} after {ECHO_STARTUP_TIMEOUT} s:\n"
                        f"{server.log()}"
                    ) from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            break
        yield server
    finally:
        await stop_process(process)


@dataclass(frozen=True)
class Sidecar:
    port: int
    """The public port: the one RESOURCE_URL names."""
    config: Config
    app: web.Application
    listen_port: int = 0
    """The port this instance listens on: `port`, unless it sits behind a front (replicas)."""

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def listen_origin(self) -> str:
        """Where this very instance answers (differs from `origin` behind a front)."""
        return f"http://127.0.0.1:{self.listen_port or self.port}"

    @property
    def mcp_url(self) -> str:
        """RESOURCE_URL: byte-equal to the URL the SDK connects to."""
        return self.config.resource_url


def sidecar_env(
    port: int, issuer: str, upstream_url: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for a sidecar on http://127.0.0.1:<port>/mcp in front of `upstream_url`:
    OIDC_AUDIENCE = RESOURCE_URL, ALLOW_SUBS=user-1 (the provider's auto-login account), no
    per-subject rate limit; `extra` adds or overrides variables."""
    resource = f"http://127.0.0.1:{port}/mcp"
    env = {
        "OIDC_ISSUER_URL": issuer,
        "OIDC_AUDIENCE": resource,
        "RESOURCE_URL": resource,
        "MCP_UPSTREAM_URL": upstream_url,
        "ALLOW_SUBS": "user-1",
        "RATE_LIMIT_RPM": "0",
    }
    env.update(extra or {})
    return env


@contextlib.asynccontextmanager
async def run_sidecar(
    issuer: str, upstream_url: str, env: Mapping[str, str] | None = None, *,
    port: int | None = None,
    listen_port: int | None = None,
) -> AsyncIterator[Sidecar]:
    """The production app (create_app(load(env))) on 127.0.0.1:<port>, its IdP keys loaded.

    The port is chosen before create_app because RESOURCE_URL names it. `listen_port` makes the
    instance listen elsewhere while RESOURCE_URL still names `port`: one of several replicas
    behind a front that owns the public port.
    """
    port = port or free_port()
    listen_port = listen_port or port
    config = load(sidecar_env(port, issuer, upstream_url, env))
    app = create_app(config)
    server = TestServer(app, host="127.0.0.1", port=listen_port)
    # As __main__ serves it; the test server sets handler_cancellation=True itself.
    await server.start_server(max_field_size=config.max_header_bytes)
    try:
        deadline = time.monotonic() + SIDECAR_READY_TIMEOUT
        while not app[IDP].ready:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sidecar did not load the IdP's keys: {app[IDP].last_error}")
            await asyncio.sleep(0.02)
        yield Sidecar(port, config, app, listen_port)
    finally:
        await server.close()
