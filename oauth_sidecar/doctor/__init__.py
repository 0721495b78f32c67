"""`oauth-sidecar check`: says before any user tries whether sign-in and token validation will
work, and if not, which of the three parties (IdP, MCP client, sidecar) disagrees and how to fix it.

Why: a misconfigured deployment shows up as a bare 401 or as an MCP client refusing to proceed,
with no hint where the mismatch is. The doctor runs the production pieces (config.load, the
IdentityProvider, the documents discovery.py and authserver.py serve, TokenVerifier, AccessPolicy,
the Gate's challenge, ChildProcess, the proxy's path mapping) against the real IdP and upstream,
prints what an MCP client will see, and reports each known pitfall with its fix. For a token,
every verdict and every pass or fail is the real verifier's and policy's (TokenVerifier.explain,
AccessPolicy.explain, the Gate's own responses); this module only puts them into words and adds
hints, so it cannot contradict the sidecar. The token itself and its signature are never printed.

Severities: an error means sign-in or validation will fail (exit 1); a warning means likely
trouble (exit 0 unless --strict); a note records what was checked and found fine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlsplit

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from oauth_sidecar import __version__
from oauth_sidecar.auth.gate import Gate
from oauth_sidecar.auth.idp import (
    MAX_REDIRECTS,
    IdentityProvider,
    VerificationKey,
    discovery_urls,
    parse_jwk,
    same_issuer,
)
from oauth_sidecar.auth.policy import AccessPolicy, Admission
from oauth_sidecar.auth.ratelimit import RateLimiter
from oauth_sidecar.auth.resource_metadata import (
    authorization_server_metadata_paths,
    protected_resource_document,
    protected_resource_paths,
    public_origin,
)
from oauth_sidecar.auth.tokens import (
    CLIENT_CLAIMS,
    ID_TOKEN_HASHES,
    MAX_KID_LENGTH,
    RFC9068_MEDIA_TYPE,
    Explanation,
    TokenError,
    TokenVerifier,
    bearer_token,
    media_type,
)
from oauth_sidecar.client_ip import ClientAddress
from oauth_sidecar.config import UNSHARED_SEALING_WARNING, Config, is_loopback_host
from oauth_sidecar.log import escaped, shown
from oauth_sidecar.signin.authserver import CALLBACK_PATH, facade_metadata, with_query
from oauth_sidecar.upstream.child import ChildProcess, ChildStartError
from oauth_sidecar.upstream.credential import UpstreamCredential
from oauth_sidecar.upstream.proxy import UpstreamProxy
from oauth_sidecar.upstream.sessions import SessionBindings

ERROR, WARNING, NOTE = "error", "warning", "note"
EXIT_PASS, EXIT_FAIL = 0, 1
PROBE_SECONDS = 10.0  # an upstream or authorization-endpoint probe: the answer's status line only
PROBE_BODY_BYTES = 64 * 1024  # enough of an IdP's error page to find its error code
CHILD_SLACK = 5.0  # seconds beyond MCP_SPAWN_READY_TIMEOUT_SECONDS before we stop waiting
CLOCK_SLACK = 2.0  # seconds: the Date header is truncated to seconds and the request took time
GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
COGNITO_HOST = re.compile(r"cognito-idp\.[a-z0-9-]+\.amazonaws\.com")
OKTA_DOMAINS = (".okta.com", ".oktapreview.com", ".okta-emea.com")
ENTRA_HOSTS = frozenset({"login.microsoftonline.com", "sts.windows.net"})
MICROSOFT_GRAPH = frozenset({"00000003-0000-0000-c000-000000000000", "https://graph.microsoft.com"})
# IdPs known to put RFC 9207 `iss` in authorization responses even where metadata is silent.
ISS_SENDER_HOSTS = (("clerk.", "Clerk"), (".clerk.accounts.dev", "Clerk"),
                    ("fusionauth", "FusionAuth"))
# Guesses that a token with a matching aud disproves (the others are about what is accepted).
UNLIKELY_AUDIENCE = frozenset({
    "audience_keycloak_mapper", "audience_auth0_api", "audience_okta_default", "audience_entra_v1",
    "audience_entra_v2", "audience_near_resource", "audience_client_id",
})  # fmt: skip
SECTIONS = ("identity provider", "keys", "upstream")
# The spawn command is printed with its credentials masked. An argument value is masked when its
# option names a credential (--api-key VALUE, --token=VALUE, password=VALUE; not a *-file, *-path
# or *-dir option, which names a place), when it is a URL's password, or when it looks like one
# by itself: 20 or more characters mixing upper case, lower case and digits (API keys, JWTs,
# base64), or 32 or more hex digits. Masking a harmless value costs a little readability;
# printing a key puts it in a terminal's scroll-back and a CI log.
MASK = "***"
CREDENTIAL_NAME = re.compile(
    r"(?i)key|token|secret|passw|passphrase|pwd|credential|cookie|bearer|private"
    r"|(?:^|[-_.])auth(?:orization)?(?:$|[-_.])")
PLACE_NAME = re.compile(r"(?i)(?:file|path|dir)$")
URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]+@")
HEX_SECRET = re.compile(r"[0-9a-fA-F]{32,}")


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str
    code: str
    """Stable identifier, e.g. `issuer_trailing_slash`."""
    message: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class ClaimCheck:
    name: str
    ok: bool | None
    """None: information only, or not checked (a check it needs failed)."""
    detail: str
    reason: str = ""
    """The verifier's or the policy's reason code when the check failed."""


@dataclass(slots=True)
class TokenReport:
    checks: list[ClaimCheck]
    accepted: bool
    status: int
    """What the sidecar answers: 200 (forwarded), 400, 401, 403 or 503."""
    reason: str
    """The verifier's or the policy's reason code; "" when accepted."""
    description: str
    challenge: str = ""
    """The WWW-Authenticate header the client would get, if any."""

    def failed_checks(self) -> list[str]:
        return [check.name for check in self.checks if check.ok is False]


@dataclass(slots=True)
class Report:
    summary: dict[str, object]
    sections: dict[str, list[str]] = field(default_factory=dict)
    documents: dict[str, object] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    token: TokenReport | None = None
    child_pid: int | None = None

    def codes(self, *severities: str) -> set[str]:
        return {f.code for f in self.findings if not severities or f.severity in severities}

    def passed(self, strict: bool = False) -> bool:
        failing = {ERROR, WARNING} if strict else {ERROR}
        token_ok = self.token is None or self.token.accepted
        return token_ok and not any(f.severity in failing for f in self.findings)


# -- entry points ----------------------------------------------------------------------------------


def read_token(value: str | None, path: str | None, stdin: TextIO) -> str | None:
    """--token TOKEN, --token - (stdin) or --token-file PATH; ValueError when unreadable."""
    if value is not None and path is not None:
        raise ValueError("give --token or --token-file, not both")
    if value == "-":
        raw = stdin.read()
    elif path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                raw = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --token-file: {exc}") from None
    elif value is not None:
        raw = value
    else:
        return None
    token = raw.strip()
    scheme, _, rest = token.partition(" ")
    if scheme.lower() == "bearer" and rest:  # pasted from an Authorization header
        token = rest.strip()
    if not token:
        raise ValueError("the token is empty")
    return token


def run(config: Config, token: str | None = None, *, strict: bool = False,
        as_json: bool = False, out: TextIO | None = None) -> int:
    """Diagnose, print the report, return the exit code (0 pass, 1 fail)."""
    report = asyncio.run(diagnose(config, token))
    out = out or sys.stdout
    # What the IdP, the upstream, the child and the token's claims said is theirs to choose:
    # escaped like a log line, so none can rewrite the operator's terminal.
    if as_json:
        document = {**dataclasses.asdict(report), "passed": report.passed(strict)}
        out.write(json.dumps(escaped(document), indent=2, default=str) + "\n")
    else:
        out.write(render(report, strict=strict))
    return EXIT_PASS if report.passed(strict) else EXIT_FAIL


async def diagnose(config: Config, token: str | None = None) -> Report:
    doctor = _Doctor(config)
    await doctor.run(token)
    return doctor.report


# -- the configuration alone -----------------------------------------------------------------------


def _names_credential(option: str) -> bool:
    name = option.lstrip("-")
    return bool(CREDENTIAL_NAME.search(name)) and not PLACE_NAME.search(name)


def _looks_secret(value: str) -> bool:
    if HEX_SECRET.fullmatch(value):
        return True
    return len(value) >= 20 and not any(c.isspace() for c in value) and (
        not value.startswith(("/", "./", "../", "~"))) and any(c.isupper() for c in value) and (
        any(c.islower() for c in value)) and any(c.isdigit() for c in value)


def shown_command(argv: tuple[str, ...]) -> str:
    """argv as a shell line, every credential-looking value masked (the rule is at MASK)."""
    words: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("-"):
            words.append(MASK)
            hide_next = False
            continue
        name, equals, value = arg.partition("=")
        if equals and value and (_names_credential(name) or _looks_secret(value)):
            words.append(f"{name}={MASK}")
        elif _looks_secret(arg):
            words.append(MASK)
        else:
            words.append(URL_PASSWORD.sub(rf"\g<1>{MASK}@", arg))
        hide_next = arg.startswith("-") and not equals and _names_credential(arg)
    return shlex.join(words)


def configuration_summary(config: Config) -> dict[str, object]:
    """What the operator configured, secrets reduced to "set" / "not set"."""
    auth, policy = config.auth_server, config.policy
    if auth.facade:
        mode = (f"facade (STATIC_CLIENT_ID={auth.client_id}, STATIC_CLIENT_SECRET "
                f"{'set' if auth.client_secret else 'not set'}, STATE_SECRET "
                f"{'set' if auth.state_secret else 'not set'})")
    else:
        mode = "direct" + (f" (STATIC_CLIENT_ID={auth.client_id})" if auth.client_id else "")
    lists = {"ALLOW_SUBS": policy.subs, "ALLOW_EMAILS": policy.emails,
             "ALLOW_EMAIL_DOMAINS": policy.email_domains, "ALLOW_GROUPS": policy.groups}
    allow = [f"{name}={','.join(sorted(values))}" for name, values in lists.items() if values]
    if policy.allow_all_authenticated:
        allow.append("ALLOW_ALL_AUTHENTICATED=true")
    if config.spawn is not None:
        upstream = (f"spawned: {shown_command(config.spawn.argv)} on 127.0.0.1:"
                    f"{config.spawn.port}")
    else:
        upstream = config.upstream.origin + config.upstream.path_prefix
    return {
        "issuer (OIDC_ISSUER_URL)": config.idp.issuer,
        "audiences (OIDC_AUDIENCE)": list(config.tokens.audiences),
        "resource (RESOURCE_URL)": config.resource_url,
        "authorization server mode": mode,
        "upstream": upstream,
        "upstream credential": "MCP_UPSTREAM_BEARER_FILE set" if config.upstream_bearer_file
        else "none",
        "allow-lists": allow,
        "groups claim": ".".join(policy.groups_claim),
        "required scopes": list(policy.required_scopes),
        "advertised scopes": list(config.advertised_scopes),
        "algorithms": sorted(config.tokens.algorithms),
        "leeway (s)": config.tokens.leeway,
        "listen": f"{config.host}:{config.port}",
        "rate-limit storage (RATE_LIMIT_STORAGE_URI)": config.rate_limits.storage_shown,
    }


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


def audience_findings(config: Config) -> list[Finding]:
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
    elif host in ENTRA_HOSTS:
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


# -- the running pieces ----------------------------------------------------------------------------


def _span(seconds: float) -> str:
    total = round(abs(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours} h"] if hours else []
    if hours or minutes:
        parts.append(f"{minutes} m")
    parts.append(f"{secs} s")
    return " ".join(parts)


def _when(timestamp: float) -> str:
    try:
        moment = datetime.fromtimestamp(timestamp, UTC)
    except (OverflowError, OSError, ValueError):
        return f"{timestamp!r}"
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def describe_key(key: VerificationKey) -> str:
    public = key.key
    if isinstance(public, rsa.RSAPublicKey):
        kind = f"RSA {public.key_size} bits"
    elif isinstance(public, ec.EllipticCurvePublicKey):
        kind = f"EC {public.curve.name}"
    else:
        kind = type(public).__name__.removesuffix("PublicKey").lstrip("_")
    return f"{kind}, verifies {', '.join(sorted(key.algorithms))}"


async def _until(predicate: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Doctor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.report = Report(summary=configuration_summary(config),
                             sections={name: [] for name in SECTIONS})
        self.session: aiohttp.ClientSession | None = None

    def add(self, severity: str, code: str, message: str, fix: str = "") -> None:
        self.report.findings.append(Finding(severity, code, message, fix))

    def line(self, section: str, text: str) -> None:
        self.report.sections[section].append(text)

    async def run(self, token: str | None) -> None:
        config = self.config
        replicas = state_secret_findings(config)
        for warning in config.warnings:
            if not (replicas and warning == UNSHARED_SEALING_WARNING):  # said more precisely below
                self.add(WARNING, "config_warning", warning)
        self.report.findings += replicas
        self.report.findings += resource_findings(config)
        audience = audience_findings(config)
        timeout = aiohttp.ClientTimeout(total=config.idp.timeout)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False,
                                         cookie_jar=aiohttp.DummyCookieJar()) as session:
            self.session = session
            idp = IdentityProvider(config.idp, config.tokens.algorithms)
            async with idp.running():
                await self._identity_provider(idp)
                metadata = idp.metadata
                if metadata is not None:
                    await self._keys(metadata)
                    self._metadata_checks(metadata)
                    if config.auth_server.facade:
                        await self._probe_relay(metadata)
                self._documents(idp)
                if token is not None:
                    self.report.token = await explain_token(config, idp, token)
            await self._upstream()
        token_report = self.report.token
        aud_ok = token_report is not None and any(
            c.name == config.tokens.audience_claim and c.ok for c in token_report.checks)
        for guess in audience:  # a real token with a matching aud settles the guess
            settled = aud_ok and guess.code in UNLIKELY_AUDIENCE
            self.report.findings.append(dataclasses.replace(
                guess, severity=NOTE, message=guess.message + " (but the given token's aud "
                "matched)") if settled else guess)

    # -- identity provider and keys -------------------------------------------------------------

    async def _identity_provider(self, idp: IdentityProvider) -> None:
        config, section = self.config, "identity provider"
        urls = discovery_urls(config.idp.issuer)
        self.line(section, f"discovery URLs tried in order: {', '.join(urls)}")
        initial = idp.last_error
        # Each URL may redirect (MAX_REDIRECTS) and each request is bounded by the timeout.
        bound = config.idp.timeout * 4 * (len(urls) + 1) + 1.0
        settled = await _until(lambda: idp.ready or idp.last_error != initial, bound)
        metadata = idp.metadata
        if metadata is not None:
            self.line(section, f"discovery document: issuer {metadata.get('issuer')!r}")
            for name in ("authorization_endpoint", "token_endpoint", "registration_endpoint",
                         "jwks_uri"):
                self.line(section, f"  {name}: {metadata.get(name, '(absent)')}")
        if idp.ready:
            self.line(section, f"keys loaded: {idp.key_count()}")
            return
        error = idp.last_error if settled else f"no answer within {bound:g} s"
        if metadata is None:
            fix = ("set OIDC_ISSUER_URL to the issuer exactly as the IdP's discovery document "
                   "names it") if "names issuer" in str(error) else (
                "check OIDC_ISSUER_URL and that this host reaches the IdP (the sidecar answers "
                "every request with 503 until it does)")
            self.add(ERROR, "discovery_failed", f"the IdP's discovery document: {error}", fix)
        elif "no usable signing key" in str(error):
            self.add(ERROR, "no_usable_key", f"the IdP's key set: {error}",
                     f"allow the IdP's signing algorithm in JWT_ALGORITHMS (now "
                     f"{','.join(sorted(config.tokens.algorithms))}); see the keys listed above")
        else:
            self.add(ERROR, "jwks_unavailable", f"the IdP's key set: {error}",
                     "check that this host reaches the jwks_uri above")

    async def _keys(self, metadata: Mapping[str, Any]) -> None:
        """Every published key with the reason it is usable or not (parse_jwk, as the IdP does),
        and the IdP's clock from the Date header."""
        section, session = "keys", self.session
        jwks_uri = metadata.get("jwks_uri")
        if not isinstance(jwks_uri, str) or session is None:
            return
        try:
            async with session.get(jwks_uri, max_redirects=MAX_REDIRECTS,
                                   headers={"Accept": "application/json"}) as response:
                body = await _read_capped(response, self.config.idp.max_document_bytes)
                status, date, age = (response.status, response.headers.get("Date"),
                                     response.headers.get("Age"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.line(section, f"cannot list the keys: {type(exc).__name__}: {exc}")
            return
        if date:
            self._clock(date, age)
        try:
            entries = json.loads(body).get("keys") if status == 200 else None
        except (ValueError, UnicodeDecodeError, AttributeError):
            entries = None
        if not isinstance(entries, list):
            self.line(section, f"cannot list the keys: HTTP {status}, no keys array")
            return
        for entry in entries:
            kid = entry.get("kid") if isinstance(entry, dict) else None
            name = f"kid {str(kid)[:64]!r}" if kid is not None else "(no kid)"
            try:
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
                key = parse_jwk(entry, self.config.tokens.algorithms)
            except ValueError as exc:
                self.line(section, f"{name}: skipped: {exc}")
                continue
            self.line(section, f"{name}: {describe_key(key)}")

    def _clock(self, date: str, age: str | None) -> None:
        try:
            idp_now = parsedate_to_datetime(date).timestamp() + (int(age) if age else 0)
        except (TypeError, ValueError):
            return
        skew = time.time() - idp_now
        leeway = self.config.tokens.leeway
        if abs(skew) <= CLOCK_SLACK:
            self.line("keys", f"clock: agrees with the IdP's Date header (within "
                              f"{CLOCK_SLACK:g} s)")
        else:
            self.line("keys", f"clock: this host is {_span(skew)} "
                              f"{'ahead of' if skew >= 0 else 'behind'} the IdP (Date header)")
        if abs(skew) > leeway + CLOCK_SLACK:
            effect = ("fresh tokens look not yet valid (nbf/iat in the future)" if skew < 0
                      else "tokens are still accepted after they expired, and refused early "
                           "at the IdP's side")
            self.add(WARNING, "clock_skew",
                     f"this host's clock is {_span(skew)} {'ahead of' if skew >= 0 else 'behind'}"
                     f" the IdP's, more than JWT_LEEWAY_SECONDS={leeway}: {effect}",
                     "synchronise the clock (NTP); raising JWT_LEEWAY_SECONDS only hides it")

    # -- the IdP's metadata: the pitfalls -------------------------------------------------------

    def _metadata_checks(self, metadata: Mapping[str, Any]) -> None:
        config = self.config
        facade = config.auth_server.facade
        configured, named = config.idp.issuer, metadata.get("issuer")
        sends_iss, sender = self._sends_iss(metadata)
        if isinstance(named, str) and named != configured and same_issuer(named, configured):
            if facade:
                self.add(WARNING, "issuer_trailing_slash",
                         f"OIDC_ISSUER_URL {configured!r} and the IdP's issuer {named!r} differ by "
                         "a trailing slash. Tolerated here: the sidecar accepts both forms in "
                         "tokens and in the relay's RFC 9207 check, and clients see the "
                         "sidecar's own issuer; it breaks as soon as clients talk to the IdP "
                         "directly (AUTH_SERVER_MODE=direct)",
                         f"set OIDC_ISSUER_URL={named}")
            else:
                also = (" The IdP also sends iss in authorization responses (RFC 9207), which "
                        "clients compare with that same issuer.") if sends_iss else ""
                self.add(ERROR, "issuer_trailing_slash",
                         f"OIDC_ISSUER_URL {configured!r} and the IdP's issuer {named!r} differ by "
                         "a trailing slash. The sidecar tolerates it (tokens carry the IdP's "
                         "form and are accepted), but MCP clients do not: the protected-resource "
                         f"metadata names {configured!r} as authorization server, and clients "
                         "compare the issuer of its metadata exactly (RFC 8414 §3.3) and refuse "
                         f"to sign in.{also}",
                         f"set OIDC_ISSUER_URL={named}")

        methods = metadata.get("code_challenge_methods_supported")
        if not isinstance(methods, list) or "S256" not in methods:
            shown = "absent" if methods is None else json.dumps(methods)
            if facade:
                self.add(WARNING, "pkce_s256_missing",
                         f"the IdP's metadata does not list S256 in "
                         f"code_challenge_methods_supported ({shown}); the facade's metadata "
                         "claims S256 for it, so sign-in fails at the token step if the IdP does "
                         "not actually support PKCE",
                         "check that the IdP supports PKCE with S256 (most do without saying so)")
            else:
                self.add(ERROR, "pkce_s256_missing",
                         f"the IdP's metadata does not list S256 in "
                         f"code_challenge_methods_supported ({shown}): MCP clients read this "
                         "document directly in direct mode and refuse to sign in without it",
                         "enable PKCE S256 at the IdP, or use facade mode (STATIC_CLIENT_ID), "
                         "whose metadata advertises S256")

        if sends_iss:
            why = (f"{sender} is known to send it" if sender
                   else "authorization_response_iss_parameter_supported is true")
            if facade:
                self.add(NOTE, "rfc9207_iss",
                         f"the IdP sends iss in authorization responses (RFC 9207; {why}); "
                         "in facade mode the sidecar always relays the authorization response "
                         f"(/authorize -> IdP -> {CALLBACK_PATH}), checks the IdP's iss and "
                         "gives clients its own, so clients that discovered the sidecar as "
                         "issuer accept it. (No configuration rewrites the issuer without "
                         "relaying.)")
            else:
                self.add(NOTE, "rfc9207_iss",
                         f"the IdP sends iss in authorization responses (RFC 9207; {why}); in "
                         "direct mode clients discovered the IdP's own issuer, so it matches")

        if not facade:
            self._registration(metadata)
        for name in ("authorization_endpoint", "token_endpoint"):
            if not isinstance(metadata.get(name), str):
                self.add(ERROR, "endpoint_missing",
                         f"the IdP's metadata has no {name}: no client can sign in",
                         "check that OIDC_ISSUER_URL names an OAuth authorization server")
        offered = metadata.get("scopes_supported")
        if isinstance(offered, list):
            missing = [s for s in config.advertised_scopes if s not in offered]
            if missing:
                self.add(WARNING, "scope_not_offered",
                         f"scope(s) {', '.join(missing)} advertised to clients (SCOPES_SUPPORTED"
                         f" / REQUIRED_SCOPES) but absent from the IdP's scopes_supported: it may "
                         "refuse them at sign-in",
                         "define these scopes at the IdP, or advertise the ones it issues")

    def _sends_iss(self, metadata: Mapping[str, Any]) -> tuple[bool, str]:
        if metadata.get("authorization_response_iss_parameter_supported") is True:
            return True, ""
        host = (urlsplit(self.config.idp.issuer).hostname or "").lower()
        for marker, name in ISS_SENDER_HOSTS:
            if marker in host:
                return True, name
        return False, ""

    def _registration(self, metadata: Mapping[str, Any]) -> None:
        """Direct mode: clients register with the IdP itself, or are handed the static client
        only if they call /register on the MCP origin (Claude.ai does, SDK clients do not)."""
        if isinstance(metadata.get("registration_endpoint"), str):
            self.add(NOTE, "registration", "the IdP offers Dynamic Client Registration")
            return
        if metadata.get("client_id_metadata_document_supported") is True:
            self.add(NOTE, "registration", "the IdP accepts Client ID Metadata Documents")
            return
        client_id = self.config.auth_server.client_id
        if client_id:
            self.add(WARNING, "static_client_direct",
                     f"direct mode with STATIC_CLIENT_ID={client_id} and no registration at the "
                     "IdP: only clients that call /register on the MCP origin (Claude.ai) get "
                     "the static client; SDK-based clients post to the IdP's /register and fail",
                     "use facade mode (unset AUTH_SERVER_MODE: it is the default with "
                     "STATIC_CLIENT_ID)")
            return
        self.add(ERROR, "no_registration",
                 "no way for a client to register: the IdP's metadata has no "
                 "registration_endpoint (no DCR) nor client_id_metadata_document_supported, and "
                 "STATIC_CLIENT_ID is not set. MCP clients stop there (Claude.ai asks the user "
                 "to type a client id, which must then exist at the IdP with its callback)",
                 "register one client at the IdP with the callback <RESOURCE_URL origin>"
                 f"{CALLBACK_PATH} and set STATIC_CLIENT_ID (facade mode), or enable DCR")

    async def _probe_relay(self, metadata: Mapping[str, Any]) -> None:
        """Ask the IdP's authorization endpoint what it says to the relay's sign-in request:
        STATIC_CLIENT_ID with redirect_uri=<public origin>/oauth/callback, PKCE S256, the
        advertised scopes and resource, as /authorize sends it. No redirect is followed."""
        config, session, section = self.config, self.session, "identity provider"
        endpoint = metadata.get("authorization_endpoint")
        if not isinstance(endpoint, str) or session is None:
            return
        callback = public_origin(config) + CALLBACK_PATH
        verifier = secrets.token_urlsafe(32)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        params = {
            "response_type": "code", "client_id": config.auth_server.client_id,
            "redirect_uri": callback, "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256", "state": secrets.token_urlsafe(16),
            "resource": config.resource_url,
        }
        if config.advertised_scopes:
            params["scope"] = " ".join(config.advertised_scopes)
        asked = f"client_id={config.auth_server.client_id}, redirect_uri={callback}"
        try:
            async with session.get(with_query(endpoint, params), allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=PROBE_SECONDS)) as response:
                status, location = response.status, response.headers.get("Location", "")
                body = await _read_capped(response, PROBE_BODY_BYTES)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.add(WARNING, "relay_probe_failed",
                     f"could not ask the IdP's authorization endpoint {endpoint}: "
                     f"{type(exc).__name__}: {exc}", "check that this host reaches the IdP")
            return
        self.line(section, f"relay sign-in probe ({asked}): HTTP {status}"
                           + (f" -> {location.partition('?')[0]}" if location else ""))
        error = _error_in(body)
        fix = (f"register {callback} as a redirect URI of client {config.auth_server.client_id} "
               "at the IdP")
        if 300 <= status < 400 and location.startswith(callback):
            answer = dict(parse_qsl(urlsplit(location).query))
            self.add(ERROR, "relay_refused",
                     f"the IdP accepted the relay's callback but refused the sign-in request "
                     f"({asked}): {answer.get('error')}: {answer.get('error_description', '')}",
                     "allow this client the authorization_code grant and the advertised scopes "
                     "and resource at the IdP")
        elif 300 <= status < 400:
            self.add(NOTE, "relay_ok",
                     f"the IdP accepts the relay's sign-in request ({asked}): it answered "
                     f"{status} towards its sign-in page")
        elif status >= 400 or _mentions_redirect_error(body):
            detail = f"{error[0]}: {error[1]}" if error else f"HTTP {status}"
            self.add(ERROR, "relay_refused",
                     f"the IdP refuses the relay's sign-in request ({asked}): {detail}; every "
                     "sign-in would stop at the IdP's error page", fix)
        else:
            self.add(NOTE, "relay_unconfirmed",
                     f"the IdP answered the relay's sign-in request ({asked}) with HTTP {status} "
                     "and a page, most likely its sign-in form; the callback could not be "
                     "confirmed", f"if sign-in fails at the IdP: {fix}")

    # -- what clients see -----------------------------------------------------------------------

    def _documents(self, idp: IdentityProvider) -> None:
        config, origin = self.config, public_origin(self.config)
        gate = Gate(config, verifier=TokenVerifier(config.tokens, idp),
                    policy=AccessPolicy(config.policy), limiter=RateLimiter(config.rate_limits),
                    addresses=ClientAddress(config.trusted_proxies), is_public=lambda _: False)
        no_token = TokenError("missing", "No bearer token", error=None)
        self.report.documents["401 challenge (WWW-Authenticate) without a token"] = (
            gate.challenge(no_token))
        prm_urls = ", ".join(origin + path for path in reversed(protected_resource_paths(config)))
        self.report.documents[f"protected-resource metadata (RFC 9728) at {prm_urls}"] = (
            protected_resource_document(config))
        metadata = idp.metadata
        if config.auth_server.facade:
            urls = ", ".join(origin + p for p in authorization_server_metadata_paths(config))
            title = f"authorization-server metadata (RFC 8414), served by the sidecar at {urls}"
            self.report.documents[title] = (
                facade_metadata(config, metadata) if metadata is not None
                else "(unavailable: the sidecar answers 503 until the IdP's metadata loads)")
        else:
            title = (f"authorization-server metadata, the IdP's own (direct mode: clients fetch "
                     f"it from {config.idp.issuer})")
            self.report.documents[title] = metadata if metadata is not None else "(unavailable)"

    # -- upstream -------------------------------------------------------------------------------

    async def _upstream(self) -> None:
        config = self.config
        proxy = UpstreamProxy(config, policy=AccessPolicy(config.policy),
                              addresses=ClientAddress(config.trusted_proxies),
                              sessions=SessionBindings(config.session_ttl))
        url = str(proxy.upstream_url(config.resource_path or "/", ""))  # the proxy's mapping
        spawn = config.spawn
        if spawn is None:
            await self._probe_upstream(url)
            return
        child, pid = ChildProcess(spawn), None
        self.line("upstream", f"spawning {shown_command(spawn.argv)} (port {spawn.port}, ready "
                              f"within {spawn.ready_timeout:g} s)")
        try:
            async with child.running():
                await _until(lambda: child.ready or child.last_exit is not None,
                             spawn.ready_timeout + CHILD_SLACK)
                pid = self.report.child_pid = child.pid
                if child.ready:
                    self.line("upstream", f"child ready: pid {pid}, port {spawn.port} accepts "
                                          "connections")
                    await self._probe_upstream(url)
                else:
                    self.add(ERROR, "child_not_ready",
                             f"the MCP child did not become ready: {child.last_exit or 'timeout'}",
                             "run MCP_SPAWN_CMD by hand (check -v shows its output); check "
                             "MCP_SPAWN_PORT is the port it listens on, and "
                             "MCP_SPAWN_READY_TIMEOUT_SECONDS")
        except ChildStartError as exc:
            self.add(ERROR, "child_start_failed", f"the MCP child cannot start: {exc.reason}",
                     "free MCP_SPAWN_PORT or choose another")
            return
        if pid is not None:
            alive = _group_alive(pid)
            self.line("upstream", f"child stopped: pid {pid} "
                                  f"{'STILL RUNNING' if alive else 'and its group are gone'}")
            if alive:
                self.add(ERROR, "child_left_running",
                         f"the child's process group {pid} outlived its stop")

    async def _probe_upstream(self, url: str) -> None:
        config, session = self.config, self.session
        if session is None:
            return
        headers = {"Accept": "application/json, text/event-stream"}
        credential = None
        if config.upstream_bearer_file:
            with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
                credential = UpstreamCredential(config.upstream_bearer_file).authorization
        if credential:
            headers["Authorization"] = credential
        timeout = aiohttp.ClientTimeout(total=config.upstream.connect_timeout + PROBE_SECONDS,
                                        sock_connect=config.upstream.connect_timeout)
        try:
            async with session.get(url, headers=headers, allow_redirects=False,
                                   timeout=timeout) as response:
                status = response.status  # only the status line: an SSE body never ends
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.line("upstream", f"GET {url}: unreachable ({type(exc).__name__})")
            self.add(ERROR, "upstream_unreachable",
                     f"GET {url} failed: {type(exc).__name__}: {exc}".rstrip(": "),
                     "check MCP_UPSTREAM_URL (or the spawned child); while the upstream is "
                     "unreachable every authenticated request gets 502 and /readyz 503")
            return
        self.line("upstream", f"GET {url} -> HTTP {status}: reachable")
        if status in (401, 403):
            self.add(WARNING, "upstream_refuses",
                     f"the upstream answered {status} to the sidecar's own request: it wants "
                     "credentials the sidecar does not send",
                     "give it a token in MCP_UPSTREAM_BEARER_FILE, or let it trust the sidecar")
        elif status == 404:
            self.add(WARNING, "upstream_not_found",
                     f"the upstream answered 404 at {url}",
                     "check MCP_UPSTREAM_PATH (the upstream path RESOURCE_URL's path maps to)")
        elif status == 421:
            self.add(WARNING, "upstream_host",
                     "the upstream answered 421 (misdirected): it checks Host",
                     "allow the Host of MCP_UPSTREAM_URL in the MCP server's settings")
        elif status >= 500:
            self.add(WARNING, "upstream_error", f"the upstream answered {status} at {url}")


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most `limit` bytes of the body (the rest is left unread)."""
    body = b""
    async for chunk in response.content.iter_chunked(65536):
        body += chunk
        if len(body) >= limit:
            return body[:limit]
    return body


def _error_in(body: bytes) -> tuple[str, str] | None:
    """An OAuth error object (RFC 6749 §4.1.2.1 fields) in a JSON answer."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return document["error"], str(document.get("error_description", ""))
    return None


def _mentions_redirect_error(body: bytes) -> bool:
    """Error pages served with 200 (Entra's AADSTS50011 is one)."""
    text = body.decode("utf-8", "replace").lower()
    return "aadsts50011" in text or bool(
        re.search(r"invalid[_ ]redirect[_ ]uri|redirect_uri[^<]{0,40}(mismatch|not match|invalid)",
                  text))


# -- the token ------------------------------------------------------------------------------------


async def explain_token(config: Config, idp: IdentityProvider, token: str) -> TokenReport:
    """What the Gate would do with this token, check by check. Every verdict and every pass or
    fail comes from the sidecar's own pieces (bearer_token, TokenVerifier.explain,
    AccessPolicy.explain, the Gate's responses); _Wording only says it in words and adds hints.
    The token and its signature are never part of the report."""
    verifier, policy = TokenVerifier(config.tokens, idp), AccessPolicy(config.policy)
    gate = Gate(config, verifier=verifier, policy=policy, limiter=RateLimiter(config.rate_limits),
                addresses=ClientAddress(config.trusted_proxies), is_public=lambda _: False)
    try:
        bearer_token([f"Bearer {token}"], [], config.tokens.max_token_bytes)
    except TokenError as exc:
        explanation = Explanation({"format": exc}, exc)
    else:
        explanation = await verifier.explain(token)
    words = _Wording(config, idp, verifier)
    checks = words.token_lines(explanation, len(token))
    payload, admission = explanation.payload, None
    subject = payload.get("sub") if payload is not None else None
    if payload is not None and isinstance(subject, str) and subject.strip():
        admission = policy.explain(subject, payload)
        checks += words.policy_lines(admission, payload, policy)
    if explanation.error is not None:
        response, reason = gate.refuse(explanation.error), explanation.error.reason
    elif admission is not None and admission.denied is not None:
        response, reason = gate.deny(admission.denied), admission.denied.reason
    else:
        return TokenReport(checks=checks, accepted=True, status=200, reason="",
                           description="forwarded to the upstream")
    body = response.body if isinstance(response.body, bytes) else b"{}"  # json_error's bytes
    description = json.loads(body).get("error_description", "")
    return TokenReport(checks=checks, accepted=False, status=response.status, reason=reason,
                       description=description,
                       challenge=response.headers.get("WWW-Authenticate", ""))


def _line(name: str, error: TokenError | None, ok_detail: str, fail_detail: str = "") -> ClaimCheck:
    """A check's outcome in words: the detail for a pass, or the failure's own sentence and
    reason code with a hint."""
    if error is None:
        return ClaimCheck(name, True, ok_detail)
    hint = f": {fail_detail}" if fail_detail else ""
    return ClaimCheck(name, False, f"{error.description} ({error.reason}){hint}", error.reason)


class _Wording:
    """Words and hints for the verifier's and the policy's outcomes; it decides nothing."""

    def __init__(self, config: Config, idp: IdentityProvider, verifier: TokenVerifier) -> None:
        self.config, self.idp, self.verifier = config, idp, verifier
        self.now = time.time()

    def token_lines(self, explanation: Explanation, length: int) -> list[ClaimCheck]:
        outcomes, header, payload = explanation.outcomes, explanation.header, explanation.payload
        lines = [_line("format", outcomes["format"], f"a signed JWT of {length} characters",
                       f"{length} characters")]
        if header is None or payload is None:
            return lines
        before_key = {name for name, _ in self.verifier.before_key}
        key_shown = False
        for name, error in outcomes.items():
            if name == "format":
                continue
            if name not in before_key and not key_shown:
                key_shown = True
                if name != "key":
                    lines.append(ClaimCheck("key", None, "not checked: alg or kid is refused"))
            if name == "key":
                lines.append(self._key(error, header, explanation))
                if "signature" not in outcomes:
                    lines.append(ClaimCheck("signature", None, "not checked: no usable key"))
            elif name == "signature":
                lines.append(self._signature(error, explanation))
            else:
                word = (self._audience if name == self.verifier.audience_claim
                        else getattr(self, f"_{name}"))
                passed, hint = word(header, payload)
                if name == "id_token" and error is not None:
                    hint = self._id_token_hint(error, payload)
                lines.append(_line(name, error, passed, hint))
        if "key" not in outcomes:
            index = next(i for i, line in enumerate(lines) if line.name == "key")
            lines.insert(index + 1, ClaimCheck("signature", None, "not checked: no usable key"))
        ignored = sorted(name for name in ("jku", "x5u", "x5c", "jwk") if name in header)
        if ignored:
            lines.append(ClaimCheck("header", None, f"{', '.join(ignored)} ignored: keys come "
                                                    "only from the IdP's JWKS"))
        return lines

    # -- the header --------------------------------------------------------------------------

    def _alg(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        allowed, alg = self.config.tokens.algorithms, header.get("alg")
        hint = " (only asymmetric algorithms are ever accepted)" if isinstance(alg, str) and (
            alg.lower() == "none" or alg.startswith("HS")) else ""
        return (f"{alg} is in JWT_ALGORITHMS",
                f"{alg!r} is not in JWT_ALGORITHMS ({','.join(sorted(allowed))}){hint}")

    def _crit(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        return "absent", "no critical extension is understood"

    def _cty(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        cty = header.get("cty")
        return ("absent" if cty is None else repr(cty)), f"cty {cty!r}"

    def _typ(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        typ = header.get("typ")
        if not isinstance(typ, str):
            return "absent", f"{typ!r} is not a string"
        kind = media_type(typ)
        rfc9068 = " (RFC 9068 access token)" if kind == RFC9068_MEDIA_TYPE else ""
        return f"{typ}{rfc9068}", f"{typ!r} is {kind}, which marks another kind of token"

    def _kid(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        kid = header.get("kid")
        if kid is None:
            return "absent: usable only when exactly one published key fits alg", ""
        return repr(kid), f"must be a string of 1 to {MAX_KID_LENGTH} characters"

    def _key(self, error: TokenError | None, header: Mapping[str, Any],
             explanation: Explanation) -> ClaimCheck:
        key, kid = explanation.key, header.get("kid")
        if error is None:
            described = describe_key(key) if key is not None else "?"
            return ClaimCheck("key", True, f"{kid!r}: {described}")
        published = ", ".join(sorted(str(k.kid) for k in self.idp.all_keys())) or "none"
        hint = {
            "keys_unavailable": f"the IdP's keys are not loaded ({self.idp.last_error})",
            "unknown_kid": f"kid {kid!r} is not in the IdP's key set (published: {published}): "
                           "signed by another issuer or environment, or with a key the IdP no "
                           "longer publishes" if kid is not None else
                           f"no kid, and not exactly one published key fits {header.get('alg')}",
            "alg_key_mismatch": f"the key for kid {kid!r} does not verify {header.get('alg')}",
        }.get(error.reason, "")
        return _line("key", error, "", hint)

    def _signature(self, error: TokenError | None, explanation: Explanation) -> ClaimCheck:
        kid = explanation.key.kid if explanation.key is not None else None
        return _line("signature", error, f"verifies with key {kid!r}",
                     f"does not verify with key {kid!r}: the token was altered, or signed by "
                     "another key with the same kid")

    # -- the claims ----------------------------------------------------------------------------

    def _time(self, name: str, payload: Mapping[str, Any]) -> tuple[str, str]:
        leeway, value = self.config.tokens.leeway, payload.get(name)
        if name not in payload:
            return "absent (optional)", "missing: the sidecar requires exp"
        if not isinstance(value, int | float) or isinstance(value, bool):
            return repr(value), f"{value!r} is not a number"
        try:
            moment = int(value)
        except (OverflowError, ValueError):
            return repr(value), f"{value!r} is not a finite number"
        delta, when = moment - self.now, _when(moment)
        if name == "exp":
            if delta > 0:
                return f"{when}: expires in {_span(delta)}", ""
            return (f"{when}: expired {_span(delta)} ago, within the {leeway} s leeway",
                    f"{when}: expired {_span(delta)} ago (leeway {leeway} s)")
        future = (f"{when}: {_span(delta)} in the future, beyond the {leeway} s leeway (is a "
                  "clock wrong?)")
        if delta > 0:
            return f"{when}: {_span(delta)} in the future, within the {leeway} s leeway", future
        return f"{when} ({_span(delta)} ago)", future

    def _exp(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        return self._time("exp", payload)

    def _nbf(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        return self._time("nbf", payload)

    def _iat(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        return self._time("iat", payload)

    def _sub(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        sub = payload.get("sub")
        return repr(sub), "missing" if sub is None else f"{sub!r} is not a non-empty string"

    def _jti(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        jti = payload.get("jti")
        return ("absent (optional)" if "jti" not in payload else repr(jti),
                f"{jti!r} is not a string")

    def _cnf(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        bound = payload.get("cnf")
        how = ", ".join(sorted(bound)) if isinstance(bound, dict) else repr(bound)
        return "absent: a bearer token", (
            f"cnf ({how}): the client asked the IdP for a DPoP or mTLS-bound token; have it "
            "request a plain bearer token for this resource")

    def _id_token(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        named = [f"{name}={payload[name]!r}" for name in CLIENT_CLAIMS if name in payload]
        client = f"; client: {', '.join(named)}" if named else ""
        mode = self.config.tokens.id_token_check
        return f"not an ID token (JWT_ID_TOKEN_CHECK={mode}){client}", ""

    def _id_token_hint(self, error: TokenError, payload: Mapping[str, Any]) -> str:
        if error.reason == "id_token_no_client":
            return (f"it names no client in {', '.join(CLIENT_CLAIMS)}, as an ID token whose aud "
                    "is the client id does (JWT_ID_TOKEN_CHECK=client); MCP clients must send "
                    "the access token")
        shown = [f"{name}={payload[name]!r}" for name in ("token_use", "typ") if name in payload]
        shown += [name for name in ID_TOKEN_HASHES if name in payload]
        return (f"it says so ({', '.join(shown)}); MCP clients must send the access token, not "
                "the ID token")

    def _iss(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        expected, iss = self.config.tokens.issuer, payload.get("iss")
        if iss is None:
            return "", "missing"
        if not isinstance(iss, str):
            return "", f"{iss!r} is not a string"
        if iss == expected:
            return f"{iss!r} = OIDC_ISSUER_URL", ""
        hint = ""
        if iss.rstrip("/") == expected.rstrip("/"):
            hint = " (they differ in trailing slashes; only one is tolerated)"
        elif iss.lower() == expected.lower():
            hint = " (they differ in letter case; issuers are compared exactly)"
        elif "sts.windows.net" in iss and "login.microsoftonline.com" in expected:
            hint = (" (an Entra v1.0 token: set requestedAccessTokenVersion=2 in the API app's "
                    "manifest)")
        return (f"{iss!r} differs from OIDC_ISSUER_URL {expected!r} only by a trailing slash: "
                "accepted (one trailing slash is tolerated)",
                f"{iss!r} is not OIDC_ISSUER_URL {expected!r}{hint}")

    def _audience(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        claim, ours = self.verifier.audience_claim, list(self.config.tokens.audiences)
        value = payload.get(claim)
        where = "" if claim == "aud" else f" (JWT_AUDIENCE_CLAIM={claim})"
        values = [value] if isinstance(value, str) else value
        if not values or not isinstance(values, list) or not all(
            isinstance(v, str) for v in values
        ):
            hint = ""
            if claim == "client_id" and payload.get("aud"):
                hint = "; the token has aud instead: an ID token, or not a Cognito access token"
            if claim == "aud" and payload.get("client_id") in ours:
                hint = "; client_id holds an OIDC_AUDIENCE value: set JWT_AUDIENCE_CLAIM=client_id"
            return "", f"{claim} is {value!r}{where}{hint}"
        matched = [a for a in ours if a in values]
        hints = []
        for item in values:
            near = [a for a in ours if a.rstrip("/").lower() == item.rstrip("/").lower()]
            if near and item not in ours:
                hints.append(f"{item!r} differs from {near[0]!r} only by case or a trailing "
                             "slash; audiences are compared exactly")
            if item == "account":
                hints.append("`account` is Keycloak's default: add an Audience mapper")
            if item.rstrip("/").endswith("/userinfo"):
                hints.append("an Auth0 login token without an API audience")
            if claim == "aud" and item in (payload.get("azp"), payload.get("client_id")):
                hints.append(f"{item!r} is the client id: an ID token, or an IdP that puts the "
                             "client in aud")
        shown = matched[0] if matched else ""
        return (f"{claim} {values} includes {shown!r} (OIDC_AUDIENCE){where}",
                f"{claim} {values}: none is in OIDC_AUDIENCE {ours}{where}"
                + "".join(f"; {hint}" for hint in hints))

    # -- the policy ----------------------------------------------------------------------------

    def policy_lines(self, admission: Admission, payload: Mapping[str, Any],
                     policy: AccessPolicy) -> list[ClaimCheck]:
        config = self.config.policy
        lines: list[ClaimCheck] = []
        held = " ".join(sorted(policy.scopes(payload))) or "(none)"
        if not config.required_scopes:
            lines.append(ClaimCheck("scope", None, f"token scopes: {held}; REQUIRED_SCOPES is "
                                                   "not set"))
        elif admission.missing_scopes:
            lines.append(ClaimCheck(
                "scope", False, f"missing {' '.join(admission.missing_scopes)} (REQUIRED_SCOPES); "
                f"the token has {held}: the sidecar answers 403 insufficient_scope",
                "insufficient_scope"))
        else:
            lines.append(ClaimCheck("scope", True, f"has every REQUIRED_SCOPES "
                                                   f"({' '.join(config.required_scopes)})"))
        said = [self._list_words(name, admits, payload, policy)
                for name, admits in admission.lists.items()]
        admitted = admission.denied is None or admission.denied.scope_missing
        if not admission.lists:
            said = ["ALLOW_ALL_AUTHENTICATED=true and no allow-list" if admitted else
                    "no allow-list admits anyone now (ALLOW_ALL_AUTHENTICATED=false, or an "
                    "allow-list file that is empty)"]
        if admitted:
            lines.append(ClaimCheck("allow-list", True, "admitted: " + "; ".join(said)))
        else:
            lines.append(ClaimCheck("allow-list", False, "no allow-list admits it: "
                                    + "; ".join(said), "not_allowed"))
        return lines

    def _list_words(self, name: str, admits: bool, payload: Mapping[str, Any],
                    policy: AccessPolicy) -> str:
        sub, email = payload.get("sub"), payload.get("email")
        verified = policy.verified_email(payload)
        if name == "ALLOW_SUBS":
            return f"ALLOW_SUBS {'has' if admits else 'does not have'} sub {sub!r}"
        if name == "ALLOW_GROUPS":
            claim = ".".join(self.config.policy.groups_claim)
            groups = policy.groups(payload)
            if admits:
                common = sorted(policy.allow_list("groups").intersection(groups))
                return f"ALLOW_GROUPS has {', '.join(common)} (claim {claim})"
            return f"groups at claim {claim}: {groups or 'none'}, none in ALLOW_GROUPS"
        if verified is not None:
            part = verified if name == "ALLOW_EMAILS" else verified.partition("@")[2]
            if admits or part.isascii():
                return f"{name} {'has' if admits else 'does not have'} {part}"
            return (f"{name} does not have {part!a} (compared exactly apart from ASCII "
                    "case: no Unicode folding or normalisation)")
        if email is None:
            return f"{name}: no email claim (have the IdP put email in access tokens)"
        if isinstance(email, str) and email.count("@") == 1:
            return (f"{name}: email {email!r} does not count: email_verified="
                    f"{payload.get('email_verified')!r} (only verified emails match; "
                    "INSECURE_ALLOW_UNVERIFIED_EMAIL=false)")
        return f"{name}: email {email!r} is not an email address"


# -- rendering ------------------------------------------------------------------------------------


def render(report: Report, *, strict: bool = False) -> str:
    lines = [f"oauth-sidecar check ({__version__})", "", "Configuration"]
    width = max(map(len, report.summary))
    for name, value in report.summary.items():
        text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        lines.append(f"  {name:<{width}}  {text or '-'}")
    titles = {"identity provider": "Identity provider", "keys": "Keys (JWKS)",
              "upstream": "Upstream"}
    for name, entries in report.sections.items():
        lines += ["", titles.get(name, name), *(f"  {entry}" for entry in entries or ["-"])]
    lines += ["", "What an MCP client sees"]
    for title, document in report.documents.items():
        lines.append(f"  {title}:")
        text = document if isinstance(document, str) else json.dumps(document, indent=2)
        lines += [f"    {row}" for row in text.splitlines()]
    token = report.token
    if token is not None:
        lines += ["", "Token (claim by claim; the token itself is never printed)"]
        for check in token.checks:
            mark = {True: "ok", False: "FAIL", None: "--"}[check.ok]
            lines.append(f"  {mark:<5} {check.name:<10} {check.detail}")
        if token.accepted:
            lines.append("  verdict: ACCEPTED: the sidecar forwards requests with this token")
        else:
            lines.append(f"  verdict: REFUSED: HTTP {token.status} ({token.reason}): "
                         f"{token.description}")
            if token.challenge:
                lines.append(f"  WWW-Authenticate: {token.challenge}")
    order = {ERROR: 0, WARNING: 1, NOTE: 2}
    lines += ["", "Findings"]
    for finding in sorted(report.findings, key=lambda f: order[f.severity]):
        lines.append(f"  {finding.severity.upper():<7} {finding.code}: {finding.message}")
        if finding.fix:
            lines.append(f"          fix: {finding.fix}")
    if not report.findings:
        lines.append("  none")
    counts = {s: sum(f.severity == s for f in report.findings) for s in (ERROR, WARNING)}
    summary = f"{counts[ERROR]} error(s), {counts[WARNING]} warning(s)"
    if token is not None:
        summary += f", token {'accepted' if token.accepted else 'refused'}"
    verdict = "PASS" if report.passed(strict) else "FAIL"
    lines += ["", f"Result: {verdict} ({summary}{', --strict' if strict else ''})", ""]
    return "\n".join(map(shown, lines))  # claims and the IdP's words, escaped
