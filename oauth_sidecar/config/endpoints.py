"""The URLs the sidecar stands between: the issuer it trusts, the resource it publishes, the
upstream it forwards to (with its credential), and the browser origins it answers.

Why canonical forms here: each is compared byte for byte later (issuer in tokens, resource by
clients, origins by CORS), so each is checked and normalised once, at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from oauth_sidecar.config.files import MAX_SECRET_FILE_BYTES, read_capped_text
from oauth_sidecar.config.model import SpawnConfig
from oauth_sidecar.config.reader import Reader, split_list
from oauth_sidecar.config.urls import (
    UNSPLITTABLE,
    canonical_resource,
    check_url,
    origin,
    shown_url,
)


def issuer(r: Reader) -> str:
    allow_http = r.flag("OIDC_ALLOW_HTTP")
    value = r.required("OIDC_ISSUER_URL", "the issuer URL of your OpenID provider")
    if value and check_url("OIDC_ISSUER_URL", value, r.problems, allow_http=allow_http) and (
        urlsplit(value).query
    ):
        r.problems.append("OIDC_ISSUER_URL must not contain a query (RFC 8414 §2)")
    return value


def resource(r: Reader) -> tuple[str, str]:
    """The canonical RESOURCE_URL and its path ("", "" when it is not usable)."""
    raw = r.required("RESOURCE_URL", "the public URL clients use, e.g. https://h/mcp")
    if raw and check_url("RESOURCE_URL", raw, r.problems):
        if urlsplit(raw).query:
            r.problems.append("RESOURCE_URL must not contain a query")
        else:
            return canonical_resource(raw)
    return "", ""


@dataclass(frozen=True, slots=True)
class Upstream:
    origin: str
    path: str


def upstream(r: Reader, spawn: SpawnConfig | None) -> Upstream:
    """Where requests go: MCP_UPSTREAM_URL, or the spawned child on loopback; none for stdio
    children (upstream/stdio_bridge.py talks to them through pipes)."""
    if spawn is not None and spawn.stdio:
        if r.raw("MCP_UPSTREAM_URL"):
            r.problems.append(
                "MCP_UPSTREAM_URL and MCP_SPAWN_CMD are both set: choose one upstream"
            )
        return Upstream("", "")
    if spawn is not None:
        raw = f"http://127.0.0.1:{spawn.port}"
        if r.raw("MCP_UPSTREAM_URL"):
            r.problems.append(
                "MCP_UPSTREAM_URL and MCP_SPAWN_CMD are both set: choose one upstream"
            )
    else:
        raw = r.required(
            "MCP_UPSTREAM_URL", "the URL of the MCP server to protect (or MCP_SPAWN_CMD)"
        )
    found, path = "", r.raw("MCP_UPSTREAM_PATH")
    if path and not path.startswith("/"):
        r.problems.append(f"MCP_UPSTREAM_PATH={path!r} must start with /")
    if raw and check_url("MCP_UPSTREAM_URL", raw, r.problems, allow_http=True):
        parts = urlsplit(raw)
        found = origin(parts.scheme.lower(), parts.hostname or "", parts.port)
        url_path = parts.path.rstrip("/")
        if parts.query:
            r.problems.append("MCP_UPSTREAM_URL must not contain a query")
        if url_path and path:
            r.problems.append(
                "MCP_UPSTREAM_URL has a path and MCP_UPSTREAM_PATH is set: give the path once"
            )
        path = path or url_path
    return Upstream(found, path.rstrip("/"))


def upstream_bearer_file(r: Reader) -> str:
    """MCP_UPSTREAM_BEARER_FILE, checked readable now; upstream/credential.py reads it."""
    path = r.raw("MCP_UPSTREAM_BEARER_FILE")
    if not path:
        return path
    try:
        content = read_capped_text(path, MAX_SECRET_FILE_BYTES).strip()
    except (OSError, UnicodeDecodeError) as exc:
        r.problems.append(f"MCP_UPSTREAM_BEARER_FILE cannot be read: {exc}")
        return path
    if not content:
        r.problems.append(f"MCP_UPSTREAM_BEARER_FILE {path} is empty")
    elif any(c in content for c in "\r\n\0"):
        r.problems.append(f"MCP_UPSTREAM_BEARER_FILE {path} has more than one line")
    return path


@dataclass(frozen=True, slots=True)
class CorsOrigins:
    origins: frozenset[str]
    any_origin: bool


def cors_origins(r: Reader) -> CorsOrigins:
    items = split_list(r.raw("CORS_ALLOW_ORIGINS"))
    found: set[str] = set()
    for item in items:
        if item == "*":
            continue
        try:
            parts = urlsplit(item)
            port = parts.port
        except ValueError:  # its text may quote a piece of a password
            r.problems.append(f"CORS_ALLOW_ORIGINS entry {shown_url(item)!r} {UNSPLITTABLE}")
            continue
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
            r.problems.append(
                f"CORS_ALLOW_ORIGINS entry {shown_url(item)!r} is not an origin like https://h"
            )
            continue
        found.add(origin(parts.scheme.lower(), parts.hostname, port))
    return CorsOrigins(frozenset(found), "*" in items)
