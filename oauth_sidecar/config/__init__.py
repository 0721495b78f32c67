"""Configuration, parsed once from the environment into frozen values.

Why: a misconfigured auth proxy must refuse to start, listing every problem at once, rather than
fail at the first request or, worse, let requests through. Nothing downstream reads the
environment again. Variable names and meanings follow the Node project `mcp-oauth-proxy`, so
its users can switch by changing the image.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import json
import os
import re
import shlex
import shutil
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Asymmetric only: a JWKS entry must never be usable as an HMAC secret (CVE-2022-29217 class).
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
DEFAULT_ALGORITHMS = "RS256,RS384,RS512,PS256,PS384,PS512,ES256,ES384,EdDSA"
DEFAULT_CORS_ORIGINS = "https://claude.ai,https://claude.com"
DEFAULT_REDIRECT_URIS = (
    "https://claude.ai/api/mcp/auth_callback,https://claude.com/api/mcp/auth_callback"
)
MAX_ALLOW_FILE_BYTES = 1 << 20  # a million characters of entries: far beyond any real list
# Bytes a request head needs beside its largest header: the request line and ordinary headers.
HEAD_ROOM = 8192
MIN_STATE_SECRET = 32  # characters: at least 128 bits of a random hex or base64 key
MAX_SECRET_FILE_BYTES = 65536  # a key, a password or a URI: far beyond any real one
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
# Cognito access tokens carry no `aud`, only the app client's id in `client_id`.
AUDIENCE_CLAIMS = ("aud", "client_id")
# How ID tokens presented as access tokens are told apart (tokens.py): by what they say they are,
# also by naming no client (for IdPs whose access tokens have the client id as aud), or not at all.
ID_TOKEN_CHECKS = ("marked", "client", "off")

# Every variable we accept, with its default ("" = unset) and meaning; --help and .env.example
# are checked against this table by the tests.
VARIABLES: dict[str, tuple[str, str]] = {
    "OIDC_ISSUER_URL": ("", "Issuer URL of your OpenID provider (required)."),
    "OIDC_AUDIENCE": ("", "Accepted `aud` values, comma-separated (required)."),
    "JWT_AUDIENCE_CLAIM": ("aud", "Claim holding the audience: aud, or client_id (AWS Cognito)."),
    "JWT_ID_TOKEN_CHECK": ("marked", "Refuse ID tokens: marked, client (+ no client claim), off."),
    "RESOURCE_URL": ("", "Public URL of the MCP endpoint, e.g. https://h/mcp (required)."),
    "MCP_UPSTREAM_URL": ("", "URL of the MCP server to forward to (required)."),
    "MCP_UPSTREAM_PATH": ("", "Upstream path that RESOURCE_URL's path maps to, e.g. /mcp."),
    "HOST": ("0.0.0.0", "Bind address."),  # noqa: S104 - a container sidecar listens on all
    "PORT": ("8080", "Listen port."),
    "LOG_LEVEL": ("info", "debug, info, warning or error."),
    "LOG_FORMAT": ("auto", "json, console, or auto (console on a terminal, JSON otherwise)."),
    "EVENT_LOOP": ("auto", "auto (uvloop when installed), uvloop, or asyncio."),
    "CORS_ALLOW_ORIGINS": (DEFAULT_CORS_ORIGINS, "Browser origins allowed, comma-separated."),
    "SCOPES_SUPPORTED": ("", "Scopes advertised in metadata and the 401 challenge."),
    "JWT_ALGORITHMS": (DEFAULT_ALGORITHMS, "Accepted JWS algorithms (asymmetric only)."),
    "JWT_LEEWAY_SECONDS": ("30", "Clock skew tolerated for exp, nbf and iat."),
    "JWT_MAX_TOKEN_BYTES": ("16384", "Longest bearer token accepted."),
    "TOKEN_CACHE_SIZE": ("10000", "Verified tokens remembered until expiry (0 disables)."),
    "JWKS_COOLDOWN_SECONDS": ("30", "Least time between key-set fetches for unknown kids."),
    "JWKS_REFRESH_SECONDS": ("3600", "Background key refresh when the IdP sends no max-age."),
    "IDP_TIMEOUT_SECONDS": ("10", "Timeout of each discovery or JWKS fetch."),
    "OIDC_ALLOW_HTTP": ("false", "Allow a plain-http issuer off loopback (never in production)."),
    "UPSTREAM_CONNECT_TIMEOUT_SECONDS": ("10", "Timeout to connect to the upstream."),
    "UPSTREAM_RESPONSE_TIMEOUT_SECONDS": ("300", "Timeout until the upstream's response headers."),
    "UPSTREAM_IDLE_TIMEOUT_SECONDS": ("300", "Idle timeout between body chunks (0 = none)."),
    "SSE_IDLE_TIMEOUT_SECONDS": ("0", "Idle timeout for text/event-stream bodies (0 = none)."),
    "REQUEST_BODY_TIMEOUT_SECONDS": ("30", "Longest silence within a request body (then 408)."),
    "CLIENT_WRITE_TIMEOUT_SECONDS": ("60", "Longest a client may stop reading an answer."),
    "MAX_STREAMS_PER_SUBJECT": ("32", "Requests that may become event streams, per subject."),
    "MAX_REQUEST_BODY_BYTES": ("10485760", "Largest request body forwarded."),
    "MAX_HEADER_BYTES": ("32768", "Largest single request header (large Entra tokens)."),
    "MAX_REQUEST_HEAD_BYTES": ("65536", "Largest request head: request line and all headers."),
    "REQUEST_HEAD_TIMEOUT_SECONDS": ("20", "Time a client gets to send a request head (then 408)."),
    "KEEPALIVE_TIMEOUT_SECONDS": ("75", "Idle time before a kept-alive connection is closed."),
    "MAX_CONNECTIONS": ("512", "Open client connections at most (lowered to fit the descriptor "
                        "limit); more get 503."),
    "SHUTDOWN_TIMEOUT_SECONDS": ("20", "Time in-flight requests get to finish on SIGTERM."),
    "ALLOW_SUBS": ("", "Subjects (`sub`) allowed, comma-separated."),
    "ALLOW_EMAILS": ("", "Verified emails allowed, comma-separated (ASCII case-insensitive)."),
    "ALLOW_EMAIL_DOMAINS": ("", "Domains whose verified emails are allowed, e.g. example.com."),
    "ALLOW_GROUPS": ("", "Groups allowed (from GROUPS_CLAIM), comma-separated."),
    "ALLOW_SUBS_FILE": ("", "File of subjects allowed, one per line; re-read when it changes."),
    "ALLOW_EMAILS_FILE": ("", "File of emails allowed, one per line; re-read when it changes."),
    "ALLOW_EMAIL_DOMAINS_FILE": ("", "File of email domains allowed; re-read when it changes."),
    "ALLOW_GROUPS_FILE": ("", "File of groups allowed, one per line; re-read when it changes."),
    "ALLOW_ALL_AUTHENTICATED": ("false", "Admit every valid token when no allow-list is set."),
    "GROUPS_CLAIM": ("groups", "Claim holding the groups: a dotted path, or a URL (one name)."),
    "INSECURE_ALLOW_UNVERIFIED_EMAIL": ("false", "Match emails without email_verified=true."),
    "REQUIRED_SCOPES": ("", "Scopes every token must carry (`scope` or `scp`)."),
    "RATE_LIMIT_RPM": ("60", "Requests per minute per subject (0 = unlimited)."),
    "RATE_LIMIT_UNAUTHENTICATED_RPM": ("600", "Token verifications, refused tokens and sign-in "
                                       "calls per minute per client IP."),
    "RATE_LIMIT_STORAGE_URI": ("memory://", "memory://, or redis://host:port/db to share."),
    "RATE_LIMIT_STORAGE_URI_FILE": ("", "File holding RATE_LIMIT_STORAGE_URI (its password)."),
    "RATE_LIMIT_ON_STORAGE_ERROR": ("allow", "allow or deny requests while the storage fails."),
    "TRUSTED_PROXIES": ("", "Proxy addresses/CIDRs whose X-Forwarded-For is believed."),
    "FORWARD_IDENTITY": ("false", "Send X-Forwarded-User/Email/Groups/Issuer upstream."),
    "STRIP_REQUEST_HEADERS": ("", "More request headers never sent upstream: names, prefix*."),
    "MCP_UPSTREAM_BEARER_FILE": ("", "File with a static token sent upstream as Bearer."),
    "SESSION_BINDING_TTL_SECONDS": ("86400", "How long an idle Mcp-Session-Id stays bound."),
    "AUTH_SERVER_MODE": ("", "direct or facade (default: facade with STATIC_CLIENT_ID)."),
    "STATIC_CLIENT_ID": ("", "Client id at the IdP handed out by /oauth/register."),
    "STATIC_CLIENT_SECRET": ("", "Its secret; added by the /token relay, never published."),
    "STATIC_CLIENT_SECRET_FILE": ("", "File holding STATIC_CLIENT_SECRET (a mounted secret)."),
    "STATIC_CLIENT_CONFIDENTIAL": ("false", "Publish the secret in /oauth/register answers."),
    "ALLOWED_REDIRECT_URIS": (DEFAULT_REDIRECT_URIS, "Client redirect URIs accepted, exactly."),
    "ALLOW_LOOPBACK_REDIRECTS": ("true", "Also accept http://127.0.0.1|localhost|[::1]:any/..."),
    "STATE_SECRET": ("", "Key sealing the relay's state and codes (share it across replicas)."),
    "STATE_SECRET_FILE": ("", "File holding STATE_SECRET (a mounted secret)."),
    "MCP_SPAWN_CMD": ("", "Run this MCP server as a child (shell-like words or a JSON array)."),
    "MCP_SPAWN_PORT": ("", "Port the child listens on, on 127.0.0.1."),
    "MCP_SPAWN_READY_TIMEOUT_SECONDS": ("60", "Time the child gets to accept connections."),
    "MCP_SPAWN_READY_PATH": ("", "Optional HTTP path probed for readiness (any status < 500)."),
    "MCP_SPAWN_RESTART": ("always", "always: restart with backoff; never: exit when it dies."),
    "MCP_SPAWN_MAX_RESTARTS": ("5", "Crashes within 5 minutes before giving up (stays down)."),
    "MCP_SPAWN_STOP_TIMEOUT_SECONDS": ("10", "SIGTERM-to-SIGKILL grace for the child's group."),
    "MCP_SPAWN_ENV": ("", "Names of the sidecar's variables to pass to the child."),
    "METRICS_PORT": ("", "Serve Prometheus metrics at /metrics on this port (unset = off)."),
    "METRICS_HOST": ("127.0.0.1", "Bind address of the metrics listener."),
}

# Prefixes of variables that are ours: an unknown one is most likely a typo.
OWN_PREFIXES = (
    "OIDC_", "MCP_", "JWT_", "JWKS_", "ALLOW_", "RATE_LIMIT", "CORS_", "STATIC_", "UPSTREAM_",
    "SSE_", "IDP_", "TOKEN_", "SCOPES", "RESOURCE", "MAX_", "SHUTDOWN_", "REQUIRED_", "GROUPS_",
    "INSECURE_", "TRUSTED_", "FORWARD_", "SESSION_", "AUTH_", "STATE_", "ALLOWED_", "METRICS_",
    "REQUEST_", "KEEPALIVE_", "STRIP_", "CLIENT_",
)  # fmt: skip
RATE_LIMIT_SCHEMES = {"memory": "async+memory", "redis": "async+redis", "rediss": "async+rediss",
                      "redis+unix": "async+redis+unix"}


class ConfigError(Exception):
    """The environment cannot be turned into a working configuration."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class IdpConfig:
    issuer: str
    timeout: float
    jwks_cooldown: float
    jwks_refresh: float
    max_document_bytes: int = 1 << 20


