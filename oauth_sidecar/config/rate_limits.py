"""The rate limits and their storage: memory, or a Redis the replicas share.

Why the storage URI is parsed here: it may carry a password, so it is split once into the form
the `limits` library takes (password included), the form people see (none), and the password's
spellings for the log's mask; no message ever quotes the URI itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from oauth_sidecar.config.model import RateLimitConfig
from oauth_sidecar.config.reader import Reader
from oauth_sidecar.config.urls import SCHEME

RATE_LIMIT_SCHEMES = {"memory": "async+memory", "redis": "async+redis", "rediss": "async+rediss",
                      "redis+unix": "async+redis+unix"}
# A Redis database number as redis-py reads it from the path: /0, / or nothing.
REDIS_DATABASE_PATH = re.compile(r"(?:/[0-9]*)?")
# redis-py also takes the password as a query parameter (redis://host:6379/0?password=...).
PASSWORD_PARAMETER = "password"  # noqa: S105 - a parameter's name, not a secret
ENCODE_HINT = "; percent-encode / ? # @ % in its user name and password (%2F %3F %23 %40 %25)"


class StorageUriError(ValueError):
    """RATE_LIMIT_STORAGE_URI cannot be used; the message never quotes the URI (it may hold a
    password, and a password with an unencoded / or ? ends up anywhere in it)."""


@dataclass(frozen=True, slots=True)
class StorageUri:
    limits_form: str
    shown: str
    secrets: tuple[str, ...] = ()


def parse_storage_uri(uri: str) -> StorageUri:
    """The rate-limit storage, parsed once: the `limits` form (password included), the form
    shown to people, and the password's spellings; raises StorageUriError."""
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in RATE_LIMIT_SCHEMES:
        named = f" ({scheme}://)" if sep and SCHEME.fullmatch(scheme) else ""
        raise StorageUriError(f"is not memory:// or a redis:// URI: its scheme{named} is not "
                              f"one of {', '.join(RATE_LIMIT_SCHEMES)}")
    limits_uri = f"{RATE_LIMIT_SCHEMES[scheme]}://{rest}"
    if scheme == "memory":
        return StorageUri(limits_uri, "memory://")
    hint = ENCODE_HINT if "@" in uri else ""  # the likely cause when credentials are written
    try:
        parts = urlsplit(uri)
        port = parts.port
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        raise StorageUriError(f"is not a valid URI (no port number after a colon, or an "
                              f"unmatched bracket){hint}") from None
    after_host = parts.path + parts.query + parts.fragment
    if parts.netloc.count("@") > 1 or "@" in after_host or parts.fragment:
        raise StorageUriError(f"has an @ or a # outside its user name and password{hint}")
    if scheme == "redis+unix":
        if parts.hostname or not parts.path:
            raise StorageUriError(f"must name a socket path, like redis+unix:///run/redis.sock"
                                  f"{hint}")
    elif not parts.hostname or port is None:
        raise StorageUriError(f"must name a host and a port, like redis://host:6379/0{hint}")
    elif not REDIS_DATABASE_PATH.fullmatch(parts.path):
        raise StorageUriError(f"must end in a database number, like /0{hint}")
    user_info, at, host = parts.netloc.rpartition("@")
    written = [parts.password or ""]
    written += [value for name, value in query if name == PASSWORD_PARAMETER]
    secrets = {form for value in written if value for form in (value, unquote(value))}
    shown_query = "&".join(f"{name}=***" if name == PASSWORD_PARAMETER else f"{name}={value}"
                           for name, value in query)
    shown = (f"{scheme}://{'***@' if at and user_info else ''}{host}{parts.path}"
             f"{'?' if shown_query else ''}{shown_query}")
    return StorageUri(limits_uri, shown, tuple(sorted(secrets, key=len, reverse=True)))


def rate_limits(r: Reader) -> RateLimitConfig:
    try:
        storage = parse_storage_uri(r.secret("RATE_LIMIT_STORAGE_URI") or "memory://")
    except StorageUriError as exc:
        r.problems.append(f"RATE_LIMIT_STORAGE_URI {exc}")
        storage = StorageUri("", "")
    return RateLimitConfig(
        per_subject_rpm=r.number("RATE_LIMIT_RPM", int, 0, 1_000_000),
        unauthenticated_rpm=r.number("RATE_LIMIT_UNAUTHENTICATED_RPM", int, 0, 1_000_000),
        storage_uri=storage.limits_form,
        fail_open=r.choice("RATE_LIMIT_ON_STORAGE_ERROR", ("allow", "deny")) == "allow",
        storage_shown=storage.shown,
        storage_secrets=storage.secrets,
    )
