"""Official-SDK (mcp 2.x) Streamable HTTP client helpers for end-to-end tests.

mcp 2.x uses ``httpx2`` (not ``httpx``). Custom headers are passed by handing
``streamable_http_client`` a pre-configured ``httpx2.AsyncClient``; the resulting
transport is given to the high-level ``mcp.Client``.

Failures (HTTP errors, JSON-RPC errors) surface from ``async with Client(...)``
as an ``ExceptionGroup`` wrapping ``mcp.shared.exceptions.MCPError``;
``find_mcp_error`` unwraps it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent

# "legacy" forces the initialize handshake (2025-era protocol, stateful session with
# Mcp-Session-Id). "auto" first probes `server/discover` (2026-07-28 protocol, no
# session id) and falls back to initialize if the server does not support it.
Mode = Literal["legacy", "auto"]
# Called with every HTTP response the SDK client receives (headers only; body not yet read),
# so a test can inspect status codes and headers the SDK does not expose.
OnResponse = Callable[[httpx2.Response], Awaitable[None]]


def _http_client(
    token: str | None,
    http_timeout: float,
    on_response: OnResponse | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> httpx2.AsyncClient:
    headers = dict(extra_headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    hooks: dict[str, list[Callable[..., Any]]] = {"response": [on_response]} if on_response else {}
    # trust_env=False: never route 127.0.0.1 test traffic via *_PROXY env vars.
    return httpx2.AsyncClient(
        headers=headers,
        timeout=httpx2.Timeout(http_timeout),
        trust_env=False,
        event_hooks=hooks,
    )


def _text_of(result: CallToolResult) -> str:
    assert not result.is_error, f"tool call failed: {result.content!r}"
    texts = [block.text for block in result.content if isinstance(block, TextContent)]
    assert len(texts) == 1, f"expected exactly one text block, got {result.content!r}"
    return texts[0]


async def _call_tool(
    url: str,
    token: str | None,
    name: str,
    arguments: dict[str, Any],
    *,
    mode: Mode,
    http_timeout: float,
    on_response: OnResponse | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> str:
    async with _http_client(token, http_timeout, on_response, extra_headers) as http_client:
        transport = streamable_http_client(url, http_client=http_client)
        # cache=None: no client-side response caching of tools/list.
        async with Client(
            transport, mode=mode, cache=None, read_timeout_seconds=http_timeout
        ) as client:
            tools = await client.list_tools()
            names = {tool.name for tool in tools.tools}
            assert name in names, f"tool {name!r} not listed by server: {sorted(names)}"
            return _text_of(await client.call_tool(name, arguments))


async def call_echo(
    url: str,
    token: str,
    text: str,
    *,
    mode: Mode = "legacy",
    http_timeout: float = 10.0,
    on_response: OnResponse | None = None,
) -> str:
    """Connect with ``Authorization: Bearer <token>``, list tools, call ``echo``.

    Runs initialize (mode="legacy"), tools/list (asserting ``echo`` is listed) and
    tools/call; returns the tool's text result.
    """
    return await _call_tool(
        url,
        token,
        "echo",
        {"text": text},
        mode=mode,
        http_timeout=http_timeout,
        on_response=on_response,
    )


async def call_whoami(
    url: str,
    token: str | None,
    *,
    mode: Mode = "legacy",
    http_timeout: float = 10.0,
    on_response: OnResponse | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Call the echo server's ``whoami`` tool.

    ``extra_headers`` (e.g. a Cookie) are sent on every request besides the bearer token.
    Returns the HTTP request headers the server saw for the tools/call POST,
    with lower-cased names.
    """
    raw = await _call_tool(
        url,
        token,
        "whoami",
        {},
        mode=mode,
        http_timeout=http_timeout,
        on_response=on_response,
        extra_headers=extra_headers,
    )
    headers = json.loads(raw)
    assert isinstance(headers, dict)
    return {str(k): str(v) for k, v in headers.items()}


def find_mcp_error(exc: BaseException) -> MCPError | None:
    """Return the first ``MCPError`` in ``exc``, looking inside (nested) exception groups."""
    if isinstance(exc, MCPError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = find_mcp_error(sub)
            if found is not None:
                return found
    return None


async def expect_unauthorized(
    url: str,
    *,
    mode: Mode = "legacy",
    http_timeout: float = 10.0,
    token: str | None = None,
    on_response: OnResponse | None = None,
) -> MCPError:
    """Connect WITHOUT a token (or with a bad ``token``) and assert the connection fails.

    Returns the ``MCPError``.

    In mcp 2.3.0 a 401 on the initialize POST (or on the ``server/discover``
    probe in "auto" mode, which then falls back to initialize) is turned by the
    Streamable HTTP transport into a JSON-RPC error. What propagates out of
    ``async with Client(...)`` is an ``ExceptionGroup`` (two levels deep: the
    transport's and the session's anyio task groups) wrapping
    ``mcp.shared.exceptions.MCPError``; this function unwraps it. The MCPError is
    code -32603 (INTERNAL_ERROR), message "Server returned an error response",
    unless the 401 has Content-Type application/json and a body that is itself a
    JSON-RPC error object, in which case that code/message is surfaced instead.
    The HTTP status code is not exposed on the exception.
    """
    async with _http_client(token, http_timeout, on_response) as http_client:
        transport = streamable_http_client(url, http_client=http_client)
        try:
            async with Client(transport, mode=mode, cache=None, read_timeout_seconds=http_timeout):
                pass
        except Exception as exc:
            found = find_mcp_error(exc)
            if found is None:
                raise
            return found
    raise AssertionError(f"connecting to {url} without a valid token unexpectedly succeeded")