@dataclass(frozen=True, slots=True)
class TokenConfig:
    issuer: str
    audiences: tuple[str, ...]
    algorithms: frozenset[str]
    leeway: int
    max_token_bytes: int
    cache_size: int
    audience_claim: str = "aud"
    """Where the audience is: `aud` (RFC 9068), or `client_id` for AWS Cognito access tokens."""
    id_token_check: str = "marked"  # noqa: S105 - a mode's name, not a secret
    """marked: refuse tokens that say they are ID tokens; client: also those naming no client."""


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    origin: str
    """scheme://host[:port] of the upstream, no path."""
    path_prefix: str
    """Upstream path that the resource path maps to ("" keeps paths unchanged)."""
    connect_timeout: float
    response_timeout: float
    idle_timeout: float | None
    sse_idle_timeout: float | None
    max_body_bytes: int
    body_timeout: float
    """Longest silence between two pieces of a request body."""
    client_write_timeout: float
    """Longest a write to a client that stopped reading may wait."""
    max_streams_per_subject: int
    """0: unlimited."""


@dataclass(frozen=True, slots=True)
class AllowFile:
    """An allow-list kept in a file (a Kubernetes ConfigMap), united with its variable's entries."""

    kind: str
    """subs, emails, email_domains or groups: the PolicyConfig field it feeds."""
    path: str
    from_variable: frozenset[str]
    """The entries of the plain variable (ALLOW_EMAILS for ALLOW_EMAILS_FILE), always kept."""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    subs: frozenset[str]
    emails: frozenset[str]
    """A-Z lowercased (ascii_lower), nothing else changed."""
    email_domains: frozenset[str]
    """A-Z lowercased, without "@"."""
    groups: frozenset[str]
    groups_claim: tuple[str, ...]
    """The dotted path, split: ("realm_access", "roles")."""
    allow_all_authenticated: bool
    allow_unverified_email: bool
    required_scopes: tuple[str, ...]
    files: tuple[AllowFile, ...] = ()
    """Allow-lists re-read when their file changes; their entries are already in the sets above."""


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    per_subject_rpm: int
    unauthenticated_rpm: int
    storage_uri: str
    """In the `limits` library's form (async+memory://, async+redis://...), password included."""
    fail_open: bool
    storage_shown: str = "memory://"
    """The URI as messages, logs and reports show it: no user-info, no password parameter."""
    storage_secrets: tuple[str, ...] = ()
    """The URI's password as written (percent-encoded) and decoded: masked in every log line."""

    @property
    def shared(self) -> bool:
        """The storage is a Redis that replicas share (the redemption store goes there too)."""
        return not self.storage_uri.startswith("async+memory")


