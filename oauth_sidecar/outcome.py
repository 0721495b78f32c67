"""The status a request ended with, the same for the access log and the metrics.

Why: a handler ends with a response, an HTTPException, or cancellation when its client leaves
(aiohttp's handler_cancellation); each must be recorded exactly once with one status, and two
middlewares deciding that separately would drift apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request its client abandoned

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def handle_and_record(
    request: web.Request, handler: Handler, record: Callable[[int], None]
) -> web.StreamResponse:
    """Run handler; call record(status) however it ends (500 for an error json_errors missed)."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED_REQUEST
        raise
    finally:
        record(status)
