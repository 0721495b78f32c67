"""Shared fixtures: a fake IdP and a recording MCP upstream, both real aiohttp apps on loopback,
real keys from cryptography, and the production create_app(load(env)) in front of them."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from ssl import SSLContext
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from processes import free_port
from redis_server import RedisServer

from oauth_sidecar.app import create_app
from oauth_sidecar.config import Config, load
from oauth_sidecar.listener import make_runner

AUDIENCE = "https://mcp.example.test/mcp"
RESOURCE_URL = "https://mcp.example.test/mcp"
# Seconds a sidecar with a small rate budget is started before the next minute begins.
MINUTE_EDGE_MARGIN = 6.0
BUDGET_VARIABLES = ("RATE_LIMIT_RPM", "RATE_LIMIT_UNAUTHENTICATED_RPM")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: PrivateKey
    publish_alg: bool = True

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            data = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            data = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = OKPAlgorithm.to_jwk(public, as_dict=True)
        data.update({"kid": self.kid, "use": "sig"})
        if self.publish_alg:
            data["alg"] = self.alg
        return data


def new_rsa(kid: str = "rsa-1", alg: str = "RS256", bits: int = 2048) -> SigningKey:
    return SigningKey(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=bits))


def new_ec(kid: str = "ec-1") -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


def new_ed25519(kid: str = "ed-1") -> SigningKey:
    return SigningKey(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())


@dataclass
class FakeIdp:
    """A real OpenID provider's discovery and JWKS endpoints, scriptable by tests."""

    keys: list[SigningKey]
    server: TestServer | None = None
    issuer_suffix: str = ""  # e.g. "/realms/demo" for a Keycloak-style issuer with a path
    hits: dict[str, int] = field(default_factory=dict)
    jwks_override: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
    discovery_override: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
    issuer_in_document: str | None = None
    document_changes: dict[str, Any] = field(default_factory=dict)
    """Merged into the discovery document; a None value removes that member."""
    jwks_max_age: int | None = None
    down: bool = False

    @property
    def origin(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def issuer(self) -> str:
        return self.origin + self.issuer_suffix

    def app(self) -> web.Application:
        app = web.Application()
        discovery = self.issuer_suffix + "/.well-known/openid-configuration"
        app.router.add_get(discovery, self._discovery)
        app.router.add_get("/jwks", self._jwks)
        return app

    def _count(self, name: str) -> None:
        self.hits[name] = self.hits.get(name, 0) + 1

    async def _discovery(self, request: web.Request) -> web.StreamResponse:
        self._count("discovery")
        if self.down:
            raise web.HTTPServiceUnavailable
        if self.discovery_override is not None:
            return await self.discovery_override(request)
        document: dict[str, Any] = {
            "issuer": self.issuer_in_document or self.issuer,
            "jwks_uri": self.origin + "/jwks",
            "authorization_endpoint": self.origin + "/authorize",
            "token_endpoint": self.origin + "/token",
            "code_challenge_methods_supported": ["S256"],
        }
        for name, value in self.document_changes.items():
            if value is None:
                document.pop(name, None)
            else:
                document[name] = value
        return web.json_response(document)

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self._count("jwks")
        if self.down:
            raise web.HTTPServiceUnavailable
        if self.jwks_override is not None:
            return await self.jwks_override(request)
        headers = {}
        if self.jwks_max_age is not None:
            headers["Cache-Control"] = f"public, max-age={self.jwks_max_age}"
        return web.json_response({"keys": [k.jwk() for k in self.keys]}, headers=headers)

    def mint(
        self,
        key: SigningKey | None = None,
        *,
        claims: dict[str, Any] | None = None,
        header: dict[str, Any] | None = None,
        drop: tuple[str, ...] = (),
    ) -> str:
        """A token signed by `key` (default: the first published key) with sane claims."""
        key = key or self.keys[0]
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer, "aud": AUDIENCE, "sub": "user-1", "exp": now + 300,
            "iat": now, "nbf": now, "jti": uuid.uuid4().hex,
        }
        payload.update(claims or {})
        for name in drop:
            payload.pop(name, None)
        headers = {"kid": key.kid, **(header or {})}
        return jwt.encode(payload, key.private, algorithm=key.alg, headers=headers)


