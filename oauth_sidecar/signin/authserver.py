"""The authorization-server side MCP clients see: an RFC 9207-safe sign-in and token relay.

Its parts beside it: the RFC 8414 document it publishes (metadata.py), its sealed state and
codes with the PKCE check (state.py), and the reading of a token request (token_request.py).

Why: in facade mode the protected-resource metadata names the sidecar as the authorization
server, so the metadata we serve must carry our own issuer (RFC 8414 §3.3; MCP 2026-07-28 clients
reject a mismatch). An IdP that puts `iss=<its issuer>` in the authorization response (RFC 9207:
node oidc-provider, Clerk, FusionAuth) would then be rejected by clients that discovered *our*
issuer. So `/authorize` sends the browser to the IdP with our own callback and a sealed
(encrypted and authenticated), expiring state carrying the client's redirect_uri and state;
`/oauth/callback` checks the IdP's `iss`, then redirects (302 only: Claude.ai broke on 307/308)
to the client with the code, its state and our `iss`; `/token` forwards to the IdP, putting our
callback back as redirect_uri. Tokens are still minted only by the IdP and we store none: the
sidecar stays a resource server. Both relayed requests name `resource` and scopes the IdP's way
(idp_request.py: Entra refuses `resource` and wants `api://<app id>/` before each scope).

The relay holds the static client's secret, so it must never lend it: `/token` relays only the
grants the metadata advertises, and adds the secret only to a refresh token (whose holder the
IdP already trusts) or to a code this sidecar issued, after checking PKCE itself (an IdP that
ignores PKCE must not make us fail open), the client the code was issued to, and that the code
was not used before. Sealed states and codes are each redeemed once (redemptions.py).

In direct mode clients talk to the IdP itself; we still answer Claude.ai's origin-root
`/authorize` and `/token` calls by passing them on, PKCE required, and never add the secret to a
code we did not issue.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit, urlunsplit

import aiohttp
import structlog
from aiohttp import web

from oauth_sidecar.auth.idp import IdentityProvider, same_issuer
from oauth_sidecar.auth.resource_metadata import public_origin
from oauth_sidecar.config import Config
from oauth_sidecar.http_errors import json_error
from oauth_sidecar.request_body import (
    BodyBroken,
    BodyReader,
    BodyStalled,
    BodyTooLarge,
    body_refused,
)
from oauth_sidecar.response_body import ResponseTooLarge, read_capped
from oauth_sidecar.signin import bound_refresh
from oauth_sidecar.signin.client_documents import (
    ClientDocument,
    ClientDocumentRefused,
    ClientDocuments,
    is_client_id_url,
)
from oauth_sidecar.signin.consent import Consent, ConsentRefused
from oauth_sidecar.signin.idp_request import toward_idp
from oauth_sidecar.signin.redemptions import RedemptionStore, RedemptionUnavailable
from oauth_sidecar.signin.registration import RedirectAllowList
from oauth_sidecar.signin.state import (
    CODE_FIELDS,
    MAX_SEALED,
    PKCE_VALUE,
    STATE_FIELDS,
    StateCodec,
    pkce_matches,
    unsealed,
)
from oauth_sidecar.signin.token_request import (
    TokenRefused,
    client_ids,
    relayed_grant,
    token_form,
)

log = structlog.get_logger("oauth_sidecar.authserver")

CALLBACK_PATH = "/oauth/callback"
UNAVAILABLE_RETRY_AFTER = {"Retry-After": "5"}  # seconds: IdP metadata or store back
MAX_TOKEN_REQUEST_BYTES = 64 * 1024
MAX_TOKEN_RESPONSE_BYTES = 1 << 20
TOKEN_TIMEOUT = 30.0  # seconds for the IdP's token endpoint
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1


class AuthorizationRefused(Exception):
    """An authorization request refused once its redirect_uri is known to be allowed: the
    client hears it by redirect (RFC 6749 §4.1.2.1)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(error)
        self.error = error
        self.description = description


