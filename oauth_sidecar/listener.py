"""The HTTP listener on HOST:PORT: aiohttp's server, bounded in what one client can make it hold.

Why: aiohttp caps each header (MAX_HEADER_BYTES) and the number of headers (128) but not a request
head as a whole, gives a client the whole keep-alive time to send a head, and accepts any number
of connections: 25 connections dribbling unterminated heads took a fresh sidecar from 54 to
256 MiB, and it kept 247 MiB. Here every connection's handler counts the head bytes it holds (the
head arriving plus complete heads pipelined behind the request being answered) and refuses more
than MAX_REQUEST_HEAD_BYTES with 431 (RFC 6585 §5); a head gets REQUEST_HEAD_TIMEOUT_SECONDS to
arrive, then 408 (RFC 9110 §15.5.9); an idle connection is closed after KEEPALIVE_TIMEOUT_SECONDS;
a connection beyond MAX_CONNECTIONS (fitted to the descriptor limit, see descriptors.py), or one
that finds the process short of descriptors, is answered 503 and closed at once, before a byte is
read (RFC 9110 §15.6.4). aiohttp has no hook for any of this, so
GuardedRequestHandler reads a few private attributes of its RequestHandler (named there);
tests/test_listener.py pins the behaviour, so an aiohttp upgrade that changes them fails the tests
instead of quietly dropping a bound. __main__, the demo and the tests all serve through
make_runner.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

import structlog
from aiohttp import hdrs, web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from oauth_sidecar import descriptors
from oauth_sidecar.config import Config, ListenerConfig
from oauth_sidecar.http_errors import error_body, json_error
from oauth_sidecar.metrics import METRICS, Metrics
from oauth_sidecar.server_header import SERVER
from oauth_sidecar.write_room import cannot_wait

HEAD_SLICE = 8192  # bytes parsed at a time while a head (or a chunked body) arrives
LINGER_SECONDS = 2.0  # a refused client still sending gets this long to read our answer
REFUSALS_LOG_INTERVAL = 10.0  # seconds between log lines about refused connections (a flood)
BACKLOG = 128  # connections the kernel queues before we accept them (run_app's default)
REFUSED_RETRY_AFTER = 1  # seconds: connections end all the time, so room comes back soon
SIGNALS = (signal.SIGTERM, signal.SIGINT)

log = structlog.get_logger("oauth_sidecar.listener")


def _answer_parts(status: int, description: str, more: str = "") -> tuple[bytes, bytes]:
    """A connection-level refusal in our JSON error shape: the head before Date, and the rest
    (`more`: extra header lines, each ending in CRLF)."""
    phrase = HTTPStatus(status).phrase
    body = error_body(phrase.lower().replace(" ", "_"), description)
    head = (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n"
            f"Server: {SERVER}\r\n{more}")
    return head.encode(), b"\r\n\r\n" + body


class Bounds:
    """What every connection of one listener shares: the limits, the open count, the metrics."""

    def __init__(self, config: ListenerConfig, metrics: Metrics, write_timeout: float) -> None:
        self.max_head_bytes = config.max_head_bytes
        self.head_timeout = config.head_timeout
        self.max_connections = config.max_connections
        # A new connection's descriptor number counts the descriptors open (the kernel hands out
        # the lowest free one): at this number the process is too short of them to serve it.
        self.descriptor_ceiling = descriptors.soft_limit() - descriptors.RESERVED // 2
        self.write_timeout = write_timeout
        self.metrics = metrics
        self.open = 0
        self._refused_unlogged = 0
        self._short_unlogged = 0
        self._next_refusal_log = 0.0
        self._answers = {
            431: _answer_parts(431, f"The request line and headers exceed {self.max_head_bytes}"
                               " bytes"),
            408: _answer_parts(408, f"The request head did not arrive within "
                               f"{self.head_timeout:g} seconds"),
            503: _answer_parts(503, "Too many connections are open; try again shortly",
                               f"Retry-After: {REFUSED_RETRY_AFTER}\r\n"),
        }

    def admit(self, descriptor: int) -> bool:
        """Count a new connection in, or refuse it (logged at most every few seconds)."""
        short = descriptor >= self.descriptor_ceiling
        if self.open < self.max_connections and not short:
            self.open += 1
            return True
        self.metrics.connection_refused()
        self._refused_unlogged += 1
        self._short_unlogged += short
        now = time.monotonic()
        if now >= self._next_refusal_log:
            log.warning("connections_refused", refused=self._refused_unlogged, open=self.open,
                        limit=self.max_connections, short_of_descriptors=self._short_unlogged)
            self._refused_unlogged = self._short_unlogged = 0
            self._next_refusal_log = now + REFUSALS_LOG_INTERVAL
        return False

    def release(self) -> None:
        self.open -= 1

    def answer(self, status: int) -> bytes:
        head, rest = self._answers[status]
        # RFC 9110 §6.6.1: an origin server with a clock sends Date in a 4xx.
        return head + b"Date: " + formatdate(usegmt=True).encode() + rest

    def head_refused(self, status: int, peer: object, held: int) -> None:
        reason = "too_large" if status == 431 else "timeout"
        self.metrics.head_refused(reason)
        remote = peer[0] if isinstance(peer, tuple) else None
        log.info("request_head_refused", status=status, reason=reason, remote=remote,
                 head_bytes=held)


def _content_length(message: object) -> int | None:
    """A parsed request's Content-Length (the parser already refused bad or doubled ones)."""
    if not isinstance(message, RawRequestMessage) or message.chunked:
        return None
    value = message.headers.get(hdrs.CONTENT_LENGTH)
    return int(value) if value is not None and value.isdigit() else None


