"""The Server header of every answer: the product's name, never a version.

Why: aiohttp announces `Python/3.x aiohttp/3.y` and a proxied answer would carry the upstream's own
(`uvicorn`, `gunicorn/23.0.0`): version strings tell an attacker which known holes to try (RFC 9110
§10.2.4: no "needlessly fine-grained detail"). A plain name still lets an operator tell the
sidecar's own 401, 502 or 504 from the MCP server's.
"""

from __future__ import annotations

from aiohttp import web

SERVER = "oauth-sidecar"


async def name_server(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs after aiohttp set its default, for proxied answers too."""
    response.headers["Server"] = SERVER
