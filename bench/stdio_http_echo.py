"""bench/echo_over_stdio.py's server over HTTP: the "HTTP child" the stdio bridge is compared with.

Why: issue 18's benchmark sets the stdio bridge (the sidecar relaying to a child's stdin/stdout)
against spawn mode's HTTP child (the sidecar proxying to a child listening on a port) with the
same answers on both sides, so the difference is the transport, not the server. Run as
`python bench/stdio_http_echo.py --port N` (spawn mode: `MCP_SPAWN_CMD="python
bench/stdio_http_echo.py --port N"`, `MCP_SPAWN_PORT=N`, `MCP_UPSTREAM_PATH=/mcp`); it serves
`POST /mcp` on 127.0.0.1 only.

A POST body is one JSON-RPC message or a batch; the answer is JSON (`application/json`), with the
same answers as echo_over_stdio.answer; a body of only notifications or responses is answered 202, a
body that is not JSON 400. No session id and no event streams (`GET /mcp` is 405): enough for
`initialize`, `tools/list` and `tools/call`, which is what the benchmark sends. The process stops
on SIGTERM or SIGINT, or when its parent dies (loopback.serve_until_stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from aiohttp import web
from echo_over_stdio import answer
from loopback import serve_until_stopped

PATH = "/mcp"


async def handle_post(request: web.Request) -> web.Response:
    try:
        body: Any = json.loads(await request.read())
    except ValueError:
        return web.json_response({"error": "the body is not JSON"}, status=400)
    if isinstance(body, list):
        replies = [reply for message in body if (reply := answer(message)) is not None]
        if not replies:
            return web.Response(status=202)
        return web.json_response(replies)
    reply = answer(body)
    if reply is None:
        return web.Response(status=202)
    return web.json_response(reply)


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_post(PATH, handle_post)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve_until_stopped("stdio_http_echo", [(build_app(), args.port)],
                                    shutdown_timeout=1.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
