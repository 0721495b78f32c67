"""The configuration's frozen model: what load() returns and every component is built from.

Why frozen, typed values: nothing downstream re-reads the environment or re-parses a string, and
nothing can change a setting after start-up. ConfigError carries every problem found at once.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
KINDS = ("tools", "prompts", "resources")  # what a tool rule can name: tool and prompt names, URIs


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
class IntrospectionConfig:
    """The client the sidecar introspects opaque tokens with (RFC 7662), and its bounds."""

    endpoint: str
    """"": the IdP metadata's introspection_endpoint."""
    client_id: str
    client_secret: str
    auth_method: str
    """client_secret_basic, client_secret_post, none, or "": chosen from the IdP metadata."""
    cache_seconds: float
    """How long an active answer is trusted (never past the token's exp): the revocation lag."""
    negative_cache_seconds: float
    require_exp: bool
    max_concurrency: int
    timeout: float
    """Seconds for one introspection, waiting for a free slot included."""


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
    validation: str = "jwt"
    """jwt, introspection (RFC 7662), or auto: a JWS to the JWT verifier, anything else asked."""
    introspection: IntrospectionConfig | None = None
    """None: TOKEN_VALIDATION=jwt."""


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
class ClientDocumentsConfig:
    """Client ID Metadata Documents (https URL client ids) in facade mode."""

    enabled: bool = True
    allowed_hosts: frozenset[str] = frozenset()
    """Lowercase hosts whose documents are accepted; empty: any host with public addresses."""
    trusted_hosts: frozenset[str] = frozenset()
    """Lowercase hosts whose clients skip the consent page."""
    allow_private_addresses: bool = False
    """Development only: fetch from loopback, private and other non-public addresses."""
    ca_file: str = ""
    """Extra CA certificates (PEM) trusted besides the system store ("" none)."""


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
    client_documents: ClientDocumentsConfig = ClientDocumentsConfig()
    send_resource: bool = True
    """IDP_RESOURCE_PARAMETER=pass: the relay passes the clients' RFC 8707 `resource` on."""
    scope_prefix: str = ""
    """IDP_SCOPE_PREFIX: put before each client scope the relay sends the IdP ("" = none)."""


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
    transport: str = "http"
    """http: one child serving HTTP on `port`; stdio: children speaking JSON-RPC lines."""
    scope: str = "session"
    """stdio: one child per MCP session (session) or at most one per subject (subject)."""
    max_processes: int = 32
    max_per_subject: int = 4
    idle_seconds: float = 600.0
    workdir_root: str = ""
    """stdio: each subject's child runs in <root>/<hash>; empty: in the sidecar's directory."""
    max_line_bytes: int = 4 * 1024 * 1024
    client_roots: bool = False
    """stdio: pass the client's MCP roots to the child (MCP_SPAWN_CLIENT_ROOTS=pass)."""

    @property
    def stdio(self) -> bool:
        return self.transport == "stdio"


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
class ToolRule:
    """One `[[rule]]` of TOOL_POLICY_FILE."""

    line: int
    """Where its `[[rule]]` header is: every message about it names this line."""
    name: str
    everyone: bool
    subs: frozenset[str] = frozenset()
    emails: frozenset[str] = frozenset()
    email_domains: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    allow: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """kind (tools, prompts, resources) -> globs this rule grants."""
    deny: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """kind -> globs this rule refuses (deny wins over any allow)."""

    @property
    def label(self) -> str:
        return (f"rule {self.name!r} (line {self.line})" if self.name
                else f"rule at line {self.line}")


@dataclass(frozen=True, slots=True)
class ToolRulesConfig:
    allow: tuple[str, ...] = ()
    """TOOLS_ALLOW: tool globs every admitted caller may call."""
    deny: tuple[str, ...] = ()
    """TOOLS_DENY: tool globs nobody may call."""
    scopes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """TOOL_SCOPES: (tool glob, scopes a call needs)."""
    rate_limits: tuple[tuple[str, int], ...] = ()
    """TOOL_RATE_LIMITS: (tool glob, calls per subject per minute)."""
    file: str = ""
    """TOOL_POLICY_FILE ("" unset), re-read when it changes."""
    file_rules: tuple[ToolRule, ...] = ()
    audit_arguments: bool = False

    @property
    def configured(self) -> bool:
        """Whether any rule applies: only then are MCP request bodies parsed."""
        return bool(self.allow or self.deny or self.scopes or self.rate_limits or self.file)



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
    tool_rules: ToolRulesConfig = ToolRulesConfig()
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
        introspection = self.tokens.introspection
        held = (auth.client_secret, auth.state_secret, *self.rate_limits.storage_secrets,
                introspection.client_secret if introspection is not None else "")
        return tuple(dict.fromkeys(value for value in held if value))
