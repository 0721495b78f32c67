"""Live probes beyond the IdP's documents: the relay's sign-in request at the IdP's authorization
endpoint (facade mode), and the upstream, reached at the URL the proxy maps RESOURCE_URL to, or
spawned and stopped as the sidecar would spawn it.

Why real requests: a redirect URI the IdP does not know, or an upstream that wants credentials,
shows up only when asked; each probe reads the status line and at most a bounded part of the
body, and a spawned child must leave no process behind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp

from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.auth.resource_metadata import public_origin
from oauth_sidecar.auth.sessions import SessionBindings
from oauth_sidecar.client_ip import ClientAddress
from oauth_sidecar.config import Config, SpawnConfig
from oauth_sidecar.config_summary import shown_command
from oauth_sidecar.doctor.mcp_lists import McpExchange, Unlisted, UpstreamLists
from oauth_sidecar.doctor.report import ERROR, NOTE, WARNING, Checker, Report
from oauth_sidecar.doctor.stdio_probe import probe_stdio
from oauth_sidecar.request_keys import Principal
from oauth_sidecar.response_body import ResponseTooLarge, read_capped
from oauth_sidecar.signin.authserver import CALLBACK_PATH, with_query
from oauth_sidecar.signin.idp_request import toward_idp
from oauth_sidecar.upstream.child import ChildProcess, ChildStartError
from oauth_sidecar.upstream.credential import UpstreamCredential
from oauth_sidecar.upstream.proxy import UpstreamProxy

PROBE_SECONDS = 10.0  # an upstream or authorization-endpoint probe: the answer's status line only
PROBE_BODY_BYTES = 64 * 1024  # enough of an IdP's error page to find its error code
CHILD_SLACK = 5.0  # seconds beyond MCP_SPAWN_READY_TIMEOUT_SECONDS before we stop waiting
LIST_SECONDS = 30.0  # the whole MCP exchange that reads the upstream's lists (check --token)


async def until(predicate: Callable[[], bool], within: float) -> bool:
    """Poll until the predicate holds, at most `within` seconds; whether it did."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def read_head(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most `limit` bytes of the body: a probe only looks for an error in what comes first."""
    try:
        return await read_capped(response, limit)
    except ResponseTooLarge as too_large:
        return too_large.head