def _unavailable(description: str) -> web.Response:
    return json_error(503, "temporarily_unavailable", description, UNAVAILABLE_RETRY_AFTER)


def _bad_state() -> web.Response:
    # Replayed, forged, expired or another deployment's: one answer, nothing to tell apart.
    return json_error(400, "invalid_request",
                      "The sign-in took too long or did not start here; try again")


def with_query(url: str, params: Mapping[str, str]) -> str:
    """url with params added to its query (kept: a redirect_uri may carry its own)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location, **NO_STORE})


class AuthorizationServer:
    def __init__(
        self, config: Config, idp: IdentityProvider, redirects: RedirectAllowList, *,
        redemptions: RedemptionStore, documents: ClientDocuments | None = None,
    ) -> None:
        """Its endpoints are unauthenticated: the app puts each behind the rate limiter's
        per-client-IP budget (RateLimiter.guard), so no handler here spends a budget.
        documents: Client ID Metadata Documents (facade mode with CIMD on; None: refused)."""
        self._config = config.auth_server
        self._documents = documents
        self._idp = idp
        self._redirects = redirects
        self._redemptions = redemptions
        self._bodies = BodyReader(MAX_TOKEN_REQUEST_BYTES, config.upstream.body_timeout)
        self.issuer = public_origin(config)
        self._callback = self.issuer + CALLBACK_PATH
        secret = self._config.state_secret.encode() or secrets.token_bytes(32)
        self._states = StateCodec(secret)
        self._consent = Consent(self._states, config.resource_url,
                                secure=self.issuer.startswith("https://"))
        self._session: aiohttp.ClientSession | None = None

    @property
    def facade(self) -> bool:
        return self._config.facade

    @asynccontextmanager
    async def running(self) -> AsyncIterator[AuthorizationServer]:
        timeout = aiohttp.ClientTimeout(total=TOKEN_TIMEOUT)
        async with contextlib.AsyncExitStack() as stack:
            if self._documents is not None:  # their fetches have a session of their own
                await stack.enter_async_context(self._documents.running())
            session = await stack.enter_async_context(aiohttp.ClientSession(
                timeout=timeout, trust_env=False, cookie_jar=aiohttp.DummyCookieJar()))
            self._session = session
            try:
                yield self
            finally:
                self._session = None

    # -- the relay ----------------------------------------------------------------------------

    def _idp_endpoint(self, name: str) -> str | None:
        value = (self._idp.metadata or {}).get(name)
        return value if isinstance(value, str) and value.startswith(("https://", "http://")) \
            else None

    async def authorize(self, request: web.Request) -> web.Response:
        query = request.query
        if len(query) != len(set(query)):  # RFC 6749 §3.1: no parameter twice
            return json_error(400, "invalid_request", "A parameter is repeated")
        redirect_uri = query.get("redirect_uri")
        client_id = query.get("client_id")
        document = await self._client_document(client_id)
        if isinstance(document, web.Response):
            return document
        # Never redirect to a URI we do not allow, not even with an error (RFC 6749 §4.1.2.1):
        # a document client's are the ones its document lists (a loopback one on any port).
        if not (document.allows_redirect(redirect_uri) if document is not None
                else self._redirects.allows(redirect_uri)):
            return json_error(400, "invalid_request", "The redirect_uri is not allowed")
        target = self._idp_endpoint("authorization_endpoint")
        if target is None:
            return _unavailable("The identity provider is not available yet")
        if self.facade and document is None and client_id != self._config.client_id:
            return json_error(400, "invalid_request", "Unknown client_id")
        assert redirect_uri is not None  # noqa: S101 - allows() refused None
        try:
            self._check_authorization_request(query)
            if not self.facade:
                return _redirect(with_query(target, dict(query)))
            state = self._states.seal({
                "kind": "state", "r": redirect_uri, "s": query.get("state"), "cid": client_id,
                "pc": query["code_challenge"],
            })
            if len(state) > MAX_SEALED:
                raise AuthorizationRefused("invalid_request", "The request is too long")
        except AuthorizationRefused as exc:
            return self._tell_client(redirect_uri, query.get("state"), exc.error, exc.description)
        # The IdP knows one client, ours: a document client signs in as it.
        params = toward_idp({**query, "client_id": self._config.client_id,
                             "redirect_uri": self._callback, "state": state}, self._config)
        go = with_query(target, params)
        if document is not None and not self._trusted(document):
            return self._consent.page(
                client_name=document.client_name, host=document.host,
                redirect_host=urlsplit(redirect_uri).hostname or redirect_uri, go=go,
                redirect_uri=redirect_uri, deny_params=self._error_params(
                    query.get("state"), "access_denied", "The user did not allow this client"))
        return _redirect(go)

    async def _client_document(self, client_id: str | None) -> ClientDocument | web.Response | None:
        """A client id that is an https URL, in facade mode: its metadata document, or the
        refusal (no redirect: its redirect URIs are not known to be its own); None otherwise."""
        if not (self.facade and self._documents is not None and is_client_id_url(client_id)):
            return None
        assert client_id is not None  # noqa: S101 - is_client_id_url refused None
        try:
            return await self._documents.resolve(client_id)
        except ClientDocumentRefused as refused:
            log.info("client_document_refused", reason=refused.reason,
                     host=urlsplit(client_id).hostname)
            return json_error(400, "invalid_client", refused.description)

    def _trusted(self, document: ClientDocument) -> bool:
        return self._documents is not None and self._documents.is_trusted(document)

    async def consent(self, request: web.Request) -> web.Response:
        """POST from the consent page: Approve goes on to the IdP, Deny tells the client."""
        try:
            body = await self._bodies.read_small(request)
        except (BodyStalled, BodyBroken, BodyTooLarge) as failure:
            return body_refused(failure)
        pairs = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        form = dict(pairs)
        try:
            if len(form) != len(pairs):
                raise ConsentRefused
            decision = self._consent.decision(form, dict(request.cookies))
            if not await self._redemptions.redeem(decision.id, decision.expires):
                raise ConsentRefused
        except ConsentRefused:
            return json_error(400, "invalid_request", "This page expired, was already answered "
                              "or was not shown in this browser; start the sign-in again")
        except RedemptionUnavailable:
            return _unavailable("The sign-in cannot be continued right now; try again")
        location = decision.go if decision.approved else with_query(decision.redirect_uri,
                                                                    decision.params)
        # 303: the browser follows a POST's answer with a GET.
        response = web.Response(status=303, headers={"Location": location, **NO_STORE})
        self._consent.forget(response)
        return response

    def _check_authorization_request(self, query: Mapping[str, str]) -> None:
        """What the relay needs before sending anyone to the IdP; raises AuthorizationRefused."""
        if self.facade:
            response_type = query.get("response_type")
            if not response_type:
                raise AuthorizationRefused("invalid_request", "response_type is missing")
            if response_type != "code":  # the metadata offers code only; the callback reads it
                raise AuthorizationRefused("unsupported_response_type",
                                           "Only response_type=code is offered")
            # A request object (RFC 9101) would override the redirect_uri, state and challenge
            # the relay checked and sent: the IdP must act on exactly those.
            if "request" in query:
                raise AuthorizationRefused("request_not_supported",
                                           "Request objects are not supported")
            if "request_uri" in query:
                raise AuthorizationRefused("request_uri_not_supported",
                                           "Request objects are not supported")
        # OAuth 2.1 §4.1.1 and MCP: PKCE with S256, whatever the IdP would accept.
        challenge = query.get("code_challenge")
        if not challenge:
            raise AuthorizationRefused("invalid_request",
                                       "code_challenge is required (PKCE with S256)")
        if query.get("code_challenge_method") != "S256":  # absent means plain (RFC 7636 §4.3)
            raise AuthorizationRefused("invalid_request", "code_challenge_method must be S256")
        if not PKCE_VALUE.fullmatch(challenge):
            raise AuthorizationRefused(
                "invalid_request", "code_challenge must be 43 to 128 characters of "
                "A-Z a-z 0-9 - . _ ~ (RFC 7636 §4.2)")

    def _tell_client(
        self, redirect_uri: str, state: str | None, error: str, description: str
    ) -> web.Response:
        return _redirect(with_query(redirect_uri, self._error_params(state, error, description)))

    def _error_params(self, state: str | None, error: str, description: str) -> dict[str, str]:
        """RFC 6749 §4.1.2.1 error response, with the `iss` the client discovered (RFC 9207):
        ours in facade mode, the IdP's in direct mode."""
        params = {"error": error, "error_description": description}
        if state is not None:
            params["state"] = state
        discovered = (self._idp.metadata or {}).get("issuer")
        params["iss"] = self.issuer if self.facade else (
            discovered if isinstance(discovered, str) else self._idp.issuer)
        return params

    async def callback(self, request: web.Request) -> web.Response:
        query = request.query
        if len(query) != len(set(query)):  # RFC 6749 §3.1: a second iss or code is a trick
            return json_error(400, "invalid_request", "A parameter is repeated")
        sealed = unsealed(self._states, query.get("state"), "state", STATE_FIELDS)
        # A document client's redirect_uri was checked against its document when sealed.
        if sealed is None or not (is_client_id_url(sealed["cid"])
                                  or self._redirects.allows(sealed["r"])):
            return _bad_state()
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
        if "code" not in query and "error" not in query:
            return json_error(400, "invalid_request", "The authorization response is empty")
        try:  # RFC 6749 §4.1.2: one state, one code; a replay is refused like a forgery
            if not await self._redemptions.redeem(sealed["id"], sealed["exp"]):
                return _bad_state()
        except RedemptionUnavailable:
            return _unavailable("The sign-in cannot be completed right now; try again")
        params = self._client_answer(query, sealed)
        params["iss"] = self.issuer
        return _redirect(with_query(sealed["r"], params))

    def _client_answer(self, query: Mapping[str, str], sealed: Mapping[str, Any]) -> dict[str, str]:
        """The client's redirect parameters: our sealed code or the IdP's error, and its state."""
        params: dict[str, str] = {}
        if "code" in query:
            # The client gets the IdP's code sealed with its redirect_uri, client and PKCE
            # challenge, so /token can check all three although the IdP only saw our callback.
            code = self._states.seal({"kind": "code", "c": query["code"], "r": sealed["r"],
                                      "cid": sealed["cid"], "pc": sealed["pc"]})
            if len(code) <= MAX_SEALED:
                params["code"] = code
            else:  # /token could never open it: tell the client now
                params.update(error="server_error",
                              error_description="The identity provider's code is too long")
        else:
            for name in ("error", "error_description", "error_uri"):
                if name in query:
                    params[name] = query[name]
        if isinstance(sealed.get("s"), str):
            params["state"] = sealed["s"]
        return params

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

    def _lends_secret(
        self, grant: str, issued_here: bool, fields: Mapping[str, str],
        headers: Mapping[str, str],
    ) -> bool:
        """The static secret goes only with a refresh token (the IdP issued it to this client
        and it is the caller's own authority) or a code this sidecar issued and has just
        redeemed; never with a caller's own credential (RFC 6749 §2.3: one method only)."""
        if not self._config.client_secret or fields.get("client_id") != self._config.client_id:
            return False
        if "Authorization" in headers or "client_secret" in fields or (
            "client_assertion" in fields
        ):
            return False
        return grant == "refresh_token" or (grant == "authorization_code" and issued_here)

    async def _redeem_code(self, fields: dict[str, str], authorization: str | None) -> str:
        """Check a sealed code as the authorization server would (RFC 6749 §4.1.3, RFC 7636
        §4.6), use it up, and put back the IdP's code and the callback it saw; the client it
        was issued to."""
        code = unsealed(self._states, fields.get("code"), "code", CODE_FIELDS)
        if code is None:
            raise TokenRefused("invalid_grant", "The authorization code is invalid or expired")
        if fields.get("redirect_uri") != code["r"]:
            raise TokenRefused("invalid_grant",
                               "redirect_uri differs from the authorization request's")
        named = client_ids(fields, authorization)
        if not named:
            raise TokenRefused("invalid_request", "client_id is missing (RFC 6749 §4.1.3)")
        if named != {code["cid"]}:
            raise TokenRefused("invalid_grant",
                               "The authorization code was issued to another client")
        # Checked here, not left to the IdP: one that ignores PKCE must not make us fail open.
        if not pkce_matches(fields.get("code_verifier"), code["pc"]):
            raise TokenRefused("invalid_grant", "The code_verifier does not match the "
                               "code_challenge (RFC 7636 §4.6)")
        if not await self._redemptions.redeem(code["id"], code["exp"]):
            raise TokenRefused("invalid_grant", "The authorization code was already used")
        fields["code"] = code["c"]
        fields["redirect_uri"] = self._callback  # the IdP bound the code to our callback
        fields["client_id"] = self._config.client_id  # a document client signed in as ours
        return str(code["cid"])

    async def token(self, request: web.Request) -> web.Response:
        headers = {"Accept": "application/json"}
        if "Authorization" in request.headers:  # the client's own authentication, for the IdP
            headers["Authorization"] = request.headers["Authorization"]
        try:
            fields = await token_form(request, self._bodies)
            grant = relayed_grant(fields)
            target, session = self._idp_endpoint("token_endpoint"), self._session
            if target is None or session is None:
                return _unavailable("The identity provider is not available yet")
            # Facade codes are ours: checked and used up here (a grant that passes is issued
            # here). Direct mode's codes were issued by the IdP to the client itself.
            issued_here = self.facade and grant == "authorization_code"
            document_client = None
            if issued_here:
                client = await self._redeem_code(fields, headers.get("Authorization"))
                document_client = client if is_client_id_url(client) else None
            elif self.facade and grant == "refresh_token" and is_client_id_url(
                    fields.get("client_id")):
                document_client = fields["client_id"]
                bound_refresh.open_for(self._states, fields, document_client)
                fields["client_id"] = self._config.client_id
            if self.facade:  # `resource` and scopes as the IdP wants them (idp_request.py)
                fields = toward_idp(fields, self._config)
        except TokenRefused as exc:
            return json_error(exc.status, exc.error, exc.description)
        except RedemptionUnavailable:
            return _unavailable("The code cannot be redeemed right now; try again")
        except (BodyStalled, BodyBroken) as failure:
            return body_refused(failure)
        if self._lends_secret(grant, issued_here, fields, headers):
            self._authenticate_static_client(fields, headers)
        # Encoded here, not by aiohttp's FormData: it refuses a field name with a control
        # character (a header check), and the client chose every name and value.
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            async with session.post(target, data=urlencode(fields).encode(), headers=headers,
                                    allow_redirects=False) as response:
                body = await read_capped(response, MAX_TOKEN_RESPONSE_BYTES)
                status, content_type = response.status, response.content_type
        except ResponseTooLarge:
            return json_error(502, "server_error", "The identity provider's answer is too large")
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("token_relay_failed", error=type(exc).__name__)
            return json_error(502, "temporarily_unavailable",
                              "The identity provider's token endpoint is not reachable")
        if document_client is not None and status == 200:
            body = bound_refresh.seal_answer(self._states, body, document_client)
        return web.Response(status=status, body=body, content_type=content_type,
                            headers=NO_STORE)
