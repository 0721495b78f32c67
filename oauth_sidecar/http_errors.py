"""One JSON shape for every refusal we send, and the middleware that enforces it.

Why: clients and operators should never get an HTML page or a traceback from an auth proxy, and
no error may carry an internal address. Every error body is `{"error", "error_description"}`
(the RFC 6749 §5.2 shape MCP clients already parse).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from oauth_sidecar.outcome import CLIENT_CLOSED_REQUEST, Handler

log = structlog.get_logger("oauth_sidecar.http")



def error_body(error: str, description: str) -> bytes:
    return json.dumps({"error": error, "error_description": description}).encode()


def json_error(
    status: int, error: str, description: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = error_body(error, description)
    response = web.Response(status=status, body=body, content_type="application/json")
    if headers:
        response.headers.update(headers)
    response.headers["Cache-Control"] = "no-store"
    return response


def method_not_allowed(allow: str) -> Handler:
    """A terminal handler for other methods on a public path: never fall through to the proxy."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return json_error(405, "method_not_allowed", f"Use {allow}", {"Allow": allow})

    return handle


def error_answer(request: web.Request, error: Exception) -> web.Response:
    """The JSON answer for an exception a handler raised: aiohttp's HTTP errors in our shape, a
    body that broke its own framing as 400, any bug as a logged 500. An HTTPException that is no
    error (a redirect, a 2xx) is raised again: aiohttp answers it."""
    if isinstance(error, web.HTTPException):
        if error.status < 400:
            raise error
        return json_error(error.status, error.reason.lower().replace(" ", "_"), error.reason)
    if isinstance(error, web.RequestPayloadError | HttpProcessingError):
        return json_error(400, "invalid_request", "The request body is malformed")
    if isinstance(error, ConnectionResetError) and (
            request.transport is None or request.transport.is_closing()):
        # The client left while we answered (e.g. before the response headers went out):
        # nothing to send and nothing wrong here; the access log says 499.
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    return _server_error(request)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """error_answer as a middleware of its own (the app runs it inside its front door)."""
    try:
        return await handler(request)
    except Exception as error:  # every bug becomes a logged JSON 500
        return error_answer(request, error)


def _server_error(request: web.Request) -> web.Response:
    log.exception("unhandled_error", path=request.path)
    return json_error(500, "server_error", "Internal error")
