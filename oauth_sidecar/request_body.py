"""Request bodies on their way upstream: small ones read whole, large ones streamed, all bounded.

Why: almost every MCP request is a small JSON-RPC message of known length; reading it whole and
sending it upstream with the headers in one write is measurably faster than streaming it. A larger
body (a long Content-Length, or a chunked one that outgrows WHOLE_BODY_BYTES) is streamed as it
arrives, so an upload holds a few buffers, never MAX_REQUEST_BODY_BYTES of memory. Every body is
bounded in size, while it streams too, and in the silence between two of its pieces
(REQUEST_BODY_TIMEOUT_SECONDS, like nginx's client_body_timeout), so a client that stops sending
holds nothing for long. A body that fails is the client's doing, and its exception says which
failure it was, so the proxy can answer 408/413/400 without blaming the upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import StreamReader, web

from oauth_sidecar.http_errors import json_error

# Bodies up to this size and of known length are read whole and sent in one write.
WHOLE_BODY_BYTES = 65536


class BodyTooLarge(Exception):
    """The request body exceeds MAX_REQUEST_BODY_BYTES."""


class BodyStalled(Exception):
    """No byte of the request body arrived for REQUEST_BODY_TIMEOUT_SECONDS."""


class BodyBroken(Exception):
    """The client closed, or broke the body's framing, before the body was complete."""


BodyFailure = BodyTooLarge | BodyStalled | BodyBroken


class StreamedBody:
    """A large body for aiohttp's client to send upstream piece by piece as it arrives.

    aiohttp wraps whatever this raises into a connection error of its own, so the reason is kept
    in `failure`; `waiting` says whether the body is waiting for the client right now (rather than
    for the upstream to take the last piece), so a timeout can be blamed on the right side.
    """

    def __init__(self, content: StreamReader, *, read: list[bytes], size: int,
                 expected: int | None, limit: int, gap: float) -> None:
        self._content = content
        self._read = read
        self._size = size
        self._expected = expected
        self._limit = limit
        self._gap = gap
        self.failure: BodyFailure | None = None
        self.waiting = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read, self._read = self._read, []
        for piece in read:  # what arrived before streaming began
            yield piece
        while True:
            self.waiting = True
            try:
                async with asyncio.timeout(self._gap):
                    piece = await self._content.readany()
            except TimeoutError:
                raise self._failed(BodyStalled()) from None
            except Exception as exc:  # the client's connection or framing broke, not the upstream
                raise self._failed(BodyBroken()) from exc
            finally:
                self.waiting = False
            if not piece:
                if self._expected is not None and self._size < self._expected:
                    raise self._failed(BodyBroken())
                return
            self._size += len(piece)
            if self._size > self._limit:  # only a chunked body can outgrow what it announced
                raise self._failed(BodyTooLarge())
            yield piece

    def _failed(self, failure: BodyFailure) -> BodyFailure:
        self.failure = failure
        return failure


class BodyReader:
    """Reads each request's body the cheapest way its size allows, within both bounds. The size
    rule is the response side's (response_body.read_capped): at most `limit` bytes, one more is
    too large, and a Content-Length over it is refused before a byte is read."""

    def __init__(self, limit: int, gap: float) -> None:
        self._limit = limit
        self._gap = gap

    async def read(self, request: web.Request) -> bytes | StreamedBody | None:
        """The body whole (None when empty), or a StreamedBody; raises a BodyFailure."""
        content, length = request.content, request.content_length
        if length is not None:
            if length > self._limit:
                raise BodyTooLarge
            if length > WHOLE_BODY_BYTES:
                return StreamedBody(content, read=[], size=0, expected=length,
                                    limit=self._limit, gap=self._gap)
            if not length:
                return None
            if content.is_eof():  # it came with the head, as most do: nothing to wait for
                try:
                    return await content.readexactly(length)
                except asyncio.IncompleteReadError:
                    raise BodyBroken from None
        elif not request.body_exists:
            return None
        return await self._gather(content, length)

    async def read_small(self, request: web.Request) -> bytes:
        """A body never streamed (a public endpoint's form or JSON, with a limit of at most
        WHOLE_BODY_BYTES), whole; b"" when empty. The same bounds: a client that stops sending
        its token request or registration holds its connection no longer than a proxied one."""
        data = await self.read(request)
        if isinstance(data, StreamedBody):  # only with a limit above WHOLE_BODY_BYTES
            raise BodyTooLarge
        return data or b""

    async def _gather(self, content: StreamReader, length: int | None) -> bytes | StreamedBody:
        """Pieces until the end, each within the gap; a chunked body that outgrows
        WHOLE_BODY_BYTES goes on as a StreamedBody with what was read so far."""
        pieces: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._gap) as timer:  # one timer, pushed back per piece
                while piece := await content.readany():
                    size += len(piece)
                    if size > self._limit:
                        raise BodyTooLarge
                    pieces.append(piece)
                    if size > WHOLE_BODY_BYTES:
                        return StreamedBody(content, read=pieces, size=size, expected=length,
                                            limit=self._limit, gap=self._gap)
                    timer.reschedule(loop.time() + self._gap)
        except TimeoutError:
            raise BodyStalled from None
        if length is not None and size < length:
            raise BodyBroken
        return b"".join(pieces)


def body_refused(failure: BodyFailure) -> web.Response:
    """The client's body failed: its error, never the upstream's (and never counted as one)."""
    if isinstance(failure, BodyTooLarge):
        return json_error(413, "request_too_large", "The request body is too large")
    if isinstance(failure, BodyStalled):
        refused = json_error(408, "request_timeout", "The request body did not arrive in time")
    else:
        refused = json_error(400, "invalid_request", "The request body is incomplete")
    refused.force_close()  # where the body ends is unknown: the connection is unusable
    return refused
