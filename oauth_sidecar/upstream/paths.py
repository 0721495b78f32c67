"""Where a public path goes upstream, and the way back for the URLs the upstream names.

Why: the resource path maps onto MCP_UPSTREAM_PATH on the way up. An upstream that names its own
URLs (a redirect's `Location`, a `Content-Location`) knows only its internal address: passed on
as is, it tells every client where the MCP server really listens and sends it where it cannot
go. Such URLs are given back under RESOURCE_URL's origin with the path mapped back (as nginx's
`proxy_redirect default` does). Both directions live here so they cannot disagree.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
# Names a server on this machine calls itself: an upstream on 127.0.0.1 may say `localhost`.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _split_reference(reference: str) -> tuple[str, str]:
    """(path, the query and fragment as sent)."""
    cut = min((i for i in (reference.find("?"), reference.find("#")) if i >= 0),
              default=len(reference))
    return reference[:cut], reference[cut:]


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PathMap:
    """RESOURCE_URL's path <-> MCP_UPSTREAM_PATH; every other path is the same on both sides."""

    def __init__(self, resource_path: str, upstream_prefix: str) -> None:
        self._resource = resource_path
        self._prefix = upstream_prefix

    def upstream(self, path: str) -> str:
        """The upstream path a public (raw) path is forwarded to."""
        prefix, resource = self._prefix, self._resource
        if not prefix:
            return path
        if not resource:
            return prefix if path == "/" else prefix + path
        if path == resource or path.startswith(resource + "/"):
            return prefix + path[len(resource):]
        return path

    def public(self, path: str) -> str | None:
        """The public path that reaches this upstream path; None when no public path does (an
        upstream path under the resource path but outside MCP_UPSTREAM_PATH, or, for an
        origin-only RESOURCE_URL, any path outside MCP_UPSTREAM_PATH)."""
        prefix, resource = self._prefix, self._resource
        if not prefix:
            return path
        if path == prefix or path.startswith(prefix + "/"):
            rest = path[len(prefix):]
            if resource:
                return resource + rest
            if rest == "/":  # the public root goes to the prefix itself: none goes to prefix/
                return None
            return rest or "/"
        if not resource or path == resource or path.startswith(resource + "/"):
            return None
        return path


class LocationRewriter:
    """Gives back an upstream's `Location` or `Content-Location` (RFC 9110 §10.2.2, §8.7) under
    the public origin; URLs of other origins and relative-path references pass unchanged."""

    def __init__(self, paths: PathMap, upstream_origin: str, public_origin: str) -> None:
        self._paths = paths
        self._public_origin = public_origin
        parts = urlsplit(upstream_origin)
        self._scheme = parts.scheme
        host, port = parts.hostname or "", parts.port or DEFAULT_PORTS.get(parts.scheme)
        hosts = LOOPBACK_NAMES | {host} if _is_loopback(host) else frozenset({host})
        self._upstream = frozenset((parts.scheme, name, port) for name in hosts)

    def rewrite(self, value: str) -> str | None:
        """The value to send to the client; None: drop the header (no public URL reaches it)."""
        if value.startswith("/") and not value.startswith("//"):
            # An absolute path resolves against the public origin at the client: map it back.
            path, rest = _split_reference(value)
            public = self._paths.public(path)
            return None if public is None else public + rest
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            return value  # not a URL anyone can follow, nor one of the upstream's
        if not parts.netloc:
            return value  # relative to the request URL: resolves alike on both sides
        scheme = parts.scheme.lower() or self._scheme  # "//host/x" takes the request's scheme
        origin = (scheme, (parts.hostname or "").lower(), port or DEFAULT_PORTS.get(scheme))
        if origin not in self._upstream:
            return value
        after = value[value.index("//") + 2 + len(parts.netloc):]
        path, rest = _split_reference(after)
        public = self._paths.public(path or "/")
        return None if public is None else self._public_origin + public + rest
