"""The stdio bridge's test servers on their own (issue 18), driven by the official SDK's stdio
client without the sidecar: tests/mcp_stdio_server.py (the `mcp` package's server in stdio mode)
and npm's @modelcontextprotocol/server-everything (tests/stdio/package.json), and the
benchmark's bench/echo_over_stdio.py and bench/stdio_http_echo.py. When a bridge test fails, these
say whether the server or the bridge is at fault.

Every wait is bounded (anyio.fail_after); the SDK's stdio client closes stdin, then terminates the
server's process tree when a `Client` block ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TextIO

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError
from mcp_stdio_server import CRASH_STATUS, TOOLS
from processes import REPO, free_port, stop_process

pytestmark = pytest.mark.slow

WAIT = 20.0  # seconds any one step may take on a loaded machine
SERVER = REPO / "tests" / "mcp_stdio_server.py"
EVERYTHING = (
    REPO / "tests" / "stdio" / "node_modules" / "@modelcontextprotocol" / "server-everything"
)


def _text(result: types.CallToolResult) -> str:
    assert not result.is_error, result
    content = result.content[0]
    assert isinstance(content, types.TextContent), content
    return content.text


@contextmanager
def _stderr_file(tmp_path: Path) -> Iterator[TextIO]:
    # A real file: the child's stderr is its descriptor, read back by the test afterwards.
    with (tmp_path / "stderr.txt").open("w", encoding="utf-8") as errlog:
        yield errlog


async def _wait_for_text(path: Path, text: str) -> None:
    with anyio.fail_after(WAIT):
        while True:
            if text in await anyio.Path(path).read_text(encoding="utf-8"):
                return
            await anyio.sleep(0.02)


async def _elicit(
    context: ClientRequestContext, params: types.ElicitRequestParams
) -> types.ElicitResult:
    assert isinstance(params, types.ElicitRequestFormParams), params
    return types.ElicitResult(action="accept", content={"answer": f"re: {params.message}"})


async def _sample(
    context: ClientRequestContext, params: types.CreateMessageRequestParams
) -> types.CreateMessageResult:
    prompt = params.messages[0].content
    assert isinstance(prompt, types.TextContent), prompt
    return types.CreateMessageResult(
        role="assistant",
        content=types.TextContent(type="text", text=f"model says: {prompt.text}"),
        model="test-model",
    )


def _python_server(
    env: dict[str, str] | None = None, cwd: Path | None = None
) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=[str(SERVER)], env=env, cwd=cwd)


@pytest.mark.parametrize(
    ("mode", "version"), [("legacy", "2025-11-25"), ("auto", "2026-07-28")]
)
async def test_python_server_tools_identity_and_round_trips(
    tmp_path: Path, mode: Literal["legacy", "auto"], version: str
) -> None:
    """Both protocol generations: the 2025 handshake (server-to-client requests mid-call) and
    2026-07-28 (server/discover, then InputRequiredResult retries for elicitation and sampling)."""
    env = {"MCP_USER_SUB": "alice", "MCP_USER_EMAIL": "alice@example.com",
           "MCP_USER_ISSUER": "https://idp.example"}
    with _stderr_file(tmp_path) as errlog:
        transport = stdio_client(_python_server(env, tmp_path), errlog=errlog)
        with anyio.fail_after(WAIT):
            async with Client(
                transport, mode=mode, cache=None, read_timeout_seconds=WAIT,
                elicitation_callback=_elicit, sampling_callback=_sample,
            ) as client:
                assert client.protocol_version == version
                assert client.server_info is not None
                assert client.server_info.name == "mcp-stdio-server"
                listed = await client.list_tools()
                assert sorted(tool.name for tool in listed.tools) == sorted(TOOLS)
                schemas = {tool.name: tool.input_schema for tool in listed.tools}
                # The resolved parameters are not the caller's to give.
                assert set(schemas["ask"]["properties"]) == {"question"}
                assert set(schemas["sample"]["properties"]) == {"prompt"}

                assert _text(await client.call_tool("echo", {"text": "héllo"})) == "héllo"

                who = json.loads(_text(await client.call_tool("whoami")))
                assert who["user_sub"] == "alice"
                assert who["user_email"] == "alice@example.com"
                assert who["user_issuer"] == "https://idp.example"
                assert await anyio.Path(who["cwd"]).samefile(tmp_path)
                assert who["pid"] != os.getpid()

                seen: list[tuple[float, float | None, str | None]] = []

                async def on_progress(
                    progress: float, total: float | None, message: str | None
                ) -> None:
                    seen.append((progress, total, message))

                done = await client.call_tool(
                    "slow", {"steps": 3, "delay": 0.01}, progress_callback=on_progress
                )
                assert _text(done) == "slow done: 3 steps"
                assert seen == [(n, 3, f"step {n} of 3") for n in (1, 2, 3)]

                asked = await client.call_tool("ask", {"question": "colour?"})
                assert _text(asked) == "accept: re: colour?"

                sampled = await client.call_tool("sample", {"prompt": "hi"})
                assert _text(sampled) == "model says: hi"


async def test_python_server_stops_slow_work_when_cancelled(tmp_path: Path) -> None:
    stderr = tmp_path / "stderr.txt"
    with _stderr_file(tmp_path) as errlog:
        transport = stdio_client(_python_server(), errlog=errlog)
        with anyio.fail_after(WAIT):
            async with Client(transport, mode="legacy", cache=None,
                              read_timeout_seconds=WAIT) as client:
                first = anyio.Event()

                async def on_progress(
                    progress: float, total: float | None, message: str | None
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

                # The server stops well before its 1000 steps and says so on stderr.
                await _wait_for_text(stderr, "slow cancelled after ")
                assert "slow step 1000" not in stderr.read_text(encoding="utf-8")
                # The session outlives the cancelled call.
                assert _text(await client.call_tool("echo", {"text": "still here"})) == "still here"


async def test_python_server_crash_ends_the_session(tmp_path: Path) -> None:
    stderr = tmp_path / "stderr.txt"
    with _stderr_file(tmp_path) as errlog:
        transport = stdio_client(_python_server(), errlog=errlog)
        with anyio.fail_after(WAIT):
            async with Client(transport, mode="legacy", cache=None,
                              read_timeout_seconds=WAIT) as client:
                with pytest.raises(MCPError):
                    await client.call_tool("crash")
                with pytest.raises(MCPError):
                    await client.call_tool("echo", {"text": "anyone?"})
    assert "crashing" in stderr.read_text(encoding="utf-8").splitlines()


async def test_python_server_wire_is_one_json_line_per_message_and_crash_exits_3() -> None:
    """What the bridge sees without an SDK: one JSON-RPC message per stdout line, and `crash` ends
    the process with its status and no answer (stdout reaches end of file)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SERVER), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        init = {"protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "raw", "version": "0"}}
        messages: list[dict[str, Any]] = [
            {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
             "params": {"name": "echo", "arguments": {"text": "a\nb"}}},
        ]
        crash = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                 "params": {"name": "crash", "arguments": {}}}
        process.stdin.write(b"".join(json.dumps(m).encode() + b"\n" for m in messages))
        await process.stdin.drain()
        async with asyncio.timeout(WAIT):
            answers = [json.loads(await process.stdout.readline()) for _ in range(2)]
            # Requests run concurrently: the crash goes only once the echo is answered.
            process.stdin.write(json.dumps(crash).encode() + b"\n")
            await process.stdin.drain()
            rest = await process.stdout.read()  # until end of file: the process is gone
            status = await process.wait()
        assert [answer["id"] for answer in answers] == [1, 2]
        assert answers[1]["result"]["content"][0]["text"] == "a\nb"
        assert rest == b""  # never an answer to the crash
        assert status == CRASH_STATUS
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _everything_entry() -> list[str]:
    manifest: dict[str, Any] = json.loads((EVERYTHING / "package.json").read_text("utf-8"))
    bin_field = manifest["bin"]
    entry = bin_field if isinstance(bin_field, str) else next(iter(bin_field.values()))
    return [str(EVERYTHING / entry), "stdio"]


