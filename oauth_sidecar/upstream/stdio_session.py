"""One MCP session over a stdio child: which HTTP stream each of the child's messages goes to.

Why: stdio has one stream each way, HTTP has one per request plus the GET stream, so every
message the child writes must be routed: a response to the request with its id, a progress
notification to the request that asked for progress with that token, anything else (list_changed,
an elicitation, sampling or roots request) to the one request in flight if there is exactly one,
else to the GET stream, else to a backlog for the next stream. Clients' request ids are replaced
by the session's own numbers on the way in (several clients of one subject share the sessionless
child, and may all send id 1) and restored on the way out. Every queue is bounded in messages and
bytes: a client that stops reading loses its stream (logged), never the sidecar its memory; the
backlog drops its oldest message. A client that leaves before its answer makes the child receive
notifications/cancelled; a child that ends answers every pending request with an error.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from oauth_sidecar.mcp.messages import json_bytes
from oauth_sidecar.upstream.stdio_child import ChildGone, StdioChild
from oauth_sidecar.upstream.stdio_roots import roots_refusal, without_client_roots

log = structlog.get_logger("oauth_sidecar.stdio")

STREAM_MESSAGES = 1024  # messages waiting for one HTTP stream's client before it is dropped
STREAM_BYTES = 16 * 1024 * 1024  # ... and their bytes (at least two of the longest lines)
BACKLOG_MESSAGES = 256  # messages kept for a stream not yet open; the oldest go first
EXITED = -32603  # JSON-RPC internal error: the answer to a request whose child ended
EXITED_MESSAGE = "the MCP server exited"

Message = dict[str, Any]


dumps = json_bytes  # one line of the child's stdin, or one JSON answer


def is_request(message: Message) -> bool:
    return "method" in message and "id" in message


def is_response(message: Message) -> bool:
    return "method" not in message and "id" in message


class MessageQueue:
    """The messages waiting for one HTTP stream (an SSE answer or the GET stream)."""

    def __init__(self, max_bytes: int) -> None:
        self._items: collections.deque[tuple[Message, int]] = collections.deque()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._ready = asyncio.Event()
        self.closed = False

    def put(self, message: Message, size: int) -> bool:
        """False when it is full (the client stopped reading) or closed."""
        if self.closed:
            return False
        if len(self._items) >= STREAM_MESSAGES or self._bytes + size > self._max_bytes:
            return False
        self._items.append((message, size))
        self._bytes += size
        self._ready.set()
        return True

    async def get(self) -> Message | None:
        """The next message; None once it is closed and empty."""
        while not self._items:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        message, size = self._items.popleft()
        self._bytes -= size
        return message

    def empty(self) -> bool:
        return not self._items

    def close(self, *, discard: bool = False) -> None:
        if discard:
            self._items.clear()
            self._bytes = 0
        self.closed = True
        self._ready.set()


@dataclass(eq=False)
class Pending:
    """A client's request written to the child, until its response."""

    client_id: Any
    internal: int
    stream: MessageQueue | None  # None: answered as JSON, nothing else goes with it
    progress_token: Any = None
    answer: asyncio.Future[Message] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class StdioSession:
    """A child and the HTTP requests and streams of the session (or sessionless caller) it
    serves. `id` is None for a subject's sessionless child."""

    def __init__(self, session_id: str | None, identity: tuple[str, str], subject: str,
                 max_line_bytes: int, *, client_roots: bool = False) -> None:
        """client_roots: pass the client's MCP roots on (stdio_roots.py; off by default)."""
        self.id = session_id
        self.client_roots = client_roots
        self.identity = identity
        self.subject = subject
        self.child: StdioChild | None = None
        self.closed = False
        self.heard = False  # the child has written a message (it is past its start-up)
        self.last_active = time.monotonic()
        self._stream_bytes = max(STREAM_BYTES, 2 * max_line_bytes)
        self._numbers = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._streams = 0  # open HTTP streams (SSE answers and GET)
        self._listener: MessageQueue | None = None
        self._backlog: collections.deque[tuple[Message, int]] = collections.deque()

    @property
    def backlogged(self) -> int:
        """Messages waiting for the next stream."""
        return len(self._backlog)

    @property
    def busy(self) -> bool:
        return bool(self._pending) or self._streams > 0

    @property
    def state(self) -> str:
        """starting (nothing heard from the child yet), busy or idle: see stdio_pool's
        CHILD_STATES."""
        if not self.heard:
            return "starting"
        return "busy" if self.busy else "idle"

    def new_stream(self) -> MessageQueue:
        """A queue for one SSE answer; what waited in the backlog goes into it first."""
        queue = MessageQueue(self._stream_bytes)
        self._streams += 1
        self._flush_backlog(queue)
        return queue

    def open_listener(self) -> MessageQueue:
        """The GET stream; a new one replaces the old, which ends."""
        if self._listener is not None:
            self._listener.close()
        self._listener = self.new_stream()
        return self._listener

    def end_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()

    def stream_ended(self, queue: MessageQueue) -> None:
        self._streams -= 1
        if queue is self._listener:
            self._listener = None
        queue.close(discard=True)
        self.touch()

    def touch(self) -> None:
        self.last_active = time.monotonic()

    async def submit(self, messages: list[Message], stream: MessageQueue | None,
                     pendings: list[Pending]) -> None:
        """Write a POST's messages to the child; the requests among them are pending (added to
        `pendings`). Raises ChildGone: the session must then end (fail() answers them)."""
        self.touch()
        lines = []
        if not self.client_roots:
            messages = [kept for m in messages if (kept := without_client_roots(m)) is not None]
        for message in messages:
            outgoing: Message | None = message
            if is_request(message):
                pending = Pending(message["id"], next(self._numbers), stream,
                                  _progress_token(message))
                self._pending[pending.internal] = pending
                pendings.append(pending)
                outgoing = {**message, "id": pending.internal}
            elif message.get("method") == "notifications/cancelled":
                outgoing = self._cancellation(message)
            if outgoing is not None:
                lines.append(dumps(outgoing))
        child = self.child
        if child is None:
            raise ChildGone
        for line in lines:
            await child.send(line)

    def _cancellation(self, message: Message) -> Message | None:
        """The client's notifications/cancelled, naming the child's number for that request;
        None when no request of this session has that id in flight."""
        params = message.get("params")
        if not isinstance(params, dict):
            return None
        for pending in reversed(self._pending.values()):
            if pending.client_id == params.get("requestId"):
                return {**message, "params": {**params, "requestId": pending.internal}}
        return None

    def abandon(self, pendings: list[Pending], reason: str = "client disconnected") -> None:
        """Nobody waits for these any more (the client left, or the wait timed out): the child
        is told to stop working on them (it may still answer; the answer is then dropped)."""
        for pending in pendings:
            if self._pending.pop(pending.internal, None) is None or self.child is None:
                continue
            self.child.send_nowait(dumps({
                "jsonrpc": "2.0", "method": "notifications/cancelled",
                "params": {"requestId": pending.internal, "reason": reason},
            }))
        self.touch()

    def route(self, message: Message, size: int) -> None:
        """One message from the child to where it belongs (see the module's docstring)."""
        self.heard = True
        if not self.client_roots and self._refused_roots(message):
            return
        if is_response(message):
            self._answered(message, size)
            return
        if "method" not in message:
            log.debug("child_message_invalid", subject=self.subject)
            return
        params = message.get("params")
        token = params.get("progressToken") if isinstance(params, dict) else None
        if token is not None and "id" not in message:
            for pending in self._pending.values():
                if pending.progress_token == token:
                    if pending.stream is not None:
                        self._deliver(pending.stream, message, size)
                    return
            return  # progress of a request already answered: nobody waits for it
        streams = {p.stream for p in self._pending.values()}
        if len(streams) == 1 and (only := next(iter(streams))) is not None:
            self._deliver(only, message, size)
        elif self._listener is not None:
            self._deliver(self._listener, message, size)
        else:
            self._backlog.append((message, size))
            if len(self._backlog) > BACKLOG_MESSAGES:
                self._backlog.popleft()
                log.warning("session_backlog_dropped", subject=self.subject,
                            kept=BACKLOG_MESSAGES)

    def _answered(self, message: Message, size: int) -> None:
        """The child's response: to its request's stream, with the client's id back."""
        pending = self._pending.pop(message["id"], None) if isinstance(
            message["id"], int) else None
        if pending is None:
            log.debug("child_answer_unclaimed", subject=self.subject)
            return
        answer = {**message, "id": pending.client_id}
        self._deliver(pending.stream, answer, size)
        if not pending.answer.done():
            pending.answer.set_result(answer)

    def _refused_roots(self, message: Message) -> bool:
        """A roots/list request of the child's, answered here (stdio_roots.py)."""
        refusal = roots_refusal(message)
        if refusal is None:
            return False
        if self.child is not None:
            self.child.send_nowait(dumps(refusal))
        return True

    def _deliver(self, queue: MessageQueue | None, message: Message, size: int) -> None:
        if queue is None or queue.closed:
            return
        if not queue.put(message, size):
            log.warning("stream_dropped", subject=self.subject, reason="client_not_reading")
            queue.close(discard=True)

    def _flush_backlog(self, queue: MessageQueue) -> None:
        while self._backlog:
            message, size = self._backlog.popleft()
            self._deliver(queue, message, size)

    def fail(self) -> None:
        """The child ended: every pending request gets its error, every stream ends."""
        self.closed = True
        for pending in list(self._pending.values()):
            answer = {"jsonrpc": "2.0", "id": pending.client_id,
                      "error": {"code": EXITED, "message": EXITED_MESSAGE}}
            self._deliver(pending.stream, answer, 0)
            if not pending.answer.done():
                pending.answer.set_result(answer)
            if pending.stream is not None:
                pending.stream.close()
        self._pending.clear()
        if self._listener is not None:
            self._listener.close()
        self._backlog.clear()


def _progress_token(message: Message) -> Any:
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta.get("progressToken") if isinstance(meta, dict) else None
