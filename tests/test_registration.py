"""Static client registration (POST /oauth/register and /register) through the real sidecar:
RFC 7591 answers naming the one client the operator registered at the IdP, guarded by the
redirect-URI allow-list (the MCP confused-deputy rule), and the configuration that shapes them."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import FakeUpstream, SidecarFactory
from test_authserver import Reply

from oauth_sidecar.config import ConfigError, load

Client = TestClient[web.Request, web.Application]

REQUEST_TIMEOUT = 10.0  # every request in this file is bounded
REGISTER_PATHS = ("/oauth/register", "/register")
CLIENT_ID = "static-client-1"
CLIENT_SECRET = "static-secret-do-not-publish"
CLAUDE_AI = "https://claude.ai/api/mcp/auth_callback"
CLAUDE_COM = "https://claude.com/api/mcp/auth_callback"
STATIC = {"STATIC_CLIENT_ID": CLIENT_ID, "STATE_SECRET": "s" * 32}

BASE_ENV = {
    "OIDC_ISSUER_URL": "https://idp.example.test/realms/demo",
    "OIDC_AUDIENCE": "https://mcp.example.test/mcp",
    "RESOURCE_URL": "https://mcp.example.test/mcp",
    "MCP_UPSTREAM_URL": "http://127.0.0.1:9000",
    "ALLOW_SUBS": "user-1",
}



async def register(
    client: Client, body: Any = None, *, raw: bytes | None = None,
    path: str = "/oauth/register", headers: dict[str, str] | None = None,
) -> Reply:
    """One bounded POST of a JSON document (or of raw bytes) to a registration path."""
    data = raw if raw is not None else json.dumps(body).encode()
    async with asyncio.timeout(REQUEST_TIMEOUT):
        response = await client.post(path, data=data, headers={
            "Content-Type": "application/json", **(headers or {})})
        text = await response.text()
    return Reply(response.status, response.headers, text)


def metadata(*redirect_uris: Any, **extra: Any) -> dict[str, Any]:
    """A registration document as MCP clients send it."""
    return {
        "redirect_uris": list(redirect_uris),
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "client_name": "Test MCP client",
        **extra,
    }


def assert_rfc7591_error(reply: Reply, error: str) -> None:
    assert reply.status == 400, reply.text
    body = reply.json()
    assert body["error"] == error
    assert isinstance(body["error_description"], str)
    assert CLIENT_ID not in reply.text


@pytest.fixture
async def static(make_sidecar: SidecarFactory) -> Client:
    """A sidecar handing out the static client (and holding a secret it must not publish)."""
    return await make_sidecar(**STATIC, STATIC_CLIENT_SECRET=CLIENT_SECRET)


# -- successful registration ----------------------------------------------------------------------


@pytest.mark.parametrize("path", REGISTER_PATHS)
async def test_claude_callbacks_register_as_the_static_public_client_without_its_secret(
    static: Client, upstream: FakeUpstream, path: str
) -> None:
    reply = await register(static, metadata(CLAUDE_AI, CLAUDE_COM), path=path)
    assert reply.status == 201, reply.text
    body = reply.json()
    assert body["client_id"] == CLIENT_ID
    assert body["token_endpoint_auth_method"] == "none"
    assert "client_secret" not in body
    assert CLIENT_SECRET not in reply.text
    assert body["redirect_uris"] == [CLAUDE_AI, CLAUDE_COM]
    assert body["response_types"] == ["code"]
    assert body["grant_types"] == ["authorization_code", "refresh_token"]
    assert isinstance(body["client_id_issued_at"], int)
    assert body["client_name"] == "Test MCP client"
    assert "no-store" in reply.headers["Cache-Control"]
    assert upstream.requests == []


LOOPBACK_REDIRECTS = [
    "http://127.0.0.1:54321/x",
    "http://127.0.0.1:1/callback",
    "http://127.0.0.1/cb",
    "http://localhost:9/cb",
    "http://localhost:33418/callback",
    "http://[::1]:8080/cb",
    "http://127.0.0.1:8080/cb?with=query",
]


async def test_loopback_redirect_uris_on_any_port_and_path_register(static: Client) -> None:
    wrong = []
    for uri in LOOPBACK_REDIRECTS:
        reply = await register(static, metadata(uri))
        if reply.status != 201 or reply.json()["redirect_uris"] != [uri]:
            wrong.append((uri, reply.status, reply.text))
    assert wrong == []
    together = await register(static, metadata(CLAUDE_AI, *LOOPBACK_REDIRECTS))
    assert together.status == 201, together.text


async def test_minimal_document_gets_code_grant_defaults(static: Client) -> None:
    reply = await register(static, {"redirect_uris": [CLAUDE_AI]})
    assert reply.status == 201, reply.text
    body = reply.json()
    assert body["grant_types"] == ["authorization_code"]
    assert body["response_types"] == ["code"]
    assert "client_name" not in body


async def test_confidential_static_client_publishes_its_secret(
    make_sidecar: SidecarFactory,
) -> None:
    client = await make_sidecar(**STATIC, STATIC_CLIENT_SECRET=CLIENT_SECRET,
                                STATIC_CLIENT_CONFIDENTIAL="true")
    reply = await register(client, metadata(CLAUDE_AI))
    assert reply.status == 201, reply.text
    body = reply.json()
    assert body["client_id"] == CLIENT_ID
    assert body["client_secret"] == CLIENT_SECRET
    assert body["client_secret_expires_at"] == 0
    assert body["token_endpoint_auth_method"] == "client_secret_post"
    assert "no-store" in reply.headers["Cache-Control"]


async def test_static_client_without_any_secret_registers_as_public(
    make_sidecar: SidecarFactory,
) -> None:
    client = await make_sidecar(**STATIC)
    reply = await register(client, metadata(CLAUDE_AI), path="/register")
    assert reply.status == 201, reply.text
    assert reply.json()["token_endpoint_auth_method"] == "none"
    assert "client_secret" not in reply.json()


# -- RFC 7591 §3.2.2 refusals ---------------------------------------------------------------------


async def refusals(client: Client, documents: list[Any], error: str) -> list[Any]:
    """Register each document (one sidecar, many cases); return those not refused with error."""
    wrong = []
    for document in documents:
        reply = await register(client, document)
        if reply.status != 400 or reply.json()["error"] != error or CLIENT_ID in reply.text:
            wrong.append((document, reply.status, reply.text))
    return wrong


MALFORMED_REDIRECT_URIS: list[dict[str, Any]] = [
    {},
    {"redirect_uris": []},
    {"redirect_uris": None},
    {"redirect_uris": CLAUDE_AI},
    {"redirect_uris": {"uri": CLAUDE_AI}},
    {"redirect_uris": [1]},
    {"redirect_uris": [None]},
    {"redirect_uris": [[CLAUDE_AI]]},
    {"redirect_uris": [{"uri": CLAUDE_AI}]},
    {"redirect_uris": [CLAUDE_AI, 7]},
]


async def test_missing_empty_or_non_string_redirect_uris_are_invalid_redirect_uri(
    static: Client,
) -> None:
    assert await refusals(static, MALFORMED_REDIRECT_URIS, "invalid_redirect_uri") == []


DISALLOWED_REDIRECTS = [
    "https://evil.example/cb",
    "javascript:alert(1)",
    "JavaScript:alert(document.cookie)//http://127.0.0.1/",
    "data:text/html;base64;PHNjcmlwdD4=",
    "http://evil.example/cb",
    "https://claude.ai/api/mcp/auth_callback/../x",
    "https://claude.ai/api/mcp/auth_callback/",
    "https://claude.ai/api/mcp/auth_callback?next=https://evil.example",
    "https://claude.ai/api/mcp/auth_callback#frag",
    "https://CLAUDE.AI/api/mcp/auth_callback",
    "http://claude.ai/api/mcp/auth_callback",
    "https://claude.ai.evil.example/api/mcp/auth_callback",
    "https://evil.example/api/mcp/auth_callback",
    "http://127.0.0.1/cb#fragment",
    "http://user@127.0.0.1/cb",
    "http://user:pw@127.0.0.1/cb",
    "http://127.0.0.1@evil.example/cb",
    "http://127.0.0.1.evil.example/cb",
    "http://localhost.evil.example/cb",
    "http://127.0.0.1:99999/cb",
    "http://127.0.0.1:port/cb",
    "https://127.0.0.1/cb",
    "ftp://127.0.0.1/cb",
    "//127.0.0.1/cb",
    "/cb",
    "",
    "http://127.0.0.1/" + "a" * 3000,
]


async def test_disallowed_redirect_uris_are_refused(static: Client) -> None:
    documents = [metadata(uri) for uri in DISALLOWED_REDIRECTS]
    assert await refusals(static, documents, "invalid_redirect_uri") == []


async def test_one_disallowed_uri_among_allowed_ones_refuses_the_whole_registration(
    static: Client,
) -> None:
    reply = await register(static, metadata(CLAUDE_AI, "https://evil.example/cb"))
    assert_rfc7591_error(reply, "invalid_redirect_uri")


BAD_GRANT_TYPES: list[Any] = [
    ["implicit"],
    ["client_credentials"],
    ["password"],
    ["authorization_code", "implicit"],
    ["authorization_code", "urn:ietf:params:oauth:grant-type:device_code"],
    ["authorization_code", "urn:ietf:params:oauth:grant-type:jwt-bearer"],
    [],
    "authorization_code",
    None,
    [1],
]


async def test_grant_types_beyond_code_and_refresh_are_invalid_client_metadata(
    static: Client,
) -> None:
    documents = [metadata(CLAUDE_AI, grant_types=grants) for grants in BAD_GRANT_TYPES]
    assert await refusals(static, documents, "invalid_client_metadata") == []


@pytest.mark.parametrize("grant_types", [[{"type": "authorization_code"}], [["implicit"]]],
                         ids=repr)
async def test_unhashable_grant_types_are_invalid_client_metadata_not_a_server_error(
    static: Client, grant_types: Any
) -> None:
    reply = await register(static, metadata(CLAUDE_AI, grant_types=grant_types))
    assert_rfc7591_error(reply, "invalid_client_metadata")


BAD_RESPONSE_TYPES: list[Any] = [
    ["token"], ["code", "token"], ["code id_token"], ["id_token"], [], "code", None,
    [{"type": "code"}],
]


async def test_response_types_other_than_code_are_invalid_client_metadata(
    static: Client,
) -> None:
    documents = [metadata(CLAUDE_AI, response_types=types) for types in BAD_RESPONSE_TYPES]
    assert await refusals(static, documents, "invalid_client_metadata") == []


async def test_code_and_refresh_grants_in_either_order_are_accepted(static: Client) -> None:
    for grants in (["authorization_code", "refresh_token"],
                   ["refresh_token", "authorization_code"]):
        reply = await register(static, metadata(CLAUDE_AI, grant_types=grants))
        assert reply.status == 201, reply.text
        assert reply.json()["grant_types"] == grants


async def test_overlong_client_name_is_truncated_and_non_string_one_dropped(
    static: Client,
) -> None:
    long_name = await register(static, metadata(CLAUDE_AI, client_name="n" * 5000))
    assert long_name.status == 201
    assert long_name.json()["client_name"] == "n" * 200
    odd_name = await register(static, metadata(CLAUDE_AI, client_name={"x": 1}))
    assert odd_name.status == 201
    assert "client_name" not in odd_name.json()


NOT_A_JSON_OBJECT = [
    b"not json",
    b"",
    b"[]",
    b'[{"redirect_uris": ["https://claude.ai/api/mcp/auth_callback"]}]',
    b"null",
    b"42",
    b'"https://claude.ai/api/mcp/auth_callback"',
    b'{"redirect_uris": ["https://claude.ai/api/mcp/auth_callback"]',
    b"\xff\xfe",
    b'{"redirect_uris": ["\xff"]}',
    b"{" * 5000,
]


async def test_bodies_that_are_not_a_json_object_get_400_json(
    static: Client, upstream: FakeUpstream
) -> None:
    wrong = []
    for raw in NOT_A_JSON_OBJECT:
        reply = await register(static, raw=raw)
        if reply.status != 400 or reply.json()["error"] != "invalid_client_metadata":
            wrong.append((raw[:40], reply.status, reply.text))
    assert wrong == []
    assert upstream.requests == []


async def test_deeply_nested_json_gets_400_not_a_server_error(static: Client) -> None:
    reply = await register(static, raw=b"[" * 30_000 + b"]" * 30_000)
    assert reply.status == 400, reply.text
    assert reply.json()["error"] == "invalid_client_metadata"


async def test_one_megabyte_body_gets_a_clean_4xx_json(
    static: Client, upstream: FakeUpstream
) -> None:
    document = json.dumps(metadata(CLAUDE_AI, padding="x" * (1 << 20))).encode()
    async with asyncio.timeout(REQUEST_TIMEOUT):
        response = await static.post("/oauth/register", data=io.BytesIO(document),
                                     headers={"Content-Type": "application/json"})
        reply = Reply(response.status, response.headers, await response.text())
    assert reply.status in (400, 413), reply.text
    assert reply.json()["error"] == "invalid_client_metadata" or reply.status == 413
    assert upstream.requests == []


async def test_one_megabyte_chunked_body_without_content_length_gets_a_clean_4xx_json(
    static: Client,
) -> None:
    async def chunks() -> Any:
        for _ in range(16):
            yield b" " * 65536

    async with asyncio.timeout(REQUEST_TIMEOUT):
        response = await static.post("/oauth/register", data=chunks(),
                                     headers={"Content-Type": "application/json"})
        text = await response.text()
    assert response.status in (400, 413), text
    assert "error" in json.loads(text)


async def test_document_arriving_in_two_writes_is_read_whole(static: Client) -> None:
    body = json.dumps(metadata(CLAUDE_AI)).encode()
    assert static.server.port is not None
    async with asyncio.timeout(REQUEST_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", static.server.port)
        try:
            writer.write(
                b"POST /oauth/register HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10]
            )
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(body[10:])
            await writer.drain()
            answer = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 201"), answer[:300]


# -- what the operator configured -----------------------------------------------------------------


async def test_loopback_redirects_refused_when_disabled(make_sidecar: SidecarFactory) -> None:
    client = await make_sidecar(**STATIC, ALLOW_LOOPBACK_REDIRECTS="false")
    for uri in ("http://127.0.0.1:8080/cb", "http://localhost:9/cb", "http://[::1]:8080/cb"):
        assert_rfc7591_error(await register(client, metadata(uri)), "invalid_redirect_uri")
    assert (await register(client, metadata(CLAUDE_AI, CLAUDE_COM))).status == 201


async def test_allowed_redirect_uris_replace_the_claude_defaults(
    make_sidecar: SidecarFactory,
) -> None:
    client = await make_sidecar(**STATIC, ALLOWED_REDIRECT_URIS="https://app.example/cb")
    ok = await register(client, metadata("https://app.example/cb"))
    assert ok.status == 201, ok.text
    assert ok.json()["redirect_uris"] == ["https://app.example/cb"]
    for uri in (CLAUDE_AI, CLAUDE_COM, "https://app.example/cb/", "https://app.example/cb2"):
        assert_rfc7591_error(await register(client, metadata(uri)), "invalid_redirect_uri")
    # Loopback is its own switch, still on by default.
    assert (await register(client, metadata("http://127.0.0.1:7777/cb"))).status == 201


CURSOR = "cursor://anysphere.cursor-mcp/oauth/callback"


async def test_a_listed_private_use_scheme_registers_exactly(
    make_sidecar: SidecarFactory,
) -> None:
    """RFC 8252 §7.1 native-app callbacks (Cursor), only when listed and only exactly."""
    client = await make_sidecar(**STATIC, ALLOWED_REDIRECT_URIS=f"{CLAUDE_AI},{CURSOR}")
    ok = await register(client, metadata(CURSOR))
    assert ok.status == 201, ok.text
    assert ok.json()["redirect_uris"] == [CURSOR]
    for uri in (CURSOR + "/", "cursor://anysphere.cursor-mcp/oauth/callback2",
                "CURSOR://anysphere.cursor-mcp/oauth/callback", "vscode://x/oauth/callback"):
        assert_rfc7591_error(await register(client, metadata(uri)), "invalid_redirect_uri")


async def test_explicitly_listed_loopback_uri_allowed_even_with_loopback_switch_off(
    make_sidecar: SidecarFactory,
) -> None:
    client = await make_sidecar(**STATIC, ALLOW_LOOPBACK_REDIRECTS="false",
                                ALLOWED_REDIRECT_URIS="http://127.0.0.1:8765/callback")
    assert (await register(client, metadata("http://127.0.0.1:8765/callback"))).status == 201
    reply = await register(client, metadata("http://127.0.0.1:8766/callback"))
    assert_rfc7591_error(reply, "invalid_redirect_uri")


@pytest.mark.parametrize("path", REGISTER_PATHS)
async def test_without_static_client_registration_is_not_supported(
    make_sidecar: SidecarFactory, upstream: FakeUpstream, path: str
) -> None:
    client = await make_sidecar()
    reply = await register(client, metadata(CLAUDE_AI), path=path)
    assert reply.status == 404, reply.text
    assert reply.json()["error"] == "registration_not_supported"
    assert "www-authenticate" not in {h.lower() for h in reply.headers}
    assert upstream.requests == []


@pytest.mark.parametrize("with_static_client", [True, False])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_on_registration_paths_are_405_and_never_proxied(
    make_sidecar: SidecarFactory, upstream: FakeUpstream, method: str,
    with_static_client: bool,
) -> None:
    client = await make_sidecar(**(STATIC if with_static_client else {}))
    for path in REGISTER_PATHS:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            response = await client.request(method, path)
            body = await response.json()
        assert response.status == 405, (path, body)
        assert response.headers["Allow"] == "POST"
        assert body["error"] == "method_not_allowed"
    assert upstream.requests == []


async def test_registrations_spend_the_client_ip_budget(make_sidecar: SidecarFactory) -> None:
    client = await make_sidecar(**STATIC, RATE_LIMIT_UNAUTHENTICATED_RPM="3")
    replies = [
        await register(client, metadata(CLAUDE_AI), path=path)
        for path in ("/oauth/register", "/register", "/oauth/register")
    ]
    assert [r.status for r in replies] == [201, 201, 201]
    # A caller-written X-Forwarded-For is not believed: it buys no fresh budget.
    limited = await register(client, metadata(CLAUDE_AI), path="/register",
                             headers={"X-Forwarded-For": "203.0.113.9"})
    assert limited.status == 429, limited.text
    assert limited.json()["error"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60


async def test_refused_registrations_spend_the_budget_too(make_sidecar: SidecarFactory) -> None:
    client = await make_sidecar(**STATIC, RATE_LIMIT_UNAUTHENTICATED_RPM="2")
    assert (await register(client, raw=b"garbage")).status == 400
    assert (await register(client, metadata("https://evil.example/cb"))).status == 400
    limited = await register(client, metadata(CLAUDE_AI))
    assert limited.status == 429
    assert limited.headers["Retry-After"].isdigit()


# -- configuration --------------------------------------------------------------------------------


def problems_for(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load({**BASE_ENV, **env})
    return caught.value.problems


def only_problem(**env: str) -> str:
    problems = problems_for(**env)
    assert len(problems) == 1, problems
    return problems[0]


@pytest.mark.parametrize("entry", [
    "http://app.example/cb",
    "https://app.example/cb#fragment",
    "javascript:alert(1)",
    "JavaScript:alert(1)",
    "data:text/html;base64;PHNjcmlwdD4=",
    "file:///etc/passwd",
    "vbscript:msgbox(1)",
    "ws://app.example/cb",
    "cursor://anysphere.cursor-mcp/oauth/callback#fragment",
    "cursor://user:hunter2@anysphere.cursor-mcp/cb",
    "1cursor://x/cb",
    "app.example/cb",
    "/cb",
    "https:///cb",
])
def test_bad_allowed_redirect_uri_entries_refuse_to_start(entry: str) -> None:
    problem = only_problem(ALLOWED_REDIRECT_URIS=f"https://good.example/cb,{entry}")
    assert "ALLOWED_REDIRECT_URIS" in problem
    assert "good.example" not in problem


def test_redirect_uri_entry_with_credentials_is_refused_without_echoing_the_password() -> None:
    problem = only_problem(ALLOWED_REDIRECT_URIS="https://user:hunter2pass@app.example/cb")
    assert "ALLOWED_REDIRECT_URIS" in problem
    assert "hunter2pass" not in problem


def test_private_use_scheme_redirect_entries_are_accepted() -> None:
    config = load({**BASE_ENV, "ALLOWED_REDIRECT_URIS":
                   "cursor://anysphere.cursor-mcp/oauth/callback com.example.app:/oauth2redirect"})
    assert config.auth_server.redirect_uris == frozenset({
        "cursor://anysphere.cursor-mcp/oauth/callback", "com.example.app:/oauth2redirect"})


def test_loopback_http_and_https_redirect_entries_are_accepted() -> None:
    config = load({**BASE_ENV, "ALLOWED_REDIRECT_URIS":
                   "http://127.0.0.1:8765/cb, http://localhost/cb https://app.example/cb"})
    assert config.auth_server.redirect_uris == frozenset({
        "http://127.0.0.1:8765/cb", "http://localhost/cb", "https://app.example/cb"})


def test_default_redirect_allow_list_is_the_claude_callbacks_plus_loopback() -> None:
    auth = load(BASE_ENV).auth_server
    assert auth.redirect_uris == frozenset({CLAUDE_AI, CLAUDE_COM})
    assert auth.allow_loopback_redirects is True


def test_confidential_static_client_without_secret_refuses_to_start() -> None:
    problem = only_problem(STATIC_CLIENT_ID=CLIENT_ID, STATIC_CLIENT_CONFIDENTIAL="true")
    assert "STATIC_CLIENT_CONFIDENTIAL" in problem
    assert "STATIC_CLIENT_SECRET" in problem


def test_secret_without_client_id_refuses_to_start() -> None:
    problem = only_problem(STATIC_CLIENT_SECRET=CLIENT_SECRET)
    assert "STATIC_CLIENT_SECRET" in problem
    assert "STATIC_CLIENT_ID" in problem
    assert CLIENT_SECRET not in problem


def test_facade_mode_without_static_client_refuses_to_start() -> None:
    problem = only_problem(AUTH_SERVER_MODE="facade")
    assert "AUTH_SERVER_MODE" in problem
    assert "STATIC_CLIENT_ID" in problem


@pytest.mark.parametrize("mode", ["bogus", "both", "proxy"])
def test_unknown_auth_server_mode_refuses_to_start(mode: str) -> None:
    problem = only_problem(AUTH_SERVER_MODE=mode, STATIC_CLIENT_ID=CLIENT_ID)
    assert "AUTH_SERVER_MODE" in problem
    assert mode in problem


def test_short_state_secret_refuses_to_start_without_echoing_it() -> None:
    short = "0123456789abcdef0123456789abcde"  # 31 characters
    problem = only_problem(STATIC_CLIENT_ID=CLIENT_ID, STATE_SECRET=short)
    assert "STATE_SECRET" in problem
    assert short not in problem
    assert load({**BASE_ENV, "STATIC_CLIENT_ID": CLIENT_ID, "STATE_SECRET": short + "f"})


def test_every_sign_in_problem_is_reported_together() -> None:
    problems = problems_for(
        AUTH_SERVER_MODE="bogus", STATIC_CLIENT_CONFIDENTIAL="true",
        ALLOWED_REDIRECT_URIS="http://app.example/cb", STATE_SECRET="short",
    )
    text = "\n".join(problems)
    for name in ("AUTH_SERVER_MODE", "STATIC_CLIENT_CONFIDENTIAL", "ALLOWED_REDIRECT_URIS",
                 "STATE_SECRET"):
        assert name in text, problems


def test_mode_defaults_to_facade_with_a_static_client_and_direct_without() -> None:
    assert load({**BASE_ENV, "STATIC_CLIENT_ID": CLIENT_ID}).auth_server.facade is True
    assert load(BASE_ENV).auth_server.facade is False
    explicit = load({**BASE_ENV, "STATIC_CLIENT_ID": CLIENT_ID, "AUTH_SERVER_MODE": "Direct"})
    assert explicit.auth_server.facade is False
    assert explicit.auth_server.client_id == CLIENT_ID


def test_facade_without_state_secret_warns_about_replicas() -> None:
    warned = load({**BASE_ENV, "STATIC_CLIENT_ID": CLIENT_ID}).warnings
    assert any("STATE_SECRET" in warning for warning in warned), warned
    quiet = load({**BASE_ENV, "STATIC_CLIENT_ID": CLIENT_ID, "STATE_SECRET": "k" * 32}).warnings
    assert not any("STATE_SECRET" in warning for warning in quiet), quiet
    direct = load(BASE_ENV).warnings
    assert not any("STATE_SECRET" in warning for warning in direct), direct
