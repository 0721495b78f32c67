"""The demo's example MCP server: the official SDK client talks to it, and raw HTTP pins the
Streamable HTTP rules (version negotiation, sessions, 202/405/406/415, JSON-RPC errors, SSE)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from mcp_client_probe import Mode, call_echo, call_whoami

from oauth_sidecar.devtools.example_mcp import LATEST, PROTOCOL_VERSIONS, ExampleMcpServer

CLIENT_TIMEOUT = 20.0
JSON_AND_SSE = "application/json, text/event-stream"


class Raw:
    """Plain HTTP to the example server, speaking JSON-RPC by hand."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url

    async def post(self, message: Any, *, session_id: str | None = None,
                   headers: dict[str, str] | None = None,
                   ) -> tuple[int, dict[str, str], str]:
        sent = {"Content-Type": "application/json", "Accept": JSON_AND_SSE, **(headers or {})}
        if session_id is not None:
            sent["Mcp-Session-Id"] = session_id
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        async with self.session.post(self.url, data=data, headers=sent) as response:
            return response.status, dict(response.headers), await response.text()

    async def initialize(self, version: str = LATEST) -> tuple[str, dict[str, Any]]:
        status, headers, body = await self.post(request("initialize", {
            "protocolVersion": version, "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"}}))
        assert status == 200, body
        return headers["Mcp-Session-Id"], json.loads(body)


def request(method: str, params: dict[str, Any] | None = None, id_: int = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "method": method}
    if params is not None:
        message["params"] = params
    return message


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    test_server = TestServer(ExampleMcpServer().app(), host="127.0.0.1")
    await test_server.start_server()
    yield test_server
    await test_server.close()


@pytest.fixture
async def raw(server: TestServer) -> AsyncIterator[Raw]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield Raw(session, str(server.make_url("/mcp")))


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_official_sdk_client_lists_tools_and_calls_echo(
    server: TestServer, mode: Mode
) -> None:
    async with asyncio.timeout(CLIENT_TIMEOUT):
        text = await call_echo(str(server.make_url("/mcp")), "unused", "hello, MCP", mode=mode)
    assert text == "hello, MCP"


async def test_whoami_shows_the_forwarded_identity_headers(server: TestServer) -> None:
    extra = {"X-Forwarded-User": "alice", "X-Forwarded-Email": "alice@example.com",
             "X-Forwarded-Groups": "mcp-users", "X-Forwarded-Issuer": "http://127.0.0.1:1"}
    async with asyncio.timeout(CLIENT_TIMEOUT):
        seen = await call_whoami(str(server.make_url("/mcp")), None, extra_headers=extra)
    assert seen == {"user": "alice", "email": "alice@example.com", "groups": "mcp-users",
                    "issuer": "http://127.0.0.1:1"}


@pytest.mark.parametrize("version", PROTOCOL_VERSIONS)
async def test_initialize_agrees_to_each_supported_version(raw: Raw, version: str) -> None:
    session_id, answer = await raw.initialize(version)
    assert answer["result"]["protocolVersion"] == version
    assert answer["result"]["capabilities"] == {"tools": {"listChanged": False}}
    assert session_id.isascii()
    assert session_id.isprintable()
    assert len(session_id) >= 32


async def test_initialize_with_an_unknown_version_offers_the_latest(raw: Raw) -> None:
    _, answer = await raw.initialize("2024-11-05")
    assert answer["result"]["protocolVersion"] == LATEST


async def test_requests_after_initialize_need_a_live_session(raw: Raw) -> None:
    session_id, _ = await raw.initialize()
    status, _, body = await raw.post(request("tools/list"))
    assert status == 400
    assert json.loads(body)["error"]["code"] == -32600
    status, _, body = await raw.post(request("tools/list"), session_id="not-a-session")
    assert status == 404
    status, _, body = await raw.post(request("tools/list", id_=7), session_id=session_id)
    assert status == 200
    answer = json.loads(body)
    assert answer["id"] == 7
    assert [tool["name"] for tool in answer["result"]["tools"]] == ["echo", "whoami"]


async def test_delete_ends_the_session(raw: Raw) -> None:
    session_id, _ = await raw.initialize()
    async with raw.session.delete(raw.url, headers={"Mcp-Session-Id": session_id}) as response:
        assert response.status == 204
    status, _, _ = await raw.post(request("ping"), session_id=session_id)
    assert status == 404
    async with raw.session.delete(raw.url) as response:
        assert response.status == 400


