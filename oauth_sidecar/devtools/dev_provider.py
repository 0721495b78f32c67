"""A development OpenID provider for `oauth-sidecar demo`, on loopback only.

Why: a newcomer should see the whole MCP authorization dance without an account at a real IdP.
So this is a real authorization server, not a shortcut: OIDC discovery and RFC 8414 metadata, a
JWKS, open RFC 7591 registration of public clients, the authorization-code grant with PKCE S256
only (OAuth 2.1), refresh-token rotation, RFC 8707 resource indicators (the token's `aud`) and
RFC 9207 `iss` in the authorization response. The sidecar fetches its discovery document and keys
over HTTP and validates its tokens exactly as it would a real IdP's.

What makes it a *development* provider: its signing key is generated at start and every grant
lives in memory, and its demo users sign in with one click and no password. Anyone who can reach
it can therefore sign in, so it must only ever be reachable from this machine: the issuer must be
a loopback URL and every request must name the issuer's host (DNS rebinding).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import jwt
import structlog
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from multidict import MultiMapping

from oauth_sidecar.config import canonical_resource, is_loopback_host, split_list
from oauth_sidecar.config.redirect_uris import (
    RedirectUriRefused,
    is_loopback_redirect,
    parse_redirect_uri,
)
from oauth_sidecar.outcome import Handler
from oauth_sidecar.signin.authserver import with_query

log = structlog.get_logger("oauth_sidecar.dev_provider")

ALGORITHM = "ES256"  # P-256 keys are generated instantly; the sidecar accepts ES256 by default
ACCESS_TOKEN_TTL = 600  # seconds: short, so clients exercise the refresh grant
REFRESH_TOKEN_TTL = 24 * 3600
CODE_TTL = 60  # RFC 6749 §4.1.2: "a maximum authorization code lifetime of 10 minutes"; less
PENDING_TTL = 600  # seconds a user has to pick an account on the sign-in page
MAX_ENTRIES = 1000  # per store (clients, pending requests, codes, refresh tokens): bounded memory
MAX_FORM_BYTES = 16 * 1024
SCOPES = ("openid", "email", "profile", "offline_access")
DEFAULT_SCOPE = "openid email profile"
# RFC 7636 §4.1: 43 to 128 unreserved characters; an S256 challenge is 43 base64url characters.
VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
S256_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1
PAGE_HEADERS = {  # the sign-in page may not be framed (clickjacking) nor run any script
    **NO_STORE, "X-Frame-Options": "DENY",
    # No form-action: browsers apply it to the redirect that follows the form, to the client.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "frame-ancestors 'none'",
}
CORS = {"Access-Control-Allow-Origin": "*"}  # browser-based clients (MCP Inspector); no cookies


@dataclass(frozen=True, slots=True)
class DemoUser:
    sub: str
    email: str
    name: str
    groups: tuple[str, ...]
    note: str
    """Shown on the sign-in page: what the demo sidecar will do with this user."""


DEMO_USERS = (
    DemoUser("alice", "alice@example.com", "Alice Example", ("mcp-users",),
             "in group mcp-users: the demo sidecar lets her in"),
    DemoUser("bob", "bob@example.com", "Bob Example", ("guests",),
             "signs in, but is on no allow-list: the demo sidecar answers 403"),
)


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    name: str
    redirect_uris: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Grant:
    """What the user approved: carried by a pending request, a code and a refresh token."""

    client_id: str
    redirect_uri: str
    redirect_uri_given: bool
    """RFC 6749 §4.1.3: if the authorization request named it, the token request must too."""
    scope: tuple[str, ...]
    resource: str
    code_challenge: str
    state: str | None
    nonce: str | None
    user: DemoUser | None = None
    family: str = field(default_factory=lambda: secrets.token_hex(8))
    """Ties a code to the refresh tokens issued from it (revoked together on code reuse)."""


class OAuthError(Exception):
    """An RFC 6749 §5.2 error for the token or registration endpoint."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


T = TypeVar("T")


class _Store(Generic[T]):
    """In-memory entries with a lifetime, oldest evicted first beyond MAX_ENTRIES."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._entries: OrderedDict[str, tuple[float, T]] = OrderedDict()

    def put(self, key: str, value: T) -> None:
        self._entries[key] = (time.monotonic() + self._ttl, value)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)

    def get(self, key: str) -> T | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def pop(self, key: str) -> T | None:
        """Single use: the entry is gone whether or not it was still valid."""
        entry = self._entries.pop(key, None)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def drop(self, matches: Any) -> None:
        for key in [k for k, (_, v) in self._entries.items() if matches(v)]:
            del self._entries[key]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _digest(secret: str) -> str:
    """Codes and refresh tokens are stored by hash: a memory dump holds no usable one."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _single(params: MultiMapping[Any], name: str) -> str | None:
    """RFC 6749 §3.1/§3.2: a parameter sent more than once is an invalid request."""
    values = params.getall(name, [])
    if len(values) > 1:
        raise OAuthError("invalid_request", f"The {name} parameter is repeated")
    return str(values[0]) if values else None


