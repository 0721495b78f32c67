"""Remote clients' MCP roots kept away from stdio children (MCP_SPAWN_CLIENT_ROOTS=drop).

Why: roots are a local client telling a local server which of *its* directories to work in. A
stdio child behind the bridge runs on the sidecar's host, so a remote client's roots name paths
there, chosen by the caller: @modelcontextprotocol/server-filesystem replaces the directories on
its command line with the client's roots, and every child runs under the sidecar's uid, so one
user could declare another user's MCP_SPAWN_WORKDIR_ROOT directory (or /) as a root and read it.
So by default the child never learns that the client has roots: the `roots` capability is taken
out of `initialize` (before 2026-07-28) and out of each request's `_meta` client capabilities
(2026-07-28), `notifications/roots/list_changed` is not passed on, and a child that asks
`roots/list` anyway is answered by the bridge with an error, never the client's list.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, Any]

CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"  # MCP 2026-07-28 (SEP-2575)
METHOD_NOT_FOUND = -32601


def _without_roots(capabilities: Any) -> Any:
    if isinstance(capabilities, dict) and "roots" in capabilities:
        return {name: value for name, value in capabilities.items() if name != "roots"}
    return capabilities


def without_client_roots(message: Message) -> Message | None:
    """The client's message as the child may see it (the same object when nothing is taken
    out); None: it is not passed on at all."""
    method = message.get("method")
    if method == "notifications/roots/list_changed":
        return None
    params = message.get("params")
    if method is None or not isinstance(params, dict):
        return message
    kept = params
    if method == "initialize":
        capabilities = params.get("capabilities")
        if (stripped := _without_roots(capabilities)) is not capabilities:
            kept = {**kept, "capabilities": stripped}
    meta = params.get("_meta")
    if isinstance(meta, dict):
        capabilities = meta.get(CAPABILITIES_META)
        if (stripped := _without_roots(capabilities)) is not capabilities:
            kept = {**kept, "_meta": {**meta, CAPABILITIES_META: stripped}}
    return message if kept is params else {**message, "params": kept}


def roots_refusal(message: Message) -> Message | None:
    """The bridge's own answer to a child's roots/list request (None for any other message)."""
    if message.get("method") != "roots/list" or "id" not in message:
        return None
    return {"jsonrpc": "2.0", "id": message["id"], "error": {
        "code": METHOD_NOT_FOUND, "message": "The client's roots are not available to this "
        "server (MCP_SPAWN_CLIENT_ROOTS=drop)"}}
