"""The tool-rules workload (issue 16), shared by bench/run.py and bench/tool_rules_micro.py.

- RULES: a TOOL_POLICY_FILE of 50 globs over three rules: two group rules allowing 20 tool globs
  each (the caller is in both groups) and an `everyone` rule denying 10. Every glob is on the
  caller's path: the 10 denials are tried first (none matches), then the 40 allowances, and the
  called tool (CALLED) matches the very last one, the worst case of one alternation per rule.
- CALL_BODY: a tools/call of CALLED with arguments of a realistic size (an issue to file).
- tools_list(): a tools/list answer of 200 tools (20 services x 10 verbs) with descriptions and
  input schemas like real servers', about 100 KB of JSON; the caller may use half of them (each
  service's get_* and list_* tools), the other half is filtered out.
"""

from __future__ import annotations

import json
from typing import Any

GROUPS_CLAIM_VALUE = ["mcp-readers", "mcp-writers", "staff"]
SERVICES = ("github", "gitlab", "jira", "slack", "linear", "notion", "confluence", "sentry",
            "datadog", "pagerduty", "stripe", "zendesk", "hubspot", "salesforce", "figma",
            "asana", "trello", "dropbox", "gdrive", "postgres")
VERBS = ("get_item", "get_details", "get_history", "list_items", "list_events", "search",
         "create_item", "update_item", "delete_item", "admin_reset")
ALLOWED_PREFIXES = ("get_", "list_")  # 5 of the 10 verbs: half the list is the caller's
DENY = ("*_delete_*", "*_admin_*", "*_purge*", "*_drop_*", "*_sudo*", "*_exec*", "*_shell*",
        "*_impersonate*", "*_export_all*", "*_rotate_keys*")
CALLED = f"{SERVICES[-1]}_list_items"  # matches the last allow glob of the last rule

TOOL_NAMES = tuple(f"{service}_{verb}" for service in SERVICES for verb in VERBS)
ALLOWED_NAMES = tuple(name for name in TOOL_NAMES if name.partition("_")[2].startswith(
    ALLOWED_PREFIXES))


def _allow_globs(services: tuple[str, ...]) -> list[str]:
    return [f"{service}_{prefix}*" for service in services for prefix in ALLOWED_PREFIXES]


def _toml_list(values: list[str] | tuple[str, ...]) -> str:
    return "[\n" + "".join(f"  {json.dumps(v)},\n" for v in values) + "]"


READERS = _allow_globs(SERVICES[:10])
WRITERS = _allow_globs(SERVICES[10:])
RULES = f"""\
# bench/tool_workload.py: 50 globs (20 + 20 allowed, 10 denied)
[[rule]]
name = "readers"
groups = ["mcp-readers"]
allow_tools = {_toml_list(READERS)}

[[rule]]
name = "writers"
groups = ["mcp-writers"]
allow_tools = {_toml_list(WRITERS)}

[[rule]]
everyone = true
deny_tools = {_toml_list(DENY)}
"""
GLOBS = len(READERS) + len(WRITERS) + len(DENY)

CALL_BODY = json.dumps({
    "jsonrpc": "2.0", "id": 1, "method": "tools/call",
    "params": {
        "name": CALLED,
        "arguments": {
            "database": "analytics", "schema": "public", "table": "events",
            "filter": {"kind": "signup", "since": "2026-11-01T00:00:00Z", "country": ["DE", "FR"]},
            "columns": ["id", "created_at", "user_id", "kind", "country", "referrer"],
            "order_by": "created_at", "descending": True, "limit": 100,
            "note": "Weekly signup review: compare referrers with the previous week and flag "
                    "anything over 20 % up or down.",
        },
        "_meta": {"progressToken": "c0ffee-42"},
    },
}, separators=(",", ":"))
LIST_BODY = '{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}'


def _tool(service: str, verb: str) -> dict[str, Any]:
    thing = verb.partition("_")[2] or "records"
    return {
        "name": f"{service}_{verb}",
        "description": (
            f"{verb.replace('_', ' ').capitalize()} in {service.title()} for the connected "
            f"workspace: the matching {thing} as JSON, paginated."),
        "inputSchema": {
            "type": "object",
            "properties": {
                "workspace": {"type": "string", "description": "Workspace or organisation "
                              "slug, as shown in its URL."},
                "query": {"type": "string", "description": "Free-text filter."},
                "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 25,
                          "description": "Items per page."},
            },
            "required": ["workspace"],
            "additionalProperties": False,
        },
        "annotations": {"readOnlyHint": verb.startswith(("get_", "list_", "search")),
                        "destructiveHint": verb.startswith(("delete_", "admin_"))},
    }


def tools_list() -> str:
    """The upstream's answer to LIST_BODY: 200 tools, compact JSON."""
    tools = [_tool(service, verb) for service in SERVICES for verb in VERBS]
    return json.dumps({"jsonrpc": "2.0", "id": 1,
                       "result": {"tools": tools, "nextCursor": "page-2"}},
                      separators=(",", ":"))


def sse_event(payload: str) -> bytes:
    """The same answer as one SSE event, as an MCP server streams it."""
    return f"event: message\ndata: {payload}\n\n".encode()
