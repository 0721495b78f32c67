"""End to end: the production app in front of a real upstream, with a real fake IdP."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import FakeIdp, FakeUpstream, bearer

Client = TestClient[web.Request, web.Application]


async def test_valid_token_reaches_upstream_without_credentials(
    sidecar: Client, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    token = idp.mint()
    response = await sidecar.post(
        "/mcp?x=1", data=b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
        headers={**bearer(token), "Cookie": "s=1", "Content-Type": "application/json"},
    )
    assert response.status == 200
    body = await response.json()
    assert body["path_qs"] == "/mcp?x=1"
    assert body["body"] == '{"jsonrpc":"2.0","id":1,"method":"ping"}'
    seen = upstream.requests[-1].headers
    assert "Authorization" not in seen
    assert "Cookie" not in seen
    assert token not in str(seen)


async def test_missing_token_gets_challenge_and_nothing_reaches_upstream(
    sidecar: Client, upstream: FakeUpstream
) -> None:
    response = await sidecar.post("/mcp", data=b"{}")
    assert response.status == 401
    assert response.headers.getall("WWW-Authenticate") == [
        'Bearer resource_metadata="https://mcp.example.test/.well-known/oauth-protected-resource/mcp"'
    ]
    assert (await response.json())["error"] == "unauthorized"
    assert upstream.requests == []


async def test_every_answer_names_the_server_without_a_version(
    sidecar: Client, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    """aiohttp says `Python/3.x aiohttp/3.y` and the proxied answers carried the upstream's own."""
    token = bearer(idp.mint())
    answers = [
        await sidecar.get("/healthz"),
        await sidecar.get("/readyz"),
        await sidecar.get("/.well-known/oauth-protected-resource/mcp"),
        await sidecar.post("/healthz"),  # 405
        await sidecar.post("/mcp", data=b"{}"),  # 401
        await sidecar.post("/mcp", data=b"{}", headers={"Origin": "https://evil.example"}),  # 403
        await sidecar.options("/mcp", headers={"Origin": "https://claude.ai",
                                               "Access-Control-Request-Method": "POST"}),  # 204
        await sidecar.post("/mcp", data=b"{}", headers=token),  # proxied JSON
        await sidecar.get("/sse", headers={**token, "Accept": "text/event-stream"}),  # streamed
    ]
    statuses = [answer.status for answer in answers]
    assert statuses == [200, 200, 200, 405, 401, 403, 204, 200, 200]
    for answer in answers:
        assert answer.headers.getall("Server") == ["oauth-sidecar"], answer.url
        answer.close()
