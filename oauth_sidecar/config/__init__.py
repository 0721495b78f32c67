"""Configuration, parsed once from the environment into frozen values.

Why: a misconfigured auth proxy must refuse to start, listing every problem at once, rather than
fail at the first request or, worse, let requests through. Nothing downstream reads the
environment again. Variable names and meanings follow the Node project `mcp-oauth-proxy`, so
its users can switch by changing the image.

The modules, one concern each: `variables` (the registry and help text), `model` (the frozen
values, ConfigError), `reader` (variables into values, problems collected), `files` (the one
capped read of a secret or allow-list file), `urls`, `endpoints` (issuer, resource, upstream,
CORS), `introspection` (TOKEN_VALIDATION, the introspection client), `allow_lists`,
`rate_limits` (and the storage URI), `auth_server`, `redirect_uris` (the one redirect-URI rule),
`serving` (listener, metrics, proxies, stripped headers), `spawn` and `load`.
This package re-exports what the rest of the code imports.
"""

from __future__ import annotations

from oauth_sidecar.config.allow_lists import (
    ALLOW_LISTS,
    allow_entries,
    ascii_lower,
    read_allow_file,
)
from oauth_sidecar.config.auth_server import UNSHARED_SEALING_WARNING
from oauth_sidecar.config.loader import load
from oauth_sidecar.config.model import (
    AllowFile,
    AuthServerConfig,
    ClientDocumentsConfig,
    Config,
    ConfigError,
    IdpConfig,
    IntrospectionConfig,
    IPNetwork,
    ListenerConfig,
    MetricsConfig,
    PolicyConfig,
    RateLimitConfig,
    SpawnConfig,
    TokenConfig,
    ToolRule,
    ToolRulesConfig,
)
from oauth_sidecar.config.reader import split_list
from oauth_sidecar.config.spawn import CHILD_ENV_FORBIDDEN
from oauth_sidecar.config.tool_rules import MAX_RULE_FILE_BYTES, parse_rule_file
from oauth_sidecar.config.urls import canonical_resource, is_loopback_host
from oauth_sidecar.config.variables import (
    ASYMMETRIC_ALGORITHMS,
    DEFAULT_ALGORITHMS,
    LOG_LEVELS,
    VARIABLES,
)

__all__ = [
    "ALLOW_LISTS",
    "ASYMMETRIC_ALGORITHMS",
    "CHILD_ENV_FORBIDDEN",
    "DEFAULT_ALGORITHMS",
    "LOG_LEVELS",
    "MAX_RULE_FILE_BYTES",
    "UNSHARED_SEALING_WARNING",
    "VARIABLES",
    "AllowFile",
    "AuthServerConfig",
    "ClientDocumentsConfig",
    "Config",
    "ConfigError",
    "IPNetwork",
    "IdpConfig",
    "IntrospectionConfig",
    "ListenerConfig",
    "MetricsConfig",
    "PolicyConfig",
    "RateLimitConfig",
    "SpawnConfig",
    "TokenConfig",
    "ToolRule",
    "ToolRulesConfig",
    "allow_entries",
    "ascii_lower",
    "canonical_resource",
    "is_loopback_host",
    "load",
    "parse_rule_file",
    "read_allow_file",
    "split_list",
]