def _descriptor(transport: asyncio.BaseTransport) -> int:
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else -1


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler, counting the head bytes it holds and timing each head.

    Private attributes of RequestHandler read here: `_request_count` (requests parsed so far on
    this connection), `_messages` (parsed requests not yet handled, as (message, payload)),
    `_waiter` (pending while it waits for a request: the connection is idle), `_parser`
    (dropped on a refusal, with the head bytes it buffered) and `_force_close` (set after an
    answer to a request whose body is still arriving: no lingering read, no close yet).
    """

    __slots__ = ("_admitted", "_body", "_body_length", "_bounds", "_head_bytes", "_head_timer",
                 "_idle", "_linger_timer", "_seen_requests", "_stopped", "_waiting_bytes")

    def __init__(self, manager: web.Server, bounds: Bounds, **options: Any) -> None:
        super().__init__(manager, **options)
        self._bounds = bounds
        self._admitted = False
        self._stopped = False  # a head was refused: nothing more is parsed
        self._seen_requests = 0
        self._body: StreamReader | None = None  # the newest request's payload
        self._body_length: int | None = None  # its Content-Length (None: chunked, or no body)
        self._head_bytes = 0  # of the head arriving now
        self._waiting_bytes = 0  # of complete heads pipelined behind the one being answered
        self._idle = False  # no request was being answered when the bytes being parsed came
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._bounds.admit(_descriptor(transport)):
            # Before reading a byte, so existing connections are unaffected; the answer is
            # written whole at once (it is small) and closing keeps the descriptor no longer.
            # A stream transport: asyncio's, or uvloop's (which does not subclass asyncio's).
            cast(asyncio.Transport, transport).write(self._bounds.answer(503))
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        # The first head is due this long after the connection opens (as nginx's
        # client_header_timeout and Go's ReadHeaderTimeout count it); later ones from their
        # first byte (between requests KEEPALIVE_TIMEOUT_SECONDS applies).
        self._head_timer = self._loop.call_later(self._bounds.head_timeout, self._head_overdue)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._bounds.release()
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._stopped or not self._admitted:
            return
        if not data:  # aiohttp re-parsing what it held back while its queue was full
            self._idle = False
            super().data_received(data)
            self._caught_up(0)
            return
        if not self._messages:  # every complete head was taken by a handler
            self._waiting_bytes = 0
        self._idle = self._waiter is not None and not self._waiter.done()
        offset = 0
        while offset < len(data) and not self._stopped:
            body = self._body
            in_body = body is not None and not body.is_eof()
            if body is not None and in_body and self._body_length is not None:
                # A Content-Length body: parse exactly its remaining bytes, then what follows.
                left = self._body_length - body.total_bytes
                piece = data[offset:offset + left] if left > 0 else data[offset:]
                offset += len(piece)
                self._feed(piece)
                continue
            room = self._bounds.max_head_bytes - self._head_bytes - self._waiting_bytes
            if not in_body and room <= 0:  # one byte more than the cap, and still no end
                self._refuse(431)
                return
            # Small pieces, so a head is refused at its first byte over the cap, and the bytes
            # after a head or a chunked body that ends inside a piece (not counted) are few.
            piece = data[offset:offset + (HEAD_SLICE if in_body else min(HEAD_SLICE, room))]
            offset += len(piece)
            if not self._feed(piece) and not in_body:
                self._count_head(len(piece))

    def _feed(self, data: bytes) -> bool:
        """Parse data; True if it completed a head."""
        super().data_received(data)
        return self._caught_up(len(data))

    def _caught_up(self, fed: int) -> bool:
        """After a head completed: its bytes are no longer arriving; they stay held (and
        counted) while it waits behind another request."""
        if self._request_count == self._seen_requests:
            return False
        self._seen_requests = self._request_count
        message, self._body = self._messages[-1] if self._messages else (None, None)
        self._body_length = _content_length(message)
        if len(self._messages) > 1 or not self._idle:  # not the next one a handler takes
            self._waiting_bytes += self._head_bytes + fed
        else:
            self._waiting_bytes = 0
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._waiting_bytes > self._bounds.max_head_bytes:
            self._refuse(431)
        return True

    def _count_head(self, size: int) -> None:
        if self._head_timer is None:  # the first byte of a later head: its time starts now
            self._head_timer = self._loop.call_later(self._bounds.head_timeout,
                                                     self._head_overdue)
        self._head_bytes += size

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self._stopped or self._caught_up(0):
            return
        if self._head_bytes == 0:  # a new connection that never sent a byte: nothing to answer
            self.force_close()
            return
        self._refuse(408)

    def _refuse(self, status: int) -> None:
        """Answer 431 or 408 if nothing else is being answered here, and close either way."""
        if self._stopped:
            return
        self._stopped = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._bounds.head_refused(status, self.peername, self._head_bytes + self._waiting_bytes)
        idle = self._waiter is not None and not self._waiter.done()
        transport = self.transport
        self._parser = None  # releases the head bytes it buffered
        self.close()  # parse nothing more; a response in progress finishes, then aiohttp closes
        if idle and transport is not None:
            transport.write(self._bounds.answer(status))
            # Half-close and keep reading a moment, so a client still sending sees the answer
            # rather than a reset (RFC 9112 §9.6).
            if transport.can_write_eof():
                transport.write_eof()
            self._linger_timer = self._loop.call_later(LINGER_SECONDS, self.force_close)

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own refusals of malformed requests, in our JSON shape (not its plain text
        echoing the offending line), logged in one line naming the parser's complaint: the
        request is the client's mistake, and aiohttp's traceback per request (1.3 KB, quoting
        the offending bytes) would let anyone flood the log. A 500, an error of ours, is still
        logged with its traceback."""
        if status >= 500:
            super().handle_error(request, status, exc, message)  # logs; raises if answered
        else:
            log.info("request_malformed", status=status, error=type(exc).__name__,
                     remote=request.remote)
            if request.writer.output_size > 0:  # as aiohttp does: too late for an answer
                raise ConnectionError("an answer was already being sent")
        phrase = HTTPStatus(status).phrase
        response = json_error(status, phrase.lower().replace(" ", "_"), phrase)
        response.headers["Server"] = SERVER  # no app hook runs for a request that never parsed
        response.force_close()
        return response

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """aiohttp writes every answer a handler returns whole (most JSON-RPC replies, every
        refusal) here, after the handler: a client that stops reading, pipelining requests it
        never reads the answers of, would hold this write and its connection forever. Past
        CLIENT_WRITE_TIMEOUT_SECONDS the connection is aborted (close() would wait to flush).

        An answer given before the request's body has arrived (a 401, 403, 429, 405 or 413 that
        never read it) closes the connection instead of letting aiohttp read and discard the
        rest for its 10 s lingering time: 44.9 GB on loopback, for a request without a token."""
        unread = not request.content.is_eof()
        if unread:
            resp.force_close()  # says Connection: close (RFC 9112 §9.6)
        elif self._cannot_wait(resp):
            return await super().finish_response(request, resp, start_time)
        try:
            async with asyncio.timeout(self._bounds.write_timeout):
                answered = await super().finish_response(request, resp, start_time)
        except TimeoutError:
            log.warning("client_write_timeout", seconds=self._bounds.write_timeout)
            if self.transport is not None:
                self.transport.abort()
            return resp, True
        if unread:
            self._close_unread()
        return answered

    def _cannot_wait(self, resp: web.StreamResponse) -> bool:
        """Whether writing this answer can never wait for the client (write_room): a whole
        answer, small with its headers (most JSON-RPC replies and refusals), needs no timer."""
        length = resp.content_length
        return (isinstance(resp, web.Response) and length is not None
                and cannot_wait(self.transport, length + sum(
                    len(name) + len(value) + 4 for name, value in resp.headers.items())))

    def _close_unread(self) -> None:
        """After the answer: half-close, so a client still sending reads the answer and the
        end, stop reading (what arrives waits in the socket buffers, never in ours), and close
        LINGER_SECONDS later (RFC 9112 §9.6). `_force_close` set without force_close() keeps
        aiohttp from draining the body and from closing at once, which would reset the
        connection and could lose the answer on its way."""
        self._stopped = True
        self._force_close = True
        self.pause_reading()
        transport = self.transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
        self._linger_timer = self._loop.call_later(LINGER_SECONDS, self.force_close)