@dataclass(frozen=True, slots=True)
class AuthServerConfig:
    facade: bool
    """True: we are the authorization server clients see, relaying to the IdP (RFC 9207-safe)."""
    client_id: str
    client_secret: str
    publish_secret: bool
    redirect_uris: frozenset[str]
    allow_loopback_redirects: bool
    state_secret: str
    """"" means: a random key per process (a single replica)."""


@dataclass(frozen=True, slots=True)
class SpawnConfig:
    argv: tuple[str, ...]
    port: int
    env: dict[str, str]
    """The child's whole environment: an allow-list, never the sidecar's secrets."""
    ready_timeout: float
    ready_path: str
    restart: bool
    max_restarts: int
    stop_timeout: float


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """The bounds of the HTTP listener on HOST:PORT (listener.py)."""

    max_head_bytes: int
    head_timeout: float
    keepalive_timeout: float
    max_connections: int


@dataclass(frozen=True, slots=True)
class Config:
    host: str
    port: int
    log_level: str
    log_format: str
    event_loop: str
    """"uvloop" or "asyncio", resolved from EVENT_LOOP."""
    resource_url: str
    """Canonical: lowercase scheme and host, no default port, no trailing slash."""
    resource_path: str
    """Path of resource_url, "" for an origin-only URL."""
    scopes: tuple[str, ...]
    cors_origins: frozenset[str]
    cors_any_origin: bool
    max_header_bytes: int
    shutdown_timeout: float
    listener: ListenerConfig
    idp: IdpConfig
    tokens: TokenConfig
    upstream: UpstreamConfig
    policy: PolicyConfig
    rate_limits: RateLimitConfig
    trusted_proxies: tuple[IPNetwork, ...]
    forward_identity: bool
    strip_request_headers: tuple[str, ...]
    """Lowercase, `_` as `-`; an entry ending in `*` is a prefix."""
    upstream_bearer_file: str
    session_ttl: float
    auth_server: AuthServerConfig
    spawn: SpawnConfig | None = None
    metrics: MetricsConfig | None = None
    """None: no metrics listener (METRICS_PORT unset)."""
    warnings: tuple[str, ...] = ()

    @property
    def advertised_scopes(self) -> tuple[str, ...]:
        """Scopes named in metadata and challenges: SCOPES_SUPPORTED, else REQUIRED_SCOPES."""
        return self.scopes or self.policy.required_scopes

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value held here, for the log's mask (secret_mask.py). The upstream
        credential is not among them: it stays in its file, re-read when that changes."""
        auth = self.auth_server
        held = (auth.client_secret, auth.state_secret, *self.rate_limits.storage_secrets)
        return tuple(dict.fromkeys(value for value in held if value))


class _Reader:
    """Reads variables, collecting every problem instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def raw(self, name: str) -> str:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return VARIABLES[name][0]
        return value.strip()

    def secret(self, name: str) -> str:
        """NAME, or the content of the file NAME_FILE names, so that no secret needs to be in
        the environment (a mounted Kubernetes or Docker secret). Never both: which one wins
        would be a guess. One trailing newline, as `echo` and editors leave, is not part of it."""
        path = self.env.get(f"{name}_FILE", "").strip()
        if not path:
            return self.raw(name)
        if self.env.get(name, "").strip():
            self.problems.append(f"{name} and {name}_FILE are both set: give the secret once")
            return ""
        try:
            with open(path, "rb") as file:
                content = file.read(MAX_SECRET_FILE_BYTES + 1)
        except OSError as exc:
            self.problems.append(f"{name}_FILE {path} cannot be read: {exc.strerror or exc}")
            return ""
        if len(content) > MAX_SECRET_FILE_BYTES:
            self.problems.append(f"{name}_FILE {path} is larger than {MAX_SECRET_FILE_BYTES} bytes")
            return ""
        try:
            value = content.decode().removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError:
            self.problems.append(f"{name}_FILE {path} is not UTF-8 text")
            return ""
        if not value.strip():
            self.problems.append(f"{name}_FILE {path} is empty")
        elif any(c in value for c in "\r\n\0"):
            self.problems.append(f"{name}_FILE {path} has more than one line")
        else:
            return value
        return ""

    def required(self, name: str, hint: str) -> str:
        value = self.raw(name)
        if not value:
            self.problems.append(f"{name} is required: {hint}")
        return value

    def number(self, name: str, cast: Callable[[str], T], low: T, high: T) -> T:
        value = self.raw(name)
        try:
            parsed = cast(value)
        except ValueError:
            self.problems.append(f"{name}={value!r} is not a number")
            return cast(VARIABLES[name][0] or str(low))  # no default (a port): any placeholder
        if not low <= parsed <= high:  # type: ignore[operator]
            self.problems.append(f"{name}={value} is out of range: use {low}..{high}")
        return parsed

    def flag(self, name: str) -> bool:
        value = self.raw(name).lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value not in ("0", "false", "no", "off"):
            self.problems.append(f"{name}={value!r} is not a boolean: use true or false")
        return False

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name).lower()
        if value not in choices:
            self.problems.append(f"{name}={value!r} is not one of {', '.join(choices)}")
        return value


