"""TOKEN_VALIDATION and the INTROSPECTION_* variables: how access tokens are checked, and the
client the sidecar introspects opaque ones with (RFC 7662).

Why checked together: introspection needs a client of the sidecar's own at the IdP (never the
caller's token as a credential), and a mode that cannot work (no client id, a secret missing for
a method that sends one, an endpoint over plain http off loopback) must stop the start rather
than refuse every caller later. Variables that do nothing in the chosen mode are said out loud.
"""

from __future__ import annotations

from oauth_sidecar.config.model import IntrospectionConfig
from oauth_sidecar.config.reader import TRUE_WORDS, Reader
from oauth_sidecar.config.urls import check_url, shown_url
from oauth_sidecar.config.variables import VARIABLES

VALIDATION_MODES = ("jwt", "introspection", "auto")
# RFC 7662 §2.1 leaves client authentication to RFC 6749 §2.3; "" means: the IdP metadata's
# introspection_endpoint_auth_methods_supported decides (RFC 8414 §2), else its
# token_endpoint_auth_methods_supported.
AUTH_METHODS = ("", "client_secret_basic", "client_secret_post", "none")
PREFIX = "INTROSPECTION_"


def token_validation(r: Reader) -> tuple[str, IntrospectionConfig | None, list[str]]:
    """The mode, the introspection client (None in jwt mode) and the warnings about it."""
    mode = r.choice("TOKEN_VALIDATION", VALIDATION_MODES)
    if mode not in ("introspection", "auto"):
        set_here = sorted(name for name, (default, _) in VARIABLES.items()
                          if name.startswith(PREFIX) and r.raw(name) != default)
        warnings = [f"{', '.join(set_here)} set, but TOKEN_VALIDATION=jwt: introspection is off "
                    "so ignored (set TOKEN_VALIDATION=introspection or auto to use them)"
                    ] if set_here else []
        return "jwt", None, warnings
    endpoint = r.raw("INTROSPECTION_ENDPOINT")
    allow_http = r.raw("OIDC_ALLOW_HTTP").lower() in TRUE_WORDS  # its problems are the issuer's
    if endpoint and not check_url("INTROSPECTION_ENDPOINT", endpoint, r.problems,
                                  allow_http=allow_http):
        endpoint = ""
    elif endpoint and "?" in endpoint:
        r.problems.append(f"INTROSPECTION_ENDPOINT={shown_url(endpoint)!r} must not contain a "
                          "query")
    client_id = r.raw("INTROSPECTION_CLIENT_ID")
    method = r.choice("INTROSPECTION_AUTH_METHOD", AUTH_METHODS)
    secret = r.secret("INTROSPECTION_CLIENT_SECRET")
    if not client_id and method != "none":  # an endpoint without client auth (Hydra's admin)
        r.problems.append(
            f"TOKEN_VALIDATION={mode} needs INTROSPECTION_CLIENT_ID: the sidecar asks the IdP "
            "about opaque tokens as a client of its own (register one at the IdP that may "
            "introspect, e.g. a confidential client with the introspection permission)")
    if method == "none":
        if secret:
            r.problems.append("INTROSPECTION_AUTH_METHOD=none sends no secret: unset "
                              "INTROSPECTION_CLIENT_SECRET or choose client_secret_basic")
    elif not secret and not any("INTROSPECTION_CLIENT_SECRET" in p for p in r.problems):
        r.problems.append(
            f"TOKEN_VALIDATION={mode} needs INTROSPECTION_CLIENT_SECRET (or its _FILE form): "
            "the introspection client's secret (or INTROSPECTION_AUTH_METHOD=none for an "
            "endpoint that takes no client authentication)")
    return mode, IntrospectionConfig(
        endpoint=endpoint, client_id=client_id, client_secret=secret, auth_method=method,
        cache_seconds=r.number("INTROSPECTION_CACHE_SECONDS", float, 0.0, 3600.0),
        negative_cache_seconds=r.number("INTROSPECTION_NEGATIVE_CACHE_SECONDS", float, 0.0,
                                        300.0),
        require_exp=r.flag("INTROSPECTION_REQUIRE_EXP"),
        max_concurrency=r.number("INTROSPECTION_MAX_CONCURRENCY", int, 1, 10_000),
        timeout=r.number("INTROSPECTION_TIMEOUT_SECONDS", float, 0.1, 120.0),
    ), []
