"""URLs in the configuration: their checks, their canonical forms, and how messages show them.

Why here: the issuer, the resource, the upstream and the CORS origins are compared byte for byte
later (RFC 9728 §3, RFC 8414 §3.3), so each is checked and put in one canonical form at start-up;
and a URL may carry a password, so no message ever quotes its user-info.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

# A URI scheme (RFC 3986 §3.1 syntax), lowercase as urlsplit returns it.
SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
# What a URL that cannot be split gets told; the ValueError's own text may quote a piece of a
# password (it names the "port" it could not read).
# A host name as DNS writes it, lowercase: LDH labels of 1..63 characters, no trailing dot.
DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_DNS_NAME = 253
UNSPLITTABLE = "is not a valid URL (no port number after a colon, or an unmatched bracket)"


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_dns_name(host: str) -> bool:
    """A lowercase DNS host name (no IP address: its last label is never all digits, RFC 3696
    §2, so neither 10.0.0.1 nor the number 2130706433 passes for a name)."""
    labels = host.split(".")
    return (len(host) <= MAX_DNS_NAME and all(DNS_LABEL.fullmatch(label) for label in labels)
            and not labels[-1].isdigit())


def origin(scheme: str, host: str, port: int | None) -> str:
    """scheme://host[:port], an IPv6 host in brackets, the scheme's default port left out."""
    shown = f"[{host}]" if ":" in host else host
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{shown}"
    return f"{scheme}://{shown}:{port}"


def shown_url(value: str) -> str:
    """A URL as it may appear in a message: never its user-info (it may hold a password)."""
    scheme, sep, rest = value.partition("://")
    # Up to the last @, not the first /: a password may hold an unencoded / ? or # itself.
    if sep and "@" in rest:
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return value


def check_url(name: str, raw: str, problems: list[str], *, allow_http: bool = False) -> bool:
    """True if raw is an absolute http(s) URL without credentials or fragment."""
    value = shown_url(raw)
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        problems.append(f"{name}={value!r} {UNSPLITTABLE}")
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{name}={value!r} must be an absolute http(s) URL")
        return False
    if parts.username or parts.password:
        problems.append(f"{name} must not contain credentials")
        return False
    if parts.fragment:
        problems.append(f"{name}={value!r} must not contain a fragment (#...)")
        return False
    if parts.scheme == "http" and not allow_http and not is_loopback_host(parts.hostname):
        problems.append(
            f"{name}={value!r} uses plain http off loopback: use https "
            "(http is accepted only for 127.0.0.1, ::1 and localhost)"
        )
        return False
    return True


def canonical_resource(value: str) -> tuple[str, str]:
    """RFC 9728 §3: clients compare `resource` byte for byte with the URL they use."""
    parts = urlsplit(value)
    path = parts.path.rstrip("/")
    return origin(parts.scheme.lower(), parts.hostname or "", parts.port) + path, path