def _event_loop(choice: str, problems: list[str]) -> str:
    """uvloop is an optional extra (`pip install 'oauth-sidecar[uvloop]'`): faster sockets."""
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not installed:
        problems.append("EVENT_LOOP=uvloop but uvloop is not installed "
                        "(pip install 'oauth-sidecar[uvloop]')")
    return "uvloop" if choice == "uvloop" or (choice == "auto" and installed) else "asyncio"


# Only A-Z: str.lower() also folds U+212A KELVIN SIGN onto "k", so an address registered with it
# would match an ASCII entry; no other case folding or Unicode normalisation is ever applied.
ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def ascii_lower(value: str) -> str:
    """Emails and domains compare case-insensitively in ASCII alone (RFC 5321 §2.4 leaves the
    local part's case to the mailbox's host; RFC 4343 folds only ASCII in domain names)."""
    # str.lower() is exact on ASCII and much faster than translate(): keep it for that case.
    return value.lower() if value.isascii() else value.translate(ASCII_LOWER)


def split_list(value: str) -> tuple[str, ...]:
    """Comma- or space-separated items, order kept, duplicates and blanks dropped."""
    items = (item.strip() for item in value.replace(",", " ").split())
    return tuple(dict.fromkeys(item for item in items if item))


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(scheme: str, host: str, port: int | None) -> str:
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


def _check_url(name: str, raw: str, problems: list[str], *, allow_http: bool = False) -> bool:
    """True if raw is an absolute http(s) URL without credentials or fragment."""
    value = shown_url(raw)
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:  # its text quotes the "port", which may be a piece of a password
        problems.append(f"{name}={value!r} is not a valid URL (no port number after a colon, "
                        "or an unmatched bracket)")
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
    return _origin(parts.scheme.lower(), parts.hostname or "", parts.port) + path, path


def _unknown_variable_warnings(env: Mapping[str, str]) -> list[str]:
    known = set(VARIABLES)
    warnings = []
    for name in sorted(env):
        if name in known or not name.startswith(OWN_PREFIXES):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"{name} is not a variable oauth_sidecar knows and is ignored{hint}")
    return warnings


