"""The authorization-server metadata (RFC 8414) the facade publishes for the IdP.

Why a module of its own: the document is derived from the IdP's own, with our issuer and the
relay's endpoints in place of the IdP's, so clients that discovered the sidecar as their
authorization server stay on it (RFC 8414 §3.3). It is pure (`check` prints it too), and served
from bytes built once per IdP document.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from oauth_sidecar.auth.idp import IdentityProvider
from oauth_sidecar.auth.resource_metadata import public_origin
from oauth_sidecar.config import Config
from oauth_sidecar.http_errors import json_error
from oauth_sidecar.signin.registration import ALLOWED_GRANTS

REGISTRATION_PATH = "/oauth/register"
# IdP metadata we must not pass on in facade mode: endpoints that would bypass the relay.
FACADE_DROP = frozenset({
    "pushed_authorization_request_endpoint", "require_pushed_authorization_requests",
    "mtls_endpoint_aliases", "client_id_metadata_document_supported", "registration_endpoint",
})  # fmt: skip


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
        "grant_types_supported": sorted(ALLOWED_GRANTS),  # exactly what /token relays
        # Clients refuse to proceed without S256 (OAuth 2.1 requires PKCE).
        "code_challenge_methods_supported": ["S256"],
        # The relay adds the static client's secret itself: clients authenticate as public.
        "token_endpoint_auth_methods_supported": ["none"] + (
            ["client_secret_post"] if config.auth_server.publish_secret else []
        ),
        "authorization_response_iss_parameter_supported": True,  # RFC 9207
    })
    if config.auth_server.client_documents.enabled:  # an https client_id is resolved here
        document["client_id_metadata_document_supported"] = True
    if config.advertised_scopes:
        offered = upstream.get("scopes_supported")
        offline = isinstance(offered, list) and "offline_access" in offered
        scopes = [*config.advertised_scopes, *(["offline_access"] if offline else [])]
        document["scopes_supported"] = list(dict.fromkeys(scopes))
    return document


class FacadeMetadata:
    """Serves facade_metadata() for the IdP's current document."""

    def __init__(self, config: Config, idp: IdentityProvider) -> None:
        self._config = config
        self._idp = idp
        self._document: tuple[int, bytes] | None = None  # (id of the IdP document, our bytes)

    async def handle(self, request: web.Request) -> web.Response:
        upstream = self._idp.metadata
        if upstream is None:
            return json_error(503, "temporarily_unavailable",
                              "The identity provider's metadata is not available yet",
                              {"Retry-After": "5"})
        if self._document is None or self._document[0] != id(upstream):
            body = json.dumps(facade_metadata(self._config, upstream), indent=2).encode()
            self._document = (id(upstream), body)
        return web.Response(body=self._document[1], content_type="application/json",
                            headers={"Cache-Control": "public, max-age=300"})
