"""What the facade's relay changes in a request before the IdP sees it: the RFC 8707 `resource`
kept or dropped (IDP_RESOURCE_PARAMETER) and the client's scopes named as the IdP names them
(IDP_SCOPE_PREFIX).

Why: MCP clients must send `resource=<RESOURCE_URL>` and ask for the bare scopes the metadata
advertises (`mcp:read`). Microsoft Entra ID refuses `resource` beside v2 scopes (AADSTS9010010,
AADSTS901002) and wants the API in each scope (`api://<app id>/mcp:read`). Clients cannot be
told to do otherwise, so the relay, which sends every authorization and token request on, says
it the IdP's way. What comes back is unchanged: Entra's `scp` names the bare scope, so
REQUIRED_SCOPES and TOOL_SCOPES keep their bare names, and the metadata keeps advertising them.
"""

from __future__ import annotations

from collections.abc import Mapping

from oauth_sidecar.config import AuthServerConfig

# OpenID Connect and OAuth scopes that belong to the IdP itself, never to the API: an IdP that
# wants API scopes prefixed (Entra) wants these bare.
AS_THEY_ARE = frozenset({"openid", "profile", "email", "offline_access"})


def idp_scope(scope: str, prefix: str) -> str:
    """The space-separated `scope` (RFC 6749 §3.3) with the prefix before each API scope; one
    that already names an API (`://`, or the prefix itself) is left as it is."""
    if not prefix:
        return scope
    return " ".join(
        word if word in AS_THEY_ARE or "://" in word or word.startswith(prefix)
        else prefix + word
        for word in scope.split(" ") if word
    )


def toward_idp(params: Mapping[str, str], auth: AuthServerConfig) -> dict[str, str]:
    """An authorization or token request's parameters as the relay sends them to the IdP."""
    sent = dict(params)
    if not auth.send_resource:
        sent.pop("resource", None)
    if "scope" in sent:
        sent["scope"] = idp_scope(sent["scope"], auth.scope_prefix)
    return sent
