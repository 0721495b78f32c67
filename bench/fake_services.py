"""Soak-test fixtures in their own process: a fake OpenID provider and a fake MCP upstream.

Run by bench/soak.py, never by hand (it exits when its parent does). Two aiohttp apps on loopback:

- the IdP: OIDC discovery and a JWKS read from a file the harness wrote (the harness holds the
  private key and mints the tokens itself);
- the upstream: `GET /mcp` (as MCP Streamable HTTP clients open their stream; `GET /sse` is the
  same handler) holds an event stream open and sends one event every
  `--event-interval` seconds (`id:` is a per-stream sequence number from 0, `data:` carries the
  send time so the harness can measure delivery latency); `POST /mcp` answers a JSON-RPC-like
  body at once with JSON, or with a one-event SSE stream when `X-Bench-Reply: sse`; `GET /stats`
  (asked directly, not through the sidecar) returns counters, including how many streams are open
  right now and whether any caller credential ever reached the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web
from loopback import serve_until_stopped

SESSION_HEADER = "Mcp-Session-Id"


@dataclass
class Counters:
    idp_discovery: int = 0
    idp_jwks: int = 0
    streams_started: int = 0
    streams_closed: int = 0
    streams_open: int = 0
    streams_open_peak: int = 0
    events_sent: int = 0
    posts: int = 0
    posts_sse: int = 0
    bad_posts: int = 0  # bodies that were not the JSON the harness sends
    credential_leaks: int = 0  # requests that reached us with Authorization or Cookie
    missing_forwarded_for: int = 0


class Services:
    def __init__(self, jwks: dict[str, object], event_interval: float, event_bytes: int) -> None:
        self.jwks = jwks
        self.event_interval = event_interval
        self.padding = "x" * event_bytes
        self.counters = Counters()
        self.idp_origin = ""

    # -- the IdP ---------------------------------------------------------------------------------

    def idp_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/jwks", self.jwks_handler)
        return app

    async def discovery(self, request: web.Request) -> web.Response:
        self.counters.idp_discovery += 1
        return web.json_response({
            "issuer": self.idp_origin,
            "jwks_uri": self.idp_origin + "/jwks",
            "authorization_endpoint": self.idp_origin + "/authorize",
            "token_endpoint": self.idp_origin + "/token",
            "code_challenge_methods_supported": ["S256"],
        })

    async def jwks_handler(self, request: web.Request) -> web.Response:
        self.counters.idp_jwks += 1
        return web.json_response(self.jwks, headers={"Cache-Control": "public, max-age=3600"})

    # -- the upstream ----------------------------------------------------------------------------

    def upstream_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/sse", self.sse)
        app.router.add_get("/mcp", self.sse)  # Streamable HTTP: GET = the server's event stream
        app.router.add_post("/mcp", self.mcp)
        app.router.add_get("/stats", self.stats)
        return app

    def _inspect(self, request: web.Request) -> None:
        if "Authorization" in request.headers or "Cookie" in request.headers:
            self.counters.credential_leaks += 1
        if "X-Forwarded-For" not in request.headers:
            self.counters.missing_forwarded_for += 1

    async def sse(self, request: web.Request) -> web.StreamResponse:
        self._inspect(request)
        c = self.counters
        c.streams_started += 1
        c.streams_open += 1
        c.streams_open_peak = max(c.streams_open_peak, c.streams_open)
        try:
            response = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            })
            await response.prepare(request)
            seq = 0
            # Absolute schedule: a slow write must not make the stream drift.
            next_at = time.monotonic()
            while True:
                event = f"id: {seq}\nevent: message\ndata: {time.time():.6f} {self.padding}\n\n"
                await response.write(event.encode())
                c.events_sent += 1
                seq += 1
                next_at += self.event_interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:  # the client left (handler cancelled) or a write failed
            c.streams_open -= 1
            c.streams_closed += 1

    async def mcp(self, request: web.Request) -> web.StreamResponse:
        self._inspect(request)
        self.counters.posts += 1
        try:
            body = json.loads(await request.read())
            request_id = body["id"]
            text = body["params"]["arguments"]["text"]
        except (ValueError, KeyError, TypeError):
            self.counters.bad_posts += 1
            return web.json_response({"error": "bad body"}, status=400)
        message = {"jsonrpc": "2.0", "id": request_id,
                   "result": {"content": [{"type": "text", "text": text}]}}
        headers = {}
        session = request.headers.get(SESSION_HEADER)
        if session:  # echo the caller's session: never issue new ids (bindings stay bounded)
            headers[SESSION_HEADER] = session
        if request.headers.get("X-Bench-Reply") == "sse":
            self.counters.posts_sse += 1
            response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(f"event: message\ndata: {json.dumps(message)}\n\n".encode())
            await response.write_eof()
            return response
        return web.json_response(message, headers=headers)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.counters))


async def serve(args: argparse.Namespace, jwks: dict[str, object]) -> int:
    services = Services(jwks, args.event_interval, args.event_bytes)
    services.idp_origin = f"http://127.0.0.1:{args.idp_port}"
    apps = [(services.idp_app(), args.idp_port), (services.upstream_app(), args.upstream_port)]
    await serve_until_stopped("fake_services", apps, shutdown_timeout=2.0,
                              max_lifetime=args.max_lifetime)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idp-port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--jwks-file", required=True)
    parser.add_argument("--event-interval", type=float, default=1.0)
    parser.add_argument("--event-bytes", type=int, default=200)
    parser.add_argument("--max-lifetime", type=float, default=3600.0)
    args = parser.parse_args()
    return asyncio.run(serve(args, json.loads(Path(args.jwks_file).read_text())))


if __name__ == "__main__":
    sys.exit(main())
