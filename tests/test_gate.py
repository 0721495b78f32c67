"""The gate: public routes are terminal and answer only their methods; everything else needs a
bearer token, whatever the path looks like on the wire and whatever protocol version is claimed."""

from __future__ import annotations

import asyncio
import re

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import FakeIdp, FakeUpstream, SidecarFactory, bearer

Client = TestClient[web.Request, web.Application]

PRM_ROOT = "/.well-known/oauth-protected-resource"
PRM_MCP = "/.well-known/oauth-protected-resource/mcp"
PUBLIC_PATHS = ["/healthz", "/readyz", PRM_ROOT, PRM_MCP]
METADATA_URL = "https://mcp.example.test/.well-known/oauth-protected-resource/mcp"
RAW_TIMEOUT = 5.0


async def raw_request(
    client: Client, request_line: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, list[str]], bytes]:
    """Send exactly the given request line over a fresh socket; nothing normalises the target."""
    port = client.port
    assert port is not None
    lines = [request_line, "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port), RAW_TIMEOUT
    )
    try:
        writer.write(payload)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), RAW_TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed: dict[str, list[str]] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed.setdefault(name.strip().lower(), []).append(value.strip())
    return int(status_line.split(" ")[1]), parsed, body


def assert_no_credentials_challenge(values: list[str], metadata_url: str = METADATA_URL) -> None:
    assert len(values) == 1, values
    challenge = values[0]
    assert challenge.startswith("Bearer ")
    assert "error=" not in challenge  # RFC 6750 §3.1: no error code without credentials
    match = re.search(r'resource_metadata="([^"]*)"', challenge)
    assert match is not None
    assert match.group(1) == metadata_url
    assert match.group(1).startswith("https://")


# -- public routes are terminal ------------------------------------------------------------------


@pytest.mark.parametrize("path", PUBLIC_PATHS)
async def test_public_route_refuses_other_methods_with_405_and_never_proxies(
    sidecar: Client, upstream: FakeUpstream, idp: FakeIdp, path: str
) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        for headers in ({}, bearer(idp.mint())):
            response = await sidecar.request(method, path, data=b"{}", headers=headers)
            assert response.status == 405, (method, path)
            assert response.headers["Allow"] == "GET, HEAD"
            assert response.content_type == "application/json"
            assert (await response.json())["error"] == "method_not_allowed"
    assert upstream.requests == []


@pytest.mark.parametrize("path", PUBLIC_PATHS)
async def test_public_route_answers_head_without_body(
    sidecar: Client, upstream: FakeUpstream, path: str
) -> None:
    response = await sidecar.head(path)
    assert response.status == 200
    assert await response.read() == b""
    assert upstream.requests == []


@pytest.mark.parametrize("path", PUBLIC_PATHS)
async def test_public_route_answers_get_without_token(sidecar: Client, path: str) -> None:
    response = await sidecar.get(path)
    assert response.status == 200
    assert "WWW-Authenticate" not in response.headers


# -- the MCP path is protected for every method -------------------------------------------------


async def test_mcp_without_token_gets_one_challenge_without_error_code(
    sidecar: Client, upstream: FakeUpstream
) -> None:
    for method in ("GET", "POST", "DELETE", "HEAD", "PUT", "PATCH"):
        response = await sidecar.request(method, "/mcp")
        assert response.status == 401, method
        assert_no_credentials_challenge(response.headers.getall("WWW-Authenticate"))
        assert response.headers["Cache-Control"] == "no-store"
        if method != "HEAD":
            assert (await response.json())["error"] == "unauthorized"
    assert upstream.requests == []


async def test_options_without_preflight_headers_is_not_a_preflight_and_needs_a_token(
    sidecar: Client, upstream: FakeUpstream
) -> None:
    plain = await sidecar.options("/mcp")
    assert plain.status == 401
    assert_no_credentials_challenge(plain.headers.getall("WWW-Authenticate"))
    # An allowed browser Origin alone does not make it a preflight either.
    with_origin = await sidecar.options("/mcp", headers={"Origin": "https://claude.ai"})
    assert with_origin.status == 401
    assert upstream.requests == []


