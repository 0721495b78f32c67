"""The spawned MCP server: its command line, its transport (HTTP on a port, or JSON-RPC lines on
stdin/stdout), the bounds of the stdio children, and the environment it inherits.

Why an allow-list environment: the child is someone else's program, and the sidecar's
environment holds the IdP client secret, the sealing key and the Redis password; the child gets
enough to run and what the operator names, never those.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Mapping

from oauth_sidecar.config.model import SpawnConfig
from oauth_sidecar.config.reader import Reader, split_list

# What a child inherits by default: enough to run a program, nothing that could be a secret.
CHILD_ENV_BASE = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME")
CHILD_ENV_PREFIX = "MCP_SPAWN_ENV_"  # MCP_SPAWN_ENV_FOO=bar gives the child FOO=bar
# The sidecar's own credentials never go to the child, even if listed in MCP_SPAWN_ENV.
CHILD_ENV_FORBIDDEN = frozenset({
    "STATIC_CLIENT_SECRET", "STATE_SECRET", "RATE_LIMIT_STORAGE_URI", "MCP_UPSTREAM_BEARER_FILE",
    "STATIC_CLIENT_SECRET_FILE", "STATE_SECRET_FILE", "RATE_LIMIT_STORAGE_URI_FILE",
    "INTROSPECTION_CLIENT_SECRET", "INTROSPECTION_CLIENT_SECRET_FILE",
})  # fmt: skip


def _spawn_argv(r: Reader, command: str) -> tuple[str, ...]:
    """A JSON array of strings, or shell-like words (quotes honoured, no shell is run)."""
    if command.startswith("["):
        try:
            parsed = json.loads(command)
        except ValueError:
            parsed = None
        if not isinstance(parsed, list) or not parsed or not all(
            isinstance(a, str) for a in parsed
        ):
            r.problems.append("MCP_SPAWN_CMD looks like JSON but is not an array of strings")
            return ()
        return tuple(parsed)
    try:
        words = shlex.split(command)
    except ValueError as exc:
        r.problems.append(f"MCP_SPAWN_CMD cannot be split into words: {exc}")
        return ()
    if not words:
        r.problems.append("MCP_SPAWN_CMD is empty")
    return tuple(words)


TRANSPORTS = ("http", "stdio")
SCOPES = ("session", "subject")


def _transport(r: Reader, port_raw: str) -> str:
    """http with a port, stdio without one, unless MCP_SPAWN_TRANSPORT says; each needs its
    port (or its absence) to be right."""
    transport = r.choice("MCP_SPAWN_TRANSPORT", TRANSPORTS) if r.raw("MCP_SPAWN_TRANSPORT") else (
        "http" if port_raw else "stdio")
    if transport == "http" and not port_raw:
        r.problems.append("MCP_SPAWN_TRANSPORT=http needs MCP_SPAWN_PORT: the port the child "
                          "listens on")
    if transport == "stdio" and port_raw:
        r.problems.append("MCP_SPAWN_TRANSPORT=stdio with MCP_SPAWN_PORT: a stdio child listens "
                          "on no port (unset MCP_SPAWN_PORT)")
    return transport


def spawn(r: Reader, env: Mapping[str, str]) -> SpawnConfig | None:
    command, port_raw = r.raw("MCP_SPAWN_CMD"), r.raw("MCP_SPAWN_PORT")
    if not command:
        if port_raw:
            r.problems.append("MCP_SPAWN_PORT is set without MCP_SPAWN_CMD")
        return None
    transport = _transport(r, port_raw)
    port = r.number("MCP_SPAWN_PORT", int, 1, 65535) if port_raw else 0
    argv = _spawn_argv(r, command)
    child_env = {name: env[name] for name in CHILD_ENV_BASE if name in env}
    for name in split_list(r.raw("MCP_SPAWN_ENV")):
        if name in CHILD_ENV_FORBIDDEN:
            r.problems.append(f"MCP_SPAWN_ENV lists {name}: the sidecar's secrets never go to the "
                              "child")
        elif name in env:
            child_env[name] = env[name]
    for name, value in env.items():
        if name.startswith(CHILD_ENV_PREFIX) and len(name) > len(CHILD_ENV_PREFIX):
            child_env[name.removeprefix(CHILD_ENV_PREFIX)] = value
    if argv:
        program = argv[0]
        found = shutil.which(program, path=child_env.get("PATH", os.defpath))
        if found is None:
            shown = "not executable" if os.path.exists(program) else "not found"
            r.problems.append(f"MCP_SPAWN_CMD program {program!r} is {shown} (PATH of the child: "
                              f"{child_env.get('PATH', os.defpath)})")
    ready_path = r.raw("MCP_SPAWN_READY_PATH")
    if ready_path and not ready_path.startswith("/"):
        r.problems.append(f"MCP_SPAWN_READY_PATH={ready_path!r} must start with /")
    return SpawnConfig(
        argv=argv, port=port, env=child_env,
        ready_timeout=r.number("MCP_SPAWN_READY_TIMEOUT_SECONDS", float, 0.5, 3600.0),
        ready_path=ready_path,
        restart=r.choice("MCP_SPAWN_RESTART", ("always", "never")) == "always",
        max_restarts=r.number("MCP_SPAWN_MAX_RESTARTS", int, 0, 1000),
        stop_timeout=r.number("MCP_SPAWN_STOP_TIMEOUT_SECONDS", float, 0.0, 600.0),
        transport=transport,
        scope=r.choice("MCP_SPAWN_SCOPE", SCOPES),
        max_processes=r.number("MCP_SPAWN_MAX_PROCESSES", int, 1, 100_000),
        max_per_subject=r.number("MCP_SPAWN_MAX_PER_SUBJECT", int, 1, 100_000),
        idle_seconds=r.number("MCP_SPAWN_IDLE_SECONDS", float, 0.1, 30 * 86400.0),
        workdir_root=_workdir_root(r),
        max_line_bytes=r.number("MCP_SPAWN_MAX_LINE_BYTES", int, 1024, 1 << 30),
        client_roots=r.choice("MCP_SPAWN_CLIENT_ROOTS", ("drop", "pass")) == "pass",
    )


def _workdir_root(r: Reader) -> str:
    """MCP_SPAWN_WORKDIR_ROOT, made absolute; it must be a directory already (the subjects'
    directories inside it are created on first use)."""
    root = r.raw("MCP_SPAWN_WORKDIR_ROOT")
    if root and not os.path.isdir(root):
        r.problems.append(f"MCP_SPAWN_WORKDIR_ROOT {root} is not a directory")
    return os.path.abspath(root) if root else ""