def _redirect_uri_allowed(uri: object) -> bool:
    """https anywhere, or http on loopback (RFC 8252 §7.3: Claude Code, MCP Inspector)."""
    try:
        parts = parse_redirect_uri(uri)
    except RedirectUriRefused:
        return False
    return parts.scheme == "https" or is_loopback_redirect(parts)


class DevProvider:
    """The provider: `app()` serves it, `mint_access_token()` is its one token builder."""

    def __init__(
        self, issuer: str, resource: str, users: Iterable[DemoUser] = DEMO_USERS, *,
        access_token_ttl: int = ACCESS_TOKEN_TTL,
    ) -> None:
        parts = urlsplit(issuer)
        if parts.scheme != "http" or not is_loopback_host(parts.hostname) or parts.path:
            raise ValueError(f"the development provider only runs on loopback, not {issuer!r}")
        self.issuer = issuer
        self.resource = canonical_resource(resource)[0]
        self.users = {user.sub: user for user in users}
        self.access_token_ttl = access_token_ttl
        self._host = parts.netloc.lower()
        self._key = ec.generate_private_key(ec.SECP256R1())
        jwk = ECAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        # RFC 7638 thumbprint as kid: the required members, sorted, no whitespace.
        members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
        self.kid = _b64(hashlib.sha256(json.dumps(members, separators=(",", ":"),
                                                  sort_keys=True).encode()).digest())
        self._jwks = json.dumps({"keys": [{**jwk, "kid": self.kid, "use": "sig",
                                           "alg": ALGORITHM}]}).encode()
        self._metadata = json.dumps(self.metadata(), indent=2).encode()
        self._clients: _Store[Client] = _Store(REFRESH_TOKEN_TTL)
        self._pending: _Store[Grant] = _Store(PENDING_TTL)
        self._codes: _Store[Grant] = _Store(CODE_TTL)
        self._used_codes: _Store[str] = _Store(REFRESH_TOKEN_TTL)  # code hash -> family
        self._refresh: _Store[Grant] = _Store(REFRESH_TOKEN_TTL)

    def metadata(self) -> dict[str, Any]:
        """One document for OIDC Discovery and RFC 8414 (the same issuer, so either path)."""
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "registration_endpoint": f"{self.issuer}/register",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],  # MCP clients refuse without S256
            "token_endpoint_auth_methods_supported": ["none"],  # public clients only
            "scopes_supported": list(SCOPES),
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "claims_supported": ["sub", "email", "email_verified", "name", "groups"],
            "authorization_response_iss_parameter_supported": True,  # RFC 9207
        }

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._only_our_host], client_max_size=MAX_FORM_BYTES)
        for document in ("openid-configuration", "oauth-authorization-server"):
            app.router.add_get(f"/.well-known/{document}", self._serve_metadata)
        app.router.add_get("/jwks", self._serve_jwks)
        app.router.add_post("/register", self._register)
        app.router.add_get("/authorize", self._authorize_page)
        app.router.add_post("/authorize", self._authorize_decision)
        app.router.add_post("/token", self._token)
        for path in ("/register", "/token", "/jwks", "/.well-known/{rest:.*}"):
            app.router.add_route("OPTIONS", path, self._preflight)
        return app

    # --- tokens ----------------------------------------------------------------------------

    def mint_access_token(
        self, user: DemoUser, *, client_id: str, scope: Iterable[str], lifetime: int,
    ) -> str:
        """The access token for the demo resource: the /token endpoint and the demo's printed
        token both come from here (same key, same claims)."""
        now = int(time.time())
        claims = {
            "iss": self.issuer, "sub": user.sub, "aud": self.resource, "iat": now,
            "exp": now + lifetime, "jti": secrets.token_hex(16), "client_id": client_id,
            "scope": " ".join(scope), "email": user.email, "email_verified": True,
            "name": user.name, "groups": list(user.groups),
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM,
                          headers={"kid": self.kid, "typ": "at+jwt"})  # RFC 9068

    def _id_token(self, grant: Grant, user: DemoUser) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "sub": user.sub, "aud": grant.client_id, "iat": now,
            "exp": now + self.access_token_ttl, "email": user.email, "email_verified": True,
            "name": user.name,
        }
        if grant.nonce:
            claims["nonce"] = grant.nonce
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self.kid})

    def _issue(self, grant: Grant, grant_type: str) -> web.Response:
        if grant.user is None:  # never: codes and refresh tokens are made after sign-in
            return self._error(OAuthError("invalid_grant", "No user approved this grant"))
        refresh_token = secrets.token_urlsafe(32)
        self._refresh.put(_digest(refresh_token), grant)
        body: dict[str, Any] = {
            "access_token": self.mint_access_token(
                grant.user, client_id=grant.client_id, scope=grant.scope,
                lifetime=self.access_token_ttl),
            "token_type": "Bearer", "expires_in": self.access_token_ttl,
            "scope": " ".join(grant.scope), "refresh_token": refresh_token,
        }
        if "openid" in grant.scope:
            body["id_token"] = self._id_token(grant, grant.user)
        log.info("token_issued", grant_type=grant_type, sub=grant.user.sub,
                 client_id=grant.client_id, scope=body["scope"])
        return web.json_response(body, headers={**NO_STORE, **CORS})

    # --- middleware and small documents ----------------------------------------------------

    @web.middleware
    async def _only_our_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """DNS rebinding: a page on another name resolving to 127.0.0.1 must not reach us."""
        if request.host.lower() != self._host:
            return web.Response(status=421, text="Misdirected request: use " + self.issuer + "\n")
        response: web.StreamResponse = await handler(request)
        return response

    async def _serve_metadata(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metadata, content_type="application/json", headers=CORS)

    async def _serve_jwks(self, request: web.Request) -> web.Response:
        return web.Response(body=self._jwks, content_type="application/json", headers=CORS)

    async def _preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers={
            **CORS, "Access-Control-Allow-Methods": "GET, POST",
            "Access-Control-Allow-Headers": "Content-Type, Authorization, MCP-Protocol-Version",
            "Access-Control-Max-Age": "600",
        })

    # --- RFC 7591 registration -------------------------------------------------------------

    async def _register(self, request: web.Request) -> web.Response:
        try:
            metadata = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError, RecursionError):
            return self._error(OAuthError("invalid_client_metadata", "The body is not JSON"))
        try:
            client, answer = self._new_client(metadata)
        except OAuthError as exc:
            return self._error(exc)
        self._clients.put(client.client_id, client)
        log.info("client_registered", client_id=client.client_id, client_name=client.name,
                 redirect_uris=list(client.redirect_uris))
        return web.json_response(answer, status=201, headers={**NO_STORE, **CORS})

    def _new_client(self, metadata: Any) -> tuple[Client, dict[str, Any]]:
        if not isinstance(metadata, dict):
            raise OAuthError("invalid_client_metadata", "The body is not a JSON object")
        uris = metadata.get("redirect_uris")
        if not isinstance(uris, list) or not uris or len(uris) > 10:
            raise OAuthError("invalid_redirect_uri", "redirect_uris must list 1 to 10 URIs")
        if not all(_redirect_uri_allowed(uri) for uri in uris):
            raise OAuthError("invalid_redirect_uri",
                             "Redirect URIs must be https, or http on 127.0.0.1, ::1 or localhost")
        grants = metadata.get("grant_types", ["authorization_code"])
        if not isinstance(grants, list) or not set(grants) <= {"authorization_code",
                                                                "refresh_token"}:
            raise OAuthError("invalid_client_metadata",
                             "Only the authorization_code and refresh_token grants are offered")
        if metadata.get("response_types", ["code"]) != ["code"]:
            raise OAuthError("invalid_client_metadata", "Only the code response type is offered")
        name = metadata.get("client_name")
        name = name[:100] if isinstance(name, str) and name.strip() else "an unnamed client"
        client = Client(secrets.token_urlsafe(16), name, tuple(uris))
        # RFC 7591 §3.2.1: the server may replace requested values; we register public
        # clients only (token_endpoint_auth_method none), whatever was asked.
        answer = {
            "client_id": client.client_id, "client_id_issued_at": int(time.time()),
            "client_name": name, "redirect_uris": list(uris),
            "grant_types": grants or ["authorization_code"], "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }
        return client, answer

    # --- authorization endpoint ------------------------------------------------------------

    async def _authorize_page(self, request: web.Request) -> web.Response:
        """Checks the request (RFC 6749 §4.1.2.1: errors about the client or its redirect URI
        are shown here, never redirected), then lists the demo users to pick from."""
        query = request.query
        try:
            client_id = _single(query, "client_id")
            redirect_given = _single(query, "redirect_uri")
        except OAuthError as exc:
            return self._page(400, "Invalid request", exc.description)
        client = self._clients.get(client_id or "")
        if client is None:
            return self._page(400, "Unknown client", "This client is not registered here "
                              "(the development provider forgets clients when it restarts).")
        if redirect_given is None and len(client.redirect_uris) == 1:
            redirect_uri = client.redirect_uris[0]
        elif redirect_given in client.redirect_uris:
            redirect_uri = redirect_given
        else:
            return self._page(400, "Invalid redirect URI",
                              "The redirect_uri is not one this client registered.")
        state = query.get("state")
        try:
            grant = self._check_request(query, client, redirect_uri, redirect_given is not None)
        except OAuthError as exc:
            return self._back_to_client(redirect_uri, state, error=exc.error,
                                        error_description=exc.description)
        handle = secrets.token_urlsafe(32)  # single use and unguessable: the page's CSRF token
        self._pending.put(handle, grant)
        return self._sign_in_page(client, grant, handle)

    def _check_request(
        self, query: Any, client: Client, redirect_uri: str, redirect_given: bool,
    ) -> Grant:
        if _single(query, "response_type") != "code":
            raise OAuthError("unsupported_response_type", "Only response_type=code is offered")
        challenge = _single(query, "code_challenge")
        if _single(query, "code_challenge_method") != "S256" or challenge is None:
            raise OAuthError("invalid_request", "PKCE is required: code_challenge_method=S256")
        if not S256_CHALLENGE.fullmatch(challenge):
            raise OAuthError("invalid_request", "The code_challenge is not an S256 challenge")
        resource = self._resource(query.getall("resource", []))
        requested = split_list(_single(query, "scope") or DEFAULT_SCOPE)
        # Scopes we do not know are dropped, not refused; the token response names the granted
        # ones (RFC 6749 §3.3), so a client asking for its own scopes still gets a token.
        scope = tuple(s for s in requested if s in SCOPES) or split_list(DEFAULT_SCOPE)
        return Grant(client_id=client.client_id, redirect_uri=redirect_uri,
                     redirect_uri_given=redirect_given, scope=scope, resource=resource,
                     code_challenge=challenge, state=_single(query, "state"),
                     nonce=_single(query, "nonce"))

    def _resource(self, values: list[Any]) -> str:
        """RFC 8707: this provider serves one resource. Without a `resource` parameter that one
        is meant (a Claude Code version sends none); a trailing slash is the same resource."""
        for value in values:
            try:
                canonical = canonical_resource(value)[0] if isinstance(value, str) else ""
            except ValueError:
                canonical = ""
            if canonical != self.resource:
                raise OAuthError("invalid_target", f"This provider issues tokens for "
                                 f"{self.resource} only")
        return self.resource

    def _sign_in_page(self, client: Client, grant: Grant, handle: str) -> web.Response:
        target = urlsplit(grant.redirect_uri)
        buttons = "\n".join(
            f'<button type="submit" name="user" value="{html.escape(user.sub)}">'
            f"<b>{html.escape(user.email)}</b><br><small>{html.escape(user.note)}</small>"
            "</button>"
            for user in self.users.values()
        )
        body = f"""<p><b>{html.escape(client.name)}</b> asks to act as you on
<code>{html.escape(grant.resource)}</code> (scope: <code>{html.escape(' '.join(grant.scope))}</code>).
After you choose, your browser returns to <code>{html.escape(target.scheme)}://{html.escape(target.netloc)}</code>.</p>
<p>Choose a demo user; there is no password, this provider is for development on this machine.</p>
<form method="post" action="/authorize">
<input type="hidden" name="request" value="{html.escape(handle)}">
{buttons}
<button type="submit" name="deny" value="1">Cancel (deny access)</button>
</form>"""  # noqa: E501 - HTML
        return self._page(200, "Sign in to the oauth-sidecar demo", body, raw=True)

    async def _authorize_decision(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() != self.issuer:
            return self._page(403, "Forbidden", "This form can only be sent from its own page.")
        form = await request.post()
        handle = form.get("request")
        grant = self._pending.pop(handle) if isinstance(handle, str) else None
        if grant is None:
            return self._page(400, "Sign-in expired", "This sign-in request expired or was "
                              "already used: start again from your MCP client.")
        if form.get("deny"):
            return self._back_to_client(grant.redirect_uri, grant.state, error="access_denied",
                                        error_description="The user denied access")
        user_id = form.get("user")
        user = self.users.get(user_id) if isinstance(user_id, str) else None
        if user is None:
            return self._page(400, "Unknown user", "Choose one of the demo users.")
        code = secrets.token_urlsafe(32)
        self._codes.put(_digest(code), replace(grant, user=user))
        log.info("signed_in", sub=user.sub, client_id=grant.client_id)
        return self._back_to_client(grant.redirect_uri, grant.state, code=code)

    def _back_to_client(self, redirect_uri: str, state: str | None, **params: str) -> web.Response:
        """302 (Claude.ai broke on 307/308) with state and RFC 9207 iss."""
        values = dict(params)
        if state is not None:
            values["state"] = state
        values["iss"] = self.issuer
        return web.Response(status=302, headers={"Location": with_query(redirect_uri, values),
                                                 **NO_STORE})

    def _page(self, status: int, title: str, message: str, *, raw: bool = False) -> web.Response:
        body = message if raw else f"<p>{html.escape(message)}</p>"
        text = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{html.escape(title)}</title><meta name="viewport" content="width=device-width">
<style>body{{font-family:sans-serif;max-width:40em;margin:3em auto;padding:0 1em}}
button{{display:block;width:100%;margin:.5em 0;padding:.8em;text-align:left;font-size:1em}}</style>
</head><body><h1>{html.escape(title)}</h1>
{body}
<p><small>oauth-sidecar demo: development OpenID provider at {html.escape(self.issuer)}</small></p>
</body></html>"""
        return web.Response(status=status, text=text, content_type="text/html",
                            headers=PAGE_HEADERS)

    # --- token endpoint --------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        try:
            if "Authorization" in request.headers:
                raise OAuthError("invalid_client", "This provider registers public clients "
                                 "only: send client_id, no client authentication", 401)
            form = await request.post()
            client_id = _single(form, "client_id")
            if client_id is None or self._clients.get(client_id) is None:
                raise OAuthError("invalid_client", "Unknown client_id", 401)
            grant_type = _single(form, "grant_type")
            if grant_type == "authorization_code":
                grant = self._redeem_code(form, client_id)
            elif grant_type == "refresh_token":
                grant = self._redeem_refresh_token(form, client_id)
            else:
                raise OAuthError("unsupported_grant_type",
                                 "Only authorization_code and refresh_token are offered")
            self._resource(form.getall("resource", []))
        except OAuthError as exc:
            log.info("token_refused", error=exc.error, reason=exc.description)
            return self._error(exc)
        return self._issue(grant, grant_type)

    def _redeem_code(self, form: Any, client_id: str) -> Grant:
        code = _single(form, "code") or ""
        grant = self._codes.pop(_digest(code))
        if grant is None:
            family = self._used_codes.get(_digest(code))
            if family is not None:  # OAuth 2.1 §4.1.3: a reused code revokes what it gave
                self._refresh.drop(lambda g: g.family == family)
                raise OAuthError("invalid_grant", "The authorization code was already used")
            raise OAuthError("invalid_grant", "Unknown or expired authorization code")
        self._used_codes.put(_digest(code), grant.family)
        if grant.client_id != client_id:
            raise OAuthError("invalid_grant", "The code was issued to another client")
        redirect_uri = _single(form, "redirect_uri")
        if (grant.redirect_uri_given or redirect_uri is not None) and (
            redirect_uri != grant.redirect_uri
        ):
            raise OAuthError("invalid_grant", "redirect_uri differs from the authorization's")
        verifier = _single(form, "code_verifier") or ""
        if not VERIFIER.fullmatch(verifier) or not secrets.compare_digest(
            _b64(hashlib.sha256(verifier.encode()).digest()), grant.code_challenge
        ):
            raise OAuthError("invalid_grant", "PKCE verification failed (code_verifier)")
        return grant

    def _redeem_refresh_token(self, form: Any, client_id: str) -> Grant:
        grant = self._refresh.pop(_digest(_single(form, "refresh_token") or ""))  # rotation
        if grant is None:
            raise OAuthError("invalid_grant", "Unknown, used or expired refresh token")
        if grant.client_id != client_id:
            raise OAuthError("invalid_grant", "The refresh token was issued to another client")
        scope = _single(form, "scope")
        if scope is not None:
            narrower = split_list(scope)
            if not set(narrower) <= set(grant.scope):
                raise OAuthError("invalid_scope", "A refresh cannot widen the scope")
            grant = replace(grant, scope=narrower)
        return grant

    def _error(self, exc: OAuthError) -> web.Response:
        headers = {**NO_STORE, **CORS}
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="oauth-sidecar demo"'
        return web.json_response({"error": exc.error, "error_description": exc.description},
                                 status=exc.status, headers=headers)
