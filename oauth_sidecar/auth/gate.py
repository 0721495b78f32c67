"""The auth middleware: every route is protected except an explicit set of public ones.

Why: deciding "public" by path prefix and then falling through to the proxy lets
unauthenticated requests reach the MCP server (`POST /healthz`, `/.well-known/%2e%2e/mcp`).
Here public routes are terminal handlers registered for exactly their methods, and the gate asks
the router which route matched, never the path. For everything else, in order: authenticate
(401, RFC 6750 §3 and the MCP authorization spec), spend one request of the subject's budget
(429), apply the access policy (403), then check that a presented MCP session is the caller's
(404, sessions.py). The budget comes first so that a signed-in subject the allow-lists refuse pays
for its refusals like anyone else: its IdP-valid token is cached, so otherwise each refusal would
be free. Each refusal is mapped to HTTP here and only here (budgets by the limiter's `refusal`).
"""

from __future__ import annotations

from aiohttp import web

from oauth_sidecar.auth.access_tokens import TokenCheck
from oauth_sidecar.auth.bearer import TokenError, bearer_token
from oauth_sidecar.auth.challenge import (
    ACCESS_DENIED_DESCRIPTION,
    INSUFFICIENT_SCOPE_DESCRIPTION,
    Challenges,
)
from oauth_sidecar.auth.policy import AccessPolicy, Denied
from oauth_sidecar.auth.ratelimit import (
    PER_CLIENT_IP,
    PER_SUBJECT,
    RateLimited,
    RateLimiter,
    RateLimitUnavailable,
    refusal,
    refusal_reason,
)
from oauth_sidecar.auth.sessions import SessionBindings, SessionRefused
from oauth_sidecar.config import Config
from oauth_sidecar.http_errors import json_error
from oauth_sidecar.outcome import Handler
from oauth_sidecar.request_keys import AUTH_FAILURE, PRINCIPAL, SESSION, IsPublic, Principal

RETRY_AFTER_UNAVAILABLE = "5"  # seconds; the IdP refresher and Redis retry faster than that
# No credential at all costs nothing to refuse: only verifications and refused credentials
# spend the per-IP budget, so users behind one egress IP (Claude.ai's connector) are not
# throttled by the unauthenticated first request every MCP client makes.
UNCOUNTED_FAILURES = frozenset({"missing", "not_bearer"})


class Gate:
    """Authenticates, authorises and rate-limits every non-public request."""

    def __init__(
        self, config: Config, *, verifier: TokenCheck, policy: AccessPolicy,
        limiter: RateLimiter, is_public: IsPublic,
        sessions: SessionBindings | None = None,
    ) -> None:
        """verifier: the JWT verifier, or the TOKEN_VALIDATION mode's (access_tokens.py);
        sessions: the bindings the proxy records; a gate of its own (the doctor's, which
        never serves) gets empty ones, so no gate ever skips the session check."""
        self._verifier = verifier
        self._policy = policy
        self._limiter = limiter
        self._is_public = is_public
        self._sessions = sessions if sessions is not None else SessionBindings(config.session_ttl)
        self._max_token = config.tokens.max_token_bytes
        self._challenges = Challenges(config)

    async def admit(self, request: web.Request) -> web.Response | None:
        """None: the request may go on (a public route, or an admitted caller, left on the
        request as PRINCIPAL, with its SESSION); otherwise the refusal to send."""
        if self._is_public(request):
            return None
        try:
            principal = await self._authenticate(request)
            request[PRINCIPAL] = principal  # before the checks below, so refusals are attributed
            await self._limiter.admit(PER_SUBJECT, principal.issuer, principal.subject)
            self._policy.check(principal.subject, principal.claims)
            session = self._sessions.check(request.headers, (principal.issuer, principal.subject))
        except TokenError as exc:
            request[AUTH_FAILURE] = exc.reason
            return self.refuse(exc)
        except Denied as exc:
            request[AUTH_FAILURE] = exc.reason
            return self.deny(exc)
        except (RateLimited, RateLimitUnavailable) as exc:
            request[AUTH_FAILURE] = refusal_reason(exc)
            return refusal(exc)
        except SessionRefused as exc:
            if exc.reason is not None:
                request[AUTH_FAILURE] = exc.reason
            return json_error(exc.status, exc.error, exc.description)
        if session is not None:
            request[SESSION] = session
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """admit as a middleware of its own (the app runs it inside its front door)."""
        refused = await self.admit(request)  # (a response's truth is its state dict's)
        return await handler(request) if refused is None else refused

    async def _authenticate(self, request: web.Request) -> Principal:
        query_keys = list(request.query) if request.query_string else []
        try:
            token = bearer_token(request.headers.getall("Authorization", []), query_keys,
                                 self._max_token)
        except TokenError as exc:
            if exc.reason not in UNCOUNTED_FAILURES:
                await self._limiter.spend(PER_CLIENT_IP, self._limiter.client_ip(request))
            raise
        principal = self._verifier.cached(token)
        if principal is None:
            # A verification costs CPU (an unknown kid a key fetch, an opaque token a call to
            # the IdP): it is paid for before it runs, atomically, so a flood of concurrent
            # requests gets no more of them than the IP's budget. A valid token pays once:
            # afterwards it is a cache hit, or (an opaque token whose answer went stale) a
            # re-check the IdP vouched for before, one call per token however many wait.
            if not self._verifier.vouched(token):
                await self._limiter.admit(PER_CLIENT_IP, self._limiter.client_ip(request))
            principal = await self._verifier.verify(token)
        return principal


    def refuse(self, error: TokenError) -> web.Response:
        if error.status == 503:
            return json_error(503, error.error or "temporarily_unavailable", error.description,
                              {"Retry-After": RETRY_AFTER_UNAVAILABLE})
        return json_error(
            error.status, error.error or "unauthorized", error.description,
            {"WWW-Authenticate": self._challenges.for_error(error)},
        )

    def deny(self, denied: Denied) -> web.Response:
        if denied.scope_missing:
            return json_error(403, "insufficient_scope", INSUFFICIENT_SCOPE_DESCRIPTION,
                              {"WWW-Authenticate": self._challenges.insufficient_scope})
        return json_error(403, "access_denied", ACCESS_DENIED_DESCRIPTION)
