"""The stdio bridge end to end with the official MCP SDK client (issue 18).

The SDK's Streamable HTTP client talks to the real sidecar (in process, on loopback) in stdio
spawn mode, with bearer tokens from the real OpenID provider (tests/real_idp.py, node's
oidc-provider: client_credentials, so a token's `sub` is its client's id). Behind the bridge run
tests/mcp_stdio_server.py (the SDK's own server in stdio mode) and npm's
@modelcontextprotocol/server-everything. tests/test_stdio_bridge.py covers the bridge with raw
HTTP; tests/test_mcp_stdio_server.py covers these servers without the sidecar.

Every wait is bounded (anyio.fail_after around each client interaction).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import RESOURCE_URL, SidecarFactory, wait_until
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_client_probe import Mode
from mcp_stdio_server import TOOLS
from processes import REPO
from pydantic import FileUrl
from real_idp import RealIdp, client_credentials_token, run_oidc_provider
from structlog.testing import capture_logs

from oauth_sidecar.upstream.stdio_pool import subject_hash

pytestmark = pytest.mark.slow

WAIT = 30.0  # seconds any one client interaction may take on a loaded machine
SERVER = REPO / "tests" / "mcp_stdio_server.py"
EVERYTHING = (
    REPO / "tests" / "stdio" / "node_modules" / "@modelcontextprotocol" / "server-everything"
)
MODES: list[Mode] = ["legacy", "auto"]
# What each mode negotiates with the SDK's stdio server through the bridge: the 2025 handshake
# (a session per initialize) or 2026-07-28 (server/discover, sessionless requests).
VERSIONS = {"legacy": "2025-11-25", "auto": "2026-07-28"}
# A second confidential client at the provider: a second user (sub = its client id).
OTHER_ID, OTHER_SECRET = "second-user", "second-secret"

Sidecar = TestClient[web.Request, web.Application]


@dataclass(frozen=True)
class Users:
    """The real provider, and a token for each of its two clients."""

    idp: RealIdp
    first: str
    second: str


@pytest.fixture
async def users() -> AsyncIterator[Users]:
    spec = f"{OTHER_ID}:{OTHER_SECRET}:http://127.0.0.1/unused-callback"
    async with run_oidc_provider(static_clients=[spec]) as real:
        other = replace(real, client_id=OTHER_ID, client_secret=OTHER_SECRET)
        first = await client_credentials_token(real, RESOURCE_URL, "mcp:read")
        second = await client_credentials_token(other, RESOURCE_URL, "mcp:read")
        yield Users(real, first, second)


async def start(make_sidecar: SidecarFactory, users: Users, command: list[str]) -> str:
    """The sidecar in stdio mode in front of `command`, trusting the real provider; its URL."""
    sidecar: Sidecar = await make_sidecar(
        OIDC_ISSUER_URL=users.idp.issuer, OIDC_AUDIENCE=RESOURCE_URL,
        MCP_UPSTREAM_URL="", MCP_SPAWN_CMD=json.dumps(command), FORWARD_IDENTITY="true",
        MCP_SPAWN_STOP_TIMEOUT_SECONDS="2",
    )
    return str(sidecar.make_url("/mcp"))


def python_server() -> list[str]:
    return [sys.executable, str(SERVER)]


@asynccontextmanager
async def connect(url: str, token: str, mode: Mode, **callbacks: Any) -> AsyncIterator[Client]:
    """An SDK client session through the sidecar with `Authorization: Bearer <token>`."""
    # trust_env=False: never route 127.0.0.1 test traffic via *_PROXY env vars.
    async with httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(WAIT),
        trust_env=False,
    ) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(
            transport, mode=mode, cache=None, read_timeout_seconds=WAIT, **callbacks
        ) as client:
            yield client


def text_of(result: types.CallToolResult) -> str:
    assert not result.is_error, result
    texts = [block.text for block in result.content if isinstance(block, types.TextContent)]
    assert len(texts) == 1, result
    return texts[0]


async def whoami(client: Client) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(text_of(await client.call_tool("whoami")))
    return found


async def elicit(
    context: ClientRequestContext, params: types.ElicitRequestParams
) -> types.ElicitResult:
    assert isinstance(params, types.ElicitRequestFormParams), params
    return types.ElicitResult(action="accept", content={"answer": f"re: {params.message}"})


async def sample(
    context: ClientRequestContext, params: types.CreateMessageRequestParams
) -> types.CreateMessageResult:
    prompt = params.messages[0].content
    assert isinstance(prompt, types.TextContent), prompt
    return types.CreateMessageResult(
        role="assistant", model="test-model",
        content=types.TextContent(type="text", text=f"model says: {prompt.text}"),
    )


def child_lines(logs: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(e["line"]) for e in logs if e["event"] == "child_output"]


@pytest.mark.parametrize("mode", MODES)
async def test_echo_and_the_forwarded_identity(
    make_sidecar: SidecarFactory, users: Users, mode: Mode
) -> None:
    url = await start(make_sidecar, users, python_server())
    with anyio.fail_after(WAIT):
        async with connect(url, users.first, mode) as client:
            assert client.server_info is not None
            assert client.server_info.name == "mcp-stdio-server"
            assert client.protocol_version == VERSIONS[mode]
            listed = await client.list_tools()
            assert sorted(tool.name for tool in listed.tools) == sorted(TOOLS)
            assert text_of(await client.call_tool("echo", {"text": "héllo ✓"})) == "héllo ✓"
            who = await whoami(client)
    assert who["user_sub"] == users.idp.client_id  # client_credentials: sub is the client
    assert who["user_issuer"] == users.idp.issuer
    assert users.first not in json.dumps(who)


@pytest.mark.parametrize("mode", MODES)
async def test_two_users_at_once_get_their_own_processes(
    make_sidecar: SidecarFactory, users: Users, mode: Mode
) -> None:
    url = await start(make_sidecar, users, python_server())
    with anyio.fail_after(WAIT):
        async with (
            connect(url, users.first, mode) as first,
            connect(url, users.second, mode) as second,
        ):
            first_seen, second_seen = await whoami(first), await whoami(second)
            # Each session keeps its process.
            assert (await whoami(first))["pid"] == first_seen["pid"]
            assert (await whoami(second))["pid"] == second_seen["pid"]
    assert first_seen["pid"] != second_seen["pid"]
    assert (first_seen["user_sub"], second_seen["user_sub"]) == (users.idp.client_id, OTHER_ID)


@pytest.mark.parametrize("mode", MODES)
async def test_progress_reaches_the_client_callback(
    make_sidecar: SidecarFactory, users: Users, mode: Mode
) -> None:
    url = await start(make_sidecar, users, python_server())
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    with anyio.fail_after(WAIT):
        async with connect(url, users.first, mode) as client:
            done = await client.call_tool(
                "slow", {"steps": 3, "delay": 0.01}, progress_callback=on_progress
            )
    assert text_of(done) == "slow done: 3 steps"
    assert seen == [(n, 3, f"step {n} of 3") for n in (1, 2, 3)]


@pytest.mark.parametrize("mode", MODES)
async def test_elicitation_and_sampling_round_trips(
    make_sidecar: SidecarFactory, users: Users, mode: Mode
) -> None:
    """legacy: server-to-client requests on the call's event stream; auto (2026-07-28): the
    SDK's InputRequiredResult retries, ordinary calls to the bridge."""
    url = await start(make_sidecar, users, python_server())
    with anyio.fail_after(WAIT):
        async with connect(
            url, users.first, mode, elicitation_callback=elicit, sampling_callback=sample
        ) as client:
            asked = await client.call_tool("ask", {"question": "colour?"})
            sampled = await client.call_tool("sample", {"prompt": "hi"})
    assert text_of(asked) == "accept: re: colour?"
    assert text_of(sampled) == "model says: hi"


