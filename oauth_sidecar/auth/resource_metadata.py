"""The public documents we serve: RFC 9728 protected-resource metadata.

Why: MCP clients learn where to sign in from this document, found either at the path-inserted URL
(`/.well-known/oauth-protected-resource/mcp` for `https://h/mcp`) or at the root; we serve both.
`resource` must be byte-identical to the URL the client uses, so it is the canonical RESOURCE_URL.
The bytes are built once at start-up; the handler only returns them.
"""

from __future__ import annotations

import json

from aiohttp import web

from oauth_sidecar.config import Config

PRM_PATH = "/.well-known/oauth-protected-resource"
CACHE_CONTROL = "public, max-age=300"  # short: operators change scopes and issuers


def protected_resource_paths(config: Config) -> list[str]:
    """Root form first, then the RFC 9728 §3.1 path-inserted form when the resource has a path."""
    paths = [PRM_PATH]
    if config.resource_path:
        paths.append(PRM_PATH + config.resource_path)
    return paths


def public_origin(config: Config) -> str:
    """scheme://host[:port] clients use; also our issuer in facade mode."""
    return config.resource_url.removesuffix(config.resource_path)


def authorization_server_metadata_paths(config: Config) -> list[str]:
    """RFC 8414 §3 and OIDC forms, at the root and path-inserted with the resource path, since
    clients following older MCP revisions build them from the MCP URL itself."""
    roots = ["/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"]
    return roots + [root + config.resource_path for root in roots if config.resource_path]


def metadata_url(config: Config) -> str:
    """The absolute URL put in `WWW-Authenticate: Bearer resource_metadata="..."`."""
    return public_origin(config) + protected_resource_paths(config)[-1]


def protected_resource_document(config: Config) -> dict[str, object]:
    document: dict[str, object] = {
        "resource": config.resource_url,
        # Facade: we are the authorization server clients see (authserver.py); direct: the IdP.
        "authorization_servers": [
            public_origin(config) if config.auth_server.facade else config.idp.issuer
        ],
        "bearer_methods_supported": ["header"],  # RFC 9728 §2: never query or body
    }
    # offline_access is the authorization server's business, never the resource's (MCP spec).
    scopes = [scope for scope in config.advertised_scopes if scope != "offline_access"]
    if scopes:
        document["scopes_supported"] = scopes
    return document


class ProtectedResourceMetadata:
    """Serves the precomputed RFC 9728 document."""

    def __init__(self, config: Config) -> None:
        self._body = json.dumps(protected_resource_document(config), indent=2).encode()

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._body,
            content_type="application/json",
            headers={"Cache-Control": CACHE_CONTROL, "Access-Control-Allow-Origin": "*"},
        )
