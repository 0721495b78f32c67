"""Tool rules end to end, with the official MCP SDK (mcp 2.x) on both sides of the sidecar.

A real `tests/mcp_tools_server.py` child process (official-SDK server: four tools, two prompts,
two resources and two templates; answers as SSE, or as JSON with --json-response) sits behind the
production sidecar with TOOLS_DENY, TOOL_POLICY_FILE or TOOL_SCOPES set. The official-SDK client
talks to the sidecar in both modes: "legacy" (initialize handshake, 2025-11-25) and "auto"
(2026-07-28 sessionless, with Mcp-Method and Mcp-Name headers). The server writes a line for every
call it runs, so each refusal is proved from outside its process: the server never saw it.
The step-up test signs in at a real OpenID provider (tests/real_idp.py) through the SDK's
`OAuthClientProvider`. Every wait is bounded; every child is terminated and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx2
import pytest
from conftest import FakeIdp, SidecarFactory, clear_of_a_minute_edge
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull
from mcp.shared.exceptions import MCPError
from mcp_client_probe import Mode, find_mcp_error
from mcp_tools_server import CRASH
from mcp_types import CallToolResult, TextContent
from oauth_flow import SdkOAuthClient, run_sidecar
from processes import free_port, stop_process
from pydantic import AnyUrl
from real_idp import run_oidc_provider
from structlog.testing import capture_logs

# Every test here runs real processes (see the marker in pyproject.toml).
pytestmark = pytest.mark.slow

TOOLS_SERVER = Path(__file__).with_name("mcp_tools_server.py")
STARTUP_TIMEOUT = 20.0  # the SDK server needs ~0.8 s; leave room for a loaded CI machine
CLIENT_TIMEOUT = 20.0  # around each whole SDK client interaction
HTTP_TIMEOUT = 10.0
METADATA_URL = "https://mcp.example.test/.well-known/oauth-protected-resource/mcp"
MODES: list[Mode] = ["legacy", "auto"]
ANSWERS = ["sse", "json"]
MODERN = "2026-07-28"

RULES = """
[[rule]]
name = "readers"
groups = ["readers"]
allow_tools = ["search", "get_*"]
allow_resources = ["file:///public/*"]

[[rule]]
name = "admins"
groups = ["admins"]
allow_tools = ["*"]
allow_resources = ["*"]

