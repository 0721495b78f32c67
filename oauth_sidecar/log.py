"""Structured logging: JSON lines to stdout (console on a terminal), one access line per request.

Why: operators grep and ship JSON; auditors need one canonical line per request naming who called.
Tokens and secrets must never reach a log line: nothing here is ever given the Authorization
header, and a last-resort processor masks anything shaped like a JWT or a bearer credential.
The access line, written on every request, has a prebuilt JSON rendering for its usual, plain
values (AccessLineFirst): the same line as the full chain's, at a fraction of its cost.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, TextIO

import structlog
from aiohttp import web

from oauth_sidecar.outcome import Handler, Record, handle_and_record
from oauth_sidecar.request_keys import AUTH_FAILURE, PRINCIPAL
from oauth_sidecar.secret_mask import SecretMask

REQUEST_ID = web.RequestKey("request_id", str)
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# RFC 6750 credentials of any case (a repeated scheme word, "Bearer Bearer x", is a common
# client mistake), access_token query parameters (aiohttp prints raw request lines in errors)
# and compact JWS/JWE (base64url JSON header starting with "{"). Applied in this order, each to
# the previous one's output, so no shape swallows the scheme word another one needs. A new
# shape must add a word its matches all contain to plain(), or the access line skips it.
SECRET_SHAPES = (
    re.compile(r"(?i:(?:bearer|basic)\s+)+[A-Za-z0-9\-._~+/]+=*"),
    re.compile(r"(?i:access_token)=[^&\s\"']+"),
    re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_.-]+"),
)
SECRET_KEYS = frozenset({"authorization", "token", "access_token", "client_secret", "password"})
# What a terminal or a log viewer acts on instead of showing: C0 controls (ESC opens the
# sequences that move the cursor, erase lines and set the window title; CR and LF start a line
# that looks like another record), DEL, C1 controls (0x9b is a one-character CSI, U+0085 a line
# break), the Unicode line and paragraph separators, and the bidi controls that reorder what is
# shown (CVE-2021-42574, "Trojan Source"). A path, a header or a claim can carry any of them,
# and a claim a lone surrogate (JSON's "\ud800"), which no UTF-8 stream can write: the console
# renderer's write would raise.
CONTROLS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}  # as Python writes them; others \\xNN
# Rendered tracebacks: their line breaks are their shape, so they stay (every line after the
# first indented, so no line of one can pass for a record of its own); the rest is escaped.
MULTILINE_KEYS = frozenset({"exception", "stack"})
# Added by structlog's stdlib bridge for its own use, never rendered.
META_KEYS = frozenset({"_record", "_from_structlog"})
# The access event as access_log hands it to the chain, in its order: the shape that gets the
# prebuilt line (AccessLineFirst). Any other event, or this one with an unusual value, takes the
# full chain.
ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "sub", "auth_error", "request_id",
                 "remote", "event")
Processor = Callable[[Any, str, Any], Any]
access = structlog.get_logger("oauth_sidecar.access")
_access_enabled = True  # configure_logging turns it off for LOG_LEVEL warning and above


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        for shape in SECRET_SHAPES:
            value = shape.sub("[redacted]", value)
        return value
    if isinstance(value, dict):
        return {k: "[redacted]" if str(k).lower() in SECRET_KEYS else _mask(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    return value


def redacted(value: Any) -> Any:
    """value with secret-named keys and secret-shaped strings masked, nested ones included
    (what redact() does to every log value), for a value rendered before it is logged."""
    if isinstance(value, dict):
        return {k: "[redacted]" if str(k).lower() in SECRET_KEYS else redacted(v)
                for k, v in value.items()}
    return _mask(value)


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask secret-shaped values, nested ones and rendered tracebacks included.

    A safety net, not the primary defence: nothing in the sidecar passes a token to a logger.
    It must run after exceptions are rendered, because aiohttp's "Error handling request"
    tracebacks quote raw request lines and headers.
    """
    for key, value in event.items():
        if key in ("_record", "_from_structlog"):
            continue
        event[key] = "[redacted]" if key.lower() in SECRET_KEYS else _mask(value)
    return event


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return SHORT_ESCAPES.get(char) or (f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")


def shown(text: str) -> str:
    """text with every control character written as a Python-style escape (\\x1b, \\u2028).
    A search first: most values have none, and then the same string comes back."""
    if CONTROLS.search(text) is None:
        return text
    return CONTROLS.sub(_escape_one, text)


def escaped(value: Any) -> Any:
    """value with every string in it shown(); anything not JSON-like as its escaped repr."""
    if isinstance(value, str):
        return shown(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {shown(k) if isinstance(k, str) else k: escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [escaped(v) for v in value]
    return shown(repr(value))  # what either renderer would print, escaped


def escape_controls(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Escape control characters in every key and value, nested ones included, so no client
    can move the cursor, erase or forge a log line, set a terminal's title or reorder what a
    log viewer shows, with the console renderer or the JSON one (json.dumps escapes them in the
    bytes it writes, but a viewer decodes the strings and shows them raw). Last before the
    renderer, after redaction (which must see the text as it was). On every access line: a
    plain string or number costs one check and is left where it is."""
    if CONTROLS.search("".join(event)):  # keys come from code: almost never
        event = {shown(key): value for key, value in event.items()}
    for key, value in event.items():
        if type(value) is str:
            if CONTROLS.search(value) is not None:
                event[key] = (
                    "\n  ".join(map(shown, value.split("\n"))) if key in MULTILINE_KEYS
                    else CONTROLS.sub(_escape_one, value))
        elif not (value is None or isinstance(value, bool | int | float) or key in META_KEYS):
            event[key] = escaped(value)
    return event


def plain(text: str) -> bool:
    """Would the full chain leave text exactly as it is, and json.dumps write it between quotes
    as it is? Printable ASCII without a quote or a backslash (no control character to escape,
    no non-ASCII character to write as \\uXXXX), and none of the words every SECRET_SHAPES
    match contains: "bearer", "basic", "access_token" in any case, "eyJ". Measured several
    times faster than one regular expression with the same answer."""
    if not (text.isascii() and text.isprintable()) or '"' in text or "\\" in text:
        return False
    lowered = text.lower()
    return not ("bearer" in lowered or "basic" in lowered or "access_token" in lowered
                or "eyJ" in text)


class UtcClock:
    """Now, as structlog's TimeStamper(fmt="iso", utc=True) writes it ("...T02:16:30.991105Z",
    no fraction at a whole second), the date and time of day formatted once a second: the
    access line's timestamp was its costliest part. Floored to the microsecond, as
    datetime.now is."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")  # one attribute: replaced whole, thread-safe

    def __call__(self) -> str:
        return self.at(time.time_ns())

    def at(self, ns: int) -> str:
        """The instant `ns` nanoseconds after the epoch."""
        second, micro = divmod(ns // 1000, 1_000_000)
        last, prefix = self._second
        if second != last:
            prefix = datetime.datetime.fromtimestamp(second, tz=datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%S")
            self._second = (second, prefix)
        return f"{prefix}.{micro:06d}Z" if micro else f"{prefix}Z"


TEXT_TYPES = frozenset({str, type(None)})


def access_line(fields: Sequence[Any], timestamp: str) -> str | None:
    """The access event (its values, in ACCESS_FIELDS order) with this timestamp, as the full
    JSON chain would write it; None when a value is not plain (plain(), or not a str, None, int
    or finite float where one is expected): then only the full chain knows what to write."""
    method, path, status, duration_ms, sub, auth_error, request_id, remote, event = fields
    texts = (method, path, sub, auth_error, request_id, remote, event)
    if not (TEXT_TYPES.issuperset(map(type, texts)) and type(status) is int
            and (type(duration_ms) is int
                 or (type(duration_ms) is float and math.isfinite(duration_ms)))):
        return None
    if not plain(" ".join([text for text in texts if text is not None])):
        return None  # joined by a space: no word plain() looks for can span two values
    q = ["null" if text is None else f'"{text}"' for text in texts]
    return (f'{{"method": {q[0]}, "path": {q[1]}, "status": {status}, "duration_ms": '
            f'{duration_ms!r}, "sub": {q[2]}, "auth_error": {q[3]}, "request_id": {q[4]}, '
            f'"remote": {q[5]}, "event": {q[6]}, "level": "info", "timestamp": "{timestamp}"}}')


class AccessLineFirst:
    """The structlog chain for JSON lines, with the access event's line prebuilt.

    Why: that event is logged on every request, and the full chain (redaction's regular
    expressions on every value, the control-character checks, json.dumps and its keyword
    handling) costs tens of µs for a line whose values are almost always plain. One check
    over its text values tells: when none holds anything the chain would change or json.dumps
    would escape, access_line writes the very line the chain would have written; otherwise,
    and for every other event, the full chain runs. The SecretMask applies to either line.
    `write` goes further and skips structlog's event dict for the access line (see
    write_access_line)."""

    def __init__(self, chain: Sequence[Processor], mask: SecretMask | None, stream: TextIO
                 ) -> None:
        self._chain = chain  # everything after merge_contextvars, the renderer last
        self._mask = mask or None
        self._stream = stream  # where the WriteLogger writes, the one write a line as it does
        self._clock = UtcClock()

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
                 ) -> Any:
        # Context variables first, as in the full chain: bound ones make it another shape.
        event_dict = structlog.contextvars.merge_contextvars(logger, method_name, event_dict)
        if method_name == "info" and tuple(event_dict) == ACCESS_FIELDS:
            line = access_line(tuple(event_dict.values()), self._clock())
            if line is not None:
                return self._mask(line) if self._mask else line
        result: Any = event_dict
        for processor in self._chain:
            result = processor(logger, method_name, result)
        return result

    def write(self, *fields: Any) -> bool:
        """The access line (fields as ACCESS_FIELDS but the event) written and flushed, as the
        WriteLogger would write what __call__ returns; False, nothing written, when it is not
        plain or a context variable is bound (it would be one more field)."""
        if structlog.contextvars.get_contextvars():
            return False
        line = access_line((*fields, "request"), self._clock())
        if line is None:
            return False
        # One write call a line, as the WriteLogger's and the stdlib handler's: a line written
        # from another thread (a file reload's) goes before or after this one, never inside it.
        self._stream.write((self._mask(line) if self._mask else line) + "\n")
        self._stream.flush()
        return True


def write_access_line(*fields: Any) -> bool:
    """The access line written straight to the log, when configure_logging's JSON chain is the
    one in force (structlog.testing.capture_logs and the like replace it; their loggers then
    get the event). Skips the bound logger's work: keyword arguments passed on three times, the
    context copied, the processors list walked. False: log the event through structlog."""
    processors = structlog.get_config()["processors"]
    first = processors[0] if len(processors) == 1 else None
    return isinstance(first, AccessLineFirst) and first.write(*fields)


def configure_logging(
    level: str, fmt: str, stream: TextIO | None = None, mask: SecretMask | None = None
) -> None:
    """Called once, from __main__ (never from create_app: tests capture logs their own way).

    `stream` defaults to stdout; `check` logs to stderr, keeping its report alone on stdout.
    `mask` (the configuration's secrets) is applied to every finished line, stdlib ones too;
    without secrets to mask it costs nothing."""
    stream = stream or sys.stdout
    terminal = stream.isatty()
    console = fmt == "console" or (fmt == "auto" and terminal)
    # Colours only on a terminal: a console log in a file or a pipe holds no escape sequence.
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=terminal) if console
        else structlog.processors.JSONRenderer()
    )
    if mask:
        renderer = mask.wrap(renderer)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,  # first: AccessLineFirst runs it itself
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    chain: list[Processor] = [*shared[1:], structlog.processors.format_exc_info, redact,
                              escape_controls, renderer]
    structlog.configure(
        processors=[shared[0], *chain] if console else [AccessLineFirst(chain, mask, stream)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[
            level.upper()]),
        # One write call a line (print makes two: the text, then the line break), so a line
        # written straight by AccessLineFirst.write can never land between them.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio log through the stdlib: render them the same way.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info, redact, escape_controls, renderer,
        ],
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    global _access_enabled  # noqa: PLW0603 - set once, here, before serving
    _access_enabled = logging.getLevelNamesMapping()[level.upper()] <= logging.INFO


def start_access(request: web.Request) -> Record | None:
    """Give the request its id (the client's X-Request-Id when safe) and start its access line:
    the returned record(status) writes it; None when LOG_LEVEL is above info (no timing, no
    fields). The one canonical line per request: who, what, outcome, how long; never the
    query string."""
    supplied = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID] = supplied if SAFE_REQUEST_ID.fullmatch(supplied) else os.urandom(16).hex()
    if not _access_enabled:
        return None
    started = time.perf_counter()

    def record(status: int) -> None:
        principal = request.get(PRINCIPAL)
        method, path, remote = request.method, request.path, request.remote
        duration_ms = round((time.perf_counter() - started) * 1000, 2)
        sub = principal.subject if principal else None
        auth_error, request_id = request.get(AUTH_FAILURE), request[REQUEST_ID]
        if not write_access_line(method, path, status, duration_ms, sub, auth_error, request_id,
                                 remote):
            access.info("request", method=method, path=path, status=status,
                        duration_ms=duration_ms, sub=sub, auth_error=auth_error,
                        request_id=request_id, remote=remote)

    return record


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """start_access as a middleware of its own (the app runs it inside its front door)."""
    record = start_access(request)
    if record is None:
        return await handler(request)
    return await handle_and_record(request, handler, record)


def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Before the headers go out: echo the request id so clients can quote it in bug reports."""
    request_id = request.get(REQUEST_ID)
    if request_id:
        response.headers["X-Request-Id"] = request_id
