"""The performance harness's helpers in one process: an SSE upstream and a fake OpenID provider.

Started by bench/run.py, never by hand (it exits when its parent does). Two aiohttp apps on
loopback:

- the SSE upstream (`--sse-port`), reached through the upstream nginx, which sends every
  `GET /mcp` here (POSTs nginx answers itself). A GET must accept `text/event-stream`:
  - `?interval_ms=N[&phase_ms=P]`: one event every N ms, at P ms past each multiple of N on
    the monotonic clock (so streams given different phases never send at the same moment and
    the client never has a burst to work through), `data:` carrying the send time as
    `time.monotonic_ns()` (CLOCK_MONOTONIC, the same clock in every process of this machine),
    so the client computes the per-event delivery latency;
  - otherwise an idle MCP stream: one `: open` comment at once, then a `: keepalive` comment
    every `--keepalive` seconds (15), the way an idle MCP server stream looks.
  `GET /stats` (asked directly) counts the streams open now, the JWKS and discovery fetches.
- the IdP (`--idp-port`): OIDC discovery naming itself as the issuer, and the JWKS the harness
  wrote to `--jwks-file` (the harness holds the private key and mints the tokens). The JWKS is
  served without Cache-Control, so the sidecar refreshes it only hourly: every fetch during a
  run is one the sidecar chose to make.
- its RFC 7662 introspection endpoint (`POST /introspect`, advertised in the discovery document
  with `client_secret_basic`): the sidecar's client credentials are checked (401
  `invalid_client` otherwise), and an opaque token minted by `opaque_token()` is active (its
  subject and expiry are in it, so any number of distinct tokens can be minted without telling
  this process), anything else inactive. Cheap on purpose, so that the IdP is not what limits
  a cache-miss run: one header comparison, the form parsed from the raw body, one small JSON
  answer. `/stats` counts its calls by outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import sys
import time
from base64 import b64encode
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from jwt_micro import AUDIENCE
from loopback import serve_until_stopped

# The sidecar's introspection client (INTROSPECTION_CLIENT_ID/SECRET in run.py); plain
# characters, so the RFC 6749 §2.3.1 urlencoding before base64 changes nothing.
INTROSPECTION_CLIENT_ID = "bench-introspector"
INTROSPECTION_CLIENT_SECRET = "bench-introspector-secret"  # noqa: S105 - a loopback fixture
BASIC = "Basic " + b64encode(
    f"{INTROSPECTION_CLIENT_ID}:{INTROSPECTION_CLIENT_SECRET}".encode()).decode("ascii")
# An opaque token: "bench-opaque~<sub>~<exp>~<nonce>", RFC 6750 b64token characters only, and
# not shaped like a JWS (no dots): TOKEN_VALIDATION=auto would introspect it too.
OPAQUE_PREFIX = "bench-opaque~"
INACTIVE = b'{"active":false}'
INVALID_CLIENT = b'{"error":"invalid_client"}'


def opaque_token(sub: str, lifetime: float = 7200.0) -> str:
    """A new opaque token this IdP answers active for until `lifetime` seconds from now."""
    return f"{OPAQUE_PREFIX}{sub}~{int(time.time() + lifetime)}~{secrets.token_urlsafe(24)}"


def introspection_answer(token: str, issuer: str, now: float) -> dict[str, Any] | None:
    """The active answer (RFC 7662 §2.2) for one of our opaque tokens, or None (inactive)."""
    if not token.startswith(OPAQUE_PREFIX):
        return None
    fields = token[len(OPAQUE_PREFIX):].split("~")
    if len(fields) != 3 or not fields[1].isdigit() or int(fields[1]) <= now:
        return None
    sub, exp = fields[0], int(fields[1])
    return {"active": True, "iss": issuer, "aud": AUDIENCE, "sub": sub, "exp": exp,
            "iat": exp - 7200, "scope": "mcp", "client_id": "bench-client",
            "token_type": "Bearer", "email": f"{sub}@bench.test", "email_verified": True}


class Services:
    def __init__(self, jwks: dict[str, object], keepalive: float) -> None:
        self.jwks = jwks
        self.keepalive = keepalive
        self.idp_origin = ""
        self.streams_open = 0
        self.streams_started = 0
        self.events_sent = 0
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.introspections = {"active": 0, "inactive": 0, "invalid_client": 0}

    # -- the SSE upstream ------------------------------------------------------------------------

    def sse_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/mcp", self.stream)
        app.router.add_get("/stats", self.stats)
        return app

    async def stream(self, request: web.Request) -> web.StreamResponse:
        if "text/event-stream" not in request.headers.get("Accept", ""):
            return web.json_response({"error": "GET /mcp needs Accept: text/event-stream"},
                                     status=406)
        interval_ms = request.query.get("interval_ms")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        self.streams_open += 1
        self.streams_started += 1
        try:
            await response.prepare(request)
            if interval_ms is None:
                await response.write(b": open\n\n")
                while True:
                    await asyncio.sleep(self.keepalive)
                    await response.write(b": keepalive\n\n")
            interval = max(float(interval_ms), 1.0) / 1000
            phase = float(request.query.get("phase_ms", "0")) / 1000 % interval
            seq = 0
            # Absolute schedule on a grid: a slow write must not drift it.
            next_at = (math.floor(time.monotonic() / interval) + 1) * interval + phase
            while True:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                await response.write(f"id: {seq}\ndata: {time.monotonic_ns()}\n\n".encode())
                self.events_sent += 1
                seq += 1
                next_at += interval
        finally:  # the client left (handler cancelled) or a write failed
            self.streams_open -= 1

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({
            "streams_open": self.streams_open, "streams_started": self.streams_started,
            "events_sent": self.events_sent, "jwks_fetches": self.jwks_fetches,
            "discovery_fetches": self.discovery_fetches,
            "introspections": self.introspections,
        })

    # -- the IdP ---------------------------------------------------------------------------------

    def idp_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/jwks", self.keys)
        app.router.add_post("/introspect", self.introspect)
        return app

    async def discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        return web.json_response({
            "issuer": self.idp_origin, "jwks_uri": self.idp_origin + "/jwks",
            "authorization_endpoint": self.idp_origin + "/authorize",
            "token_endpoint": self.idp_origin + "/token",
            "code_challenge_methods_supported": ["S256"],
            "introspection_endpoint": self.idp_origin + "/introspect",
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic"],
        })

    async def keys(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        return web.json_response(self.jwks)

    async def introspect(self, request: web.Request) -> web.Response:
        """RFC 7662 §2: the client authenticated (RFC 6749 §2.3.1), the token from the form."""
        if request.headers.get("Authorization") != BASIC:
            self.introspections["invalid_client"] += 1
            return web.Response(status=401, body=INVALID_CLIENT, content_type="application/json",
                                headers={"WWW-Authenticate": 'Basic realm="bench"'})
        form = dict(parse_qsl((await request.read()).decode("ascii")))
        answer = introspection_answer(form.get("token", ""), self.idp_origin, time.time())
        if answer is None:
            self.introspections["inactive"] += 1
            return web.Response(body=INACTIVE, content_type="application/json")
        self.introspections["active"] += 1
        return web.Response(body=json.dumps(answer).encode(), content_type="application/json")


async def serve(args: argparse.Namespace, jwks: dict[str, object]) -> int:
    services = Services(jwks, args.keepalive)
    services.idp_origin = f"http://127.0.0.1:{args.idp_port}"
    apps = [(services.sse_app(), args.sse_port), (services.idp_app(), args.idp_port)]
    await serve_until_stopped("perf_services", apps, shutdown_timeout=1.0)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sse-port", type=int, required=True)
    parser.add_argument("--idp-port", type=int, required=True)
    parser.add_argument("--jwks-file", required=True)
    parser.add_argument("--keepalive", type=float, default=15.0,
                        help="seconds between comments on an idle stream [15]")
    args = parser.parse_args()
    return asyncio.run(serve(args, json.loads(Path(args.jwks_file).read_text())))


if __name__ == "__main__":
    sys.exit(main())
