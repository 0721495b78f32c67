"""Minimal official-SDK (mcp 2.x) MCP server for end-to-end tests.

Run as ``python tests/mcp_echo_server.py --host 127.0.0.1 --port N``.
Serves Streamable HTTP at ``/mcp`` with two tools:

* ``echo(text)`` returns ``text`` unchanged.
* ``whoami()`` returns a JSON object of the HTTP request headers the server
  received for the ``tools/call`` request (lower-cased names), so a test can
  assert that e.g. ``authorization`` was stripped by a proxy in front of it.

The SDK auto-enables DNS-rebinding protection when ``--host`` is 127.0.0.1,
localhost or ::1: the Host header must be ``127.0.0.1:<port>``,
``localhost:<port>`` or ``[::1]:<port>`` (421 otherwise) and an Origin header,
if present, must be ``http://`` + one of those (403 otherwise).
``--no-dns-rebinding-protection`` turns the check off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from types import FrameType

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings


def build_server() -> MCPServer:
    server: MCPServer = MCPServer("mcp-echo-server", log_level="WARNING")

    @server.tool()
    def echo(text: str) -> str:
        """Return the given text unchanged."""
        return text

    @server.tool()
    def whoami(ctx: Context) -> str:
        """Return the HTTP request headers this tool call arrived with, as a JSON object."""
        headers = ctx.headers or {}
        return json.dumps({name.lower(): value for name, value in headers.items()}, sort_keys=True)

    return server


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # uvicorn captures SIGTERM/SIGINT while serving, shuts down gracefully and
    # then re-raises the signal with the previous handler restored; ending with
    # SystemExit(0) here makes that a clean exit (status 0, no traceback).
    raise SystemExit(0)


async def serve(
    host: str,
    port: int,
    *,
    dns_rebinding_protection: bool = True,
    log_level: str = "warning",
) -> None:
    server = build_server()
    security = (
        None
        if dns_rebinding_protection
        else TransportSecuritySettings(enable_dns_rebinding_protection=False)
    )
    app = server.streamable_http_app(
        streamable_http_path="/mcp", host=host, transport_security=security
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        # Safety net: bound how long shutdown waits for open (e.g. SSE) connections.
        timeout_graceful_shutdown=2,
    )
    await uvicorn.Server(config).serve()


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
    )
    parser.add_argument("--no-dns-rebinding-protection", action="store_true")
    args = parser.parse_args(argv)
    asyncio.run(
        serve(
            args.host,
            args.port,
            dns_rebinding_protection=not args.no_dns_rebinding_protection,
            log_level=args.log_level,
        )
    )


if __name__ == "__main__":
    main()