def load(env: Mapping[str, str]) -> Config:
    """Parse the whole configuration or raise ConfigError listing every problem."""
    r = _Reader(env)
    problems = r.problems

    allow_http = r.flag("OIDC_ALLOW_HTTP")
    issuer = r.required("OIDC_ISSUER_URL", "the issuer URL of your OpenID provider")
    if issuer and _check_url("OIDC_ISSUER_URL", issuer, problems, allow_http=allow_http) and (
        urlsplit(issuer).query
    ):
        problems.append("OIDC_ISSUER_URL must not contain a query (RFC 8414 §2)")

    audiences = split_list(
        r.required("OIDC_AUDIENCE", "the `aud` your IdP puts in access tokens for this server")
    )

    resource_raw = r.required("RESOURCE_URL", "the public URL clients use, e.g. https://h/mcp")
    resource_url, resource_path = "", ""
    if resource_raw and _check_url("RESOURCE_URL", resource_raw, problems):
        if urlsplit(resource_raw).query:
            problems.append("RESOURCE_URL must not contain a query")
        else:
            resource_url, resource_path = canonical_resource(resource_raw)

    spawn = _spawn(r, env)
    if spawn is not None:
        upstream_raw = f"http://127.0.0.1:{spawn.port}"
        if r.raw("MCP_UPSTREAM_URL"):
            problems.append("MCP_UPSTREAM_URL and MCP_SPAWN_CMD are both set: choose one upstream")
    else:
        upstream_raw = r.required(
            "MCP_UPSTREAM_URL", "the URL of the MCP server to protect (or MCP_SPAWN_CMD)"
        )
    upstream_origin, upstream_path = "", r.raw("MCP_UPSTREAM_PATH")
    if upstream_path and not upstream_path.startswith("/"):
        problems.append(f"MCP_UPSTREAM_PATH={upstream_path!r} must start with /")
    if upstream_raw and _check_url("MCP_UPSTREAM_URL", upstream_raw, problems, allow_http=True):
        parts = urlsplit(upstream_raw)
        upstream_origin = _origin(parts.scheme.lower(), parts.hostname or "", parts.port)
        url_path = parts.path.rstrip("/")
        if parts.query:
            problems.append("MCP_UPSTREAM_URL must not contain a query")
        if url_path and upstream_path:
            problems.append(
                "MCP_UPSTREAM_URL has a path and MCP_UPSTREAM_PATH is set: give the path once"
            )
        upstream_path = upstream_path or url_path
    upstream_path = upstream_path.rstrip("/")

    algorithms = frozenset(split_list(r.raw("JWT_ALGORITHMS")))
    bad_algs = sorted(algorithms - ASYMMETRIC_ALGORITHMS)
    if bad_algs:
        problems.append(
            f"JWT_ALGORITHMS has {', '.join(bad_algs)}: only asymmetric algorithms are accepted "
            f"({', '.join(sorted(ASYMMETRIC_ALGORITHMS))})"
        )
    if not algorithms:
        problems.append("JWT_ALGORITHMS is empty")

    cors_items = split_list(r.raw("CORS_ALLOW_ORIGINS"))
    cors_any = "*" in cors_items
    cors_origins: set[str] = set()
    for item in cors_items:
        if item == "*":
            continue
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
            problems.append(
                f"CORS_ALLOW_ORIGINS entry {shown_url(item)!r} is not an origin like https://h"
            )
            continue
        cors_origins.add(_origin(parts.scheme.lower(), parts.hostname, parts.port))

    port = r.number("PORT", int, 1, 65535)
    leeway = r.number("JWT_LEEWAY_SECONDS", int, 0, 300)
    max_token = r.number("JWT_MAX_TOKEN_BYTES", int, 1024, 1 << 20)
    max_header = r.number("MAX_HEADER_BYTES", int, 8190, 1 << 21)
    if max_header < max_token + len("Bearer "):
        problems.append(
            f"MAX_HEADER_BYTES={max_header} cannot carry a token of JWT_MAX_TOKEN_BYTES={max_token}"
        )
    listener = _listener(r, max_header)
    policy = _policy(r)
    rate_limits = _rate_limits(r)
    trusted_proxies = _networks(r, "TRUSTED_PROXIES")
    bearer_file = r.raw("MCP_UPSTREAM_BEARER_FILE")
    if bearer_file:
        try:
            with open(bearer_file, encoding="utf-8") as handle:
                content = handle.read().strip()
            if not content:
                problems.append(f"MCP_UPSTREAM_BEARER_FILE {bearer_file} is empty")
            elif any(c in content for c in "\r\n\0"):
                problems.append(f"MCP_UPSTREAM_BEARER_FILE {bearer_file} has more than one line")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"MCP_UPSTREAM_BEARER_FILE cannot be read: {exc}")
    idle = r.number("UPSTREAM_IDLE_TIMEOUT_SECONDS", float, 0.0, 86400.0)
    sse_idle = r.number("SSE_IDLE_TIMEOUT_SECONDS", float, 0.0, 86400.0)

    config = Config(
        host=r.raw("HOST"),
        port=port,
        log_level=r.choice("LOG_LEVEL", LOG_LEVELS),
        log_format=r.choice("LOG_FORMAT", LOG_FORMATS),
        event_loop=_event_loop(r.choice("EVENT_LOOP", EVENT_LOOPS), problems),
        resource_url=resource_url,
        resource_path=resource_path,
        scopes=split_list(r.raw("SCOPES_SUPPORTED")),
        cors_origins=frozenset(cors_origins),
        cors_any_origin=cors_any,
        max_header_bytes=max_header,
        shutdown_timeout=r.number("SHUTDOWN_TIMEOUT_SECONDS", float, 0.0, 3600.0),
        listener=listener,
        idp=IdpConfig(
            issuer=issuer,
            timeout=r.number("IDP_TIMEOUT_SECONDS", float, 0.1, 120.0),
            jwks_cooldown=r.number("JWKS_COOLDOWN_SECONDS", float, 0.1, 3600.0),
            jwks_refresh=r.number("JWKS_REFRESH_SECONDS", float, 1.0, 86400.0),
        ),
        tokens=TokenConfig(
            issuer=issuer,
            audiences=audiences,
            algorithms=algorithms,
            leeway=leeway,
            max_token_bytes=max_token,
            cache_size=r.number("TOKEN_CACHE_SIZE", int, 0, 10_000_000),
            audience_claim=r.choice("JWT_AUDIENCE_CLAIM", AUDIENCE_CLAIMS),
            id_token_check=r.choice("JWT_ID_TOKEN_CHECK", ID_TOKEN_CHECKS),
        ),
        upstream=UpstreamConfig(
            origin=upstream_origin,
            path_prefix=upstream_path,
            connect_timeout=r.number("UPSTREAM_CONNECT_TIMEOUT_SECONDS", float, 0.1, 600.0),
            response_timeout=r.number("UPSTREAM_RESPONSE_TIMEOUT_SECONDS", float, 0.1, 86400.0),
            idle_timeout=idle or None,
            sse_idle_timeout=sse_idle or None,
            max_body_bytes=r.number("MAX_REQUEST_BODY_BYTES", int, 0, 1 << 34),
            body_timeout=r.number("REQUEST_BODY_TIMEOUT_SECONDS", float, 0.1, 3600.0),
            client_write_timeout=r.number("CLIENT_WRITE_TIMEOUT_SECONDS", float, 0.1, 3600.0),
            max_streams_per_subject=r.number("MAX_STREAMS_PER_SUBJECT", int, 0, 1_000_000),
        ),
        policy=policy,
        rate_limits=rate_limits,
        trusted_proxies=trusted_proxies,
        forward_identity=r.flag("FORWARD_IDENTITY"),
        strip_request_headers=_strip_request_headers(r),
        upstream_bearer_file=bearer_file,
        session_ttl=r.number("SESSION_BINDING_TTL_SECONDS", float, 1.0, 30 * 86400.0),
        auth_server=_auth_server(r),
        spawn=spawn,
        metrics=_metrics(r, port, spawn),
        warnings=tuple(_unknown_variable_warnings(env)),
    )
    if problems:  # with the typo hints: "X is required" is often "you spelled X wrong"
        raise ConfigError(problems + list(config.warnings))
    if policy.allow_all_authenticated and not _has_allow_list(policy):
        warning = (
            "ALLOW_ALL_AUTHENTICATED=true: every valid token from the issuer is admitted "
            "(anyone who can sign in to the IdP can use this MCP server)"
        )
        config = replace(config, warnings=(*config.warnings, warning))
    if policy.allow_unverified_email and (policy.emails or policy.email_domains):
        warning = (
            "INSECURE_ALLOW_UNVERIFIED_EMAIL=true: on an IdP with self-service sign-up anyone "
            "can claim an allowed email address"
        )
        config = replace(config, warnings=(*config.warnings, warning))
    if config.auth_server.facade and not config.auth_server.state_secret:
        config = replace(config, warnings=(*config.warnings, UNSHARED_SEALING_WARNING))
    auth = config.auth_server
    if not auth.facade and auth.client_secret and not auth.publish_secret:
        warning = (
            "AUTH_SERVER_MODE=direct with STATIC_CLIENT_SECRET: clients redeem their codes with "
            "the IdP themselves, and the /token relay lends the secret to refresh tokens only "
            "(never to a code it did not issue), so a client without the secret cannot sign in; "
            "register the static client as public at the IdP, set STATIC_CLIENT_CONFIDENTIAL=true, "
            "or use AUTH_SERVER_MODE=facade"
        )
        config = replace(config, warnings=(*config.warnings, warning))
    tokens, id_check = config.tokens, config.tokens.id_token_check
    if id_check == "off":
        warning = ("JWT_ID_TOKEN_CHECK=off: ID tokens that carry an accepted audience pass as "
                   "access tokens")
        config = replace(config, warnings=(*config.warnings, warning))
    elif id_check == "marked" and tokens.audience_claim == "aud" and (
        config.auth_server.client_id in tokens.audiences
    ):
        warning = (
            f"OIDC_AUDIENCE includes STATIC_CLIENT_ID {config.auth_server.client_id}: the ID "
            "tokens the IdP issues to that client carry it in aud too, so set "
            "JWT_ID_TOKEN_CHECK=client to refuse tokens that name no client (azp, client_id, "
            "cid or appid), as such ID tokens do"
        )
        config = replace(config, warnings=(*config.warnings, warning))
    if cors_any:
        warning = (
            "CORS_ALLOW_ORIGINS=* lets any web page call the MCP endpoint with a user's token "
            "and disables the MCP DNS-rebinding Origin check"
        )
        config = replace(config, warnings=(*config.warnings, warning))
    return config