async def test_challenge_carries_configured_scopes(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(SCOPES_SUPPORTED="mcp:read mcp:write")
    missing = await client.post("/mcp")
    assert missing.status == 401
    [challenge] = missing.headers.getall("WWW-Authenticate")
    assert 'scope="mcp:read mcp:write"' in challenge
    assert "error=" not in challenge
    invalid = await client.post("/mcp", headers=bearer(idp.mint(claims={"aud": "other"})))
    assert invalid.status == 401
    [challenge] = invalid.headers.getall("WWW-Authenticate")
    assert 'error="invalid_token"' in challenge
    assert 'scope="mcp:read mcp:write"' in challenge
    assert f'resource_metadata="{METADATA_URL}"' in challenge


async def test_challenge_has_no_scope_when_none_configured(sidecar: Client) -> None:
    response = await sidecar.post("/mcp")
    assert "scope=" not in response.headers["WWW-Authenticate"]


async def test_invalid_token_challenge_names_invalid_token_once(
    sidecar: Client, upstream: FakeUpstream
) -> None:
    response = await sidecar.post("/mcp", headers=bearer("not.a.jwt"))
    assert response.status == 401
    [challenge] = response.headers.getall("WWW-Authenticate")
    assert challenge.startswith('Bearer error="invalid_token"')
    assert f'resource_metadata="{METADATA_URL}"' in challenge
    assert upstream.requests == []


# -- path tricks ---------------------------------------------------------------------------------

PATH_TRICKS = [
    "/.well-known/%2e%2e/mcp",
    "/.well-known/%2E%2E/mcp",
    "/.well-known/../mcp",
    "/healthz/../mcp",
    "/healthz/..%2fmcp",
    "/healthz%2f..%2fmcp",
    "//mcp",
    "//healthz/../mcp",
    "/mcp%2F..",
    "/MCP",
    "/Healthz",
    "/HEALTHZ",
    "/healthz/",
    "/healthz/.",
    "/./healthz",
    "/healthz;x",
    "/healthz%00",
    "/healthz%20",
    "/healthz\\..\\mcp",
    "/healthz?x",
    "/healthz?x=../../mcp",
    "/healthz#x",
    "/healthz%23",
    "/healthz%23/../mcp",
    "/mcp%23",
    "/.well-known/oauth-protected-resource/../../mcp",
    "/.well-known/oauth-protected-resource%2f..%2f..%2fmcp",
    "/.well-known/oauth-protected-resource/mcp/../../../mcp",
    "/.well-known/anything",
    "/.well-known/",
    "/.well-known/openid-configuration",
    "/%2e%2e/mcp",
    "/..",
    "/../healthz",
    "http://127.0.0.1/healthz/../mcp",
    "http://evil.test/mcp",
    "*",
]
# Targets that really are a public route once the query or fragment is set aside.
PUBLIC_TARGETS = {"/healthz?x", "/healthz?x=../../mcp", "/healthz#x"}


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE", "PUT"])
async def test_path_tricks_never_skip_auth_or_reach_upstream(
    sidecar: Client, upstream: FakeUpstream, method: str
) -> None:
    # One sidecar per method, every target sent raw: the bytes on the wire are exactly these.
    outcomes: dict[str, int] = {}
    for target in PATH_TRICKS:
        status, headers, _ = await raw_request(sidecar, f"{method} {target} HTTP/1.1")
        outcomes[target] = status
        allowed = {200} if target in PUBLIC_TARGETS and method == "GET" else {400, 401, 404, 405}
        assert status in allowed, (method, target, status)
        if status == 401:
            assert_no_credentials_challenge(headers["www-authenticate"])
        assert upstream.requests == [], (method, target)
    # The classic bypasses are refused by the gate itself, not by luck of routing.
    for target in ("/.well-known/%2e%2e/mcp", "/healthz/../mcp", "//mcp", "/mcp%2F..", "/MCP",
                   "/Healthz", "/healthz/", "/.well-known/anything",
                   "/.well-known/oauth-protected-resource/../../mcp", "/healthz%23"):
        assert outcomes[target] == 401, (method, target)


async def test_path_tricks_with_token_forward_the_authenticated_path(
    sidecar: Client, upstream: FakeUpstream, idp: FakeIdp
) -> None:
    """A dot-segment path that passed the gate is forwarded as is, never re-resolved to a
    public route; encoded dots and slashes are refused before the upstream."""
    auth = bearer(idp.mint())
    status, _, _ = await raw_request(sidecar, "POST /healthz/../mcp HTTP/1.1", auth)
    assert status == 200
    assert [r.method for r in upstream.requests] == ["POST"]
    for target in ("/.well-known/%2e%2e/mcp", "/mcp%2F..", "/healthz\\..\\mcp"):
        status, _, _ = await raw_request(sidecar, f"POST {target} HTTP/1.1", auth)
        assert status == 400, target
    assert len(upstream.requests) == 1


# -- the auth decision ignores MCP-Protocol-Version ----------------------------------------------

PROTOCOL_VERSIONS = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28",
                     "garbage", ""]


async def test_protocol_version_header_never_changes_the_auth_decision(
    sidecar: Client, upstream: FakeUpstream, idp: FakeIdp
) -> None:
    for version in PROTOCOL_VERSIONS:
        upstream.requests.clear()
        await _check_protocol_version(sidecar, upstream, idp, version)


async def _check_protocol_version(
    sidecar: Client, upstream: FakeUpstream, idp: FakeIdp, version: str
) -> None:
    headers = {"MCP-Protocol-Version": version, "Content-Type": "application/json"}
    body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    refused = await sidecar.post("/mcp", data=body, headers=headers)
    assert refused.status == 401
    assert_no_credentials_challenge(refused.headers.getall("WWW-Authenticate"))
    assert upstream.requests == []
    wrong_audience = idp.mint(claims={"aud": "https://other.example.test/mcp"})
    refused = await sidecar.post("/mcp", data=body, headers={**headers, **bearer(wrong_audience)})
    assert refused.status == 401
    assert upstream.requests == []
    accepted = await sidecar.post("/mcp", data=body, headers={**headers, **bearer(idp.mint())})
    assert accepted.status == 200
    assert len(upstream.requests) == 1
    forwarded = {k.lower(): v for k, v in upstream.requests[0].headers.items()}
    if version:
        assert forwarded["mcp-protocol-version"] == version