async def test_a_crash_is_an_error_and_a_new_session_works(
    make_sidecar: SidecarFactory, users: Users
) -> None:
    url = await start(make_sidecar, users, python_server())
    with anyio.fail_after(WAIT):
        async with connect(url, users.first, "legacy") as client:
            before = (await whoami(client))["pid"]
            with pytest.raises(MCPError) as raised:
                await client.call_tool("crash")
        crashed = raised.value
        assert crashed.error.code == types.INTERNAL_ERROR
        assert "exited" in crashed.error.message
        async with connect(url, users.first, "legacy") as again:
            after = (await whoami(again))["pid"]
            assert text_of(await again.call_tool("echo", {"text": "back"})) == "back"
    assert after != before


async def test_server_everything_lists_and_echoes(
    make_sidecar: SidecarFactory, users: Users
) -> None:
    node = shutil.which("node")
    assert node is not None, "`node` is not on PATH: server-everything needs Node.js"
    assert EVERYTHING.is_dir(), "run: npm ci --prefix tests/stdio"
    url = await start(make_sidecar, users, [node, str(EVERYTHING / "dist" / "index.js"), "stdio"])
    with anyio.fail_after(WAIT):
        async with connect(url, users.first, "legacy") as client:
            listed = await client.list_tools()
            names = {tool.name for tool in listed.tools}
            assert "echo" in names, sorted(names)
            echoed = await client.call_tool("echo", {"message": "through the sidecar"})
    assert text_of(echoed) == "Echo: through the sidecar"


