"""Official-SDK (mcp 2.x) MCP server with things for tool rules to bite on, for end-to-end tests.

Run as ``python tests/mcp_tools_server.py --host 127.0.0.1 --port N --calls-file PATH``.
Serves Streamable HTTP at ``/mcp`` (answers as SSE, or as JSON with ``--json-response``):

* tools ``search(query)``, ``get_doc(doc_id)``, ``write_note(text)``, ``delete_everything()``;
* prompts ``summary(topic)`` and ``secret_plan()``;
* resources ``file:///public/readme.txt`` and ``file:///private/keys.txt``, and the templates
  ``file:///public/{name}`` and ``file:///private/{name}``.

Every tool call, prompt get and resource read appends one JSON line to ``--calls-file``
(``{"method": ..., "name": ...}``), written before it answers, so a test proves from outside the
process what the server ran, and what it never saw. ``get_doc("crash-the-server")`` records its
call and then ends the process at once, without an answer. tests/mcp_echo_server.py stays as it is:
other tests count its tools.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path
from types import FrameType

import uvicorn
from mcp.server.mcpserver import MCPServer

TOOLS = ["search", "get_doc", "write_note", "delete_everything"]
PROMPTS = ["summary", "secret_plan"]
RESOURCES = ["file:///public/readme.txt", "file:///private/keys.txt"]
TEMPLATES = ["file:///public/{name}", "file:///private/{name}"]
CRASH = "crash-the-server"


def build_server(calls_file: Path) -> MCPServer:
    server: MCPServer = MCPServer("mcp-tools-server", log_level="WARNING")

    def ran(method: str, name: str) -> None:
        with calls_file.open("a", encoding="utf-8") as calls:
            calls.write(json.dumps({"method": method, "name": name}) + "\n")

    @server.tool()
    def search(query: str) -> str:
        """Search the documents."""
        ran("tools/call", "search")
        return f"found: {query}"

    @server.tool()
    def get_doc(doc_id: str) -> str:
        """Read one document."""
        ran("tools/call", "get_doc")
        if doc_id == CRASH:  # the server dies mid-call: its answer never comes
            os._exit(3)
        return f"doc {doc_id}"

    @server.tool()
    def write_note(text: str) -> str:
        """Write a note."""
        ran("tools/call", "write_note")
        return f"noted: {text}"

    @server.tool()
    def delete_everything() -> str:
        """Delete every document."""
        ran("tools/call", "delete_everything")
        return "deleted everything"

    @server.prompt()
    def summary(topic: str) -> str:
        """Summarise a topic."""
        ran("prompts/get", "summary")
        return f"Summarise {topic}."

    @server.prompt()
    def secret_plan() -> str:
        """The secret plan."""
        ran("prompts/get", "secret_plan")
        return "The secret plan."

    @server.resource("file:///public/readme.txt", mime_type="text/plain")
    def public_readme() -> str:
        ran("resources/read", "file:///public/readme.txt")
        return "public readme"

    @server.resource("file:///private/keys.txt", mime_type="text/plain")
    def private_keys() -> str:
        ran("resources/read", "file:///private/keys.txt")
        return "private keys"

    @server.resource("file:///public/{name}", mime_type="text/plain")
    def public_file(name: str) -> str:
        ran("resources/read", f"file:///public/{name}")
        return f"public {name}"

    @server.resource("file:///private/{name}", mime_type="text/plain")
    def private_file(name: str) -> str:
        ran("resources/read", f"file:///private/{name}")
        return f"private {name}"

    return server


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # As in mcp_echo_server.py: uvicorn re-raises the signal after a graceful shutdown.
    raise SystemExit(0)


async def serve(
    host: str, port: int, calls_file: Path, *, json_response: bool, log_level: str = "warning"
) -> None:
    server = build_server(calls_file)
    app = server.streamable_http_app(
        streamable_http_path="/mcp", host=host, json_response=json_response
    )
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
        timeout_graceful_shutdown=2,
    )
    await uvicorn.Server(config).serve()


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--calls-file", type=Path, required=True)
    parser.add_argument("--json-response", action="store_true")
    parser.add_argument("--log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.calls_file, json_response=args.json_response,
                      log_level=args.log_level))


if __name__ == "__main__":
    main()