async def test_get_offers_no_event_stream(raw: Raw) -> None:
    async with raw.session.get(raw.url, headers={"Accept": "text/event-stream"}) as response:
        assert response.status == 405
        assert set(response.headers["Allow"].replace(" ", "").split(",")) == {"POST", "DELETE"}


async def test_notifications_and_responses_are_accepted_with_202(raw: Raw) -> None:
    session_id, _ = await raw.initialize()
    for message in ({"jsonrpc": "2.0", "method": "notifications/initialized"},
                    {"jsonrpc": "2.0", "id": 5, "result": {}}):
        status, _, body = await raw.post(message, session_id=session_id)
        assert (status, body) == (202, "")


async def test_ping_echo_and_errors(raw: Raw) -> None:
    session_id, _ = await raw.initialize()

    async def call(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        status, _, body = await raw.post(request(method, params), session_id=session_id)
        assert status == 200, body
        answer: dict[str, Any] = json.loads(body)
        return answer

    assert (await call("ping"))["result"] == {}
    echoed = await call("tools/call", {"name": "echo", "arguments": {"text": "é ✓"}})
    assert echoed["result"] == {"content": [{"type": "text", "text": "é ✓"}], "isError": False}
    bad_args = await call("tools/call", {"name": "echo", "arguments": {"text": 3}})
    assert bad_args["result"]["isError"] is True  # a tool error the model can read
    assert (await call("tools/call", {"name": "nope"}))["error"]["code"] == -32602
    assert (await call("resources/list"))["error"]["code"] == -32601
    whoami = await call("tools/call", {"name": "whoami"})
    assert "FORWARD_IDENTITY" in whoami["result"]["content"][0]["text"]


async def test_malformed_bodies_are_json_rpc_errors(raw: Raw) -> None:
    status, _, body = await raw.post(b"{not json")
    assert status == 400
    assert json.loads(body) == {"jsonrpc": "2.0", "id": None,
                                "error": {"code": -32700, "message": "Parse error"}}
    status, _, body = await raw.post([request("ping")])
    assert (status, json.loads(body)["error"]["code"]) == (400, -32600)
    status, _, body = await raw.post({"id": 1, "method": "ping"})
    assert (status, json.loads(body)["error"]["code"]) == (400, -32600)
    status, _, _ = await raw.post(request("ping"), headers={"Content-Type": "text/plain"})
    assert status == 415
    status, _, _ = await raw.post(request("ping"), headers={"Accept": "text/html"})
    assert status == 406


async def test_unsupported_protocol_version_header_is_a_400(raw: Raw) -> None:
    session_id, _ = await raw.initialize()
    status, _, body = await raw.post(request("ping"), session_id=session_id,
                                     headers={"MCP-Protocol-Version": "1999-01-01"})
    assert status == 400
    assert "1999-01-01" in json.loads(body)["error"]["message"]
    status, _, _ = await raw.post(request("ping"), session_id=session_id,
                                  headers={"MCP-Protocol-Version": "2025-06-18"})
    assert status == 200


async def test_a_client_accepting_only_sse_gets_one_event(raw: Raw) -> None:
    status, headers, body = await raw.post(
        request("initialize", {"protocolVersion": LATEST, "capabilities": {},
                               "clientInfo": {"name": "sse", "version": "1"}}),
        headers={"Accept": "text/event-stream"})
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    event, data = body.strip().split("\n")
    assert event == "event: message"
    assert json.loads(data.removeprefix("data: "))["result"]["protocolVersion"] == LATEST


@pytest.mark.parametrize(("header", "value", "status"), [
    ("Origin", "https://evil.example", 403),
    ("Host", "evil.example", 421),
])
async def test_foreign_origin_or_host_is_refused(
    raw: Raw, header: str, value: str, status: int
) -> None:
    """DNS rebinding: a web page must not reach a local MCP server under another name."""
    got, _, _ = await raw.post(request("initialize", {"protocolVersion": LATEST}),
                               headers={header: value})
    assert got == status
    ok, _, _ = await raw.post(request("initialize", {"protocolVersion": LATEST}),
                              headers={"Origin": "http://localhost:6274"})
    assert ok == 200