def _error_in(body: bytes) -> tuple[str, str] | None:
    """An OAuth error object (RFC 6749 §4.1.2.1 fields) in a JSON answer."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return document["error"], str(document.get("error_description", ""))
    return None


def _mentions_redirect_error(body: bytes) -> bool:
    """Error pages served with 200 (Entra's AADSTS50011 is one)."""
    text = body.decode("utf-8", "replace").lower()
    return "aadsts50011" in text or bool(
        re.search(r"invalid[_ ]redirect[_ ]uri|redirect_uri[^<]{0,40}(mismatch|not match|invalid)",
                  text))


class Probes(Checker):
    """The relay's sign-in request and the upstream, written into the report."""

    def __init__(self, config: Config, report: Report,
                 session: aiohttp.ClientSession | None = None) -> None:
        super().__init__(config, report, session)
        self.lists: UpstreamLists | None = None
        """The upstream's MCP lists as the token's caller would get them (check --token)."""
        self.lists_source = ""
        self.unlisted = "the upstream was not reached"
        """Why `lists` is None."""
        self._credential: UpstreamCredential | None = None
        self._own_headers: dict[str, str] | None = None

    async def probe_relay(self, metadata: Mapping[str, Any]) -> None:
        """Ask the IdP's authorization endpoint what it says to the relay's sign-in request:
        STATIC_CLIENT_ID with redirect_uri=<public origin>/oauth/callback, PKCE S256, the
        advertised scopes and resource, as /authorize sends them (IDP_RESOURCE_PARAMETER,
        IDP_SCOPE_PREFIX applied). No redirect is followed."""
        config, session, section = self.config, self.session, "identity provider"
        endpoint = metadata.get("authorization_endpoint")
        if not isinstance(endpoint, str) or session is None:
            return
        callback = public_origin(config) + CALLBACK_PATH
        verifier = secrets.token_urlsafe(32)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        params = {
            "response_type": "code", "client_id": config.auth_server.client_id,
            "redirect_uri": callback, "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256", "state": secrets.token_urlsafe(16),
            "resource": config.resource_url,
        }
        if config.advertised_scopes:
            params["scope"] = " ".join(config.advertised_scopes)
        params = toward_idp(params, config.auth_server)  # resource and scopes, as /authorize
        asked = f"client_id={config.auth_server.client_id}, redirect_uri={callback}"
        try:
            async with session.get(with_query(endpoint, params), allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=PROBE_SECONDS)) as response:
                status, location = response.status, response.headers.get("Location", "")
                body = await read_head(response, PROBE_BODY_BYTES)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.add(WARNING, "relay_probe_failed",
                     f"could not ask the IdP's authorization endpoint {endpoint}: "
                     f"{type(exc).__name__}: {exc}", "check that this host reaches the IdP")
            return
        self.line(section, f"relay sign-in probe ({asked}): HTTP {status}"
                           + (f" -> {location.partition('?')[0]}" if location else ""))
        error = _error_in(body)
        fix = (f"register {callback} as a redirect URI of client {config.auth_server.client_id} "
               "at the IdP")
        if 300 <= status < 400 and location.startswith(callback):
            answer = dict(parse_qsl(urlsplit(location).query))
            self.add(ERROR, "relay_refused",
                     f"the IdP accepted the relay's callback but refused the sign-in request "
                     f"({asked}): {answer.get('error')}: {answer.get('error_description', '')}",
                     "allow this client the authorization_code grant and the advertised scopes "
                     "and resource at the IdP")
        elif 300 <= status < 400:
            self.add(NOTE, "relay_ok",
                     f"the IdP accepts the relay's sign-in request ({asked}): it answered "
                     f"{status} towards its sign-in page")
        elif status >= 400 or _mentions_redirect_error(body):
            detail = f"{error[0]}: {error[1]}" if error else f"HTTP {status}"
            self.add(ERROR, "relay_refused",
                     f"the IdP refuses the relay's sign-in request ({asked}): {detail}; every "
                     "sign-in would stop at the IdP's error page", fix)
        else:
            self.add(NOTE, "relay_unconfirmed",
                     f"the IdP answered the relay's sign-in request ({asked}) with HTTP {status} "
                     "and a page, most likely its sign-in form; the callback could not be "
                     "confirmed", f"if sign-in fails at the IdP: {fix}")

    # -- upstream -------------------------------------------------------------------------------

    async def upstream(self, caller: Principal | None = None) -> None:
        """Probe the upstream; with a caller, also read its MCP lists (into self.lists, or why
        not into self.unlisted) while it runs, as that caller's requests would reach it."""
        config = self.config
        credential = None
        if config.upstream_bearer_file:
            with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
                credential = UpstreamCredential(config.upstream_bearer_file)
        self._credential = credential
        proxy = UpstreamProxy(config, policy=AccessPolicy.serving(config),
                              addresses=ClientAddress(config.trusted_proxies),
                              sessions=SessionBindings(config.session_ttl), credential=credential)
        self._own_headers = proxy.headers.own(caller) if caller is not None else None
        url = str(proxy.upstream_url(config.resource_path or "/", ""))  # the proxy's mapping
        spawn = config.spawn
        if spawn is None:
            await self._probe_upstream(url)
            return
        if spawn.stdio:  # started per session: one is started here, asked and stopped
            await self._probe_stdio(spawn)
            return
        child, pid = ChildProcess(spawn), None
        self.line("upstream", f"spawning {shown_command(spawn.argv)} (port {spawn.port}, ready "
                              f"within {spawn.ready_timeout:g} s)")
        try:
            async with child.running():
                await until(lambda: child.ready or child.last_exit is not None,
                             spawn.ready_timeout + CHILD_SLACK)
                pid = self.report.child_pid = child.pid
                if child.ready:
                    self.line("upstream", f"child ready: pid {pid}, port {spawn.port} accepts "
                                          "connections")
                    await self._probe_upstream(url)
                else:
                    self.unlisted = "the spawned MCP child did not become ready"
                    self.add(ERROR, "child_not_ready",
                             f"the MCP child did not become ready: {child.last_exit or 'timeout'}",
                             "run MCP_SPAWN_CMD by hand (check -v shows its output); check "
                             "MCP_SPAWN_PORT is the port it listens on, and "
                             "MCP_SPAWN_READY_TIMEOUT_SECONDS")
        except ChildStartError as exc:
            self.add(ERROR, "child_start_failed", f"the MCP child cannot start: {exc.reason}",
                     "free MCP_SPAWN_PORT or choose another")
            return
        if pid is not None:
            alive = _group_alive(pid)
            self.line("upstream", f"child stopped: pid {pid} "
                                  f"{'STILL RUNNING' if alive else 'and its group are gone'}")
            if alive:
                self.add(ERROR, "child_left_running",
                         f"the child's process group {pid} outlived its stop")

    async def _probe_stdio(self, spawn: SpawnConfig) -> None:
        self.line("upstream", f"starting {shown_command(spawn.argv)} once over stdio (children "
                              f"start per MCP session, scope {spawn.scope})")
        probe = await probe_stdio(spawn)
        self.unlisted = "the stdio MCP server did not list its tools"
        if probe.server:
            self.line("upstream", f"initialize: {probe.server}")
        if probe.failure:
            self.add(ERROR, "stdio_child_failed",
                     f"the stdio MCP server did not complete initialize and tools/list: "
                     f"{probe.failure}",
                     "run MCP_SPAWN_CMD by hand with `check -v`; a server that needs a port "
                     "is an HTTP one (set MCP_SPAWN_PORT)")
        else:
            shown = ", ".join(probe.tools[:20]) + (" ..." if len(probe.tools) > 20 else "")
            self.line("upstream", f"tools/list: {len(probe.tools)} tool(s): {shown}")
            # every caller's child runs this command: its list is what a caller's would show
            # (unless the server lists by the MCP_USER_* identity it is given)
            self.lists = UpstreamLists(probe.server, {"tools": list(probe.tools)})
            self.lists_source = "the stdio command's own tools/list (started once, no caller)"
        if probe.dropped_lines:
            self.add(WARNING, "stdio_stdout_noise",
                     f"the stdio server wrote {probe.dropped_lines} line(s) on stdout that are "
                     "not JSON-RPC: the bridge drops them, but a server that logs to stdout "
                     "may also break its own messages",
                     "make the server log to stderr")
        if probe.pid is not None:
            alive = _group_alive(probe.pid)
            self.line("upstream", f"child stopped: pid {probe.pid} "
                                  f"{'STILL RUNNING' if alive else 'and its group are gone'}")
            if alive:
                self.add(ERROR, "child_left_running",
                         f"the child's process group {probe.pid} outlived its stop")

    async def _probe_upstream(self, url: str) -> None:
        config, session = self.config, self.session
        if session is None:
            return
        headers = {"Accept": "application/json, text/event-stream"}
        credential = self._credential.authorization if self._credential is not None else None
        if credential:
            headers["Authorization"] = credential
        timeout = aiohttp.ClientTimeout(total=config.upstream.connect_timeout + PROBE_SECONDS,
                                        sock_connect=config.upstream.connect_timeout)
        try:
            async with session.get(url, headers=headers, allow_redirects=False,
                                   timeout=timeout) as response:
                status = response.status  # only the status line: an SSE body never ends
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.line("upstream", f"GET {url}: unreachable ({type(exc).__name__})")
            self.unlisted = f"the upstream is unreachable ({type(exc).__name__})"
            self.add(ERROR, "upstream_unreachable",
                     f"GET {url} failed: {type(exc).__name__}: {exc}".rstrip(": "),
                     "check MCP_UPSTREAM_URL (or the spawned child); while the upstream is "
                     "unreachable every authenticated request gets 502 and /readyz 503")
            return
        self.line("upstream", f"GET {url} -> HTTP {status}: reachable")
        if self._own_headers is not None:
            await self._read_lists(url, self._own_headers, timeout)
        if status in (401, 403):
            self.add(WARNING, "upstream_refuses",
                     f"the upstream answered {status} to the sidecar's own request: it wants "
                     "credentials the sidecar does not send",
                     "give it a token in MCP_UPSTREAM_BEARER_FILE, or let it trust the sidecar")
        elif status == 404:
            self.add(WARNING, "upstream_not_found",
                     f"the upstream answered 404 at {url}",
                     "check MCP_UPSTREAM_PATH (the upstream path RESOURCE_URL's path maps to)")
        elif status == 421:
            self.add(WARNING, "upstream_host",
                     "the upstream answered 421 (misdirected): it checks Host",
                     "allow the Host of MCP_UPSTREAM_URL in the MCP server's settings")
        elif status >= 500:
            self.add(WARNING, "upstream_error", f"the upstream answered {status} at {url}")


    async def _read_lists(self, url: str, headers: dict[str, str],
                          each: aiohttp.ClientTimeout) -> None:
        """The upstream's MCP lists, as the given caller's requests reach it (mcp_lists.py)."""
        if self.session is None:
            return
        exchange = McpExchange(self.session, url, headers, each)
        try:
            async with asyncio.timeout(LIST_SECONDS):
                lists = await exchange.lists()
        except Unlisted as exc:
            self.unlisted = str(exc)
        except TimeoutError:
            self.unlisted = f"the MCP exchange took longer than {LIST_SECONDS:g} s"
        else:
            self.lists = lists
            self.lists_source = (f"the upstream's lists at {url}"
                                 + (f" (server {lists.server})" if lists.server else ""))
            counts = ", ".join(f"{len(names)} {kind}" for kind, names in lists.names.items())
            self.line("upstream", f"MCP lists as the token's caller: {counts}")
            return
        self.line("upstream", f"MCP lists as the token's caller: unavailable: {self.unlisted}")
