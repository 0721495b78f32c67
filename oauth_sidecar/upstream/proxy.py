"""The streaming reverse proxy to the one upstream MCP server.

Why: MCP answers with JSON or with Server-Sent Events that may stay open for hours, so bodies are
streamed both ways and never buffered, there is no total timeout (aiohttp's default of 300 s
would cut every SSE stream at five minutes), and a client that leaves cancels the upstream
request. The caller's credentials never go upstream (MCP: "MUST NOT pass through the token");
the upstream gets its own Host and no browser Origin (the official MCP SDK server answers 421/403
to foreign ones). Errors before the upstream answers become 502/504 JSON without internal
addresses; errors after the status line went out drop the connection so the client sees a
truncated response, not a complete one. No client holds the sidecar's resources without bound:
its body has a size and a silence limit (request_body.py), its writes a time limit (a client
that stops reading is dropped and its upstream request ended), and its subject a number of
requests that may become event streams (stream_slots.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web
from yarl import URL

from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.auth.resource_metadata import public_origin
from oauth_sidecar.auth.sessions import SessionBindings, valid_session_id
from oauth_sidecar.client_ip import ClientAddress
from oauth_sidecar.config import Config
from oauth_sidecar.http_errors import json_error
from oauth_sidecar.log import REQUEST_ID
from oauth_sidecar.mcp.calls import MAX_ANSWER_BYTES, CallRules, Judged
from oauth_sidecar.mcp.list_filter import EventRewriter
from oauth_sidecar.metrics import Metrics
from oauth_sidecar.request_body import (
    WHOLE_BODY_BYTES,
    BodyBroken,
    BodyReader,
    BodyStalled,
    BodyTooLarge,
    StreamedBody,
    body_refused,
)
from oauth_sidecar.request_keys import (
    AUTH_FAILURE,
    PRINCIPAL,
    SESSION,
    PresentedSession,
    Principal,
)
from oauth_sidecar.response_body import ResponseTooLarge, read_capped
from oauth_sidecar.upstream.child import ChildProcess
from oauth_sidecar.upstream.credential import UpstreamCredential
from oauth_sidecar.upstream.headers import HeaderFilter
from oauth_sidecar.upstream.paths import LocationRewriter, PathMap
from oauth_sidecar.upstream.stream_slots import RETRY_AFTER, Slot, StreamSlots, TooManyStreams
from oauth_sidecar.write_room import cannot_wait

# The process (EMFILE) or the system (ENFILE) has no descriptor left for the upstream connection:
# the sidecar is overloaded, the upstream is not at fault (503, not 502).
NO_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})
OVERLOADED_RETRY_AFTER = "1"  # seconds: descriptors come back as connections end

log = structlog.get_logger("oauth_sidecar.proxy")

# Encoded slash, backslash, dot or NUL mean different paths to different parsers: refuse them.
AMBIGUOUS_PATH = re.compile(r"%(?:2f|5c|2e|00)|\\", re.IGNORECASE)
# TRACE echoes the request, MCP_UPSTREAM_BEARER_FILE's credential included; CONNECT tunnels.
NEVER_FORWARDED = frozenset({"TRACE", "CONNECT"})
# A chunk's size line and line ends in chunked transfer coding (and the last chunk's "0\r\n\r\n").
CHUNK_FRAMING_BYTES = 32
READY_CACHE_SECONDS = 2.0  # /readyz is public: never one upstream probe per request


@dataclass(frozen=True, slots=True)
class JudgedBody:
    """A POST body the tool rules admitted, read whole, and what its answer needs."""

    data: bytes | None
    verdict: Judged

    @property
    def watches_answer(self) -> bool:
        return self.verdict.watches_answer


class UpstreamProxy:
    """Forwards authenticated requests to the upstream and streams the answer back."""

    def __init__(
        self, config: Config, *, policy: AccessPolicy, addresses: ClientAddress,
        sessions: SessionBindings, credential: UpstreamCredential | None = None,
        child: ChildProcess | None = None, metrics: Metrics | None = None,
        calls: CallRules | None = None,
    ) -> None:
        """calls: the tool rules (None: none configured, bodies are never parsed)."""
        self._calls = calls
        self._child = child
        self._metrics = metrics or Metrics()
        self._config = config.upstream
        self._policy = policy
        self._addresses = addresses
        self._sessions = sessions
        self._credential = credential
        self._paths = PathMap(config.resource_path, config.upstream.path_prefix)
        self.headers = HeaderFilter(
            config, policy=policy, addresses=addresses, credential=credential,
            locations=LocationRewriter(self._paths, config.upstream.origin, public_origin(config)),
        )
        self._shutdown_timeout = config.shutdown_timeout
        self._bodies = BodyReader(config.upstream.max_body_bytes, config.upstream.body_timeout)
        self._slots = StreamSlots(config.upstream.max_streams_per_subject)
        self._session: aiohttp.ClientSession | None = None
        self._ready_at = 0.0
        self._ready = False
        self.unreachable: str | None = None
        """Why the last readiness probe failed (address and error): for the log, never public."""
        self._stopping = False
        self._in_flight: set[asyncio.Task[object]] = set()
        self._event_streams: set[aiohttp.ClientResponse] = set()
        self._deadline: asyncio.TimerHandle | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[UpstreamProxy]:
        """One pooled session for the upstream for the app's lifetime."""
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._config.connect_timeout,
            connect=self._config.connect_timeout,
        )
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60)  # streams are long-lived
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # a shared jar would mix users' cookies
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
        ) as session:
            self._session = session
            try:
                yield self
            finally:
                if self._deadline is not None:
                    self._deadline.cancel()
                self._session = None

    async def stop(self, app: web.Application) -> None:
        """on_shutdown (aiohttp runs it after the listener closed, before it drains handlers).

        Event streams never end by themselves, so they are ended cleanly now (clients resume
        with Last-Event-ID); other requests get SHUTDOWN_TIMEOUT_SECONDS, then are cancelled,
        so shutdown is bounded by that one timeout (aiohttp alone would wait it twice).
        """
        self._stopping = True
        for upstream in list(self._event_streams):
            upstream.close()
        self._deadline = asyncio.get_running_loop().call_later(
            self._shutdown_timeout, self._cancel_in_flight
        )

    def in_flight(self) -> int:
        """Requests being forwarded now (waiting for the upstream or relaying its answer)."""
        return len(self._in_flight)

    def open_streams(self) -> int:
        """Event streams (text/event-stream answers) being relayed now."""
        return len(self._event_streams)

    def _cancel_in_flight(self) -> None:
        for task in list(self._in_flight):
            task.cancel()

    def upstream_url(self, raw_path: str, raw_query: str) -> URL:
        """Map the resource path onto MCP_UPSTREAM_PATH; every other path goes unchanged."""
        path = self._paths.upstream(raw_path)
        url = self._config.origin + path + (f"?{raw_query}" if raw_query else "")
        return URL(url, encoded=True)

    async def reachable(self) -> bool:
        """A cached TCP connect to the upstream, for /readyz."""
        now = time.monotonic()
        if now - self._ready_at < READY_CACHE_SECONDS:
            return self._ready
        self._ready_at = now
        parts = urlsplit(self._config.origin)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            async with asyncio.timeout(min(self._config.connect_timeout, 2.0)):
                _, writer = await asyncio.open_connection(parts.hostname, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._ready, self.unreachable = True, None
        except (OSError, TimeoutError) as exc:
            self._ready = False
            self.unreachable = f"{parts.hostname}:{port}: {type(exc).__name__}: {exc}".rstrip(": ")
        return self._ready

    async def handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is None or self._session is None:
            raise RuntimeError("proxy used outside its cleanup context")
        self._in_flight.add(task)
        try:
            return await self._forward(request, self._session)
        finally:
            self._in_flight.discard(task)

    async def _forward(  # noqa: PLR0912 - a request's steps in order, each refusal an early answer
        self, request: web.Request, session: aiohttp.ClientSession
    ) -> web.StreamResponse:
        if request.method in NEVER_FORWARDED:
            return json_error(405, "method_not_allowed", f"{request.method} is not forwarded")
        raw_path = request.rel_url.raw_path
        if AMBIGUOUS_PATH.search(raw_path):
            return json_error(400, "invalid_path", "Encoded slashes, dots and backslashes are "
                              "not accepted in the path")
        if self._child is not None and not self._child.ready:  # fail fast, never hang
            return json_error(503, "upstream_unavailable",
                              f"The MCP server is not ready ({self._child.state})",
                              {"Retry-After": "2"})
        principal = request[PRINCIPAL]
        identity = (principal.issuer, principal.subject)
        presented = request.get(SESSION)  # the gate checked it is the caller's (or nobody's)
        url = self.upstream_url(raw_path, request.rel_url.raw_query_string)
        try:
            slot = self._slots.reserve(request.method, request.headers, identity)
        except TooManyStreams:
            request[AUTH_FAILURE] = "rate_limited_streams"
            self._metrics.rate_limited("streams")
            refused = json_error(429, "rate_limited", "Too many open event streams",
                                 {"Retry-After": RETRY_AFTER})
            # Closed after the answer: a subject over its streams does not keep the connection
            # (and its descriptor) that another user needs; a retry opens a new one.
            refused.force_close()
            return refused
        try:
            try:
                data = await self._bodies.read(request)
                judged = await self._judge(request, principal, data)
            except (BodyTooLarge, BodyStalled, BodyBroken) as failure:
                return body_refused(failure)
            if isinstance(judged, web.StreamResponse):
                return judged
            if judged is not None:
                data = judged.data
            body = data if isinstance(data, StreamedBody) else None
            headers = self.headers.request(request, principal)
            if judged is not None and judged.watches_answer:
                headers.pop("accept-encoding", None)  # its answer is read: never compressed
            if self._calls is not None:
                # A resumed stream replays answers to earlier requests, whose lists the rules
                # could no longer filter: with tool rules, streams start afresh (MCP 2026-07-28
                # has no resumption at all).
                headers.pop("last-event-id", None)
            upstream = await self._send(session, request.method, url, headers=headers, data=data,
                                        body=body)
            if isinstance(upstream, web.Response):
                if judged is not None:
                    self._calls_finish(judged, None)
                return upstream
            if upstream.status == 401:
                upstream.close()
                return self._credential_refused()
            issued = upstream.headers.get("Mcp-Session-Id")
            if issued is not None and not valid_session_id(issued):
                upstream.close()
                return self._session_id_refused(issued)
            self._track_session(request.method, presented, upstream, identity)
            try:
                return await self._relay(request, upstream, body, slot, identity, judged)
            finally:
                upstream.close()  # no-op after a full read; aborts the upstream if we stopped early
                if judged is not None:
                    self._calls_finish(judged, upstream.status)
        finally:
            if slot is not None:
                slot.release()

    async def _send(
        self, session: aiohttp.ClientSession, method: str, url: URL, *,
        headers: dict[str, str], data: bytes | StreamedBody | None, body: StreamedBody | None,
    ) -> aiohttp.ClientResponse | web.Response:
        """The upstream's response (headers arrived), or the answer for its failure."""
        try:
            # A streamed body is still being sent while this runs: its silences have their
            # own bound, and end this wait with its failure.
            async with asyncio.timeout(self._config.response_timeout):
                sent = time.perf_counter()
                upstream = await session.request(
                    method, url, headers=headers, data=data, allow_redirects=False,
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._not_answered(exc, body)
        self._metrics.upstream_answered(time.perf_counter() - sent)
        return upstream

    async def _judge(self, request: web.Request, principal: Principal,
                     data: bytes | StreamedBody | None) -> JudgedBody | web.Response | None:
        """With tool rules (mcp/calls.py), a POST body (or any other request's, should a client
        send one: a server may read it) is read whole and judged: the refusal to send, or the
        body to forward with what its answer needs; None without rules or body."""
        if self._calls is None or (request.method != "POST" and data is None):
            return None
        if isinstance(data, StreamedBody):
            data = b"".join([piece async for piece in data])  # bounded: MAX_REQUEST_BODY_BYTES
        verdict = await self._calls.judge(request, principal, data or b"", request[REQUEST_ID])
        if isinstance(verdict, web.StreamResponse):
            return verdict
        return JudgedBody(data, verdict)

    def _calls_finish(self, judged: JudgedBody, status: int | None) -> None:
        if self._calls is not None and judged.verdict.calls:
            self._calls.finish(judged.verdict, status)

    def _unfilterable(self, upstream: aiohttp.ClientResponse, judged: JudgedBody | None
                      ) -> web.Response | None:
        """An answer whose lists must be filtered but is encoded (Content-Encoding, despite the
        request asking for none) is refused: never shown unfiltered."""
        if judged is None or not judged.verdict.lists or not _encoded(upstream):
            return None
        log.warning("upstream_answer_encoded", encoding=upstream.headers["Content-Encoding"])
        self._metrics.upstream_failed("encoded")
        return json_error(502, "upstream_encoded", "The MCP server's answer is encoded "
                          "(Content-Encoding) and cannot be filtered")

    async def _relay_read(self, upstream: aiohttp.ClientResponse, judged: JudgedBody
                          ) -> web.StreamResponse:
        """A JSON answer the tool rules read (list results filtered, calls audited): read
        whole, at most MAX_ANSWER_BYTES, within the idle timeout."""
        try:
            if upstream.content.is_eof():  # it came with the headers: nothing to wait for,
                data = await upstream.read()  # and nothing more to hold than is held already
                if len(data) > MAX_ANSWER_BYTES:
                    raise ResponseTooLarge(MAX_ANSWER_BYTES, b"")
            else:
                async with asyncio.timeout(self._config.idle_timeout):
                    data = await read_capped(upstream, MAX_ANSWER_BYTES)
        except TimeoutError:
            log.warning("upstream_timeout", phase="body")
            self._metrics.upstream_failed("timeout")
            return json_error(504, "upstream_timeout", "The MCP server did not answer in time")
        except (aiohttp.ClientError, ResponseTooLarge) as exc:
            log.warning("upstream_stream_failed", error=type(exc).__name__)
            self._metrics.upstream_failed("broken")
            return json_error(502, "upstream_unavailable", "The MCP server's answer broke off "
                              "or is too large to filter")
        if self._calls is not None and not _encoded(upstream):
            data = self._calls.whole_answer(judged.verdict, upstream.status, data)
        response = web.Response(status=upstream.status, reason=upstream.reason, body=data)
        self.headers.response(upstream, response)
        response.headers.popall("Content-Length", None)  # the filtered body's own
        return response

    def _not_answered(
        self, exc: aiohttp.ClientError | TimeoutError, body: StreamedBody | None
    ) -> web.Response:
        """No response headers came back: the client's body or the upstream is to blame."""
        if body is not None:
            if body.failure is not None:
                return body_refused(body.failure)
            if isinstance(exc, TimeoutError) and body.waiting:  # the client is the slow one
                return body_refused(BodyStalled())
        if isinstance(exc, TimeoutError):
            log.warning("upstream_timeout", phase="headers")
            self._metrics.upstream_failed("timeout")
            return json_error(504, "upstream_timeout", "The MCP server did not answer in time")
        if isinstance(exc, OSError) and exc.errno in NO_DESCRIPTORS:
            log.warning("descriptors_exhausted", phase="upstream_connect")
            return json_error(503, "temporarily_unavailable",
                              "The sidecar has too many connections open; try again shortly",
                              {"Retry-After": OVERLOADED_RETRY_AFTER})
        log.warning("upstream_unavailable", error=type(exc).__name__)
        self._metrics.upstream_failed("unavailable")
        return json_error(502, "upstream_unavailable", "The MCP server is not reachable")

    def _credential_refused(self) -> web.Response:
        """The upstream never sees the caller's token, so its 401 is about the sidecar's own
        credential (MCP_UPSTREAM_BEARER_FILE, or none). Relayed as 401 it would send the MCP
        client to sign in again, in a loop that cannot fix it: the fault is ours, 502."""
        log.warning("upstream_unauthorized", credential=self._credential is not None)
        self._metrics.upstream_failed("refused")
        return json_error(502, "upstream_refused",
                          "The MCP server refused the sidecar's credentials")

    def _session_id_refused(self, issued: str) -> web.Response:
        """An id the sidecar may not bind (too long, or not visible ASCII) could never be
        presented back through it: the session is unusable, so say so now, and keep nothing."""
        log.warning("upstream_session_id_invalid", length=len(issued))
        self._metrics.upstream_failed("invalid_session_id")
        return json_error(502, "upstream_invalid_session",
                          "The MCP server issued a session id the sidecar cannot bind")

    def _track_session(
        self, method: str, presented: PresentedSession | None,
        upstream: aiohttp.ClientResponse, identity: tuple[str, str],
    ) -> None:
        """Record what the upstream answered: bind the session ids it accepted or issued to the
        caller, forget ended ones. Both are valid ids by now: the gate refused a malformed
        presented one, _forward an issued one. Whether the caller may use the session was
        decided by the gate."""
        if upstream.status >= 400:
            return
        if presented is not None and method == "DELETE":  # ended, even if the answer repeats it
            self._sessions.forget(presented.id)
            return
        issued = upstream.headers.get("Mcp-Session-Id")
        if issued:
            self._sessions.bind(issued, identity)
        elif presented is not None and not presented.bound:  # from before a restart or another
            self._sessions.bind(presented.id, identity)  # replica: the upstream accepted it

    async def _relay(  # noqa: PLR0917 - one answer's every input, passed on from _forward
        self, request: web.Request, upstream: aiohttp.ClientResponse, body: StreamedBody | None,
        slot: Slot | None, identity: tuple[str, str], judged: JudgedBody | None,
    ) -> web.StreamResponse:
        """The upstream's answer to the caller: small ones whole, the rest streamed; one the
        tool rules read (judged) filtered and audited, a JSON one read whole, an event stream
        event by event. Event streams count against the subject's MAX_STREAMS_PER_SUBJECT."""
        unfilterable = self._unfilterable(upstream, judged)
        if unfilterable is not None:
            return unfilterable
        watched = judged if judged is not None and judged.watches_answer else None
        event_stream = upstream.content_type == "text/event-stream"
        claimed = None
        if not event_stream:
            if slot is not None:
                slot.release()  # not a stream after all: the slot is free at once
        elif slot is None:  # it ran already, so it is relayed; it counts from now on
            claimed = self._slots.claim(identity)
        length = upstream.content_length
        if not event_stream and request.method != "HEAD":
            if watched is not None:
                return await self._relay_read(upstream, watched)
            if length is not None and length <= WHOLE_BODY_BYTES:
                return await self._relay_whole(upstream, body)
        rewriter = None
        if watched is not None and event_stream and self._calls is not None and not _encoded(
                upstream):
            rewriter = self._calls.event_rewriter(watched.verdict, upstream.status)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        self.headers.response(upstream, response)
        if event_stream:
            response.headers["X-Accel-Buffering"] = "no"  # tell nginx-style proxies not to buffer
        idle = self._config.sse_idle_timeout if event_stream else self._config.idle_timeout
        try:
            await response.prepare(request)
            if event_stream:
                self._event_streams.add(upstream)
            await self._copy_body(request, upstream, response, idle, body, rewriter=rewriter)
        finally:
            self._event_streams.discard(upstream)
            if claimed is not None:
                claimed.release()
        return response

    async def _relay_whole(
        self, upstream: aiohttp.ClientResponse, request_body: StreamedBody | None
    ) -> web.StreamResponse:
        """A small answer of known length (most JSON-RPC replies) is read whole and sent in one
        write: one timer instead of one per chunk, and an upstream failing mid-body is still
        an honest 502/504 because nothing has been sent yet."""
        try:
            if upstream.content.is_eof():  # it came with the headers, as usual: nothing to wait for
                body = await upstream.read()
            else:
                async with asyncio.timeout(self._config.idle_timeout):
                    body = await upstream.read()
        except TimeoutError:
            log.warning("upstream_timeout", phase="body")
            self._metrics.upstream_failed("timeout")
            return json_error(504, "upstream_timeout", "The MCP server did not answer in time")
        except aiohttp.ClientError as exc:
            if request_body is not None and request_body.failure is not None:
                return body_refused(request_body.failure)  # it answered before the body broke
            log.warning("upstream_stream_failed", error=type(exc).__name__)
            self._metrics.upstream_failed("broken")
            return json_error(502, "upstream_unavailable", "The MCP server's answer broke off")
        response = web.Response(status=upstream.status, reason=upstream.reason, body=body)
        self.headers.response(upstream, response)
        return response

    async def _copy_body(  # noqa: PLR0912 - each way a relayed stream can end, in one loop
        self, request: web.Request, upstream: aiohttp.ClientResponse,
        response: web.StreamResponse, idle: float | None, body: StreamedBody | None, *,
        rewriter: EventRewriter | None = None,
    ) -> None:
        content = upstream.content
        while True:
            try:
                chunk = content.read_nowait()  # what has arrived already needs no timer
                if not chunk and not content.is_eof():
                    async with asyncio.timeout(idle):
                        chunk = await content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                if self._stopping and upstream.content_type == "text/event-stream":
                    break  # we closed it for shutdown: end the stream cleanly
                if body is not None and body.failure is not None:
                    log.info("request_body_failed", error=type(body.failure).__name__)
                else:
                    log.warning("upstream_stream_failed", error=type(exc).__name__)
                    self._metrics.upstream_failed("timeout" if isinstance(exc, TimeoutError) else
                                                  "broken")
                # Headers are gone: the only honest signal left is dropping the connection.
                if request.transport is not None:
                    request.transport.close()
                return
            if not chunk:
                break
            if rewriter is not None:
                rewritten = _rewritten(request, rewriter, chunk)
                if rewritten is None:
                    return
                chunk = rewritten
            if chunk and not await self._write(request, response.write(chunk), len(chunk)):
                return
        if rewriter is not None:
            rest = rewriter.close()
            if rest and not await self._write(request, response.write(rest), len(rest)):
                return
        await self._write(request, response.write_eof(), 0)

    async def _write(self, request: web.Request, write: Awaitable[None], size: int) -> bool:
        """Whether the client took the write of `size` bytes in time. One that stopped reading
        (its TCP window closed) would hold this write, its connection and the upstream's stream
        forever: after the timeout its connection is aborted (close() would wait to flush to a
        client that never reads) and the caller's cleanup closes the upstream request. A write
        that cannot wait (write_room: most events of a stream) needs no timer."""
        try:
            if cannot_wait(request.transport, size + CHUNK_FRAMING_BYTES):
                await write
            else:
                async with asyncio.timeout(self._config.client_write_timeout):
                    await write
        except ConnectionError:  # the client left (ClientConnectionResetError included)
            return False
        except TimeoutError:
            log.warning("client_write_timeout", seconds=self._config.client_write_timeout)
            if request.transport is not None:
                request.transport.abort()
            return False
        return True


def _rewritten(request: web.Request, rewriter: EventRewriter, chunk: bytes) -> bytes | None:
    """The complete events of what arrived, as the tool rules rewrite them; None (the client's
    connection dropped) for an event too large to judge: it is never relayed unjudged."""
    try:
        return rewriter.feed(chunk)
    except ValueError:
        log.warning("upstream_event_too_large", limit=MAX_ANSWER_BYTES)
        if request.transport is not None:
            request.transport.close()
        return None


def _encoded(upstream: aiohttp.ClientResponse) -> bool:
    return upstream.headers.get("Content-Encoding", "identity").strip().lower() != "identity"