@pytest.mark.parametrize("mode", MODES)
async def test_a_cancelled_call_stops_the_work_in_the_child(
    make_sidecar: SidecarFactory, users: Users, mode: Mode
) -> None:
    url = await start(make_sidecar, users, python_server())
    with capture_logs() as logs, anyio.fail_after(WAIT):
        async with connect(url, users.first, mode) as client:
            first = anyio.Event()

            async def on_progress(progress: float, total: float | None, message: str | None
                                  ) -> None:
                first.set()

            async with anyio.create_task_group() as group:

                async def call() -> None:
                    # Cancelled below: the SDK then sends notifications/cancelled.
                    await client.call_tool(
                        "slow", {"steps": 1000, "delay": 0.05}, progress_callback=on_progress
                    )

                group.start_soon(call)
                await first.wait()
                group.cancel_scope.cancel()

            stopped: Callable[[], bool] = lambda: any(  # noqa: E731 - a one-line predicate
                line.startswith("slow cancelled after ") for line in child_lines(logs))
            await wait_until(stopped, within=WAIT)
            # The session outlives the cancelled call.
            assert text_of(await client.call_tool("echo", {"text": "still here"})) == (
                "still here")
    assert "slow step 1000" not in child_lines(logs)


FILESYSTEM = (REPO / "tests" / "stdio" / "node_modules" / "@modelcontextprotocol"
              / "server-filesystem" / "dist" / "index.js")


@pytest.mark.parametrize("roots", ["drop", "pass"])
async def test_a_client_cannot_point_the_filesystem_server_at_another_users_directory(
    make_sidecar: SidecarFactory, users: Users, tmp_path: Path, roots: str
) -> None:
    """@modelcontextprotocol/server-filesystem replaces its command-line directories with the
    client's MCP roots, and every child runs as the sidecar's uid: with roots passed, the first
    user declares the second user's directory as a root and reads their file (the control);
    dropped (the default), the server keeps its own directory, `.`: the user's own."""
    node = shutil.which("node")
    assert node is not None
    sidecar: Sidecar = await make_sidecar(
        OIDC_ISSUER_URL=users.idp.issuer, OIDC_AUDIENCE=RESOURCE_URL, MCP_UPSTREAM_URL="",
        MCP_SPAWN_CMD=json.dumps([node, str(FILESYSTEM), "."]),
        MCP_SPAWN_WORKDIR_ROOT=str(tmp_path), MCP_SPAWN_CLIENT_ROOTS=roots,
        MCP_SPAWN_ENV_npm_config_cache=str(tmp_path / "npm"), MCP_SPAWN_STOP_TIMEOUT_SECONDS="2")
    url = str(sidecar.make_url("/mcp"))
    victim = tmp_path / subject_hash((users.idp.issuer, OTHER_ID))
    with anyio.fail_after(WAIT * 2):
        async with connect(url, users.second, "legacy") as second:
            await second.call_tool("write_file", {"path": "notes.txt", "content": "bob's secret"})
    assert (victim / "notes.txt").read_text() == "bob's secret"

    async def their_directory(context: ClientRequestContext) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri=FileUrl(victim.as_uri()))])

    # after initialized the server decides once where it may work, and says so on stderr
    decided = ("Updated allowed directories from MCP roots" if roots == "pass"
               else "Client does not support MCP Roots")
    with anyio.fail_after(WAIT * 2), capture_logs() as logs:
        async with connect(url, users.first, "legacy",
                           list_roots_callback=their_directory) as first:
            await wait_until(lambda: any(decided in line for line in child_lines(logs)),
                             within=WAIT)
            allowed = text_of(await first.call_tool("list_allowed_directories", {}))
            read = await first.call_tool("read_text_file", {"path": str(victim / "notes.txt")})
    own = tmp_path / subject_hash((users.idp.issuer, users.idp.client_id))
    if roots == "pass":
        assert str(victim) in allowed
        assert text_of(read) == "bob's secret"
    else:
        assert str(victim) not in allowed
        assert str(own) in allowed
        assert read.is_error
        assert "bob's secret" not in str(read.content)
