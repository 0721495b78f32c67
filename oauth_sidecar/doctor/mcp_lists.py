"""The upstream's own lists of tools, prompts and resources, asked as an MCP client's requests
reach it through the sidecar, for `check --token` to judge name by name.

Why a real exchange: which names exist is the upstream's to say, and some servers list per
session or per forwarded identity. The exchange is the smallest a client makes (initialize with
protocol 2025-11-25, notifications/initialized, then each list request with its cursors, the
Mcp-Session-Id and MCP-Protocol-Version it was given) with the headers the proxy itself adds (the
upstream credential, X-Forwarded-Proto/Host, the forwarded identity), never the caller's token.
Every answer, JSON or an event stream, is read under the proxy's own cap and a timeout, and the
session is ended with DELETE as MCP asks of a client that is done.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from oauth_sidecar import __version__
from oauth_sidecar.mcp.calls import MAX_ANSWER_BYTES
from oauth_sidecar.mcp.list_filter import EventRewriter
from oauth_sidecar.mcp.messages import LIST_METHODS
from oauth_sidecar.response_body import ResponseTooLarge, read_capped

PROTOCOL_VERSION = "2025-11-25"
MAX_PAGES = 10  # cursor pages per list: more than real servers use, bounded for a looping one
# Which list requests a declared capability makes worth asking (tools/list is always asked).
ASKED = {"tools": ("tools/list",), "prompts": ("prompts/list",),
         "resources": ("resources/list", "resources/templates/list")}


class Unlisted(Exception):
    """Why the upstream's lists could not be read."""


@dataclass(slots=True)
class UpstreamLists:
    server: str
    """The upstream's serverInfo name and version, as it says them."""
    names: dict[str, list[str]] = field(default_factory=dict)
    """kind (tools, prompts, resources) -> names (URIs, URI templates), in the upstream's order."""
    notes: list[str] = field(default_factory=list)


