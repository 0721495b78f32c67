"""The MCP endpoint served from stdio children (MCP_SPAWN_TRANSPORT=stdio): Streamable HTTP in,
JSON-RPC lines out.

Why its own handler: there is no upstream HTTP server to stream to, so this side speaks the
transport itself. POST carries one message or a batch: `initialize` starts a session (and its
child) and its answer carries the `Mcp-Session-Id` the sidecar issued; requests are answered as
JSON when the client accepts only JSON, else as an event stream that carries every message the
child sends about them and ends with their responses; notifications and responses alone get 202.
GET opens the session's stream of messages tied to no request; DELETE ends the session and stops
its child. Requests without a session that are not `initialize` (sessionless clients) go to the
subject's sessionless child. The gate ran before: the caller is verified and a session id it
presents is its own (or bound to nobody, which the pool then answers 404).

The tool rules (mcp/calls.py) apply here as in the proxy: a body is judged before any of it
reaches a child, list answers are filtered message by message and each call is audited. Without
rules, a 2026-07-28 request's Mcp-Method/Mcp-Name headers are still held to its body: the child
never sees headers, so the bridge is the server that must refuse a mismatch.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
from aiohttp import web

from oauth_sidecar.config import Config
from oauth_sidecar.http_errors import json_error
from oauth_sidecar.log import REQUEST_ID
from oauth_sidecar.mcp.calls import CallRules, Judged
from oauth_sidecar.mcp.messages import BodyRefused, check_headers, error_object, parse
from oauth_sidecar.request_body import (
    BodyBroken,
    BodyReader,
    BodyStalled,
    BodyTooLarge,
    StreamedBody,
    body_refused,
)
from oauth_sidecar.request_keys import AUTH_FAILURE, PRINCIPAL, SESSION
from oauth_sidecar.upstream.stdio_child import ChildGone
from oauth_sidecar.upstream.stdio_pool import (
    RETRY_AFTER,
    ChildRefused,
    ChildStartFailed,
    StdioPool,
)
from oauth_sidecar.upstream.stdio_session import (
    Message,
    MessageQueue,
    Pending,
    StdioSession,
    dumps,
    is_request,
    is_response,
)
from oauth_sidecar.upstream.stream_slots import StreamSlots, TooManyStreams, may_become_stream

log = structlog.get_logger("oauth_sidecar.stdio")

ALLOW = "POST, GET, DELETE"
PARSE_ERROR, INVALID_REQUEST = -32700, -32600  # JSON-RPC 2.0 error codes


class StdioBridge:
    """The handler of the MCP route in stdio mode."""

    def __init__(self, config: Config, pool: StdioPool, calls: CallRules | None = None) -> None:
        """calls: the tool rules (None: none configured)."""
        self._calls = calls
        self._path = config.resource_path or "/"
        self._pool = pool
        self._bodies = BodyReader(config.upstream.max_body_bytes, config.upstream.body_timeout)
        self._write_timeout = config.upstream.client_write_timeout
        self._answer_timeout = config.upstream.response_timeout
        self._slots = StreamSlots(config.upstream.max_streams_per_subject)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path != self._path:
            return json_error(404, "not_found", "No such endpoint")
        if request.method == "DELETE":
            return await self._delete(request)
        if request.method not in ("POST", "GET"):
            return json_error(405, "method_not_allowed", f"Use {ALLOW}", {"Allow": ALLOW})
        principal = request[PRINCIPAL]
        try:  # as the proxy does: MAX_STREAMS_PER_SUBJECT, decided before the child runs it
            slot = self._slots.reserve(request.method, request.headers,
                                       (principal.issuer, principal.subject))
        except TooManyStreams:
            request[AUTH_FAILURE] = "rate_limited_streams"
            return json_error(429, "rate_limited", "Too many open event streams",
                              {"Retry-After": RETRY_AFTER})
        try:
            if request.method == "POST":
                # the proxy's rule too: a stream unless the Accept rules text/event-stream out
                return await self._post(request,
                                        stream=may_become_stream("POST", request.headers))
            return await self._get(request)
        finally:
            if slot is not None:
                slot.release()

    def _session(self, request: web.Request) -> StdioSession | None:
        presented = request.get(SESSION)
        if presented is None:
            return None
        principal = request[PRINCIPAL]
        return self._pool.find(presented.id, (principal.issuer, principal.subject))

    async def _post(self, request: web.Request, *, stream: bool) -> web.StreamResponse:
        """stream: answer requests with an event stream (the Accept allows one)."""
        try:
            data = await self._body(request)
        except (BodyTooLarge, BodyStalled, BodyBroken) as failure:
            return body_refused(failure)
        judged = None
        if self._calls is not None:
            verdict = await self._calls.judge(request, request[PRINCIPAL], data,
                                              request[REQUEST_ID])
            if isinstance(verdict, web.StreamResponse):
                return verdict
            judged = verdict if verdict.watches_answer else None
        elif "Mcp-Method" in request.headers or "Mcp-Name" in request.headers:
            try:
                check_headers(request.headers, parse(data))
            except BodyRefused as refused:
                return _rpc_error(refused.status, refused.code, refused.message,
                                  refused.request_id)
        status: int | None = None
        try:
            answer = await self._route(request, data, judged, stream=stream)
            status = answer.status
            return answer
        finally:
            if judged is not None and self._calls is not None:
                self._calls.finish(judged, status)

    async def _route(  # noqa: PLR0912 - each refusal an early answer
        self, request: web.Request, data: bytes, judged: Judged | None, *, stream: bool
    ) -> web.StreamResponse:
        """The body's messages to their session's child (started by initialize)."""
        parsed = _messages(data)
        if isinstance(parsed, web.Response):
            return parsed
        messages, batch = parsed
        requests = [m for m in messages if is_request(m)]
        starts = any(m.get("method") == "initialize" for m in requests)
        presented = request.get(SESSION)
        if starts and (presented is not None or len(messages) > 1):
            return _rpc_error(400, INVALID_REQUEST, "initialize comes alone and without "
                              "Mcp-Session-Id")
        try:
            if starts:
                session = await self._pool.open(request[PRINCIPAL])
            elif presented is not None:
                found = self._session(request)
                if found is None:
                    return _no_session()
                session = found
            else:
                session = await self._pool.sessionless(request[PRINCIPAL])
        except ChildRefused as refused:
            if refused.status == 429:
                request[AUTH_FAILURE] = "rate_limited_children"
            return json_error(refused.status, refused.error, refused.description,
                              {"Retry-After": RETRY_AFTER})
        except ChildStartFailed:
            return json_error(502, "upstream_unavailable", "The MCP server could not be started")
        if not requests:
            try:
                await session.submit(messages, None, [])
            except ChildGone:
                await self._pool.close(session, "child_gone")
                return _no_session()
            return web.Response(status=202)
        queue = session.new_stream() if stream else None
        pendings: list[Pending] = []
        try:
            return await self._answer(request, session, messages, queue, pendings, batch=batch,
                                      judged=judged)
        finally:
            if queue is not None:
                session.stream_ended(queue)
            if starts and not all(p.answer.done() and "result" in p.answer.result()
                                  for p in pendings):
                # refused, failed or abandoned: no session is left behind
                await asyncio.shield(self._pool.close(session, "initialize_failed"))

    async def _body(self, request: web.Request) -> bytes:
        data = await self._bodies.read(request)
        if isinstance(data, StreamedBody):
            data = b"".join([piece async for piece in data])  # bounded: MAX_REQUEST_BODY_BYTES
        return data or b""

    async def _answer(
        self, request: web.Request, session: StdioSession, messages: list[Message],
        stream: MessageQueue | None, pendings: list[Pending], *, batch: bool,
        judged: Judged | None,
    ) -> web.StreamResponse:
        """`pendings` is filled with the requests written, for the caller's cleanup."""
        try:
            try:
                await session.submit(messages, stream, pendings)
            except ChildGone:  # its pending requests are answered with the exit's error
                await self._pool.close(session, "child_gone")
            if not pendings:  # nothing was written: the child was gone already
                return _no_session()
            if stream is None:
                try:  # as long as the proxy waits for an upstream's response headers
                    async with asyncio.timeout(self._answer_timeout):
                        answers = [await p.answer for p in pendings]
                except TimeoutError:
                    session.abandon(pendings, "timed out")
                    log.warning("child_timeout", subject=session.subject,
                                seconds=self._answer_timeout)
                    return json_error(504, "upstream_timeout",
                                      "The MCP server did not answer in time")
                # an initialize the child refused issues no session (the caller closes it)
                issued = _session_header(session) if all("result" in a for a in answers) else {}
                answer: Any = answers if batch else answers[0]
                if judged is not None and self._calls is not None:
                    answer = self._calls.answered(judged, 200, answer)
                return web.json_response(answer, dumps=_json_text, headers=issued)
            return await self._stream(request, session, stream, pendings, judged)
        finally:
            session.abandon([p for p in pendings if not p.answer.done()])

    async def _stream(self, request: web.Request, session: StdioSession, queue: MessageQueue,
                      pendings: list[Pending], judged: Judged | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no", **_session_header(session)})
        await response.prepare(request)
        while not (all(p.answer.done() for p in pendings) and queue.empty()):
            message = await queue.get()
            if message is None:
                break
            if judged is not None and self._calls is not None:
                message = self._calls.answered(judged, 200, message)
            if not await self._write(request, response, message):
                return response
        await self._finish(request, response)
        return response

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if request.get(SESSION) is None:
            return json_error(405, "method_not_allowed", "A stream needs an Mcp-Session-Id",
                              {"Allow": ALLOW})
        session = self._session(request)
        if session is None:
            return _no_session()
        queue = session.open_listener()
        try:
            response = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"})
            await response.prepare(request)
            while (message := await queue.get()) is not None:
                if not await self._write(request, response, message):
                    return response
            await self._finish(request, response)
            return response
        finally:
            session.stream_ended(queue)

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        if request.get(SESSION) is None:
            return json_error(400, "invalid_request", "DELETE needs an Mcp-Session-Id")
        session = self._session(request)
        if session is None:
            return _no_session()
        await self._pool.close(session, "deleted")
        return web.Response(status=204)

    async def _write(self, request: web.Request, response: web.StreamResponse,
                     message: Message) -> bool:
        """One event, within CLIENT_WRITE_TIMEOUT_SECONDS: a client that stops reading is
        dropped (its requests are then abandoned, the child told)."""
        try:
            async with asyncio.timeout(self._write_timeout):
                await response.write(b"event: message\ndata: " + dumps(message) + b"\n\n")
        except ConnectionError:
            return False
        except TimeoutError:
            log.warning("client_write_timeout", seconds=self._write_timeout)
            if request.transport is not None:
                request.transport.abort()
            return False
        return True

    async def _finish(self, request: web.Request, response: web.StreamResponse) -> None:
        try:
            async with asyncio.timeout(self._write_timeout):
                await response.write_eof()
        except (ConnectionError, TimeoutError):
            if request.transport is not None:
                request.transport.abort()


def _session_header(session: StdioSession) -> dict[str, str]:
    return {"Mcp-Session-Id": session.id} if session.id is not None else {}


def _json_text(value: Any) -> str:
    return dumps(value).decode()


def _no_session() -> web.Response:
    return json_error(404, "session_not_found", "No such session")


def _messages(data: bytes) -> tuple[list[Message], bool] | web.Response:
    """The POST's messages, and whether they came as a batch (answered as one)."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return _rpc_error(400, PARSE_ERROR, "The body is not JSON")
    batch = parsed if isinstance(parsed, list) else [parsed]
    if not batch or not all(
        isinstance(m, dict) and ("method" in m or is_response(m)) for m in batch
    ):
        return _rpc_error(400, INVALID_REQUEST, "Not a JSON-RPC message or batch")
    return batch, isinstance(parsed, list)


def _rpc_error(status: int, code: int, message: str, request_id: Any = None) -> web.Response:
    return web.json_response(error_object(request_id, code, message), status=status,
                             headers={"Cache-Control": "no-store"})
