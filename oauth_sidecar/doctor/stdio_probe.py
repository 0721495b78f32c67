"""`check` with a stdio MCP server: start the command once, as a session would, and ask it.

Why: in stdio mode no child runs until a caller's first `initialize`, so a command that cannot
start, or that writes logs on stdout (which desynchronises any JSON-RPC reader), would only show
at the first sign-in. The probe starts one child with the children's environment, sends
`initialize` (protocol 2025-11-25), `notifications/initialized` and `tools/list`, reads the
answers within a bound, and stops the child's whole process group: what it saw, or why not.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from oauth_sidecar.config import SpawnConfig
from oauth_sidecar.upstream.stdio_child import ChildGone, LineCounters, StdioChild

PROBE_PROTOCOL = "2025-11-25"
PROBE_SECONDS = 30.0  # the whole exchange: npx and uvx may fetch the server first


@dataclass
class StdioProbe:
    pid: int | None = None
    server: str = ""
    """serverInfo name and version, and the protocol version it chose."""
    tools: list[str] = field(default_factory=list)
    failure: str = ""
    """Why the exchange did not complete ("" when it did)."""
    dropped_lines: int = 0
    """stdout lines that were not JSON-RPC (logs written to stdout break every session)."""


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


async def probe_stdio(spawn: SpawnConfig, within: float = PROBE_SECONDS) -> StdioProbe:
    """Run one child through initialize and tools/list; always stops it."""
    result = StdioProbe()
    answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    counters = LineCounters()
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_exit(how: str) -> None:
        if not ended.done():
            ended.set_result(how)

    child = StdioChild(spawn.argv, spawn.env, cwd=spawn.workdir_root or None, subject="check",
                       max_line_bytes=spawn.max_line_bytes, stop_timeout=spawn.stop_timeout,
                       counters=counters, on_message=lambda m, _: answers.put_nowait(m),
                       on_exit=on_exit)

    async def answer(request_id: int) -> dict[str, Any]:
        while True:
            waiting: asyncio.Future[Any] = asyncio.ensure_future(answers.get())
            either: set[asyncio.Future[Any]] = {waiting, ended}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                waiting.cancel()
                raise ChildGone(f"the server exited ({ended.result()}) before answering")
            message: dict[str, Any] = waiting.result()
            if message.get("id") == request_id and "method" not in message:
                return message

    try:
        await child.start()
    except OSError as exc:
        result.failure = f"the command cannot start: {exc}"
        return result
    result.pid = child.pid
    try:
        async with asyncio.timeout(within):
            await child.send(_line({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": PROBE_PROTOCOL, "capabilities": {},
                "clientInfo": {"name": "oauth-sidecar check", "version": "1"}}}))
            initialized = await answer(1)
            info = initialized.get("result")
            if not isinstance(info, dict):
                result.failure = f"initialize was refused: {initialized.get('error')}"
                return result
            named = info.get("serverInfo")
            server: dict[str, Any] = named if isinstance(named, dict) else {}
            result.server = (f"{server.get('name', '?')} {server.get('version', '')}".strip()
                             + f", protocol {info.get('protocolVersion')}")
            await child.send(_line({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            await child.send(_line({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
            listed = (await answer(2)).get("result")
            tools = listed.get("tools") if isinstance(listed, dict) else None
            result.tools = [t["name"] for t in tools or []
                            if isinstance(t, dict) and isinstance(t.get("name"), str)]
    except TimeoutError:
        result.failure = f"no answer within {within:g} s"
    except ChildGone as exc:
        result.failure = str(exc) or "the server stopped reading its stdin"
    finally:
        await child.stop()
        result.dropped_lines = counters.dropped
    return result
