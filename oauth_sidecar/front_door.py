"""The one middleware every request passes, and the one hook before every answer's headers.

Why one: aiohttp runs each middleware as a coroutine of its own and each on_response_prepare
hook as another (about 2 µs a layer in a running server, on every request), and these steps
always run together, in this order: the request id and access line (log), the count (metrics),
JSON errors (http_errors), CORS, then the gate. Each step stays in its own module; this one only
orders them, so the order is read in one place:

1. the request gets its id; its access line and count are recorded however it ends (outcome);
2. inside that, any exception becomes a JSON answer (a bug a logged 500);
3. CORS answers preflights and refuses a disallowed Origin, before authentication;
4. the gate authenticates, rate-limits and authorises every non-public route;
5. the route's handler (the proxy, or a public handler).
"""

from __future__ import annotations

from aiohttp import web

from oauth_sidecar.auth.gate import Gate
from oauth_sidecar.cors import Cors
from oauth_sidecar.http_errors import error_answer
from oauth_sidecar.log import echo_request_id, start_access
from oauth_sidecar.metrics import Metrics
from oauth_sidecar.outcome import Handler, Recording
from oauth_sidecar.server_header import SERVER


class FrontDoor:
    def __init__(self, *, cors: Cors, gate: Gate, metrics: Metrics) -> None:
        self._cors = cors
        self._gate = gate
        self._metrics = metrics

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        access, count = start_access(request), self._metrics.recorder(request)
        records = [record for record in (access, count) if record is not None]
        with Recording(records) as outcome:
            response: web.StreamResponse
            try:
                refused = self._cors.refusal(request)
                if refused is None:
                    refused = await self._gate.admit(request)
                response = await handler(request) if refused is None else refused
            except Exception as error:  # every bug becomes a logged JSON 500
                response = error_answer(request, error)
            outcome.status = response.status
            return response

    async def before_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare, streamed answers included: CORS headers, the request id, and
        our Server name (after aiohttp set its default; proxied answers too)."""
        self._cors.decorate(request, response)
        echo_request_id(request, response)
        response.headers["Server"] = SERVER
