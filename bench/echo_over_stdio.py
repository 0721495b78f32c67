"""The tiniest stdio MCP server: an `echo` tool over newline-delimited JSON-RPC, no SDK.

Why: the stdio bridge's benchmark (issue 18) measures what the bridge adds, so the child must cost
next to nothing itself; the official SDKs' servers spend more per message than a relay does. Run
as `python bench/echo_over_stdio.py` (the bridge starts it); it reads one JSON-RPC message per stdin
line and writes each answer as one stdout line, flushed, until stdin ends (exit 0).

It answers `initialize` (the client's protocol version when it is one of VERSIONS, else the
newest), `ping`, `tools/list` (one tool, `echo(text)`) and `tools/call` of `echo` (the text back
as one text content block); another method is a -32601 error (so a 2026-07-28 client's
`server/discover` falls back to the handshake, as with any handshake-era server), an unknown tool
-32602, a line that is not JSON -32700. Notifications and responses get no answer. Requests are
answered one at a time, in order. bench/stdio_http_echo.py serves the same answers over HTTP.
"""

from __future__ import annotations

import json
import sys
from typing import Any

VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
SERVER_INFO = {"name": "bench-stdio-echo", "version": "1.0.0"}
ECHO_TOOL = {
    "name": "echo",
    "description": "Return the given text unchanged.",
    "inputSchema": {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
    },
}


def _error(message_id: Any, code: int, text: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": message_id, "error": {"code": code, "message": text}}


def answer(message: Any) -> dict[str, Any] | None:
    """The answer to one parsed JSON-RPC message; None for a notification or a response."""
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        if isinstance(message, dict) and ("result" in message or "error" in message):
            return None  # a response to a request we never send: nothing to say
        return _error(None, -32600, "invalid request")
    if "id" not in message:
        return None  # a notification (initialized, cancelled, ...)
    message_id = message["id"]
    method = message["method"]
    params = message.get("params") or {}
    if method == "initialize":
        asked = params.get("protocolVersion")
        result: dict[str, Any] = {
            "protocolVersion": asked if asked in VERSIONS else VERSIONS[-1],
            "capabilities": {"tools": {}},
            "serverInfo": SERVER_INFO,
        }
    elif method == "ping":
        result = {}
    elif method == "tools/list":
        result = {"tools": [ECHO_TOOL]}
    elif method == "tools/call":
        arguments = params.get("arguments") or {}
        if params.get("name") != "echo" or not isinstance(arguments.get("text"), str):
            return _error(message_id, -32602, "unknown tool or bad arguments")
        result = {"content": [{"type": "text", "text": arguments["text"]}], "isError": False}
    else:
        return _error(message_id, -32601, f"method not found: {method}")
    return {"jsonrpc": "2.0", "id": message_id, "result": result}


def answer_line(line: bytes) -> bytes | None:
    """One stdin line in, one stdout line (with its newline) out, or None."""
    try:
        message = json.loads(line)
    except ValueError:
        reply: dict[str, Any] | None = _error(None, -32700, "parse error")
    else:
        reply = answer(message)
    if reply is None:
        return None
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"


def main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        for line in stdin:
            if not line.strip():
                continue
            reply = answer_line(line)
            if reply is not None:
                stdout.write(reply)
                stdout.flush()
    except BrokenPipeError:  # the reader went away first: as good as the end of stdin
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
