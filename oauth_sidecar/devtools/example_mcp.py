"""A small, real MCP server (Streamable HTTP) for `oauth-sidecar demo` to protect.

Why: the demo must show a real MCP exchange through the sidecar with nothing but this package
installed, and the official MCP SDK is only a test dependency. It speaks the Streamable HTTP
transport of protocol revisions 2025-03-26, 2025-06-18 and 2025-11-25: `initialize` negotiates
the version and opens a session (`Mcp-Session-Id`, required on every later request, ended by
DELETE); notifications and responses are accepted with 202; requests are answered with one JSON
body (or one SSE event for a client that accepts only `text/event-stream`); GET offers no stream
(405). Its tools: `echo`, and `whoami`, which shows the identity the sidecar forwarded.

It listens on loopback behind the sidecar and, as the transport spec requires of local servers,
refuses a foreign Host or Origin (DNS rebinding).
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from oauth_sidecar import __version__
from oauth_sidecar.config import is_loopback_host
from oauth_sidecar.outcome import Handler

log = structlog.get_logger("oauth_sidecar.example_mcp")

MCP_PATH = "/mcp"
PROTOCOL_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")  # oldest first
LATEST = PROTOCOL_VERSIONS[-1]
MAX_SESSIONS = 1000  # oldest idle session dropped beyond this: bounded memory
SESSION_IDLE = 3600.0  # seconds
MAX_BODY = 1 << 20
IDENTITY_HEADERS = {"user": "X-Forwarded-User", "email": "X-Forwarded-Email",
                    "groups": "X-Forwarded-Groups", "issuer": "X-Forwarded-Issuer"}
# JSON-RPC 2.0 error codes (§5.1).
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602

TOOLS = [
    {
        "name": "echo",
        "title": "Echo",
        "description": "Return the given text unchanged.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}},
                        "required": ["text"]},
    },
    {
        "name": "whoami",
        "title": "Who am I",
        "description": "Show the identity the oauth-sidecar verified and forwarded "
                       "(X-Forwarded-User, -Email, -Groups, -Issuer).",
        "inputSchema": {"type": "object", "properties": {}},
    },
]


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(slots=True)
class Session:
    protocol_version: str
    last_used: float


def _rpc_error(status: int, code: int, message: str, request_id: Any = None) -> web.Response:
    body = {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
    return web.json_response(body, status=status)


def _text(text: str, *, error: bool = False) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": error}


class ExampleMcpServer:
    """Serves MCP at /mcp; everything else is 404."""

    def __init__(self) -> None:
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._local_only], client_max_size=MAX_BODY)
        app.router.add_post(MCP_PATH, self._post)
        app.router.add_delete(MCP_PATH, self._delete)
        app.router.add_get(MCP_PATH, self._get, allow_head=False)
        return app

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @web.middleware
    async def _local_only(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """MCP transport, Security Warning: validate Origin; bound to localhost, check Host."""
        host = urlsplit(f"//{request.host}").hostname
        origin = request.headers.get("Origin")
        if not is_loopback_host(host):
            return _rpc_error(421, INVALID_REQUEST, "Misdirected request: unknown Host")
        if origin is not None and not is_loopback_host(urlsplit(origin).hostname):
            return _rpc_error(403, INVALID_REQUEST, "Forbidden: Origin not allowed")
        return await handler(request)

    async def _get(self, request: web.Request) -> web.Response:
        # "The server MUST either return Content-Type: text/event-stream ... or else return
        # HTTP 405 Method Not Allowed": this server never sends unprompted messages.
        return web.Response(status=405, headers={"Allow": "POST, DELETE"})

    async def _delete(self, request: web.Request) -> web.Response:
        session_id = request.headers.get("Mcp-Session-Id")
        if session_id is None:
            return _rpc_error(400, INVALID_REQUEST, "Bad Request: Mcp-Session-Id is required")
        if self._sessions.pop(session_id, None) is None:
            return _rpc_error(404, INVALID_REQUEST, "Session not found")
        log.info("mcp_session_ended", sessions=len(self._sessions))
        return web.Response(status=204)

    def _session(self, session_id: str | None) -> Session | web.Response:
        if session_id is None:
            return _rpc_error(400, INVALID_REQUEST, "Bad Request: Mcp-Session-Id is required "
                              "(send initialize first)")
        session = self._sessions.get(session_id)
        now = time.monotonic()
        if session is None or now - session.last_used > SESSION_IDLE:
            self._sessions.pop(session_id, None)
            # 404: the client must start a new session with initialize.
            return _rpc_error(404, INVALID_REQUEST, "Session not found")
        session.last_used = now
        self._sessions.move_to_end(session_id)
        return session

    async def _post(self, request: web.Request) -> web.Response:
        accept = request.headers.get("Accept", "*/*").lower()
        json_ok = any(kind in accept for kind in ("application/json", "*/*", "application/*"))
        if not json_ok and "text/event-stream" not in accept:
            return _rpc_error(406, INVALID_REQUEST,
                              "Not Acceptable: accept application/json or text/event-stream")
        if request.content_type != "application/json":
            return _rpc_error(415, INVALID_REQUEST, "Unsupported Media Type: use application/json")
        try:
            message = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError, RecursionError):
            return _rpc_error(400, PARSE_ERROR, "Parse error")
        if isinstance(message, list):  # batches were removed in 2025-06-18; we never took them
            return _rpc_error(400, INVALID_REQUEST, "Batches are not supported")
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return _rpc_error(400, INVALID_REQUEST, "Invalid Request: not a JSON-RPC 2.0 message")
        version = request.headers.get("MCP-Protocol-Version")
        if version is not None and version not in PROTOCOL_VERSIONS:
            return _rpc_error(400, INVALID_REQUEST, f"Unsupported MCP-Protocol-Version: "
                              f"{version[:40]} (supported: {', '.join(PROTOCOL_VERSIONS)})")
        method, request_id = message.get("method"), message.get("id")
        headers: dict[str, str] = {}
        if method == "initialize" and "id" in message:
            result: Any = self._initialize(message.get("params"), headers)
        else:
            session = self._session(request.headers.get("Mcp-Session-Id"))
            if isinstance(session, web.Response):
                return session
            if "id" not in message or not isinstance(method, str):
                return web.Response(status=202)  # a notification or a response: accepted
            try:
                result = self._dispatch(method, message.get("params"), request)
            except RpcError as exc:
                return self._answer(request, {"jsonrpc": "2.0", "id": request_id,
                                              "error": {"code": exc.code, "message": exc.message}},
                                    json_ok, headers)
        return self._answer(request, {"jsonrpc": "2.0", "id": request_id, "result": result},
                            json_ok, headers)

    def _answer(self, request: web.Request, body: dict[str, Any], json_ok: bool,
                headers: dict[str, str]) -> web.Response:
        if json_ok:
            return web.json_response(body, headers=headers)
        event = f"event: message\ndata: {json.dumps(body)}\n\n"
        return web.Response(text=event, content_type="text/event-stream",
                            headers={**headers, "Cache-Control": "no-cache"})

    def _initialize(self, params: Any, headers: dict[str, str]) -> dict[str, Any]:
        requested = params.get("protocolVersion") if isinstance(params, dict) else None
        # Lifecycle, version negotiation: the client's version if we support it, else our latest.
        version = requested if requested in PROTOCOL_VERSIONS else LATEST
        session_id = secrets.token_urlsafe(24)  # visible ASCII, cryptographically random
        self._sessions[session_id] = Session(version, time.monotonic())
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        headers["Mcp-Session-Id"] = session_id
        client = params.get("clientInfo") if isinstance(params, dict) else None
        log.info("mcp_session_started", protocol_version=version,
                 client=str(client.get("name"))[:80] if isinstance(client, dict) else None)
        return {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": "oauth-sidecar-example", "title": "oauth-sidecar demo server",
                           "version": __version__},
            "instructions": "An example MCP server behind oauth-sidecar: `echo` returns its "
                            "text, `whoami` shows the identity the sidecar verified.",
        }

    def _dispatch(self, method: str, params: Any, request: web.Request) -> dict[str, Any]:
        if params is not None and not isinstance(params, dict):
            raise RpcError(INVALID_PARAMS, "params must be an object")
        params = params or {}
        if method == "ping":
            return {}
        if method == "tools/list":
            return {"tools": TOOLS}
        if method == "tools/call":
            return self._call(params.get("name"), params.get("arguments") or {}, request)
        raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method[:80]}")

    def _call(self, name: Any, arguments: Any, request: web.Request) -> dict[str, Any]:
        if not isinstance(arguments, dict):
            raise RpcError(INVALID_PARAMS, "arguments must be an object")
        if name == "echo":
            text = arguments.get("text")
            if not isinstance(text, str):  # a tool execution error the model can read
                return _text("echo needs a `text` argument (a string)", error=True)
            return _text(text)
        if name == "whoami":
            identity = {key: request.headers.get(header)
                        for key, header in IDENTITY_HEADERS.items()}
            if identity["user"] is None:
                return _text("No identity was forwarded (the sidecar's FORWARD_IDENTITY is off)")
            return _text(json.dumps(identity, sort_keys=True))
        raise RpcError(INVALID_PARAMS, f"Unknown tool: {str(name)[:80]}")
