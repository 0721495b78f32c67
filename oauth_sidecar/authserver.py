"""The authorization-server side MCP clients see: RFC 8414 metadata and an RFC 9207-safe relay.

Why: in facade mode the protected-resource metadata names the sidecar as the authorization
server, so the metadata we serve must carry our own issuer (RFC 8414 §3.3; MCP 2026-07-28 clients
reject a mismatch). An IdP that puts `iss=<its issuer>` in the authorization response (RFC 9207:
node oidc-provider, Clerk, FusionAuth) would then be rejected by clients that discovered *our*
issuer. So `/authorize` sends the browser to the IdP with our own callback and a signed,
expiring state carrying the client's redirect_uri and state; `/oauth/callback` checks the IdP's
`iss`, then redirects (302 only: Claude.ai broke on 307/308) to the client with the code, its
state and our `iss`; `/token` forwards to the IdP, putting our callback back as redirect_uri.
Tokens are still minted only by the IdP and we store none: the sidecar stays a resource server.

In direct mode clients talk to the IdP itself; we still answer Claude.ai's origin-root
`/authorize` and `/token` calls by passing them on unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit, urlunsplit

import aiohttp
import structlog
from aiohttp import web

from oauth_sidecar.client_ip import ClientAddress, forwarded_chain
from oauth_sidecar.config import Config
from oauth_sidecar.discovery import public_origin
from oauth_sidecar.http_errors import json_error, rate_limited
from oauth_sidecar.idp import IdentityProvider, same_issuer
from oauth_sidecar.ratelimit import RateLimited, RateLimiter, RateLimitUnavailable
from oauth_sidecar.registration import RedirectAllowList

log = structlog.get_logger("oauth_sidecar.authserver")

CALLBACK_PATH = "/oauth/callback"
REGISTRATION_PATH = "/oauth/register"
STATE_TTL = 600  # seconds a user has to sign in at the IdP
MAX_TOKEN_REQUEST_BYTES = 64 * 1024
MAX_TOKEN_RESPONSE_BYTES = 1 << 20
TOKEN_TIMEOUT = 30.0  # seconds for the IdP's token endpoint
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1
# IdP metadata we must not pass on in facade mode: endpoints that would bypass the relay.
FACADE_DROP = frozenset({
    "pushed_authorization_request_endpoint", "require_pushed_authorization_requests",
    "mtls_endpoint_aliases", "client_id_metadata_document_supported", "registration_endpoint",
})  # fmt: skip


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StateCodec:
    """HMAC-signed, expiring relay state: the client's own values travel through the IdP."""

    def __init__(self, secret: bytes) -> None:
        self._key = hashlib.sha256(b"oauth_sidecar relay state\0" + secret).digest()

    def seal(self, values: Mapping[str, Any]) -> str:
        payload = _b64(json.dumps({**values, "exp": int(time.time()) + STATE_TTL}).encode())
        return f"{payload}.{_b64(hmac.new(self._key, payload.encode(), 'sha256').digest())}"

    def open(self, state: str | None) -> dict[str, Any] | None:
        if not state or state.count(".") != 1 or len(state) > 8192:
            return None
        payload, signature = state.split(".")
        expected = _b64(hmac.new(self._key, payload.encode(), "sha256").digest())
        if not hmac.compare_digest(signature, expected):
            return None
        try:
            values = json.loads(_unb64(payload))
        except ValueError:
            return None
        if not isinstance(values, dict) or not isinstance(values.get("exp"), int):
            return None
        return values if values["exp"] >= time.time() else None


def with_query(url: str, params: Mapping[str, str]) -> str:
    """url with params added to its query (kept: a redirect_uri may carry its own)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location, **NO_STORE})


def facade_metadata(config: Config, upstream: Mapping[str, Any]) -> dict[str, Any]:
    """The IdP's RFC 8414 document as the facade presents it (pure: `check` prints it too)."""
    issuer = public_origin(config)
    document = {k: v for k, v in upstream.items() if k not in FACADE_DROP}
    document.update({
        "issuer": issuer,
        "authorization_endpoint": issuer + "/authorize",
        "token_endpoint": issuer + "/token",
        "registration_endpoint": issuer + REGISTRATION_PATH,
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        # Clients refuse to proceed without S256 (OAuth 2.1 requires PKCE).
        "code_challenge_methods_supported": ["S256"],
        # The relay adds the static client's secret itself: clients authenticate as public.
        "token_endpoint_auth_methods_supported": ["none"] + (
            ["client_secret_post"] if config.auth_server.publish_secret else []
        ),
        "authorization_response_iss_parameter_supported": True,  # RFC 9207
    })
    if config.advertised_scopes:
        offered = upstream.get("scopes_supported")
        offline = isinstance(offered, list) and "offline_access" in offered
        scopes = [*config.advertised_scopes, *(["offline_access"] if offline else [])]
        document["scopes_supported"] = list(dict.fromkeys(scopes))
    return document


