"""The floor of this stack: a minimal aiohttp streaming reverse proxy, no auth, no checks.

Started by bench/run.py beside the sidecar so its cost can be subtracted: one pooled
ClientSession, headers copied minus the hop-by-hop ones, no total timeout, handlers cancelled
when their client leaves (as the sidecar runs). Anything the sidecar costs above this is auth,
policy, logging and checks.

By default both bodies are streamed chunk by chunk. With --whole-body it does what the sidecar
does with small bodies, so the floor is not slower than it needs to be: a request body of known
length up to WHOLE_BODY_MAX is read whole, and an answer of known length up to the same size
that is not an event stream is read whole and sent as one web.Response.

    .venv/bin/python bench/minimal_proxy.py --port 9000 --upstream http://127.0.0.1:8000 \
        [--whole-body] [--uvloop]
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
WHOLE_BODY_MAX = 64 * 1024  # the sidecar's own small-body threshold (request_body.py)


async def forward_whole(request: web.Request) -> web.StreamResponse:
    """Small bodies of known length read whole, both ways; anything else streamed."""
    length = request.content_length
    if request.body_exists and (length is None or length > WHOLE_BODY_MAX):
        return await forward(request)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    url = request.app[UPSTREAM] + request.rel_url.raw_path_qs
    body = await request.read() if request.body_exists else None
    async with request.app[SESSION].request(
        request.method, url, headers=headers, allow_redirects=False, data=body,
    ) as upstream:
        answer_length = upstream.content_length
        if (answer_length is not None and answer_length <= WHOLE_BODY_MAX
                and upstream.content_type != "text/event-stream"):
            response_headers = [(k, v) for k, v in upstream.headers.items()
                                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
            return web.Response(status=upstream.status, reason=upstream.reason,
                                body=await upstream.read(), headers=response_headers)
        return await relay(request, upstream)


async def forward(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    url = request.app[UPSTREAM] + request.rel_url.raw_path_qs
    async with request.app[SESSION].request(
        request.method, url, headers=headers, allow_redirects=False,
        data=request.content if request.body_exists else None,
    ) as upstream:
        return await relay(request, upstream)


async def relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
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
    parser.add_argument("--whole-body", action="store_true",
                        help="read small bodies of known length whole, as the sidecar does")
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(session_context)
    app.router.add_route("*", "/{path:.*}", forward_whole if args.whole_body else forward)
    loop = None
    if args.uvloop:
        import uvloop  # noqa: PLC0415 - only when asked for

        loop = uvloop.new_event_loop()
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None,
                handler_cancellation=True, shutdown_timeout=2.0, loop=loop)


if __name__ == "__main__":
    main()
