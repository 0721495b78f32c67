"""Static client registration for IdPs without Dynamic Client Registration, and the redirect
URI allow-list that makes handing one client to everyone safe.

Why: Authentik, Google, Entra and others offer no RFC 7591 registration, yet MCP clients register
before they sign in. We answer with the one client the operator registered at the IdP. The answer
is served to anyone, so the secret stays out of it unless the operator says otherwise, and the
redirect allow-list is the binding: no client can get a sign-in sent to a URI the operator did
not approve (the MCP "confused deputy" rule).
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from oauth_sidecar.config import AuthServerConfig
from oauth_sidecar.config.redirect_uris import (
    RedirectUriRefused,
    is_loopback_redirect,
    parse_redirect_uri,
)
from oauth_sidecar.http_errors import json_error
from oauth_sidecar.request_body import (
    BodyBroken,
    BodyReader,
    BodyStalled,
    BodyTooLarge,
    body_refused,
)

MAX_REGISTRATION_BYTES = 64 * 1024  # real registration documents are a few hundred bytes
ALLOWED_GRANTS = frozenset({"authorization_code", "refresh_token"})


class RedirectAllowList:
    """Exact URIs, plus loopback http on any port and path (RFC 8252 §7.3 native apps); every
    URI first held to the rule the start-up check applies (config/redirect_uris.py)."""

    def __init__(self, config: AuthServerConfig) -> None:
        self._exact = config.redirect_uris
        self._loopback = config.allow_loopback_redirects

    def allows(self, uri: object) -> bool:
        try:
            parts = parse_redirect_uri(uri)
        except RedirectUriRefused:
            return False
        return uri in self._exact or (self._loopback and is_loopback_redirect(parts))


def _invalid(error: str, description: str) -> web.Response:
    """RFC 7591 §3.2.2 error response."""
    return json_error(400, error, description)


class StaticRegistration:
    """POST /oauth/register and /register: RFC 7591 answers naming the static client."""

    def __init__(
        self, config: AuthServerConfig, redirects: RedirectAllowList, body_timeout: float
    ) -> None:
        self._config = config
        self._redirects = redirects
        self._bodies = BodyReader(MAX_REGISTRATION_BYTES, body_timeout)

    async def handle(self, request: web.Request) -> web.Response:
        if not self._config.client_id:
            return json_error(404, "registration_not_supported",
                              "This server offers no client registration")
        try:
            raw = await self._bodies.read_small(request)
        except BodyTooLarge:
            return _invalid("invalid_client_metadata", "The registration document is too large")
        except (BodyStalled, BodyBroken) as failure:
            return body_refused(failure)
        try:
            metadata = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return _invalid("invalid_client_metadata", "The body is not JSON")
        if not isinstance(metadata, dict):
            return _invalid("invalid_client_metadata", "The body is not a JSON object")
        return self._register(metadata)

    def _register(self, metadata: dict[str, Any]) -> web.Response:
        uris = metadata.get("redirect_uris")
        if not isinstance(uris, list) or not uris:
            return _invalid("invalid_redirect_uri", "redirect_uris must be a non-empty list")
        if not all(self._redirects.allows(uri) for uri in uris):
            return _invalid("invalid_redirect_uri",
                            "A redirect URI is not allowed by this server")
        grants = metadata.get("grant_types", ["authorization_code"])
        if not isinstance(grants, list) or not grants or not all(
            isinstance(grant, str) and grant in ALLOWED_GRANTS for grant in grants
        ):
            return _invalid("invalid_client_metadata",
                            "Only authorization_code and refresh_token grants are offered")
        responses = metadata.get("response_types", ["code"])
        if responses != ["code"]:
            return _invalid("invalid_client_metadata", "Only the code response type is offered")
        answer: dict[str, Any] = {
            "client_id": self._config.client_id,
            "client_id_issued_at": int(time.time()),
            "redirect_uris": uris,
            "grant_types": grants,
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }
        name = metadata.get("client_name")
        if isinstance(name, str):
            answer["client_name"] = name[:200]
        if self._config.publish_secret:
            answer["client_secret"] = self._config.client_secret
            answer["client_secret_expires_at"] = 0
            answer["token_endpoint_auth_method"] = "client_secret_post"  # noqa: S105 - a name
        return web.json_response(answer, status=201, headers={"Cache-Control": "no-store"})