# A facade's start-up warning without STATE_SECRET; the doctor words it for shared Redis.
UNSHARED_SEALING_WARNING = (
    "STATE_SECRET is not set: sign-ins are sealed with a random per-process key, so with "
    "several replicas a sign-in started on one fails on another; set the same "
    "STATE_SECRET everywhere"
)


def _has_allow_list(policy: PolicyConfig) -> bool:
    return bool(policy.subs or policy.emails or policy.email_domains or policy.groups)


# The allow-lists: PolicyConfig field -> the variable naming its entries (+ "_FILE").
ALLOW_LISTS = {
    "subs": "ALLOW_SUBS", "emails": "ALLOW_EMAILS", "email_domains": "ALLOW_EMAIL_DOMAINS",
    "groups": "ALLOW_GROUPS",
}


def allow_entries(kind: str, entries: list[str], source: str) -> tuple[frozenset[str], list[str]]:
    """Normalised entries of one allow-list and the problems found in them (named by source)."""
    problems: list[str] = []
    if kind == "emails":
        entries = [ascii_lower(e) for e in entries]
        for email in entries:
            local, _, domain = email.partition("@")
            if email.count("@") != 1 or not local or not domain:
                problems.append(f"{source} entry {email!r} is not an email address")
    elif kind == "email_domains":
        entries = [ascii_lower(d).removeprefix("@") for d in entries]
        for domain in entries:
            if "@" in domain or "*" in domain or domain.startswith(".") or "." not in domain:
                problems.append(
                    f"{source} entry {domain!r} is not a domain like example.com "
                    "(matched exactly; no wildcards, no subdomains)"
                )
    return frozenset(entries), problems


