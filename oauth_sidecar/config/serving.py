"""How the sidecar faces the network: the listener's bounds, the metrics listener, the proxies
whose forwarded addresses are believed, and the request headers never sent upstream.

Why checked at start-up: a head bound that cannot carry the largest allowed token, or metrics
served on the public port, would only show up as refused requests or a leak in production.
"""

from __future__ import annotations

import ipaddress
import re

from oauth_sidecar.config.model import IPNetwork, ListenerConfig, MetricsConfig, SpawnConfig
from oauth_sidecar.config.reader import Reader, split_list

# Bytes a request head needs beside its largest header: the request line and ordinary headers.
HEAD_ROOM = 8192
# A header name (RFC 9110 §5.6.2 token) starting with a letter or digit, or such a prefix and `*`.
STRIP_ENTRY = re.compile(r"[a-z0-9][a-z0-9!#$%&'+.^`|~-]*\*?")


def listener(r: Reader, max_header: int) -> ListenerConfig:
    max_head = r.number("MAX_REQUEST_HEAD_BYTES", int, 16384, 1 << 24)
    if max_head < max_header + HEAD_ROOM:
        r.problems.append(
            f"MAX_REQUEST_HEAD_BYTES={max_head} cannot carry one header of MAX_HEADER_BYTES="
            f"{max_header} beside the request line and ordinary headers: use at least "
            f"{max_header + HEAD_ROOM}"
        )
    return ListenerConfig(
        max_head_bytes=max_head,
        head_timeout=r.number("REQUEST_HEAD_TIMEOUT_SECONDS", float, 0.1, 3600.0),
        keepalive_timeout=r.number("KEEPALIVE_TIMEOUT_SECONDS", float, 0.1, 86400.0),
        max_connections=r.number("MAX_CONNECTIONS", int, 1, 1 << 20),
    )


def metrics(r: Reader, port: int, spawn: SpawnConfig | None) -> MetricsConfig | None:
    if not r.raw("METRICS_PORT"):
        return None
    metrics_port = r.number("METRICS_PORT", int, 1, 65535)
    if metrics_port == port:
        r.problems.append(f"METRICS_PORT={metrics_port} is PORT: metrics are served on a listener "
                          "of their own, never on the public port")
    if spawn is not None and metrics_port == spawn.port:
        r.problems.append(f"METRICS_PORT={metrics_port} is MCP_SPAWN_PORT, the child's port")
    return MetricsConfig(host=r.raw("METRICS_HOST"), port=metrics_port)


def strip_request_headers(r: Reader) -> tuple[str, ...]:
    """Matched like the proxy matches names: case-insensitively, `_` and `-` alike."""
    entries = []
    for entry in split_list(r.raw("STRIP_REQUEST_HEADERS")):
        normal = entry.lower().replace("_", "-")
        if STRIP_ENTRY.fullmatch(normal):
            entries.append(normal)
        else:
            r.problems.append(f"STRIP_REQUEST_HEADERS entry {entry!r} is not a header name or a "
                              "name prefix ending in * (like x-internal-*)")
    return tuple(dict.fromkeys(entries))


def networks(r: Reader, name: str) -> tuple[IPNetwork, ...]:
    found = []
    for item in split_list(r.raw(name)):
        try:
            found.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            r.problems.append(f"{name} entry {item!r} is not an IP address or CIDR")
    return tuple(found)
