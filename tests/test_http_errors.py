"""The error middleware: bugs become one logged 500 in JSON; a client that left is no error.

A real aiohttp server on loopback with the production middlewares (access_log, json_errors)
in front of handlers that fail the ways handlers fail.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import SidecarServer, wait_until
from structlog.testing import capture_logs

from oauth_sidecar.config import load
from oauth_sidecar.http_errors import json_errors
from oauth_sidecar.log import access_log

Client = TestClient[web.Request, web.Application]
BOUND = 5.0
REQUEST_BOUND = aiohttp.ClientTimeout(total=BOUND)


async def bug(request: web.Request) -> web.StreamResponse:
    raise RuntimeError("secret internal detail")


async def client_leaves_before_headers(request: web.Request) -> web.StreamResponse:
    """What happens when the client's connection closes while the upstream is answering: the
    transport is closing when the response headers are written (aiohttp raises
    ClientConnectionResetError "Cannot write to closing transport")."""
    assert request.transport is not None
    request.transport.close()
    response = web.StreamResponse()
    await response.prepare(request)
    return response


async def broken_body(request: web.Request) -> web.StreamResponse:
    raise web.RequestPayloadError("the chunked body broke its framing")


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    app = web.Application(middlewares=[access_log, json_errors])
    app.router.add_get("/bug", bug)
    app.router.add_get("/leaves", client_leaves_before_headers)
    app.router.add_post("/body", broken_body)
    config = load({"OIDC_ISSUER_URL": "https://idp.example.test", "OIDC_AUDIENCE": "a",
                   "RESOURCE_URL": "https://mcp.example.test/mcp",
                   "MCP_UPSTREAM_URL": "http://127.0.0.1:9", "ALLOW_ALL_AUTHENTICATED": "true"})
    server = SidecarServer(app, config)
    test_client: Client = TestClient(server)
    await test_client.start_server()
    try:
        yield test_client
    finally:
        await test_client.close()


async def test_a_bug_is_one_logged_500_in_json_without_details(client: Client) -> None:
    with capture_logs() as events:
        response = await client.get("/bug", timeout=REQUEST_BOUND)
        body = await response.text()
    assert response.status == 500
    assert json.loads(body) == {"error": "server_error", "error_description": "Internal error"}
    assert "secret internal detail" not in body
    errors = [e for e in events if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["unhandled_error"]
    assert [e["status"] for e in events if e["event"] == "request"] == [500]


async def test_a_client_that_left_is_logged_as_499_not_as_an_error(client: Client) -> None:
    with capture_logs() as events:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", client.port), BOUND)
        try:
            writer.write(b"GET /leaves HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), BOUND)
        finally:
            writer.close()
            await writer.wait_closed()
        await wait_until(lambda: any(e["event"] == "request" for e in events), BOUND)
    assert answer == b""  # the connection was gone before anything was written
    assert [e for e in events if e["log_level"] in ("error", "critical")] == []
    assert [e["status"] for e in events if e["event"] == "request"] == [499]


async def test_a_body_that_broke_its_framing_is_a_400(client: Client) -> None:
    with capture_logs() as events:
        response = await client.post("/body", data=b"{}", timeout=REQUEST_BOUND)
        body = await response.json()
    assert response.status == 400
    assert body["error"] == "invalid_request"
    assert [e for e in events if e["log_level"] == "error"] == []
