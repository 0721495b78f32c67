"""A fake RFC 7662 introspection endpoint: a real aiohttp app on loopback, scriptable by tests.

It records every call (form, Authorization header, Accept), checks the client's credentials the
way an IdP does (client_secret_basic with RFC 6749 §2.3.1's form-urlencoding, or
client_secret_post), answers per token, and can be slow, held, failing, refusing or answer
garbage. With a signing key it answers RFC 9701 signed JWTs (application/token-introspection+jwt)
to callers that accept them, signed with a real key the fake IdP publishes in its JWKS.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import jwt
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import AUDIENCE, SigningKey

SIGNED = "application/token-introspection+jwt"
CLIENT_ID = "sidecar-introspector"
CLIENT_SECRET = "s3cr:et%+/ with space"  # a ':' '%' '+' and a space: urlencoding matters


@dataclass
class Call:
    form: dict[str, str]
    authorization: str | None
    accept: str


@dataclass
class FakeIntrospection:
    """Answers by token; an unknown token is inactive (as RFC 7662 §2.2 has it)."""

    issuer: str
    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    method: str = "client_secret_basic"
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    server: TestServer | None = None
    delay: float = 0.0
    hold: asyncio.Event | None = None
    """Set: every call waits for it (concurrency and coalescing tests)."""
    status: int = 200
    body: bytes | None = None
    """Sent as-is instead of an answer (garbage)."""
    error_code: str = ""
    """With a 400: the OAuth error code in the body."""
    signing_key: SigningKey | None = None
    signed_header: dict[str, Any] = field(default_factory=dict)
    signed_claims: dict[str, Any] = field(default_factory=dict)
    in_flight: int = 0
    most_in_flight: int = 0

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}/introspect"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/introspect", self._introspect)
        return app

    def issue(self, **claims: Any) -> str:
        """A new opaque token and its active answer (claims override; a None value drops)."""
        token = secrets.token_urlsafe(32)
        now = int(time.time())
        answer: dict[str, Any] = {
            "active": True, "iss": self.issuer, "aud": AUDIENCE, "sub": "user-1",
            "exp": now + 300, "iat": now, "nbf": now, "scope": "openid mcp",
            "client_id": "mcp-client", "token_type": "Bearer", "email": "user1@example.com",
            "email_verified": True,
        }
        answer.update(claims)
        self.answers[token] = {k: v for k, v in answer.items() if v is not None}
        return token

    def _client_ok(self, form: dict[str, str], authorization: str | None) -> bool:
        if self.method == "client_secret_basic":
            if not authorization or not authorization.startswith("Basic "):
                return False
            decoded = base64.b64decode(authorization.removeprefix("Basic ")).decode()
            raw_id, _, raw_secret = decoded.partition(":")
            return (unquote_plus(raw_id), unquote_plus(raw_secret)) == (
                self.client_id, self.client_secret)
        return authorization is None and (form.get("client_id"), form.get("client_secret")) == (
            self.client_id, self.client_secret)

    async def _introspect(self, request: web.Request) -> web.StreamResponse:
        form = {key: str(value) for key, value in (await request.post()).items()}
        authorization = request.headers.get("Authorization")
        self.calls.append(Call(form, authorization, request.headers.get("Accept", "")))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                await asyncio.wait_for(self.hold.wait(), 10)
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if self.body is not None:
            return web.Response(status=self.status, body=self.body,
                                content_type="application/json")
        if self.status != 200:
            return web.json_response({"error": self.error_code or "server_error"},
                                     status=self.status)
        if not self._client_ok(form, authorization):
            return web.json_response({"error": "invalid_client"}, status=401)
        answer = self.answers.get(form.get("token", ""), {"active": False})
        if self.signing_key is not None and SIGNED in request.headers.get("Accept", ""):
            return self._signed(answer)
        return web.json_response(answer)

    def _signed(self, answer: dict[str, Any]) -> web.Response:
        key = self.signing_key
        assert key is not None
        claims: dict[str, Any] = {"iss": self.issuer, "aud": self.client_id,
                                  "iat": int(time.time()), "token_introspection": answer}
        claims.update(self.signed_claims)
        header = {"kid": key.kid, "typ": "token-introspection+jwt", **self.signed_header}
        signed = jwt.encode(claims, key.private, algorithm=key.alg, headers=header)
        return web.Response(body=signed.encode(), content_type=SIGNED)