[[rule]]
everyone = true
deny_tools = ["delete_*"]
deny_prompts = ["secret_*"]
"""

OnResponse = Callable[[httpx2.Response], Awaitable[None]]


@dataclass
class ToolsServer:
    port: int
    calls_file: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ran(self) -> list[tuple[str, str]]:
        """(method, name) of every call the server ran, in order."""
        if not self.calls_file.exists():
            return []
        lines = self.calls_file.read_text(encoding="utf-8").splitlines()
        return [(entry["method"], entry["name"]) for entry in map(json.loads, lines)]


@contextlib.asynccontextmanager
async def run_tools_server(directory: Path, *, json_response: bool) -> AsyncIterator[ToolsServer]:
    """tests/mcp_tools_server.py as a child process on a free loopback port, until it listens."""
    port = free_port()
    server = ToolsServer(port, directory / f"calls-{port}.jsonl",
                         directory / f"mcp_tools_server-{port}.log")
    args = [sys.executable, str(TOOLS_SERVER), "--host", "127.0.0.1", "--port", str(port),
            "--calls-file", str(server.calls_file)]
    if json_response:
        args.append("--json-response")
    with server.log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"tools server exited with {process.returncode}:\n"
                                   f"{server.log_path.read_text(errors='replace')}")
            try:
                async with asyncio.timeout(1.0):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tools server not listening on {port} after "
                                       f"{STARTUP_TIMEOUT} s") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            break
        yield server
    finally:
        await stop_process(process)


@pytest.fixture(params=ANSWERS)
async def tools_server(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ToolsServer]:
    """The official-SDK tools server, answering as SSE or as JSON."""
    async with run_tools_server(tmp_path, json_response=request.param == "json") as server:
        yield server


@pytest.fixture
async def sse_tools_server(tmp_path: Path) -> AsyncIterator[ToolsServer]:
    async with run_tools_server(tmp_path, json_response=False) as server:
        yield server


@dataclass
class Seen:
    """Every HTTP exchange the SDK client made: request headers and body, status, headers."""

    exchanges: list[tuple[httpx2.Request, httpx2.Response]] = field(default_factory=list)

    async def __call__(self, response: httpx2.Response) -> None:
        self.exchanges.append((response.request, response))

    def posts(self, method: str) -> list[tuple[httpx2.Request, httpx2.Response]]:
        """The POSTs whose JSON-RPC body calls `method`."""
        found = []
        for request, response in self.exchanges:
            if request.method != "POST":
                continue
            try:
                body = json.loads(request.content)
            except (ValueError, httpx2.RequestNotRead):
                continue
            if isinstance(body, dict) and body.get("method") == method:
                found.append((request, response))
        return found


@contextlib.asynccontextmanager
async def connect(url: str, token: str, mode: Mode, seen: Seen | None = None
                  ) -> AsyncIterator[Client]:
    """An official-SDK client session through the sidecar with `Authorization: Bearer token`."""
    hooks: dict[str, list[OnResponse]] = {"response": [seen]} if seen is not None else {}
    async with (
        asyncio.timeout(CLIENT_TIMEOUT),
        httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(HTTP_TIMEOUT),
            trust_env=False, event_hooks=hooks,
        ) as http_client,
        Client(streamable_http_client(url, http_client=http_client), mode=mode, cache=None,
               read_timeout_seconds=HTTP_TIMEOUT) as client,
    ):
        yield client


def text_of(result: CallToolResult) -> str:
    assert not result.is_error, result.content
    texts = [block.text for block in result.content if isinstance(block, TextContent)]
    assert len(texts) == 1, result.content
    return texts[0]


async def refused(call: Awaitable[Any]) -> MCPError:
    """The MCPError a refused SDK call raises (plain, or inside an exception group)."""
    try:
        await call
    except Exception as exc:  # unwrapped below, re-raised if not an MCPError
        found = find_mcp_error(exc)
        if found is None:
            raise
        return found
    raise AssertionError("the call was not refused")


async def sidecar_url(make_sidecar: SidecarFactory, server: ToolsServer, **env: str) -> str:
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=server.url, **env)
    return str(sidecar.make_url("/mcp"))


# --- a denied tool ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_denied_tool_raises_naming_it_and_never_runs(
    make_sidecar: SidecarFactory, idp: FakeIdp, tools_server: ToolsServer, mode: Mode
) -> None:
    url = await sidecar_url(make_sidecar, tools_server, TOOLS_DENY="delete_*")
    seen = Seen()
    async with connect(url, idp.mint(), mode, seen) as client:
        names = sorted(tool.name for tool in (await client.list_tools()).tools)
        error = await refused(client.call_tool("delete_everything", {}))
        # The session outlives the refusal: the next call goes through.
        assert text_of(await client.call_tool("search", {"query": "q"})) == "found: q"
    assert names == ["get_doc", "search", "write_note"]  # a denied tool is not offered either
    assert "delete_everything" in error.message, error
    assert "not allowed" in error.message, error
    assert error.code == -32602, error
    assert tools_server.ran() == [("tools/call", "search")]
    denied = seen.posts("tools/call")[0]
    assert denied[1].status_code == 200  # a JSON-RPC error, not an HTTP one
    if mode == "auto":  # the 2026-07-28 client names the call in headers, which agree
        request = denied[0]
        assert request.headers.get("mcp-method") == "tools/call"
        assert request.headers.get("mcp-name") == "delete_everything"
        assert "mcp-session-id" not in request.headers


# --- what a caller may see and use ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_reader_sees_and_uses_only_what_the_rules_allow(
    make_sidecar: SidecarFactory, idp: FakeIdp, tools_server: ToolsServer, mode: Mode,
    tmp_path: Path,
) -> None:
    rules = tmp_path / "tools.toml"
    rules.write_text(RULES)
    url = await sidecar_url(make_sidecar, tools_server, TOOL_POLICY_FILE=str(rules))
    token = idp.mint(claims={"groups": ["readers"]})
    async with connect(url, token, mode) as client:
        tools = sorted(tool.name for tool in (await client.list_tools()).tools)
        prompts = sorted(prompt.name for prompt in (await client.list_prompts()).prompts)
        resources = sorted(str(r.uri) for r in (await client.list_resources()).resources)
        templates = sorted(t.uri_template for t in
                           (await client.list_resource_templates()).resource_templates)
        assert text_of(await client.call_tool("get_doc", {"doc_id": "7"})) == "doc 7"
        prompt = await client.get_prompt("summary", {"topic": "rules"})
        public = await client.read_resource("file:///public/readme.txt")
        from_template = await client.read_resource("file:///public/notes.txt")
        write = await refused(client.call_tool("write_note", {"text": "x"}))
        secret = await refused(client.get_prompt("secret_plan"))
        private = await refused(client.read_resource("file:///private/keys.txt"))
        private_template = await refused(client.read_resource("file:///private/other.txt"))
    assert tools == ["get_doc", "search"]
    assert prompts == ["summary"]
    assert resources == ["file:///public/readme.txt"]
    assert templates == ["file:///public/{name}"]
    assert prompt.messages, prompt
    assert [getattr(c, "text", None) for c in public.contents] == ["public readme"]
    assert [getattr(c, "text", None) for c in from_template.contents] == ["public notes.txt"]
    assert "'write_note'" in write.message, write
    assert "Prompt 'secret_plan'" in secret.message, secret
    assert "Resource 'file:///private/keys.txt'" in private.message, private
    assert "'file:///private/other.txt'" in private_template.message, private_template
    assert tools_server.ran() == [
        ("tools/call", "get_doc"), ("prompts/get", "summary"),
        ("resources/read", "file:///public/readme.txt"),
        ("resources/read", "file:///public/notes.txt"),
    ]


@pytest.mark.parametrize("mode", MODES)
async def test_an_admin_sees_all_but_what_everyone_is_denied(
    make_sidecar: SidecarFactory, idp: FakeIdp, tools_server: ToolsServer, mode: Mode,
    tmp_path: Path,
) -> None:
    rules = tmp_path / "tools.toml"
    rules.write_text(RULES)
    url = await sidecar_url(make_sidecar, tools_server, TOOL_POLICY_FILE=str(rules))
    token = idp.mint(claims={"groups": ["admins"]})
    async with connect(url, token, mode) as client:
        tools = sorted(tool.name for tool in (await client.list_tools()).tools)
        prompts = sorted(prompt.name for prompt in (await client.list_prompts()).prompts)
        resources = sorted(str(r.uri) for r in (await client.list_resources()).resources)
        assert text_of(await client.call_tool("write_note", {"text": "hi"})) == "noted: hi"
        private = await client.read_resource("file:///private/keys.txt")
    assert tools == ["get_doc", "search", "write_note"]
    assert prompts == ["summary"]  # deny_prompts of everyone; prompts are otherwise open
    assert resources == ["file:///private/keys.txt", "file:///public/readme.txt"]
    assert [getattr(c, "text", None) for c in private.contents] == ["private keys"]
    assert tools_server.ran() == [("tools/call", "write_note"),
                                  ("resources/read", "file:///private/keys.txt")]


# --- Mcp-Method / Mcp-Name must agree with the body ------------------------------------------


def modern_headers(token: str, method: str, name: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}", "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": MODERN,
        "Mcp-Method": method, "Mcp-Name": name,
    }


def tools_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": name, "arguments": arguments,
                       "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                                 "io.modelcontextprotocol/clientCapabilities": {}}}}


@pytest.mark.parametrize("body_calls", ["delete_everything", "get_doc"])
async def test_a_header_naming_another_tool_than_the_body_is_refused(
    make_sidecar: SidecarFactory, idp: FakeIdp, tools_server: ToolsServer, body_calls: str
) -> None:
    """The headers say `search`; the body calls another tool (denied, or allowed: the mismatch
    alone is refused). Then the same request with agreeing headers reaches the server."""
    url = await sidecar_url(make_sidecar, tools_server, TOOLS_DENY="delete_*")
    token = idp.mint()
    arguments = {"doc_id": "1"} if body_calls == "get_doc" else {}
    async with (
        asyncio.timeout(CLIENT_TIMEOUT),
        httpx2.AsyncClient(timeout=httpx2.Timeout(HTTP_TIMEOUT), trust_env=False) as http,
    ):
        mismatch = await http.post(url, headers=modern_headers(token, "tools/call", "search"),
                                   content=json.dumps(tools_call(body_calls, arguments)))
        agreeing = await http.post(url, headers=modern_headers(token, "tools/call", "search"),
                                   content=json.dumps(tools_call("search", {"query": "q"})))
    assert mismatch.status_code == 400, mismatch.text
    assert mismatch.headers["content-type"].startswith("application/json")
    error = mismatch.json()
    assert error["jsonrpc"] == "2.0"
    assert error["id"] == 1
    assert error["error"]["code"] == -32020, error
    assert agreeing.status_code == 200, agreeing.text
    assert "found: q" in agreeing.text
    assert tools_server.ran() == [("tools/call", "search")]


async def test_a_repeated_mcp_name_is_refused_before_the_server_reads_either(
    make_sidecar: SidecarFactory, idp: FakeIdp, sse_tools_server: ToolsServer
) -> None:
    """The first Mcp-Name agrees with the body, the second names another tool: readers disagree
    on which counts (the official server refuses what it reads; an intermediary in front of the
    sidecar may show `search`), so the sidecar refuses it: the server never sees it."""
    url = await sidecar_url(make_sidecar, sse_tools_server, TOOLS_DENY="delete_*")
    headers = [*modern_headers(idp.mint(), "tools/call", "get_doc").items(),
               ("Mcp-Name", "search")]
    async with (
        asyncio.timeout(CLIENT_TIMEOUT),
        httpx2.AsyncClient(timeout=httpx2.Timeout(HTTP_TIMEOUT), trust_env=False) as http,
    ):
        answer = await http.post(url, headers=headers,
                                 content=json.dumps(tools_call("get_doc", {"doc_id": "1"})))
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == {
        "code": -32020, "message": "Header mismatch: Mcp-Method or Mcp-Name is repeated"}
    assert sse_tools_server.ran() == []


# --- TOOL_SCOPES: step-up ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_token_without_the_tools_scope_gets_the_step_up_challenge(
    make_sidecar: SidecarFactory, idp: FakeIdp, sse_tools_server: ToolsServer, mode: Mode
) -> None:
    url = await sidecar_url(make_sidecar, sse_tools_server, REQUIRED_SCOPES="mcp:read",
                            TOOL_SCOPES="write_*=mcp:write")
    seen = Seen()
    reader = idp.mint(claims={"scope": "mcp:read"})
    async with connect(url, reader, mode, seen) as client:
        tools = sorted(tool.name for tool in (await client.list_tools()).tools)
        assert text_of(await client.call_tool("search", {"query": "q"})) == "found: q"
        error = await refused(client.call_tool("write_note", {"text": "x"}))
    assert "write_note" in tools  # a tool needing a scope stays listed: a client can step up
    assert error is not None
    request, response = seen.posts("tools/call")[-1]
    assert json.loads(request.content)["params"]["name"] == "write_note"
    assert response.status_code == 403
    assert response.headers.get_list("www-authenticate") == [
        f'Bearer error="insufficient_scope", scope="mcp:read mcp:write", '
        f'resource_metadata="{METADATA_URL}"'
    ]
    writer = idp.mint(claims={"scope": "mcp:read mcp:write"})
    async with connect(url, writer, mode) as client:
        assert text_of(await client.call_tool("write_note", {"text": "x"})) == "noted: x"
    assert sse_tools_server.ran() == [("tools/call", "search"), ("tools/call", "write_note")]


STEP_UP_ENV = {
    # The 401 challenge names mcp:read only: the first sign-in asks for no more.
    "SCOPES_SUPPORTED": "mcp:read", "REQUIRED_SCOPES": "mcp:read",
    "TOOL_SCOPES": "write_*=mcp:write",
}
CALLS = [("search", {"query": "q"}), ("write_note", {"text": "stepped up"})]


@pytest.mark.parametrize("mode", MODES)
async def test_the_sdk_steps_up_at_a_real_idp_and_the_retried_call_succeeds(
    tmp_path: Path, mode: Mode
) -> None:
    """Signed in with mcp:read only, the SDK's write_note gets 403 insufficient_scope naming
    mcp:write; the SDK's OAuthClientProvider authorises again at the real provider with the union
    of the scopes and retries the call, which succeeds. The client is pre-registered (as a
    facade's or an enterprise's): one registered through DCR is the next test."""
    redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
    async with (
        run_oidc_provider(auto_login="user-1",
                          static_clients=[f"mcp-static:static-secret:{redirect_uri}"]) as real_idp,
        run_tools_server(tmp_path, json_response=False) as server,
        run_sidecar(real_idp.issuer, server.url, STEP_UP_ENV) as sidecar,
    ):
        client = SdkOAuthClient(sidecar.mcp_url, redirect_uri=redirect_uri, client_info=(
            OAuthClientInformationFull(
                client_id="mcp-static", client_secret="static-secret",
                redirect_uris=[AnyUrl(redirect_uri)],
                token_endpoint_auth_method="client_secret_basic",
                grant_types=["authorization_code", "refresh_token"], response_types=["code"])))
        result = await client.session(CALLS, mode=mode, allow_failure=True)
        assert result.error is None, result.describe()
    assert result.results == ["found: q", "noted: stepped up"]
    assert len(result.authorization_urls) == 2, result.describe()
    first, second = (set(_query(url).get("scope", "").split()) for url in result.authorization_urls)
    assert "mcp:read" in first, first
    assert "mcp:write" not in first, first
    assert {"mcp:read", "mcp:write"} <= second, second  # SEP-2350: the union
    challenged = [e for e in result.exchanges if e.status == 403]
    assert len(challenged) == 1, result.describe()
    assert challenged[0].www_authenticate == (
        'Bearer error="insufficient_scope", scope="mcp:read mcp:write", '
        f'resource_metadata="{sidecar.origin}/.well-known/oauth-protected-resource/mcp"')
    # The retried call carried the new token, which holds both scopes.
    i = result.exchanges.index(challenged[0])
    retried = next(e for e in result.exchanges[i + 1:] if e.url == sidecar.mcp_url)
    assert (retried.method, retried.status, retried.authorization) == ("POST", 200, "Bearer")
    assert retried.json()["params"]["name"] == "write_note"
    claims = result.claims
    assert claims is not None
    assert set(claims["scope"].split()) >= {"mcp:read", "mcp:write"}, claims
    assert server.ran() == [("tools/call", "search"), ("tools/call", "write_note")]


@pytest.mark.parametrize("mode", MODES)
async def test_a_dynamically_registered_client_is_refused_the_step_up_by_the_idp(
    tmp_path: Path, mode: Mode
) -> None:
    """Where the full step-up stops with DCR: the SDK registers with the scopes of the first
    challenge (mcp:read offline_access) and never updates its registration, so an authorization
    server that holds a client to its registered scope (oidc-provider does) refuses mcp:write
    (invalid_scope). The sidecar's part is right all the same, and the server never ran the
    call. An operator whose IdP does this lists the TOOL_SCOPES scopes in SCOPES_SUPPORTED: the
    SDK then registers with (and asks for) them from the start."""
    async with (
        run_oidc_provider(auto_login="user-1") as real_idp,
        run_tools_server(tmp_path, json_response=False) as server,
        run_sidecar(real_idp.issuer, server.url, STEP_UP_ENV) as sidecar,
    ):
        result = await SdkOAuthClient(sidecar.mcp_url).session(CALLS, mode=mode,
                                                               allow_failure=True)
        assert result.error is not None, result.describe()
    registration = next(e for e in result.exchanges if e.path.endswith("/reg"))
    assert registration.json()["scope"] == "mcp:read offline_access"
    assert result.results == ["found: q"]
    assert len(result.authorization_urls) == 2, result.describe()
    assert "mcp:write" in _query(result.authorization_urls[1])["scope"].split()
    assert len(result.callbacks) == 1, result.describe()  # the second came back as an error
    assert "invalid_scope" in repr(result.error), result.describe()
    assert [e.status for e in result.exchanges if e.url == sidecar.mcp_url][-1] == 403
    assert server.ran() == [("tools/call", "search")]


def _query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


@pytest.mark.parametrize("mode", MODES)
async def test_a_uri_the_sdk_sends_base64_encoded_in_mcp_name_is_judged_as_meant(
    make_sidecar: SidecarFactory, idp: FakeIdp, sse_tools_server: ToolsServer, mode: Mode,
    tmp_path: Path,
) -> None:
    """Non-ASCII and spaces: the 2026-07-28 SDK sends Mcp-Name as `=?base64?...?=`, which the
    sidecar decodes to compare with the body; the rule judges the URI itself."""
    rules = tmp_path / "tools.toml"
    rules.write_text(RULES)
    url = await sidecar_url(make_sidecar, sse_tools_server, TOOL_POLICY_FILE=str(rules))
    seen = Seen()
    public, private = "file:///public/café notes.txt", "file:///private/café notes.txt"
    async with connect(url, idp.mint(claims={"groups": ["readers"]}), mode, seen) as client:
        read = await client.read_resource(public)
        error = await refused(client.read_resource(private))
    assert [getattr(c, "text", None) for c in read.contents] == ["public café notes.txt"]
    assert repr(private) in error.message, error
    assert sse_tools_server.ran() == [("resources/read", public)]
    if mode == "auto":
        names = [request.headers.get("mcp-name") for request, _ in seen.posts("resources/read")]
        assert all(name and name.startswith("=?base64?") for name in names), names


@pytest.mark.parametrize("mode", MODES)
async def test_a_tool_over_its_budget_gets_429_and_never_runs(
    make_sidecar: SidecarFactory, idp: FakeIdp, sse_tools_server: ToolsServer, mode: Mode
) -> None:
    url = await sidecar_url(make_sidecar, sse_tools_server, TOOL_RATE_LIMITS="search=2")
    await clear_of_a_minute_edge()  # an exact count of a small budget follows
    seen = Seen()
    async with connect(url, idp.mint(), mode, seen) as client:
        for query in ("a", "b"):
            await client.call_tool("search", {"query": query})
        error = await refused(client.call_tool("search", {"query": "c"}))
        assert text_of(await client.call_tool("get_doc", {"doc_id": "1"})) == "doc 1"
    assert error is not None
    statuses = [response.status_code for _, response in seen.posts("tools/call")]
    assert statuses == [200, 200, 429, 200]
    over = seen.posts("tools/call")[2][1]
    assert int(over.headers["retry-after"]) >= 1
    assert sse_tools_server.ran() == [("tools/call", "search")] * 2 + [("tools/call", "get_doc")]


# --- the audit line -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_each_sdk_call_gets_one_audit_line_with_its_outcome(
    make_sidecar: SidecarFactory, idp: FakeIdp, tools_server: ToolsServer, mode: Mode
) -> None:
    url = await sidecar_url(make_sidecar, tools_server, TOOLS_DENY="delete_*")
    with capture_logs() as logs:
        async with connect(url, idp.mint(), mode) as client:
            await client.call_tool("search", {"query": "q"})
            failed = await client.call_tool("search", {})  # invalid arguments: isError
            await refused(client.call_tool("delete_everything", {}))
    audit = [e for e in logs if e["event"] == "mcp_call"]
    assert failed.is_error
    assert [(e["name"], e["decision"], e.get("outcome"), e["upstream_status"]) for e in audit] == [
        ("search", "allowed", "ok", 200), ("search", "allowed", "error", 200),
        ("delete_everything", "denied", None, None)]
    access = {e["request_id"] for e in logs if e["event"] == "request"}
    assert all(e["request_id"] in access for e in audit)


@pytest.mark.parametrize("mode", MODES)
async def test_a_call_whose_server_dies_before_answering_is_audited_failed(
    make_sidecar: SidecarFactory, idp: FakeIdp, tools_server: ToolsServer, mode: Mode
) -> None:
    """The server records the call and exits at once: no JSON-RPC answer ever comes, whether
    or not it had begun an event stream (HTTP 200), so the audit line says `failed`."""
    url = await sidecar_url(make_sidecar, tools_server, TOOLS_DENY="delete_*")
    with capture_logs() as logs, contextlib.suppress(Exception):
        async with connect(url, idp.mint(), mode) as client:
            await client.call_tool("get_doc", {"doc_id": CRASH}, read_timeout_seconds=5)
    assert tools_server.ran() == [("tools/call", "get_doc")]
    audit = [e for e in logs if e["event"] == "mcp_call"]
    assert [(e["name"], e["decision"], e.get("outcome")) for e in audit] == [
        ("get_doc", "allowed", "failed")], audit
