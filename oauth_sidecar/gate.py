"""The auth middleware: every route is protected except an explicit set of public ones.

Why: the peer project decided "public" by path prefix and then fell through to the proxy, so
unauthenticated requests reached the MCP server (`POST /healthz`, `/.well-known/%2e%2e/mcp`).
Here public routes are terminal handlers registered for exactly their methods, and the gate asks
the router which route matched, never the path. Refusals follow RFC 6750 §3 and the MCP
authorization spec: 401 with `WWW-Authenticate: Bearer resource_metadata="..."`.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from oauth_sidecar.config import Config
from oauth_sidecar.discovery import metadata_url
from oauth_sidecar.http_errors import Handler, json_error
from oauth_sidecar.tokens import Principal, TokenError, TokenVerifier, bearer_token

PRINCIPAL = web.RequestKey("principal", Principal)
AUTH_FAILURE = web.RequestKey("auth_failure", str)
KEYS_RETRY_AFTER = "5"  # seconds; the IdP refresher retries faster than that at first

IsPublic = Callable[[web.Request], bool]


class Gate:
    """Authenticates every non-public request and puts the Principal on it."""

    def __init__(self, config: Config, verifier: TokenVerifier, is_public: IsPublic) -> None:
        self._verifier = verifier
        self._is_public = is_public
        self._max_token = config.tokens.max_token_bytes
        # Precomputed challenge parts (house rule 5): only the error code varies per request.
        self._tail = f'resource_metadata="{metadata_url(config)}"'
        if config.scopes:
            self._tail += f', scope="{" ".join(config.scopes)}"'
        self._no_credentials = f"Bearer {self._tail}"

    def challenge(self, error: TokenError) -> str:
        if error.error is None:  # RFC 6750 §3.1: no error code when no credentials were sent
            return self._no_credentials
        return (
            f'Bearer error="{error.error}", error_description="{error.description}", {self._tail}'
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._is_public(request):
            return await handler(request)
        query_keys = list(request.query) if request.query_string else []
        try:
            token = bearer_token(request.headers.getall("Authorization", []), query_keys,
                                 self._max_token)
            principal = await self._verifier.verify(token)
        except TokenError as exc:
            request[AUTH_FAILURE] = exc.reason
            return self.refuse(exc)
        request[PRINCIPAL] = principal
        return await handler(request)

    def refuse(self, error: TokenError) -> web.Response:
        if error.status == 503:
            return json_error(503, error.error or "temporarily_unavailable", error.description,
                              {"Retry-After": KEYS_RETRY_AFTER})
        return json_error(
            error.status, error.error or "unauthorized", error.description,
            {"WWW-Authenticate": self.challenge(error)},
        )