def read_allow_file(path: str) -> list[str]:
    """Entries one per line (commas also separate); blank lines and `#` comments ignored.

    Raises OSError or UnicodeDecodeError when the file cannot be read.
    """
    with open(path, encoding="utf-8") as file:
        text = file.read(MAX_ALLOW_FILE_BYTES + 1)
    if len(text) > MAX_ALLOW_FILE_BYTES:
        raise OSError(f"larger than {MAX_ALLOW_FILE_BYTES} bytes")
    entries: list[str] = []
    for line in text.splitlines():
        entries.extend(split_list(line.partition("#")[0]))
    return entries


def _allow_list(r: _Reader, kind: str) -> tuple[frozenset[str], AllowFile | None]:
    name = ALLOW_LISTS[kind]
    from_variable, problems = allow_entries(kind, list(split_list(r.raw(name))), name)
    r.problems.extend(problems)
    path = r.raw(f"{name}_FILE")
    if not path:
        return from_variable, None
    try:
        from_file, problems = allow_entries(kind, read_allow_file(path), f"{name}_FILE {path}")
    except (OSError, UnicodeDecodeError) as exc:
        r.problems.append(f"{name}_FILE cannot be read: {exc}")
        return from_variable, None
    r.problems.extend(problems)
    return from_variable | from_file, AllowFile(kind, path, from_variable)


def _listener(r: _Reader, max_header: int) -> ListenerConfig:
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


def _policy(r: _Reader) -> PolicyConfig:
    lists = {kind: _allow_list(r, kind) for kind in ALLOW_LISTS}
    claim = r.raw("GROUPS_CLAIM")
    # Auth0 requires namespaced custom claims (`https://example.com/roles`): a URL is one name.
    path = (claim,) if "://" in claim else tuple(claim.split("."))
    if not all(path):
        r.problems.append(f"GROUPS_CLAIM={claim!r} is not a claim name or dotted path")
    files = tuple(file for _, file in lists.values() if file is not None)
    policy = PolicyConfig(
        subs=lists["subs"][0],
        emails=lists["emails"][0],
        email_domains=lists["email_domains"][0],
        groups=lists["groups"][0],
        groups_claim=path,
        allow_all_authenticated=r.flag("ALLOW_ALL_AUTHENTICATED"),
        allow_unverified_email=r.flag("INSECURE_ALLOW_UNVERIFIED_EMAIL"),
        required_scopes=split_list(r.raw("REQUIRED_SCOPES")),
        files=files,
    )
    # A configured file counts even while empty: it admits nobody until entries are added.
    file_named = any(r.raw(f"{name}_FILE") for name in ALLOW_LISTS.values())
    if not (_has_allow_list(policy) or file_named) and not policy.allow_all_authenticated:
        r.problems.append(
            "no allow-list is set: set ALLOW_SUBS, ALLOW_EMAILS, ALLOW_EMAIL_DOMAINS or "
            "ALLOW_GROUPS (or their _FILE variants), or ALLOW_ALL_AUTHENTICATED=true to admit "
            "every valid token"
        )
    return policy


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
        named = f" ({scheme}://)" if sep and PRIVATE_SCHEME.fullmatch(scheme) else ""
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


def _rate_limits(r: _Reader) -> RateLimitConfig:
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


def _metrics(r: _Reader, port: int, spawn: SpawnConfig | None) -> MetricsConfig | None:
    if not r.raw("METRICS_PORT"):
        return None
    metrics_port = r.number("METRICS_PORT", int, 1, 65535)
    if metrics_port == port:
        r.problems.append(f"METRICS_PORT={metrics_port} is PORT: metrics are served on a listener "
                          "of their own, never on the public port")
    if spawn is not None and metrics_port == spawn.port:
        r.problems.append(f"METRICS_PORT={metrics_port} is MCP_SPAWN_PORT, the child's port")
    return MetricsConfig(host=r.raw("METRICS_HOST"), port=metrics_port)