@dataclass
class Recorded:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeUpstream:
    """A real HTTP upstream that records what reaches it."""

    requests: list[Recorded] = field(default_factory=list)
    server: TestServer | None = None
    stream_closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/sse", self._sse)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        return app

    async def _record(self, request: web.Request) -> Recorded:
        body = await request.read()
        recorded = Recorded(request.method, request.path_qs, dict(request.headers), body)
        self.requests.append(recorded)
        return recorded

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        return web.json_response(
            {"method": recorded.method, "path_qs": recorded.path_qs,
             "body": recorded.body.decode("utf-8", "replace")},
            headers={"Mcp-Session-Id": "session-1", "Access-Control-Allow-Origin": "*"},
        )

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        """Three events, then holds the stream open until the client leaves."""
        await self._record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(3):
                await response.write(f"id: {i}\ndata: event-{i}\n\n".encode())
            await asyncio.sleep(3600)
        finally:
            self.stream_closed.set()
        return response


def sidecar_env(idp: FakeIdp, upstream: FakeUpstream, **extra: str) -> dict[str, str]:
    env = {
        "OIDC_ISSUER_URL": idp.issuer,
        "OIDC_AUDIENCE": AUDIENCE,
        "RESOURCE_URL": RESOURCE_URL,
        "MCP_UPSTREAM_URL": upstream.url,
        "JWKS_COOLDOWN_SECONDS": "1",
        "ALLOW_ALL_AUTHENTICATED": "true",
        "RATE_LIMIT_RPM": "0",  # rate limits are tested on their own (test_ratelimit.py)
    }
    env.update(extra)
    return env


class SidecarServer(TestServer):
    """aiohttp's test server, serving the app through the production listener (make_runner):
    every bound of __main__'s server applies in the tests too."""

    def __init__(self, app: web.Application, config: Config) -> None:
        super().__init__(app, host="127.0.0.1")
        self.config = config

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return make_runner(self.app, self.config)  # it sets handler_cancellation itself


SidecarFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture(scope="session")
def rsa_private_key() -> rsa.RSAPrivateKey:
    """One 2048-bit RSA key per test process: generating one costs tens of milliseconds of CPU
    (more on a loaded machine), and over a thousand tests sign with the IdP's default key. The
    key object is immutable; tests that need distinct material still call new_rsa()."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def signing_key(rsa_private_key: rsa.RSAPrivateKey) -> SigningKey:
    """The IdP's published key: a fresh SigningKey per test (tests may change its kid or
    publish_alg) over the session's RSA material."""
    return SigningKey("rsa-1", "RS256", rsa_private_key)


@pytest.fixture
async def idp(signing_key: SigningKey) -> AsyncIterator[FakeIdp]:
    fake = FakeIdp(keys=[signing_key])
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.server = server
    yield fake
    await server.close()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.server = server
    yield fake
    await server.close()


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Bounded wait for background work: a test that waits forever hangs CI instead of failing."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def clear_of_a_minute_edge(margin: float = MINUTE_EDGE_MARGIN) -> None:
    """Rate budgets are sliding-window counters over minutes aligned to the epoch: just after a
    minute begins, the last minute's count weighs a little less than whole, so a test asserting
    an exact count must not straddle that edge. Waits (at most `margin` s) until the next edge
    is at least `margin` s away."""
    left = 60 - time.time() % 60
    if left < margin:
        await asyncio.sleep(left + 0.05)


def _small_budget(extra: dict[str, str]) -> bool:
    values = [extra.get(name, "0") for name in BUDGET_VARIABLES]
    return any(value.isdigit() and 0 < int(value) <= 1000 for value in values)


@pytest.fixture
async def make_sidecar(
    idp: FakeIdp, upstream: FakeUpstream
) -> AsyncIterator[SidecarFactory]:
    """Start the production app on loopback with the given extra environment; keys loaded."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def start(
        wait_ready: bool = True, ssl: SSLContext | None = None, **extra: str
    ) -> TestClient[web.Request, web.Application]:
        """ssl: serve https with this context (a browser test's sidecar: Secure cookies)."""
        config = load(sidecar_env(idp, upstream, **extra))
        app = create_app(config)
        server = SidecarServer(app, config)
        await server.start_server(ssl=ssl)
        client: TestClient[web.Request, web.Application] = TestClient(server)
        await client.start_server()
        clients.append(client)
        if wait_ready:
            from oauth_sidecar.app import IDP

            await wait_until(lambda: app[IDP].ready)
        if _small_budget(extra):  # an exact count of a small budget is tested next
            await clear_of_a_minute_edge()
        return client

    yield start
    for client in clients:
        await client.close()


@pytest.fixture
async def sidecar(make_sidecar: SidecarFactory) -> TestClient[web.Request, web.Application]:
    return await make_sidecar()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def as_json(text: str) -> Any:
    return json.loads(text)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