class AuthorizationServer:
    def __init__(
        self, config: Config, idp: IdentityProvider, redirects: RedirectAllowList,
        limiter: RateLimiter, addresses: ClientAddress,
    ) -> None:
        self._config = config.auth_server
        self._whole_config = config
        self._idp = idp
        self._redirects = redirects
        self._limiter = limiter
        self._addresses = addresses
        self.issuer = public_origin(config)
        self._callback = self.issuer + CALLBACK_PATH
        secret = self._config.state_secret.encode() or secrets.token_bytes(32)
        self._states = StateCodec(secret)
        self._session: aiohttp.ClientSession | None = None
        self._document: tuple[int, bytes] | None = None  # (id of the IdP document, our bytes)

    @property
    def facade(self) -> bool:
        return self._config.facade

    @asynccontextmanager
    async def running(self) -> AsyncIterator[AuthorizationServer]:
        timeout = aiohttp.ClientTimeout(total=TOKEN_TIMEOUT)
        async with aiohttp.ClientSession(
            timeout=timeout, trust_env=False, cookie_jar=aiohttp.DummyCookieJar()
        ) as session:
            self._session = session
            try:
                yield self
            finally:
                self._session = None

    # -- metadata -----------------------------------------------------------------------------

    async def metadata(self, request: web.Request) -> web.Response:
        upstream = self._idp.metadata
        if upstream is None:
            return json_error(503, "temporarily_unavailable",
                              "The identity provider's metadata is not available yet",
                              {"Retry-After": "5"})
        if self._document is None or self._document[0] != id(upstream):
            body = json.dumps(facade_metadata(self._whole_config, upstream), indent=2).encode()
            self._document = (id(upstream), body)
        return web.Response(body=self._document[1], content_type="application/json",
                            headers={"Cache-Control": "public, max-age=300"})

    # -- the relay ----------------------------------------------------------------------------

    async def over_budget(self, request: web.Request) -> web.Response | None:
        """These endpoints are unauthenticated: each call spends the client IP's budget."""
        client_ip = self._addresses.client(request.remote, forwarded_chain(request.headers))
        try:
            await self._limiter.hit_client(client_ip)
        except RateLimited as exc:
            return rate_limited(exc)
        except RateLimitUnavailable:
            return json_error(503, "temporarily_unavailable", "Try again later",
                              {"Retry-After": "5"})
        return None

    def _idp_endpoint(self, name: str) -> str | None:
        value = (self._idp.metadata or {}).get(name)
        return value if isinstance(value, str) and value.startswith(("https://", "http://")) \
            else None

    async def authorize(self, request: web.Request) -> web.Response:
        refusal = await self.over_budget(request)
        if refusal is not None:
            return refusal
        query = request.query
        if len(query) != len(set(query)):  # RFC 6749 §3.1: no parameter twice
            return json_error(400, "invalid_request", "A parameter is repeated")
        redirect_uri = query.get("redirect_uri")
        # Never redirect to a URI we do not allow, not even with an error (RFC 6749 §4.1.2.1).
        if not self._redirects.allows(redirect_uri):
            return json_error(400, "invalid_request", "The redirect_uri is not allowed")
        target = self._idp_endpoint("authorization_endpoint")
        if target is None:
            return json_error(503, "temporarily_unavailable",
                              "The identity provider is not available yet", {"Retry-After": "5"})
        if not self.facade:
            return _redirect(with_query(target, dict(query)))
        client_id = query.get("client_id")
        if client_id != self._config.client_id:
            return json_error(400, "invalid_request", "Unknown client_id")
        assert redirect_uri is not None  # noqa: S101 - allows() refused None
        state = self._states.seal({"kind": "state", "r": redirect_uri, "s": query.get("state")})
        params = {**query, "redirect_uri": self._callback, "state": state}
        return _redirect(with_query(target, params))

    async def callback(self, request: web.Request) -> web.Response:
        query = request.query
        sealed = self._states.open(query.get("state"))
        if sealed is None or sealed.get("kind") != "state" or not self._redirects.allows(
            sealed.get("r")
        ):
            return json_error(400, "invalid_request",
                              "The sign-in took too long or did not start here; try again")
        iss = query.get("iss")
        idp_says_iss = bool((self._idp.metadata or {}).get(
            "authorization_response_iss_parameter_supported"))
        # RFC 9207 §2.4: the response must come from the IdP we sent the user to (mix-up).
        if (iss is not None and not same_issuer(iss, self._idp.issuer)) or (
            iss is None and idp_says_iss
        ):
            log.warning("authorization_response_issuer_mismatch")
            return json_error(400, "invalid_request", "The authorization response's issuer "
                              "is not this server's identity provider")
        params: dict[str, str] = {}
        if "code" in query:
            # The client gets the IdP's code sealed with its redirect_uri, so /token can insist
            # on the same redirect_uri (RFC 6749 §4.1.3) although the IdP only saw our callback.
            params["code"] = self._states.seal({"kind": "code", "c": query["code"],
                                                "r": sealed["r"]})
        elif "error" in query:
            for name in ("error", "error_description", "error_uri"):
                if name in query:
                    params[name] = query[name]
        else:
            return json_error(400, "invalid_request", "The authorization response is empty")
        if isinstance(sealed.get("s"), str):
            params["state"] = sealed["s"]
        params["iss"] = self.issuer
        return _redirect(with_query(sealed["r"], params))

    def _authenticate_static_client(self, fields: dict[str, str], headers: dict[str, str]) -> None:
        """Add the static client's secret the way the IdP accepts it (RFC 6749 §2.3.1)."""
        methods = (self._idp.metadata or {}).get("token_endpoint_auth_methods_supported")
        # Basic is what every server must support (RFC 6749 §2.3.1) and what IdPs that enforce
        # the registered method expect; the body only when the IdP offers nothing else.
        if isinstance(methods, list) and "client_secret_post" in methods and (
            "client_secret_basic" not in methods
        ):
            fields["client_secret"] = self._config.client_secret
            return
        # RFC 8414 §2: client_secret_basic is the default when the IdP lists nothing.
        pair = f"{quote_plus(self._config.client_id)}:{quote_plus(self._config.client_secret)}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()

    async def token(self, request: web.Request) -> web.Response:
        refusal = await self.over_budget(request)
        if refusal is not None:
            return refusal
        target, session = self._idp_endpoint("token_endpoint"), self._session
        if target is None or session is None:
            return json_error(503, "temporarily_unavailable",
                              "The identity provider is not available yet", {"Retry-After": "5"})
        if (request.content_length or 0) > MAX_TOKEN_REQUEST_BYTES:
            return json_error(413, "invalid_request", "The token request is too large")
        if request.content_type != "application/x-www-form-urlencoded":
            return json_error(400, "invalid_request",
                              "Use application/x-www-form-urlencoded (RFC 6749 §4.1.3)")
        try:
            form = parse_qsl((await request.read()).decode(), keep_blank_values=True,
                             max_num_fields=100, strict_parsing=False)
        except (ValueError, UnicodeDecodeError):
            return json_error(400, "invalid_request", "The token request is malformed")
        fields = dict(form)
        if len(fields) != len(form):
            return json_error(400, "invalid_request", "A parameter is repeated")
        headers = {"Accept": "application/json"}
        if "Authorization" in request.headers:  # the client's own authentication, for the IdP
            headers["Authorization"] = request.headers["Authorization"]
        if self.facade and fields.get("grant_type") == "authorization_code":
            code = self._states.open(fields.get("code"))
            if code is None or code.get("kind") != "code" or not isinstance(code.get("c"), str):
                return json_error(400, "invalid_grant", "The authorization code is invalid or "
                                  "expired")
            if fields.get("redirect_uri") != code.get("r"):
                return json_error(400, "invalid_grant",
                                  "redirect_uri differs from the authorization request's")
            fields["code"] = code["c"]
            fields["redirect_uri"] = self._callback  # the IdP bound the code to our callback
        if (self._config.client_secret and fields.get("client_id") == self._config.client_id
                and "Authorization" not in headers and "client_secret" not in fields):
            self._authenticate_static_client(fields, headers)
        try:
            async with session.post(target, data=fields, headers=headers,
                                    allow_redirects=False) as response:
                body = b""
                async for chunk in response.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_TOKEN_RESPONSE_BYTES:
                        break
                status, content_type = response.status, response.content_type
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("token_relay_failed", error=type(exc).__name__)
            return json_error(502, "temporarily_unavailable",
                              "The identity provider's token endpoint is not reachable")
        if len(body) > MAX_TOKEN_RESPONSE_BYTES:
            return json_error(502, "server_error", "The identity provider's answer is too large")
        return web.Response(status=status, body=body, content_type=content_type,
                            headers=NO_STORE)
