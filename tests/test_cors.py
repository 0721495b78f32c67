"""CORS and the MCP DNS-rebinding Origin rule, through the production app."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import FakeIdp, FakeUpstream, SidecarFactory, bearer

Client = TestClient[web.Request, web.Application]

BOUND = aiohttp.ClientTimeout(total=5)  # every request in this module is a bounded wait
CLAUDE = "https://claude.ai"
EVIL = "https://evil.example"
PRM = "/.well-known/oauth-protected-resource/mcp"


def _listed(value: str) -> set[str]:
    return {item.strip().lower() for item in value.split(",") if item.strip()}


async def _preflight(client: Client, path: str, origin: str) -> aiohttp.ClientResponse:
    return await client.options(path, headers={
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, mcp-session-id",
    }, timeout=BOUND)


async def _post(client: Client, token: str | None, origin: str | None) -> aiohttp.ClientResponse:
    headers = bearer(token) if token else {}
    if origin is not None:
        headers["Origin"] = origin
    return await client.post("/mcp", data=b"{}", headers=headers, timeout=BOUND)


async def test_preflight_from_an_allowed_origin_is_answered_without_a_token(
    sidecar: Client, upstream: FakeUpstream
) -> None:
    response = await _preflight(sidecar, "/mcp", CLAUDE)
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == CLAUDE
    allowed = _listed(response.headers["Access-Control-Allow-Headers"])
    assert {"authorization", "mcp-session-id", "mcp-protocol-version", "last-event-id"} <= allowed
    assert "post" in _listed(response.headers["Access-Control-Allow-Methods"])
    assert "origin" in _listed(response.headers.get("Vary", ""))
    assert upstream.requests == []


async def test_preflight_from_a_disallowed_origin_is_refused(
    sidecar: Client, upstream: FakeUpstream
) -> None:
    response = await _preflight(sidecar, "/mcp", EVIL)
    assert response.status == 403
    assert (await response.json())["error"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in response.headers
    assert upstream.requests == []


async def test_disallowed_origin_is_refused_even_with_a_valid_token(
    sidecar: Client, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    response = await _post(sidecar, idp.mint(), EVIL)
    assert response.status == 403
    assert (await response.json())["error"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in response.headers
    assert upstream.requests == []


async def test_disallowed_origin_is_refused_before_authentication(
    sidecar: Client, upstream: FakeUpstream
) -> None:
    response = await _post(sidecar, None, EVIL)
    assert response.status == 403
    assert upstream.requests == []


async def test_request_without_origin_is_allowed(
    sidecar: Client, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    response = await _post(sidecar, idp.mint(), None)
    assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers  # upstream's "*" is dropped
    assert len(upstream.requests) == 1


async def test_allowed_origin_gets_our_cors_headers_on_a_proxied_answer(
    sidecar: Client, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    response = await _post(sidecar, idp.mint(), CLAUDE)
    assert response.status == 200
    assert response.headers.getall("Access-Control-Allow-Origin") == [CLAUDE]
    exposed = _listed(response.headers["Access-Control-Expose-Headers"])
    assert {"www-authenticate", "mcp-session-id"} <= exposed
    assert response.headers["Mcp-Session-Id"] == "session-1"
    assert len(upstream.requests) == 1


async def test_unauthorized_answer_to_an_allowed_origin_is_readable_by_the_browser(
    sidecar: Client, upstream: FakeUpstream
) -> None:
    response = await _post(sidecar, None, CLAUDE)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer resource_metadata=")
    assert response.headers["Access-Control-Allow-Origin"] == CLAUDE
    exposed = _listed(response.headers["Access-Control-Expose-Headers"])
    assert {"www-authenticate", "mcp-session-id"} <= exposed
    assert upstream.requests == []


async def test_null_origin_is_refused(
    sidecar: Client, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    response = await _post(sidecar, idp.mint(), "null")
    assert response.status == 403
    preflight = await _preflight(sidecar, "/mcp", "null")
    assert preflight.status == 403
    assert upstream.requests == []


@pytest.mark.parametrize("origin", ["HTTPS://CLAUDE.AI", "https://Claude.AI", "Https://claude.ai"])
async def test_origin_matching_ignores_case_of_scheme_and_host(
    sidecar: Client, idp: FakeIdp, origin: str
) -> None:
    response = await _post(sidecar, idp.mint(), origin)
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == origin


@pytest.mark.parametrize("origin", [
    "https://claude.ai.evil.example", "http://claude.ai", "https://claude.ai:8443",
])
async def test_lookalike_origins_are_refused(sidecar: Client, idp: FakeIdp, origin: str) -> None:
    response = await _post(sidecar, idp.mint(), origin)
    assert response.status == 403


async def test_cors_allow_origins_replaces_the_default_list(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    sidecar = await make_sidecar(CORS_ALLOW_ORIGINS="https://a.example,http://localhost:6274")
    token = idp.mint()
    for origin in ("https://a.example", "http://localhost:6274"):
        response = await _post(sidecar, token, origin)
        assert response.status == 200, origin
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert (await _preflight(sidecar, "/mcp", origin)).status == 204, origin
    for origin in (CLAUDE, "http://localhost:6275", "https://b.example"):
        assert (await _post(sidecar, token, origin)).status == 403, origin


@pytest.mark.parametrize("path", [PRM, "/.well-known/oauth-protected-resource"])
async def test_metadata_document_is_readable_from_any_origin(
    sidecar: Client, upstream: FakeUpstream, path: str
) -> None:
    response = await sidecar.get(path, headers={"Origin": EVIL}, timeout=BOUND)
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert (await response.json())["resource"] == "https://mcp.example.test/mcp"
    assert upstream.requests == []


async def test_metadata_preflight_succeeds_from_any_origin(
    sidecar: Client, upstream: FakeUpstream
) -> None:
    response = await sidecar.options(PRM, headers={
        "Origin": EVIL, "Access-Control-Request-Method": "GET",
    }, timeout=BOUND)
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] in ("*", EVIL)
    assert upstream.requests == []


async def test_metadata_for_an_allowed_origin_keeps_a_usable_allow_origin(sidecar: Client) -> None:
    response = await sidecar.get(PRM, headers={"Origin": CLAUDE}, timeout=BOUND)
    assert response.status == 200
    assert response.headers.getall("Access-Control-Allow-Origin") in (["*"], [CLAUDE])


async def test_preflight_allows_mcp_param_headers_the_browser_asks_for(sidecar: Client) -> None:
    response = await sidecar.options("/mcp", headers={
        "Origin": CLAUDE,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, mcp-method, mcp-name, mcp-param-city",
    }, timeout=BOUND)
    assert response.status == 204
    assert "mcp-param-city" in _listed(response.headers["Access-Control-Allow-Headers"])
