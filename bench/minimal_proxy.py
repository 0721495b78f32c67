"""The floor of this stack: a minimal aiohttp streaming reverse proxy, no auth, no checks.

Started by bench/run.py beside the sidecar so its cost can be subtracted: one pooled
ClientSession, the request body and the response body streamed chunk by chunk, headers copied
minus the hop-by-hop ones, no total timeout, handlers cancelled when their client leaves (as
the sidecar runs). Anything the sidecar costs above this is auth, policy, logging and checks.

    .venv/bin/python bench/minimal_proxy.py --port 9000 --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "host",
})  # fmt: skip
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    url = request.app[UPSTREAM] + request.rel_url.raw_path_qs
    async with request.app[SESSION].request(
        request.method, url, headers=headers, allow_redirects=False,
        data=request.content if request.body_exists else None,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in HOP_BY_HOP:
                response.headers.add(name, value)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_context(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0)  # streams are long-lived: no pool cap
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
    ) as session:
        app[SESSION] = session
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="origin, e.g. http://127.0.0.1:8000")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(session_context)
    app.router.add_route("*", "/{path:.*}", forward)
    loop = None
    if args.uvloop:
        import uvloop  # noqa: PLC0415 - only when asked for

        loop = uvloop.new_event_loop()
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None,
                handler_cancellation=True, shutdown_timeout=2.0, loop=loop)


if __name__ == "__main__":
    main()
