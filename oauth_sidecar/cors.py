"""CORS for browser-based MCP clients, and the MCP DNS-rebinding Origin rule.

Why: Claude.ai's connector and the MCP Inspector run in browsers, so preflights must be answered
before authentication and `WWW-Authenticate` / `Mcp-Session-Id` must be readable. The MCP
Streamable HTTP transport also requires rejecting a present, disallowed `Origin` with 403 (DNS
rebinding); a request with no `Origin` (server-side clients) is fine. Our headers always replace
the upstream's (the proxy strips them). All header values are computed once.

The metadata documents, registration and `/token` are readable from any origin (`*`, never with
credentials): browser-based clients call them cross-origin, and nothing ambient authorises them
(a token request's authority is the code and verifier or the refresh token in its body). The
sign-in pages `/authorize` and `/oauth/callback` are top-level navigations: public, but their
answers carry no CORS headers and their preflights are refused, so no page can read them.
"""

from __future__ import annotations

from aiohttp import web

from oauth_sidecar.config import Config
from oauth_sidecar.http_errors import json_error
from oauth_sidecar.request_keys import IsPublic

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = (
    "Authorization, Content-Type, Accept, Mcp-Session-Id, MCP-Protocol-Version, Last-Event-ID, "
    "Mcp-Method, Mcp-Name"
)
EXPOSE_HEADERS = "WWW-Authenticate, Mcp-Session-Id, MCP-Protocol-Version"
MAX_AGE = "600"  # seconds browsers may cache a preflight


def allow_headers(request: web.Request) -> str:
    """Our fixed list plus any requested Mcp-Param-* (MCP 2026-07-28 names them per call)."""
    asked = request.headers.get("Access-Control-Request-Headers", "")
    extra = [h.strip() for h in asked.split(",") if h.strip().lower().startswith("mcp-param-")]
    return ", ".join([ALLOW_HEADERS, *extra]) if extra else ALLOW_HEADERS


class Cors:
    def __init__(self, config: Config, is_public: IsPublic, is_navigation: IsPublic) -> None:
        self._origins = config.cors_origins
        self._any = config.cors_any_origin
        self._is_public = is_public
        self._is_navigation = is_navigation

    def _readable_anywhere(self, request: web.Request) -> bool:
        return self._is_public(request) and not self._is_navigation(request)

    def allows(self, origin: str) -> bool:
        return self._any or origin.lower() in self._origins

    def refusal(self, request: web.Request) -> web.Response | None:
        """Before authentication: a preflight's answer, 403 for a present, disallowed Origin
        (DNS rebinding), or None to go on."""
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        public = self._is_public(request)
        allowed = self.allows(origin)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not (allowed or self._readable_anywhere(request)):
                return json_error(403, "origin_not_allowed", "This origin may not call this server")
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": origin if allowed else "*",
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": allow_headers(request),
                "Access-Control-Max-Age": MAX_AGE,
                "Vary": "Origin",
            })
        if not (allowed or public):
            return json_error(403, "origin_not_allowed", "This origin may not call this server")
        return None

    def decorate(self, request: web.Request, response: web.StreamResponse) -> None:
        """Just before the headers go out, streamed responses included."""
        origin = request.headers.get("Origin")
        if origin is None:
            return
        if self.allows(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            response.headers.add("Vary", "Origin")
        elif self._readable_anywhere(request):  # metadata, registration, token: no credentials
            response.headers.setdefault("Access-Control-Allow-Origin", "*")
