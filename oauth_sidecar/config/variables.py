"""The variables we accept: each one's default and meaning, and the words their values may take.

Why one table: --help, .env.example and the typo hints for unknown variables are all drawn from
it (and the tests check the documents against it), so a variable documented is a variable read.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

# Asymmetric only: a JWKS entry must never be usable as an HMAC secret (CVE-2022-29217 class).
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
DEFAULT_ALGORITHMS = "RS256,RS384,RS512,PS256,PS384,PS512,ES256,ES384,EdDSA"
DEFAULT_CORS_ORIGINS = "https://claude.ai,https://claude.com"
# The clients known to publish Client ID Metadata Documents: Claude (web, Desktop, Code), VS Code,
# ChatGPT and Codex. Their sign-ins skip the consent page; anyone else's show it.
DEFAULT_CIMD_TRUSTED_HOSTS = "claude.ai,claude.com,vscode.dev,chatgpt.com"
DEFAULT_REDIRECT_URIS = (
    "https://claude.ai/api/mcp/auth_callback,https://claude.com/api/mcp/auth_callback"
)
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
# What the facade's relay does with the RFC 8707 `resource` clients send (Entra refuses it).
RESOURCE_PARAMETER_CHOICES = ("pass", "omit")
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
    "MCP_UPSTREAM_URL": ("", "URL of the MCP server to forward to (required without "
                         "MCP_SPAWN_CMD)."),
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
    "TOKEN_VALIDATION": ("jwt", "jwt, introspection (opaque tokens, RFC 7662), or auto (a JWT "
                         "verified here, anything else introspected)."),
    "INTROSPECTION_ENDPOINT": ("", "Introspection URL (default: the IdP metadata's "
                               "introspection_endpoint)."),
    "INTROSPECTION_CLIENT_ID": ("", "Client id the sidecar introspects with (required for "
                                "introspection and auto)."),
    "INTROSPECTION_CLIENT_SECRET": ("", "Its secret (required unless "
                                    "INTROSPECTION_AUTH_METHOD=none)."),
    "INTROSPECTION_CLIENT_SECRET_FILE": ("", "File holding INTROSPECTION_CLIENT_SECRET (a "
                                         "mounted secret)."),
    "INTROSPECTION_AUTH_METHOD": ("", "client_secret_basic, client_secret_post or none "
                                  "(default: from the IdP metadata, basic first)."),
    "INTROSPECTION_CACHE_SECONDS": ("30", "How long an active answer is reused (never past exp): "
                                    "a revoked token works this long."),
    "INTROSPECTION_NEGATIVE_CACHE_SECONDS": ("5", "How long a refused token's answer is reused."),
    "INTROSPECTION_REQUIRE_EXP": ("true", "Refuse active answers without exp."),
    "INTROSPECTION_MAX_CONCURRENCY": ("16", "Most introspection calls in flight to the IdP."),
    "INTROSPECTION_TIMEOUT_SECONDS": ("5", "Timeout of one introspection, queueing included "
                                      "(then 503)."),
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
    "TOOLS_ALLOW": ("", "Tool globs every admitted caller may call (restricts tools)."),
    "TOOLS_DENY": ("", "Tool globs nobody may call."),
    "TOOL_SCOPES": ("", "Scopes a tool needs: glob=scope[ scope], comma-separated."),
    "TOOL_RATE_LIMITS": ("", "Calls per subject per minute by tool: glob=N, comma-separated."),
    "TOOL_POLICY_FILE": ("", "TOML file of tool, prompt and resource rules by caller; "
                         "re-read when it changes."),
    "AUDIT_LOG_ARGUMENTS": ("false", "Log tool call arguments in the audit line (redacted)."),
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
    "CIMD": ("on", "Accept Client ID Metadata Documents (https URL client ids) in facade mode."),
    "CIMD_ALLOWED_HOSTS": ("", "Hosts whose client documents are accepted (empty = any public)."),
    "CIMD_TRUSTED_HOSTS": (DEFAULT_CIMD_TRUSTED_HOSTS, "Client document hosts that skip the "
                           "consent page (none: every client sees it)."),
    "CIMD_ALLOW_PRIVATE_ADDRESSES": ("false", "Fetch client documents from private and loopback "
                                     "addresses (development only)."),
    "CIMD_CA_FILE": ("", "Extra CA certificates (PEM) trusted for client document fetches."),
    "STATE_SECRET": ("", "Key sealing the relay's state and codes (share it across replicas)."),
    "STATE_SECRET_FILE": ("", "File holding STATE_SECRET (a mounted secret)."),
    "IDP_RESOURCE_PARAMETER": ("pass", "Facade: pass or omit the clients' `resource` toward "
                               "the IdP (Entra: omit)."),
    "IDP_SCOPE_PREFIX": ("", "Facade: prefix for client scopes toward the IdP, e.g. "
                         "api://<app id>/ (Entra)."),
    "MCP_SPAWN_CMD": ("", "Run this MCP server as a child (shell-like words or a JSON array)."),
    "MCP_SPAWN_PORT": ("", "Port the child listens on, on 127.0.0.1 (HTTP transport)."),
    "MCP_SPAWN_TRANSPORT": ("", "http or stdio; default http with MCP_SPAWN_PORT, else stdio "
                            "(a command without a port speaks JSON-RPC on stdin/stdout)."),
    "MCP_SPAWN_SCOPE": ("session", "stdio: one child per MCP session (session) or at most one "
                        "per subject (subject)."),
    "MCP_SPAWN_MAX_PROCESSES": ("32", "stdio: most children running at once (then 503)."),
    "MCP_SPAWN_MAX_PER_SUBJECT": ("4", "stdio: most children of one subject (then 429)."),
    "MCP_SPAWN_IDLE_SECONDS": ("600", "stdio: a child idle this long is stopped (its session "
                               "then answers 404)."),
    "MCP_SPAWN_WORKDIR_ROOT": ("", "stdio: each subject's child runs in <root>/<hash of "
                               "issuer+sub> (0700); unset: in the sidecar's directory."),
    "MCP_SPAWN_CLIENT_ROOTS": ("drop", "stdio: drop (default) or pass the remote client's MCP "
                               "roots; passed, a client can point a server at any path."),
    "MCP_SPAWN_MAX_LINE_BYTES": ("4194304", "stdio: longest stdout line of a child; longer "
                                 "ones are dropped."),
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
    "REQUEST_", "KEEPALIVE_", "STRIP_", "CLIENT_", "CIMD", "INTROSPECTION_",
)  # fmt: skip


def unknown_variable_warnings(env: Mapping[str, str]) -> list[str]:
    """A warning for each variable that looks like ours but is not one: most likely a typo."""
    known = set(VARIABLES)
    warnings = []
    for name in sorted(env):
        if name in known or not name.startswith(OWN_PREFIXES):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"{name} is not a variable oauth_sidecar knows and is ignored{hint}")
    return warnings
