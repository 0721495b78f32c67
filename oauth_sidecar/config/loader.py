"""load(env): the whole configuration from the environment, or every problem at once.

Why one pass that collects: a misconfigured auth proxy must refuse to start, listing every
problem together, rather than fail at the first request or, worse, let requests through. Each
section reads through the same Reader; the warnings about risky but valid choices come last.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import replace

from oauth_sidecar.config import (
    allow_lists,
    auth_server,
    endpoints,
    introspection,
    rate_limits,
    serving,
    spawn,
    tool_rules,
)
from oauth_sidecar.config.model import (
    Config,
    ConfigError,
    IdpConfig,
    TokenConfig,
    UpstreamConfig,
)
from oauth_sidecar.config.reader import Reader, split_list
from oauth_sidecar.config.variables import (
    ASYMMETRIC_ALGORITHMS,
    AUDIENCE_CLAIMS,
    EVENT_LOOPS,
    ID_TOKEN_CHECKS,
    LOG_FORMATS,
    LOG_LEVELS,
    unknown_variable_warnings,
)


def _event_loop(choice: str, problems: list[str]) -> str:
    """uvloop is an optional extra (`pip install 'oauth-sidecar[uvloop]'`): faster sockets."""
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not installed:
        problems.append("EVENT_LOOP=uvloop but uvloop is not installed "
                        "(pip install 'oauth-sidecar[uvloop]')")
    return "uvloop" if choice == "uvloop" or (choice == "auto" and installed) else "asyncio"


def _algorithms(r: Reader) -> frozenset[str]:
    algorithms = frozenset(split_list(r.raw("JWT_ALGORITHMS")))
    bad_algs = sorted(algorithms - ASYMMETRIC_ALGORITHMS)
    if bad_algs:
        r.problems.append(
            f"JWT_ALGORITHMS has {', '.join(bad_algs)}: only asymmetric algorithms are accepted "
            f"({', '.join(sorted(ASYMMETRIC_ALGORITHMS))})"
        )
    if not algorithms:
        r.problems.append("JWT_ALGORITHMS is empty")
    return algorithms


def load(env: Mapping[str, str]) -> Config:
    """Parse the whole configuration or raise ConfigError listing every problem."""
    r = Reader(env)
    problems = r.problems

    issuer = endpoints.issuer(r)
    audiences = split_list(
        r.required("OIDC_AUDIENCE", "the `aud` your IdP puts in access tokens for this server")
    )
    resource_url, resource_path = endpoints.resource(r)
    child = spawn.spawn(r, env)
    upstream = endpoints.upstream(r, child)
    algorithms = _algorithms(r)
    cors = endpoints.cors_origins(r)

    port = r.number("PORT", int, 1, 65535)
    leeway = r.number("JWT_LEEWAY_SECONDS", int, 0, 300)
    max_token = r.number("JWT_MAX_TOKEN_BYTES", int, 1024, 1 << 20)
    max_header = r.number("MAX_HEADER_BYTES", int, 8190, 1 << 21)
    if max_header < max_token + len("Bearer "):
        problems.append(
            f"MAX_HEADER_BYTES={max_header} cannot carry a token of JWT_MAX_TOKEN_BYTES={max_token}"
        )
    listener = serving.listener(r, max_header)
    policy = allow_lists.policy(r)
    limits = rate_limits.rate_limits(r)
    trusted_proxies = serving.networks(r, "TRUSTED_PROXIES")
    bearer_file = endpoints.upstream_bearer_file(r)
    validation, introspected, validation_warnings = introspection.token_validation(r)
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
        cors_origins=cors.origins,
        cors_any_origin=cors.any_origin,
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
            validation=validation,
            introspection=introspected,
        ),
        upstream=UpstreamConfig(
            origin=upstream.origin,
            path_prefix=upstream.path,
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
        rate_limits=limits,
        trusted_proxies=trusted_proxies,
        forward_identity=r.flag("FORWARD_IDENTITY"),
        strip_request_headers=serving.strip_request_headers(r),
        upstream_bearer_file=bearer_file,
        session_ttl=r.number("SESSION_BINDING_TTL_SECONDS", float, 1.0, 30 * 86400.0),
        auth_server=auth_server.auth_server(r),
        tool_rules=tool_rules.tool_rules(r),
        spawn=child,
        metrics=serving.metrics(r, port, child),
        warnings=(*unknown_variable_warnings(env), *validation_warnings),
    )
    if problems:  # with the typo hints: "X is required" is often "you spelled X wrong"
        raise ConfigError(problems + list(config.warnings))
    return replace(config, warnings=(*config.warnings, *_warnings(config)))


def _warnings(config: Config) -> list[str]:
    """Risky but valid choices, said out loud at every start."""
    warnings = []
    policy, auth = config.policy, config.auth_server
    if policy.allow_all_authenticated and not allow_lists.has_allow_list(policy):
        warnings.append(
            "ALLOW_ALL_AUTHENTICATED=true: every valid token from the issuer is admitted "
            "(anyone who can sign in to the IdP can use this MCP server)"
        )
    if policy.allow_unverified_email and (policy.emails or policy.email_domains):
        warnings.append(
            "INSECURE_ALLOW_UNVERIFIED_EMAIL=true: on an IdP with self-service sign-up anyone "
            "can claim an allowed email address"
        )
    if auth.facade and not auth.state_secret:
        warnings.append(auth_server.UNSHARED_SEALING_WARNING)
    documents = auth.client_documents
    if auth.facade and documents.enabled and documents.allow_private_addresses:
        warnings.append(
            "CIMD_ALLOW_PRIVATE_ADDRESSES=true: a client id URL may make the sidecar fetch from "
            "loopback, private and link-local addresses (cloud metadata included); development "
            "only"
        )
    if not auth.facade and auth.client_secret and not auth.publish_secret:
        warnings.append(
            "AUTH_SERVER_MODE=direct with STATIC_CLIENT_SECRET: clients redeem their codes with "
            "the IdP themselves, and the /token relay lends the secret to refresh tokens only "
            "(never to a code it did not issue), so a client without the secret cannot sign in; "
            "register the static client as public at the IdP, set STATIC_CLIENT_CONFIDENTIAL=true, "
            "or use AUTH_SERVER_MODE=facade"
        )
    tokens, id_check = config.tokens, config.tokens.id_token_check
    if id_check == "off":
        warnings.append("JWT_ID_TOKEN_CHECK=off: ID tokens that carry an accepted audience pass "
                        "as access tokens")
    elif id_check == "marked" and tokens.audience_claim == "aud" and (
        auth.client_id in tokens.audiences
    ):
        warnings.append(
            f"OIDC_AUDIENCE includes STATIC_CLIENT_ID {auth.client_id}: the ID "
            "tokens the IdP issues to that client carry it in aud too, so set "
            "JWT_ID_TOKEN_CHECK=client to refuse tokens that name no client (azp, client_id, "
            "cid or appid), as such ID tokens do"
        )
    tool_scopes = dict.fromkeys(s for _, scopes in config.tool_rules.scopes for s in scopes)
    unadvertised = [scope for scope in tool_scopes if scope not in config.advertised_scopes]
    if unadvertised and config.advertised_scopes:
        warnings.append(
            f"TOOL_SCOPES names {', '.join(unadvertised)}, which the metadata's scopes_supported "
            "(SCOPES_SUPPORTED) does not list: clients learn them only from the 403 challenge, "
            "and the IdP must know them"
        )
    if config.cors_any_origin:
        warnings.append(
            "CORS_ALLOW_ORIGINS=* lets any web page call the MCP endpoint with a user's token "
            "and disables the MCP DNS-rebinding Origin check"
        )
    return warnings