class GuardedServer(web.Server):
    """aiohttp's server (connection tracking, graceful shutdown), building guarded handlers."""

    def __init__(
        self, handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]], *,
        request_factory: Any, loop: asyncio.AbstractEventLoop, bounds: Bounds,
        options: dict[str, Any],
    ) -> None:
        # Cancel a handler whose client disconnected, so an abandoned event stream also closes
        # its upstream request (aiohttp's default keeps it running).
        super().__init__(handler, request_factory=request_factory, handler_cancellation=True,
                         loop=loop)
        self._bounds, self._options, self._event_loop = bounds, options, loop

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, self._bounds, loop=self._event_loop, **self._options)


def handler_options(config: Config) -> dict[str, Any]:
    """How each connection's handler runs this app."""
    return {
        "max_field_size": config.max_header_bytes,  # Entra tokens with many groups exceed 8 KB
        # Bodies are relayed as sent: decoding Content-Encoding here while the proxy forwards the
        # client's Content-Encoding and Content-Length would hand the upstream another body.
        "auto_decompress": False,
        "keepalive_timeout": config.listener.keepalive_timeout,
        "access_log": None,  # our access_log middleware writes the one line per request
    }


class _GuardedAppRunner(web.AppRunner):
    def __init__(self, app: web.Application, config: Config) -> None:
        super().__init__(app, shutdown_timeout=config.shutdown_timeout)
        self._config = config

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the app; its server is replaced
        metrics = self.app.get(METRICS) or Metrics()
        bounds = Bounds(self._config.listener, metrics,
                        self._config.upstream.client_write_timeout)
        metrics.watch("open_connections", "Client connections open now on PORT",
                      lambda: bounds.open)
        return GuardedServer(plain.request_handler, request_factory=plain.request_factory,
                             loop=asyncio.get_running_loop(), bounds=bounds,
                             options=handler_options(self._config))


def make_runner(app: web.Application, config: Config) -> web.AppRunner:
    """A runner for the sidecar's app whose server bounds every connection (any site works)."""
    return _GuardedAppRunner(app, config)


async def serve(app: web.Application, config: Config) -> None:
    """Serve on HOST:PORT until SIGTERM or SIGINT, then stop within SHUTDOWN_TIMEOUT_SECONDS.

    A signal during start-up (a spawned child slow to listen) ends the start-up. A start-up
    failure (a taken port, a child that cannot start) is raised after cleaning up."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - always awaited inside a task
        raise RuntimeError("serve() must run in a task")
    runner = make_runner(app, config)
    stop = asyncio.Event()
    started = False

    def on_signal() -> None:
        if not started and not stop.is_set():
            task.cancel()
        stop.set()

    for signum in SIGNALS:
        loop.add_signal_handler(signum, on_signal)
    try:
        try:
            await runner.setup()
            await web.TCPSite(runner, config.host, config.port, backlog=BACKLOG).start()
        except asyncio.CancelledError:
            if not stop.is_set():
                raise
            task.uncancel()
            return
        started = True
        await stop.wait()
    finally:
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)
        await runner.cleanup()