async def test_server_everything_lists_its_tools_over_stdio(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node is not None, "`node` is not on PATH: server-everything needs Node.js"
    assert EVERYTHING.is_dir(), "run: npm ci --prefix tests/stdio"
    params = StdioServerParameters(command=node, args=_everything_entry(), cwd=tmp_path)
    with _stderr_file(tmp_path) as errlog, anyio.fail_after(WAIT):
        async with Client(stdio_client(params, errlog=errlog), mode="legacy", cache=None,
                          read_timeout_seconds=WAIT) as client:
            listed = await client.list_tools()
            names = {tool.name for tool in listed.tools}
            assert "echo" in names, sorted(names)
            echoed = await client.call_tool("echo", {"message": "over stdio"})
            assert "over stdio" in _text(echoed)


# bench/echo_over_stdio.py and bench/stdio_http_echo.py: the benchmark's children, alike both ways.
BENCH = REPO / "bench"


async def _echo_through(client: Client) -> tuple[list[str], str]:
    listed = await client.list_tools()
    echoed = await client.call_tool("echo", {"text": "bench ✓"})
    return [tool.name for tool in listed.tools], _text(echoed)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_bench_stdio_echo_answers_the_sdk_client(
    tmp_path: Path, mode: Literal["legacy", "auto"]
) -> None:
    """`auto` tries 2026-07-28's server/discover first; the -32601 makes it fall back."""
    params = StdioServerParameters(command=sys.executable, args=[str(BENCH / "echo_over_stdio.py")])
    with _stderr_file(tmp_path) as errlog, anyio.fail_after(WAIT):
        async with Client(stdio_client(params, errlog=errlog), mode=mode, cache=None,
                          read_timeout_seconds=WAIT) as client:
            assert client.protocol_version == "2025-11-25"
            assert await _echo_through(client) == (["echo"], "bench ✓")
    assert (tmp_path / "stderr.txt").read_text(encoding="utf-8") == ""


async def test_bench_http_echo_answers_the_sdk_client() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH / "stdio_http_echo.py"), "--port", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                break
        with anyio.fail_after(WAIT):
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy", cache=None,
                              read_timeout_seconds=WAIT) as client:
                assert client.protocol_version == "2025-11-25"
                assert await _echo_through(client) == (["echo"], "bench ✓")
    finally:
        await stop_process(process)
    assert process.returncode == 0
