"""The configuration alone, before anything is fetched: pitfalls visible in the settings
themselves (replicas without a shared STATE_SECRET, a RESOURCE_URL clients cannot reach, audiences
the IdP recognised from its issuer is unlikely to put in access tokens, an Entra issuer without
the relay settings Entra's sign-in needs).

Why apart from the live probes: these need no network, so they are plain functions of a Config
that tests call directly, and the diagnosis only adds their findings.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from oauth_sidecar.auth.idp import same_issuer
from oauth_sidecar.config import Config, is_loopback_host
from oauth_sidecar.doctor.report import ERROR, NOTE, WARNING, Finding

GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
COGNITO_HOST = re.compile(r"cognito-idp\.[a-z0-9-]+\.amazonaws\.com")
OKTA_DOMAINS = (".okta.com", ".oktapreview.com", ".okta-emea.com")
ENTRA_HOSTS = frozenset({"login.microsoftonline.com", "sts.windows.net"})
ENTRA_EXTERNAL_ID = ".ciamlogin.com"  # Entra External ID: https://<tenant>.ciamlogin.com/<id>/v2.0
MICROSOFT_GRAPH = frozenset({"00000003-0000-0000-c000-000000000000", "https://graph.microsoft.com"})
# Guesses that a token with a matching aud disproves (the others are about what is accepted).
UNLIKELY_AUDIENCE = frozenset({
    "audience_keycloak_mapper", "audience_auth0_api", "audience_okta_default", "audience_entra_v1",
    "audience_entra_v2", "audience_near_resource", "audience_client_id",
})  # fmt: skip


def is_entra(issuer: str) -> bool:
    """Microsoft Entra ID (workforce, v1.0 or v2.0 issuer form) or Entra External ID."""
    host = (urlsplit(issuer).hostname or "").lower()
    return host in ENTRA_HOSTS or host.endswith(ENTRA_EXTERNAL_ID)


def entra_scope_prefix(audiences: tuple[str, ...]) -> str:
    """The IDP_SCOPE_PREFIX OIDC_AUDIENCE points to: the API's App ID URI (api://...) as given,
    or the default URI of an application id (api://<GUID>); "" when neither is there."""
    for audience in audiences:
        if audience.lower().startswith("api://") and len(audience.rstrip("/")) > len("api://"):
            return audience.rstrip("/") + "/"
    for audience in audiences:
        if GUID.fullmatch(audience):
            return f"api://{audience}/"
    return ""


def entra_findings(config: Config) -> list[Finding]:
    """Entra refuses the RFC 8707 `resource` MCP clients send beside v2.0 scopes (AADSTS9010010,
    AADSTS901002) and wants the API in each scope: the facade's relay can say it Entra's way."""
    issuer, auth = config.idp.issuer, config.auth_server
    if not is_entra(issuer):
        return []
    v2 = urlsplit(issuer).path.rstrip("/").endswith("/v2.0")
    if not v2:
        return [Finding(NOTE, "entra_v1_sign_in", (
            "this is an Entra v1.0 issuer: its discovery names the v1.0 endpoints, which read "
            "`resource` (wanting the API's App ID URI) rather than scopes, so "
            "IDP_RESOURCE_PARAMETER and IDP_SCOPE_PREFIX do not apply to them"),
            "prefer the v2.0 issuer https://login.microsoftonline.com/<tenant>/v2.0 with "
            "IDP_RESOURCE_PARAMETER=omit and IDP_SCOPE_PREFIX=api://<API app id>/ (facade mode)")]
    suggested = entra_scope_prefix(config.tokens.audiences)
    prefix = suggested or "api://<API app id>/"
    if not auth.facade:
        return [Finding(WARNING, "entra_direct", (
            "with Entra in direct mode, MCP clients send their RFC 8707 `resource` and bare scopes "
            "to Entra itself, which refuses them (AADSTS9010010 or AADSTS901002; an unknown "
            "scope): the sidecar cannot change requests it does not relay"),
            f"use facade mode (STATIC_CLIENT_ID, a client registered with the callback "
            f"<RESOURCE_URL origin>/oauth/callback) with IDP_RESOURCE_PARAMETER=omit and "
            f"IDP_SCOPE_PREFIX={prefix}")]
    findings = []
    if auth.send_resource:
        findings.append(Finding(WARNING, "entra_resource_parameter", (
            "IDP_RESOURCE_PARAMETER=pass: the relay passes on the `resource` MCP clients must "
            "send (RFC 8707), and Entra's v2.0 endpoints refuse it beside the API's scopes "
            "(AADSTS9010010: the resource parameter doesn't match the requested scopes; "
            "AADSTS901002: the resource parameter is not supported)"),
            "set IDP_RESOURCE_PARAMETER=omit: the API is named by the scope instead"))
    if not auth.scope_prefix:
        which = ("(from OIDC_AUDIENCE; if the API's Application ID URI is not the default, use "
                 "it and a slash)" if suggested else
                 "(the API app's Application ID URI and a slash)")
        findings.append(Finding(WARNING, "entra_scope_prefix", (
            "IDP_SCOPE_PREFIX is not set: Entra names an API's scopes api://<API app id>/<scope>, "
            "and a bare scope such as the clients' `mcp:read` is not one of them (a sign-in that "
            "names no API scope gets a Microsoft Graph token, which the sidecar cannot verify)"),
            f"set IDP_SCOPE_PREFIX={prefix} {which}; keep SCOPES_SUPPORTED, REQUIRED_SCOPES "
            "and TOOL_SCOPES bare: Entra's scp claim carries the bare names"))
    else:
        named = {g.lower() for g in GUID.findall(auth.scope_prefix)}
        accepted = {a.lower() for a in config.tokens.audiences if GUID.fullmatch(a)}
        if named and accepted and not named & accepted:
            findings.append(Finding(WARNING, "entra_scope_prefix_app", (
                f"IDP_SCOPE_PREFIX={auth.scope_prefix} names another application than "
                f"OIDC_AUDIENCE ({', '.join(config.tokens.audiences)}): Entra issues the token "
                "for the API of the scope, with that API's id in aud, so it would be refused "
                "(wrong_audience)"),
                f"set IDP_SCOPE_PREFIX={suggested}, or OIDC_AUDIENCE to the API app's id"))
    return findings


def state_secret_findings(config: Config) -> list[Finding]:
    """Replicas are likely when they share a Redis; each then needs the same STATE_SECRET."""
    auth = config.auth_server
    if not auth.facade or auth.state_secret or not config.rate_limits.shared:
        return []
    return [Finding(WARNING, "state_secret_replicas", (
        "STATE_SECRET is not set although RATE_LIMIT_STORAGE_URI is a Redis that replicas "
        "share: each replica seals sign-ins with a random key of its own, so a sign-in whose "
        "callback or /token request reaches another replica than /authorize did is refused"),
        "set the same STATE_SECRET (or STATE_SECRET_FILE) on every replica, e.g. the output of "
        "`openssl rand -hex 32`")]


def resource_findings(config: Config) -> list[Finding]:
    """RESOURCE_URL over plain http off loopback is already refused by config.load (exit 2)."""
    parts = urlsplit(config.resource_url)
    findings = []
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        findings.append(Finding(NOTE, "resource_loopback", (
            f"RESOURCE_URL {config.resource_url} is plain http on loopback: only clients on this "
            "host can use it (Claude.ai cannot)")))
    elif parts.port not in (None, 443):
        findings.append(Finding(WARNING, "resource_port", (
            f"RESOURCE_URL {config.resource_url} uses port {parts.port}: Claude.ai connects to "
            "MCP servers on port 443 only"),
            "publish the sidecar on https port 443 (a reverse proxy or load balancer in front)"))
    return findings


def audience_findings(config: Config) -> list[Finding]:  # noqa: PLR0912, PLR0915 (one rule per IdP)  # noqa: PLR0912, PLR0915 (one rule per IdP family)
    """Audiences the IdP, recognised from its issuer, is unlikely to put in access tokens."""
    issuer = config.idp.issuer
    parts = urlsplit(issuer)
    host, path = (parts.hostname or "").lower(), parts.path
    audiences = config.tokens.audiences
    shown = ", ".join(audiences)
    findings: list[Finding] = []

    def add(severity: str, code: str, message: str, fix: str) -> None:
        findings.append(Finding(severity, code, message, fix))

    recognised = True
    if host == "accounts.google.com":
        add(ERROR, "audience_google_opaque",
            "Google's access tokens are opaque strings, not JWTs: the sidecar cannot validate "
            "them and every request would get 401 (only Google's ID tokens are JWTs)",
            "put an IdP that issues JWT access tokens in front (e.g. Keycloak, Auth0 or Okta "
            "federating Google sign-in) and point OIDC_ISSUER_URL at it")
    elif COGNITO_HOST.fullmatch(host):
        if config.tokens.audience_claim != "client_id":
            add(ERROR, "audience_cognito_no_aud",
                "Cognito user-pool access tokens carry no aud claim (only client_id), so with "
                "JWT_AUDIENCE_CLAIM=aud every Cognito access token would be refused",
                "set JWT_AUDIENCE_CLAIM=client_id and OIDC_AUDIENCE=<the app client id>")
        elif any("/" in audience or ":" in audience for audience in audiences):
            add(WARNING, "audience_cognito_client_id",
                f"with JWT_AUDIENCE_CLAIM=client_id, OIDC_AUDIENCE must be the app client id "
                f"(like 1example23456789abcdefghij), not a URL: {shown}",
                "set OIDC_AUDIENCE to the id under App integration -> App clients")
    elif "/realms/" in path:
        if "account" in audiences:
            add(WARNING, "audience_keycloak_account",
                "OIDC_AUDIENCE includes `account`, the audience Keycloak puts in the tokens of "
                "every client of the realm: tokens issued for any other application are accepted",
                "create an Audience mapper for this server (below) and accept only its audience")
        else:
            add(WARNING, "audience_keycloak_mapper",
                f"Keycloak access tokens carry aud=account by default; aud={audiences[0]} "
                "appears only when an Audience mapper adds it",
                f"in the realm: Client scopes -> Create (e.g. `mcp`, type Default) -> Mappers -> "
                f"By configuration -> Audience, Included Custom Audience = {audiences[0]}, Add "
                "to access token ON; make it a realm default client scope so clients registered "
                "by DCR get it too")
    elif host.endswith(".auth0.com"):
        if any(a.rstrip("/").endswith("/userinfo") for a in audiences):
            add(ERROR, "audience_auth0_userinfo",
                "OIDC_AUDIENCE names Auth0's /userinfo audience: it is in every login token of "
                "the tenant whatever API it is for, and such tokens are not meant for this server",
                "create an API for this server and use its Identifier as OIDC_AUDIENCE")
        else:
            add(WARNING, "audience_auth0_api",
                f"Auth0 issues a JWT access token with aud={audiences[0]} only for an API with "
                "that Identifier, and only when the sign-in names it (audience=...) or it is the "
                "tenant's Default Audience; MCP clients send resource=RESOURCE_URL, not audience, "
                "and otherwise get an opaque token",
                f"Applications -> APIs -> Create API with Identifier {config.resource_url} (set "
                "OIDC_AUDIENCE to it); then Settings -> API Authorization Settings -> Default "
                "Audience = that Identifier (or enable the Resource Parameter Compatibility "
                "Profile)")
    elif host.endswith(OKTA_DOMAINS):
        if "/oauth2/" not in path:
            add(ERROR, "audience_okta_org_server",
                "this is Okta's Org authorization server: its access tokens are for Okta's own "
                "APIs and cannot be validated by a resource server",
                "use a custom authorization server: OIDC_ISSUER_URL=https://<your-org>/oauth2/"
                "default (or /oauth2/<id>)")
        elif path.rstrip("/").endswith("/oauth2/default") and "api://default" not in audiences:
            add(WARNING, "audience_okta_default",
                "Okta's `default` authorization server issues aud=api://default unless its "
                f"Audience was changed; OIDC_AUDIENCE is {shown}",
                "set OIDC_AUDIENCE=api://default, or change the server's Audience (Security -> "
                "API -> Authorization Servers -> default -> Settings) to this value")
    elif is_entra(issuer):
        graph = [a for a in audiences if a.lower().rstrip("/") in MICROSOFT_GRAPH]
        v2 = path.rstrip("/").endswith("/v2.0")
        if graph:
            add(ERROR, "audience_entra_graph",
                "OIDC_AUDIENCE names Microsoft Graph: Graph access tokens are signed for Graph "
                "alone (with a nonce in their header) and cannot be validated by anyone else",
                "register an API app (Expose an API), and accept its application (client) id")
        elif v2 and not any(GUID.fullmatch(a) for a in audiences):
            add(WARNING, "audience_entra_v2",
                f"Entra v2.0 access tokens carry aud = the API app's application (client) id, a "
                f"GUID; an App ID URI such as api://... is the aud of v1.0 tokens. OIDC_AUDIENCE "
                f"is {shown}",
                "set OIDC_AUDIENCE to the API app registration's Application (client) ID, and "
                "its manifest's requestedAccessTokenVersion (accessTokenAcceptedVersion) to 2: "
                "otherwise tokens are v1.0, with iss https://sts.windows.net/<tenant>/")
        elif not v2:
            add(WARNING, "audience_entra_v1",
                "this is an Entra v1.0 issuer: tokens carry iss https://sts.windows.net/<tenant>/ "
                "only while the API app's manifest says requestedAccessTokenVersion null or 1, "
                "and aud is then the App ID URI (api://...) the client asked for",
                "prefer v2.0: OIDC_ISSUER_URL=https://login.microsoftonline.com/<tenant>/v2.0, "
                "requestedAccessTokenVersion=2 and OIDC_AUDIENCE=<the API app's client id>")
    else:
        recognised = False

    if any(same_issuer(a, issuer) for a in audiences):
        add(WARNING, "audience_is_issuer",
            "OIDC_AUDIENCE equals the issuer: IdPs that put their own URL in aud put it in every "
            "token, so tokens meant for other applications would be accepted",
            "give this server its own audience at the IdP (RESOURCE_URL is the natural one)")
    resource = config.resource_url
    near = [a for a in audiences if a != resource
            and a.rstrip("/").lower() == resource.rstrip("/").lower()]
    if near and resource not in audiences:
        add(WARNING, "audience_near_resource",
            f"OIDC_AUDIENCE {near[0]!r} differs from RESOURCE_URL {resource!r} only by case or "
            "a trailing slash: an IdP honouring RFC 8707 puts the resource exactly as the client "
            "sent it (RESOURCE_URL, from the metadata) in aud, and audiences are compared exactly",
            f"set OIDC_AUDIENCE={resource} (list both forms if some clients send the other)")
    client_ids = [a for a in audiences if "://" not in a and not a.startswith(("api:", "urn:"))]
    id_check = config.tokens.id_token_check
    if not recognised and client_ids and resource not in audiences:
        add(WARNING, "audience_client_id",
            f"OIDC_AUDIENCE {client_ids[0]!r} looks like a client id, but MCP clients ask for "
            f"tokens with resource={resource} (RFC 8707): an IdP that honours it issues "
            "aud=RESOURCE_URL, and a client id in aud usually marks an ID token",
            f"if the IdP supports resource indicators, add {resource} to OIDC_AUDIENCE; "
            "otherwise configure the IdP to put this value in the access tokens it issues"
            + ("" if id_check == "client" else
               ", and if its ID tokens carry the same aud, set JWT_ID_TOKEN_CHECK=client"))
    return findings