class McpExchange:
    """One MCP session with the upstream: initialize, the lists, DELETE."""

    def __init__(self, session: aiohttp.ClientSession, url: str, headers: Mapping[str, str],
                 timeout: aiohttp.ClientTimeout) -> None:
        self._session = session
        self._url = url
        self._headers = {**headers, "accept": "application/json, text/event-stream",
                         "content-type": "application/json"}
        self._timeout = timeout
        self._next_id = 0

    async def lists(self) -> UpstreamLists:
        """Every list the upstream declares; Unlisted when initialize or tools/list fails."""
        try:
            return await self._lists()
        finally:
            await self._end_session()

    async def _lists(self) -> UpstreamLists:
        started = await self.call("initialize", {
            "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
            "clientInfo": {"name": "oauth-sidecar-check", "version": __version__}})
        if not isinstance(started, dict):
            raise Unlisted("initialize answered a result that is not an object")
        version = started.get("protocolVersion")
        if isinstance(version, str) and version.isprintable():
            self._headers["mcp-protocol-version"] = version
        info = started.get("serverInfo")
        info = info if isinstance(info, dict) else {}
        lists = UpstreamLists(" ".join(str(info[k]) for k in ("name", "version") if k in info))
        await self.notify("notifications/initialized")
        declared = started.get("capabilities")
        declared = declared if isinstance(declared, dict) else {}
        for kind, methods in ASKED.items():
            if kind != "tools" and kind not in declared:
                continue
            for method in methods:
                try:
                    lists.names.setdefault(kind, []).extend(await self._pages(method, lists))
                except Unlisted as exc:
                    if kind == "tools":
                        raise
                    lists.notes.append(str(exc))
        return lists

    async def _pages(self, method: str, lists: UpstreamLists) -> list[str]:
        """Every name of one list, page by page (at most MAX_PAGES)."""
        _kind, list_field, key = LIST_METHODS[method]
        names: dict[str, None] = {}
        unnamed, cursor, seen = 0, None, set()
        for _page in range(MAX_PAGES):
            result = await self.call(method, {} if cursor is None else {"cursor": cursor})
            items = result.get(list_field) if isinstance(result, dict) else None
            if not isinstance(items, list):
                raise Unlisted(f"{method} answered without a {list_field} list")
            for item in items:
                name = item.get(key) if isinstance(item, dict) else None
                if isinstance(name, str):
                    names[name] = None
                else:
                    unnamed += 1
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor or cursor in seen:
                break
            seen.add(cursor)
        else:
            lists.notes.append(f"{method} has more than {MAX_PAGES} pages: only the first "
                               f"{MAX_PAGES} are judged here")
        if unnamed:
            lists.notes.append(f"{method}: {unnamed} item(s) without a string {key}, which the "
                               "sidecar hides from every caller")
        return list(names)

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """The result of one request; Unlisted for an error, an HTTP failure or no answer."""
        self._next_id += 1
        ident = self._next_id
        body = {"jsonrpc": "2.0", "id": ident, "method": method, "params": params}
        try:
            async with self._session.post(
                    self._url, data=json.dumps(body).encode(), headers=self._headers,
                    allow_redirects=False, timeout=self._timeout,
                    skip_auto_headers=("Accept-Encoding", "User-Agent")) as response:
                if method == "initialize" and "Mcp-Session-Id" in response.headers:
                    self._headers["mcp-session-id"] = response.headers["Mcp-Session-Id"]
                answer = await self._answer(method, ident, response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unlisted(f"{method} failed: {type(exc).__name__}: {exc}".rstrip(": ")) from None
        error = answer.get("error")
        if error is not None:
            code = error.get("code") if isinstance(error, dict) else None
            text = error.get("message") if isinstance(error, dict) else error
            raise Unlisted(f"{method} answered JSON-RPC error {code}: {text}")
        return answer.get("result")

    async def notify(self, method: str) -> None:
        body = {"jsonrpc": "2.0", "method": method}
        try:
            async with self._session.post(
                    self._url, data=json.dumps(body).encode(), headers=self._headers,
                    allow_redirects=False, timeout=self._timeout,
                    skip_auto_headers=("Accept-Encoding", "User-Agent")) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unlisted(f"{method} failed: {type(exc).__name__}: {exc}".rstrip(": ")) from None
        if status >= 300:
            raise Unlisted(f"{method} answered HTTP {status}")

    async def _end_session(self) -> None:
        """DELETE the session it issued (MCP: a client that is done SHOULD); 405 is fine."""
        if "mcp-session-id" not in self._headers:
            return
        headers = {k: v for k, v in self._headers.items() if k != "content-type"}
        try:
            async with self._session.delete(self._url, headers=headers, allow_redirects=False,
                                            timeout=self._timeout):
                pass
        except (aiohttp.ClientError, TimeoutError):
            pass  # the session expires at the upstream on its own

    async def _answer(self, method: str, ident: int,
                      response: aiohttp.ClientResponse) -> dict[str, Any]:
        """The JSON-RPC response with this id, from a JSON answer or an event stream."""
        if response.status != 200:
            hint = {401: ": it wants a credential (MCP_UPSTREAM_BEARER_FILE)",
                    403: ": it refuses the sidecar's credential", 404: ": wrong path?"}
            raise Unlisted(f"{method} answered HTTP {response.status}"
                           + hint.get(response.status, ""))
        encoding = response.headers.get("Content-Encoding", "identity").lower()
        if encoding != "identity" and method in LIST_METHODS:
            raise Unlisted(f"{method} answered encoded ({encoding}) although not asked to: the "
                           "sidecar cannot filter such an answer and refuses it with 502")
        kind = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        try:
            if kind == "application/json":
                found = _find(json.loads(await read_capped(response, MAX_ANSWER_BYTES)), ident)
            elif kind == "text/event-stream":
                found = await _from_events(response, ident)
            else:
                raise Unlisted(f"{method} answered {kind or 'no Content-Type'}, neither JSON nor "
                               "an event stream")
        except ResponseTooLarge:
            raise Unlisted(f"{method}: the answer is larger than {MAX_ANSWER_BYTES} bytes, "
                           "the sidecar's cap for a list it filters") from None
        except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
            raise Unlisted(f"{method} answered something that is not JSON-RPC") from None
        if found is None:
            raise Unlisted(f"{method} got no answer with its id")
        return found


def _find(message: Any, ident: int) -> dict[str, Any] | None:
    """The response with this id in a message or a batch of them."""
    for item in message if isinstance(message, list) else [message]:
        if isinstance(item, dict) and item.get("id") == ident and "method" not in item:
            return item
    return None


async def _from_events(response: aiohttp.ClientResponse, ident: int) -> dict[str, Any] | None:
    """Read events until the one answering `ident` (a stream may stay open after it)."""
    found: list[dict[str, Any]] = []

    def look(payload: str) -> str:
        try:
            answer = _find(json.loads(payload), ident)
        except (ValueError, RecursionError):
            return payload
        if answer is not None:
            found.append(answer)
        return payload

    events, size = EventRewriter(look, MAX_ANSWER_BYTES), 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise ResponseTooLarge(MAX_ANSWER_BYTES, b"")
        events.feed(chunk)
        if found:
            return found[0]
    return None
