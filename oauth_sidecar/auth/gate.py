"""The auth middleware: every route is protected except an explicit set of public ones.

Why: deciding "public" by path prefix and then falling through to the proxy lets
unauthenticated requests reach the MCP server (`POST /healthz`, `/.well-known/%2e%2e/mcp`).
Here public routes are terminal handlers registered for exactly their methods, and the gate asks
the router which route matched, never the path. For everything else, in order: authenticate
(401, RFC 6750 §3 and the MCP authorization spec), spend one request of the subject's budget
(429), then apply the access policy (403). The budget comes first so that a signed-in subject the
allow-lists refuse pays for its refusals like anyone else: its IdP-valid token is cached, so
otherwise each refusal would be free. Each refusal is mapped to HTTP here and only here.
"""

from __future__ import annotations

from aiohttp import web

from oauth_sidecar.auth.challenge import (
    ACCESS_DENIED_DESCRIPTION,
    INSUFFICIENT_SCOPE_DESCRIPTION,
    Challenges,
)
from oauth_sidecar.auth.policy import AccessPolicy, Denied
from oauth_sidecar.auth.ratelimit import (
    RateLimited,
    RateLimiter,
    RateLimitUnavailable,
    rate_limited,
)
from oauth_sidecar.auth.tokens import TokenError, TokenVerifier, bearer_token
from oauth_sidecar.client_ip import ClientAddress, forwarded_chain
from oauth_sidecar.config import Config
from oauth_sidecar.http_errors import json_error
from oauth_sidecar.outcome import Handler
from oauth_sidecar.request_keys import AUTH_FAILURE, PRINCIPAL, IsPublic, Principal

RETRY_AFTER_UNAVAILABLE = "5"  # seconds; the IdP refresher and Redis retry faster than that
# No credential at all costs nothing to refuse: only verifications and refused credentials
# spend the per-IP budget, so users behind one egress IP (Claude.ai's connector) are not
# throttled by the unauthenticated first request every MCP client makes.
UNCOUNTED_FAILURES = frozenset({"missing", "not_bearer"})


class Gate:
    """Authenticates, authorises and rate-limits every non-public request."""

    def __init__(
        self, config: Config, *, verifier: TokenVerifier, policy: AccessPolicy,
        limiter: RateLimiter, addresses: ClientAddress, is_public: IsPublic,
    ) -> None:
        self._verifier = verifier
        self._policy = policy
        self._limiter = limiter
        self._addresses = addresses
        self._is_public = is_public
        self._max_token = config.tokens.max_token_bytes
        self._challenges = Challenges(config)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._is_public(request):
            return await handler(request)
        try:
            principal = await self._authenticate(request)
            request[PRINCIPAL] = principal  # before the checks below, so refusals are attributed
            await self._limiter.hit_subject(principal.issuer, principal.subject)
            self._policy.check(principal.subject, principal.claims)
        except TokenError as exc:
            request[AUTH_FAILURE] = exc.reason
            return self.refuse(exc)
        except Denied as exc:
            request[AUTH_FAILURE] = exc.reason
            return self.deny(exc)
        except RateLimited as exc:
            request[AUTH_FAILURE] = f"rate_limited_{exc.scope}"
            return rate_limited(exc)
        except RateLimitUnavailable:
            request[AUTH_FAILURE] = "rate_limit_unavailable"
            return json_error(503, "temporarily_unavailable", "Rate limiting is unavailable",
                              {"Retry-After": RETRY_AFTER_UNAVAILABLE})
        return await handler(request)

    async def _authenticate(self, request: web.Request) -> Principal:
        query_keys = list(request.query) if request.query_string else []
        try:
            token = bearer_token(request.headers.getall("Authorization", []), query_keys,
                                 self._max_token)
        except TokenError as exc:
            if exc.reason not in UNCOUNTED_FAILURES:
                await self._limiter.hit_failure(self._client_ip(request))
            raise
        principal = self._verifier.cached(token)
        if principal is None:
            # A verification costs CPU (and an unknown kid a key fetch): it is paid for before
            # it runs, atomically, so a flood of concurrent requests gets no more of them than
            # the IP's budget. A valid token pays once: afterwards it is a cache hit.
            await self._limiter.hit_client(self._client_ip(request))
            principal = await self._verifier.verify(token)
        return principal

    def _client_ip(self, request: web.Request) -> str:
        """Only needed off the hot path (a cache miss or a failure)."""
        return self._addresses.client(request.remote, forwarded_chain(request.headers))

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
