"""RFC 9728 protected-resource metadata: both discovery URLs, one canonical document."""

from __future__ import annotations

import json
import re

from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import FakeIdp, FakeUpstream, SidecarFactory

from oauth_sidecar.auth.resource_metadata import (
    metadata_url,
    protected_resource_document,
    protected_resource_paths,
)
from oauth_sidecar.config import load

Client = TestClient[web.Request, web.Application]

PRM_ROOT = "/.well-known/oauth-protected-resource"
PRM_MCP = "/.well-known/oauth-protected-resource/mcp"


async def test_root_and_path_inserted_metadata_are_the_same_document(
    sidecar: Client, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    bodies = []
    for path in (PRM_MCP, PRM_ROOT):
        response = await sidecar.get(path)
        assert response.status == 200
        assert response.content_type == "application/json"
        cache_control = response.headers["Cache-Control"]
        assert re.search(r"(?:^|,)\s*max-age=\d+", cache_control), cache_control
        assert "no-store" not in cache_control
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        bodies.append(await response.read())
    assert bodies[0] == bodies[1]
    document = json.loads(bodies[0])
    assert document == {
        "resource": "https://mcp.example.test/mcp",
        "authorization_servers": [idp.issuer],
        "bearer_methods_supported": ["header"],
    }
    # Byte-identical: no trailing slash, no escaping of the slashes by the JSON encoder.
    assert b'"resource": "https://mcp.example.test/mcp"' in bodies[0]
    assert upstream.requests == []


async def test_scopes_supported_published_only_when_configured(
    make_sidecar: SidecarFactory,
) -> None:
    client = await make_sidecar(SCOPES_SUPPORTED="mcp:read, mcp:write")
    for path in (PRM_MCP, PRM_ROOT):
        document = await (await client.get(path)).json()
        assert document["scopes_supported"] == ["mcp:read", "mcp:write"]


async def test_no_scopes_key_without_scopes(sidecar: Client) -> None:
    document = await (await sidecar.get(PRM_MCP)).json()
    assert "scopes_supported" not in document


async def test_metadata_readable_from_any_browser_origin(sidecar: Client) -> None:
    """Public metadata: a page on an unlisted origin may read it (no credentials involved)."""
    response = await sidecar.get(PRM_MCP, headers={"Origin": "https://unlisted.example"})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    preflight = await sidecar.options(PRM_MCP, headers={
        "Origin": "https://unlisted.example", "Access-Control-Request-Method": "GET",
    })
    assert preflight.status == 204


async def test_resource_url_is_served_in_canonical_form(make_sidecar: SidecarFactory) -> None:
    client = await make_sidecar(RESOURCE_URL="HTTPS://MCP.Example.TEST:443/mcp/")
    for path in (PRM_MCP, PRM_ROOT):
        response = await client.get(path)
        assert response.status == 200, path
        assert (await response.json())["resource"] == "https://mcp.example.test/mcp"
    challenge = (await client.post("/mcp")).headers["WWW-Authenticate"]
    assert challenge == (
        'Bearer resource_metadata="https://mcp.example.test/.well-known/'
        'oauth-protected-resource/mcp"'
    )


async def test_non_default_port_is_kept_in_resource_and_metadata_url(
    make_sidecar: SidecarFactory,
) -> None:
    client = await make_sidecar(RESOURCE_URL="https://MCP.example.test:8443/mcp")
    document = await (await client.get(PRM_MCP)).json()
    assert document["resource"] == "https://mcp.example.test:8443/mcp"
    challenge = (await client.post("/mcp")).headers["WWW-Authenticate"]
    assert 'resource_metadata="https://mcp.example.test:8443/.well-known/' in challenge


async def test_resource_without_path_serves_only_the_root_metadata(
    make_sidecar: SidecarFactory, upstream: FakeUpstream
) -> None:
    client = await make_sidecar(RESOURCE_URL="https://mcp.example.test/")
    root = await client.get(PRM_ROOT)
    assert root.status == 200
    assert (await root.json())["resource"] == "https://mcp.example.test"
    path_inserted = await client.get(PRM_MCP)
    assert path_inserted.status == 401  # not a public route: it is protected like any other
    [challenge] = path_inserted.headers.getall("WWW-Authenticate")
    assert challenge == (
        'Bearer resource_metadata="https://mcp.example.test/.well-known/oauth-protected-resource"'
    )
    assert upstream.requests == []


async def test_nested_resource_path_gets_its_own_path_inserted_metadata(
    make_sidecar: SidecarFactory,
) -> None:
    client = await make_sidecar(RESOURCE_URL="https://mcp.example.test/api/v1/mcp")
    nested = await client.get(PRM_ROOT + "/api/v1/mcp")
    assert nested.status == 200
    assert (await nested.json())["resource"] == "https://mcp.example.test/api/v1/mcp"
    assert (await client.get(PRM_ROOT)).status == 200
    assert (await client.get(PRM_MCP)).status == 401


def test_metadata_url_prefers_the_path_inserted_form() -> None:
    env = {
        "OIDC_ISSUER_URL": "https://idp.example.test/realms/demo",
        "OIDC_AUDIENCE": "mcp", "ALLOW_ALL_AUTHENTICATED": "true",
        "RESOURCE_URL": "https://mcp.example.test/mcp",
        "MCP_UPSTREAM_URL": "http://127.0.0.1:9000",
    }
    config = load(env)
    assert protected_resource_paths(config) == [PRM_ROOT, PRM_MCP]
    assert metadata_url(config) == "https://mcp.example.test" + PRM_MCP
    assert protected_resource_document(config)["authorization_servers"] == [
        "https://idp.example.test/realms/demo"
    ]
    origin_only = load({**env, "RESOURCE_URL": "https://mcp.example.test"})
    assert protected_resource_paths(origin_only) == [PRM_ROOT]
    assert metadata_url(origin_only) == "https://mcp.example.test" + PRM_ROOT