# A header name (RFC 9110 §5.6.2 token) starting with a letter or digit, or such a prefix and `*`.
STRIP_ENTRY = re.compile(r"[a-z0-9][a-z0-9!#$%&'+.^`|~-]*\*?")


def _strip_request_headers(r: _Reader) -> tuple[str, ...]:
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


def _networks(r: _Reader, name: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in split_list(r.raw(name)):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            r.problems.append(f"{name} entry {item!r} is not an IP address or CIDR")
    return tuple(networks)


def _auth_server(r: _Reader) -> AuthServerConfig:
    client_id, secret = r.raw("STATIC_CLIENT_ID"), r.secret("STATIC_CLIENT_SECRET")
    mode = r.raw("AUTH_SERVER_MODE").lower() or ("facade" if client_id else "direct")
    if mode not in ("direct", "facade"):
        r.problems.append(f"AUTH_SERVER_MODE={mode!r} is not direct or facade")
    if mode == "facade" and not client_id:
        r.problems.append(
            "AUTH_SERVER_MODE=facade needs STATIC_CLIENT_ID: the relay signs users in with one "
            "client registered at the IdP with the callback <RESOURCE_URL origin>/oauth/callback"
        )
    if secret and not client_id:
        r.problems.append("STATIC_CLIENT_SECRET is set without STATIC_CLIENT_ID")
    publish = r.flag("STATIC_CLIENT_CONFIDENTIAL")
    if publish and not secret:
        r.problems.append("STATIC_CLIENT_CONFIDENTIAL=true needs STATIC_CLIENT_SECRET")
    uris = []
    for uri in split_list(r.raw("ALLOWED_REDIRECT_URIS")):
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") and PRIVATE_SCHEME.fullmatch(parts.scheme) and (
            parts.scheme not in NEVER_REDIRECT_SCHEMES
        ):
            # RFC 8252 §7.1: a native app's private-use scheme (Cursor: cursor://...); PKCE
            # protects the code from another app claiming the scheme.
            if parts.fragment or parts.username or parts.password or len(uri) > MAX_URI:
                r.problems.append(f"ALLOWED_REDIRECT_URIS entry {shown_url(uri)!r} must have "
                                  "no fragment or credentials")
            else:
                uris.append(uri)
        elif parts.scheme not in ("https", "http") or not parts.hostname or parts.fragment or (
            parts.username or parts.password
        ):
            r.problems.append(
                f"ALLOWED_REDIRECT_URIS entry {shown_url(uri)!r} is not an absolute http(s) URL "
                "(or a native app's private-use scheme) without fragment or credentials"
            )
        elif parts.scheme == "http" and not is_loopback_host(parts.hostname):
            r.problems.append(f"ALLOWED_REDIRECT_URIS entry {uri!r} must use https")
        else:
            uris.append(uri)
    state_secret = r.secret("STATE_SECRET")
    if state_secret and len(state_secret) < MIN_STATE_SECRET:
        r.problems.append(
            f"STATE_SECRET is shorter than {MIN_STATE_SECRET} characters "
            "(use e.g. `openssl rand -hex 32`)"
        )
    return AuthServerConfig(
        facade=mode == "facade", client_id=client_id, client_secret=secret,
        publish_secret=publish, redirect_uris=frozenset(uris),
        allow_loopback_redirects=r.flag("ALLOW_LOOPBACK_REDIRECTS"), state_secret=state_secret,
    )


# Redirect URI schemes a native app may own (RFC 8252 §7.1; RFC 3986 §3.1 syntax, lowercase).
PRIVATE_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
# Schemes that are never an app's callback: script, inline content, local files, transport.
NEVER_REDIRECT_SCHEMES = frozenset({
    "javascript", "vbscript", "data", "blob", "file", "filesystem", "about",
    "ftp", "ws", "wss", "mailto", "tel", "urn", "view-source", "chrome", "jar",
})  # fmt: skip
MAX_URI = 2048  # the redirect allow-list refuses longer URIs anyway (registration.py)


# What a child inherits by default: enough to run a program, nothing that could be a secret.
CHILD_ENV_BASE = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME")
CHILD_ENV_PREFIX = "MCP_SPAWN_ENV_"  # MCP_SPAWN_ENV_FOO=bar gives the child FOO=bar
# The sidecar's own credentials never go to the child, even if listed in MCP_SPAWN_ENV.
CHILD_ENV_FORBIDDEN = frozenset({
    "STATIC_CLIENT_SECRET", "STATE_SECRET", "RATE_LIMIT_STORAGE_URI", "MCP_UPSTREAM_BEARER_FILE",
    "STATIC_CLIENT_SECRET_FILE", "STATE_SECRET_FILE", "RATE_LIMIT_STORAGE_URI_FILE",
})  # fmt: skip


def _spawn_argv(r: _Reader, command: str) -> tuple[str, ...]:
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


def _spawn(r: _Reader, env: Mapping[str, str]) -> SpawnConfig | None:
    command, port_raw = r.raw("MCP_SPAWN_CMD"), r.raw("MCP_SPAWN_PORT")
    if not command:
        if port_raw:
            r.problems.append("MCP_SPAWN_PORT is set without MCP_SPAWN_CMD")
        return None
    if not port_raw:
        r.problems.append("MCP_SPAWN_CMD needs MCP_SPAWN_PORT: the port the child listens on")
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
    )
