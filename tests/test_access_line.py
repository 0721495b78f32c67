"""The access line's prebuilt rendering: the same line the full chain writes, whatever the values.

log.AccessLineFirst writes the access event without the processor chain when its values are
plain. These tests hold it to the chain it replaces (the one configure_logging built before it):
same keys, same order, same text, redaction, escaping and the SecretMask included; and they read
real access lines from a running sidecar.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import structlog
from conftest import FakeIdp, FakeUpstream, bearer, sidecar_env
from hypothesis import given, settings
from hypothesis import strategies as st
from processes import PROCESS_TIMEOUT, free_port, sidecar_process, wait_ready
from structlog.testing import capture_logs

from oauth_sidecar.log import (
    ACCESS_FIELDS,
    SECRET_SHAPES,
    UtcClock,
    configure_logging,
    escape_controls,
    plain,
    redact,
    write_access_line,
)
from oauth_sidecar.secret_mask import MARK, SecretMask

FAKE_JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXBhcnQ"
CREDENTIAL = "opaque-credential-0123456789"
SECRET = "sidecar-state-secret-0123456789abcdef"  # a STATE_SECRET: the sidecar's own
LINE_KEYS = [*ACCESS_FIELDS, "level", "timestamp"]
TIMESTAMP = re.compile(r'"timestamp": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?Z"')
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?Z")


def reference_chain(mask: SecretMask) -> list[Any]:
    """The JSON chain configure_logging built before the access line had its own rendering."""
    return [
        structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info, redact, escape_controls,
        mask.wrap(structlog.processors.JSONRenderer()),
    ]


def reference_line(mask: SecretMask, fields: tuple[Any, ...]) -> str:
    event: Any = dict(zip(ACCESS_FIELDS, fields, strict=True))
    for processor in reference_chain(mask):
        event = processor(None, "info", event)
    assert isinstance(event, str)
    return event


def untimed(line: str) -> str:
    """The line with its timestamp (the one value two renderings cannot share) blanked."""
    assert len(TIMESTAMP.findall(line)) == 1, line
    return TIMESTAMP.sub('"timestamp": "T"', line)


@contextmanager
def configured(mask: SecretMask) -> Iterator[io.StringIO]:
    """configure_logging("info", "json") in this process, writing to a buffer; put back after."""
    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure_logging("info", "json", stream, mask)
        yield stream
    finally:
        structlog.configure(**saved)
        root.handlers, root.level = handlers, level  # "info" left access logging on


PLAIN_FIELDS = ("POST", "/mcp", 200, 1.25, "user-1", None, "0f8e2c7a9b1d4e3f", "127.0.0.1")
TEXT_POSITIONS = (0, 1, 4, 5, 6, 7)
# Every kind of text the chain changes or json.dumps escapes: secret shapes in each spelling,
# controls, non-ASCII, quotes, the sidecar's own secret.
HOSTILE = [
    f"/mcp/{FAKE_JWT}", f"/x/Bearer {CREDENTIAL}", f"BASIC  {CREDENTIAL}", f"bEaReR\t{CREDENTIAL}",
    f"access_token={CREDENTIAL}", f"ACCESS_TOKEN={CREDENTIAL}", "/mcp/\x1b[2K", "a\u2028b",
    "\u202eevil", "ünïcödé", 'say "hi"', "back\\slash", "\x85", "\x9b", "a\tb", "\x7f", "\x00",
    f"/mcp/{SECRET}", f"x{SECRET}y", "eyJ", "bearer", "basic", "access_token",
]
# Texts as a request can bring them: plain ones (the usual case) and hostile ones.
TEXTS = st.none() | st.sampled_from(
    ["", "/mcp", "POST", "user-1", "127.0.0.1", "0f8e2c7a9b1d4e3f", "request", "expired",
     *HOSTILE]) | st.text(max_size=12)
STATUSES = st.integers(100, 599) | st.sampled_from([True, None, "200"])
DURATIONS = (st.floats(0, 1e6).map(lambda d: round(d, 2)) | st.integers(0, 10**6)
             | st.sampled_from([float("nan"), float("inf"), None, "1.5"]))


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(method=TEXTS, path=TEXTS, status=STATUSES, duration=DURATIONS, sub=TEXTS,
       auth_error=TEXTS, request_id=TEXTS, remote=TEXTS)
def test_the_access_line_is_the_full_chains_line_whatever_the_values(  # noqa: PLR0917 - the fields
    method: Any, path: Any, status: Any, duration: Any, sub: Any, auth_error: Any,
    request_id: Any, remote: Any,
) -> None:
    """Both ways the access line is written (by the configured chain's processor, and straight
    to the stream) give the old chain's line, byte for byte but the timestamp: when the values
    are not plain, the direct way declines and the chain writes it."""
    fields = (method, path, status, duration, sub, auth_error, request_id, remote)
    mask = SecretMask([SECRET])
    expected = untimed(reference_line(mask, (*fields, "request")))
    with configured(mask) as stream:
        processor = structlog.get_config()["processors"][0]
        event = dict(zip(ACCESS_FIELDS, (*fields, "request"), strict=True))
        assert untimed(processor(None, "info", event)) == expected
        if write_access_line(*fields):
            assert untimed(stream.getvalue()) == expected + "\n"
        else:
            assert stream.getvalue() == ""
            structlog.get_logger("oauth_sidecar.access").info(
                "request", **dict(zip(ACCESS_FIELDS, fields, strict=False)))
            assert untimed(stream.getvalue()) == expected + "\n"
    assert SECRET not in expected
    assert FAKE_JWT.rsplit(".", 1)[-1] not in expected
    assert CREDENTIAL not in expected


def test_one_hostile_text_among_plain_ones_gets_the_full_chains_treatment() -> None:
    """Each hostile text in each text field of an otherwise plain line (the random mixes above
    seldom leave one hostile value alone): the old chain's line, secrets masked."""
    mask = SecretMask([SECRET])
    with configured(mask) as stream:
        for position in TEXT_POSITIONS:
            for text in HOSTILE:
                fields = list(PLAIN_FIELDS)
                fields[position] = text
                expected = untimed(reference_line(mask, (*fields, "request")))
                for secret in (SECRET, CREDENTIAL, FAKE_JWT.rsplit(".", 1)[-1]):
                    assert secret not in expected
                if not write_access_line(*fields):
                    structlog.get_logger("oauth_sidecar.access").info(
                        "request", **dict(zip(ACCESS_FIELDS, fields, strict=False)))
                assert untimed(stream.getvalue()) == expected + "\n", (position, text)
                stream.seek(0)
                stream.truncate()


def test_plain_values_take_the_direct_way_and_others_do_not() -> None:
    plain = PLAIN_FIELDS
    with configured(SecretMask([SECRET])):
        assert write_access_line(*plain)
        for position, value in [(1, f"/mcp/{FAKE_JWT}"), (1, "/\x1b"), (4, "ü"), (6, "a\"b"),
                                (2, True), (3, float("nan"))]:
            changed: list[Any] = list(plain)
            changed[position] = value
            assert not write_access_line(*changed), value


def test_a_bound_context_variable_sends_the_line_through_the_chain() -> None:
    """A bound context variable is one more field: only the chain (merge_contextvars) adds it."""
    with configured(SecretMask()) as stream, structlog.contextvars.bound_contextvars(tenant="t1"):
        assert not write_access_line("GET", "/mcp", 200, 0.5, None, None, "id-1", "127.0.0.1")
        fields = ("GET", "/mcp", 200, 0.5, None, None, "id-1", "127.0.0.1", "request")
        processor = structlog.get_config()["processors"][0]
        line = json.loads(processor(None, "info", dict(zip(ACCESS_FIELDS, fields, strict=True))))
        assert line["tenant"] == "t1"
        assert stream.getvalue() == ""


def test_captured_logs_get_the_access_event_even_when_logging_is_configured() -> None:
    """capture_logs replaces the configured processors: the direct way must notice it."""
    with configured(SecretMask()) as stream, capture_logs() as events:
        assert not write_access_line("GET", "/mcp", 200, 0.5, None, None, "id-1", "127.0.0.1")
    assert stream.getvalue() == ""
    assert events == []  # the caller (access_log) logs it through structlog then


@pytest.mark.parametrize("ns", [
    0, 1_000, 999, 1_764_988_590_000_000_000, 1_764_988_590_000_001_000, 1_764_988_590_123_456_789,
    1_709_164_799_999_999_999, 1_709_164_800_000_000_000,  # the last ns of 2024-02-28, then 29th
    4_102_444_799_999_999_000,
])
def test_the_clock_writes_what_the_timestampers_datetime_writes(ns: int) -> None:
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    expected = (epoch + datetime.timedelta(microseconds=ns // 1000)).isoformat()
    clock = UtcClock()
    assert clock.at(ns) == expected.replace("+00:00", "Z")
    assert clock.at(ns) == expected.replace("+00:00", "Z")  # the cached second


def test_the_clock_tells_the_time() -> None:
    before = datetime.datetime.now(tz=datetime.UTC)
    stamp = UtcClock()()
    after = datetime.datetime.now(tz=datetime.UTC)
    assert ISO_UTC.fullmatch(stamp)
    assert before <= datetime.datetime.fromisoformat(stamp) <= after


# -- real access lines from a running sidecar ------------------------------------------------


@pytest.mark.slow
async def test_a_running_sidecars_access_lines_have_their_fields_and_nothing_secret(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    port = free_port()
    env = sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(port), LOG_FORMAT="json",
                      STATE_SECRET=SECRET)
    base = f"http://127.0.0.1:{port}"
    escape = "\x1b[1A\x1b[2K\u2028"
    hostile_sub = escape + FAKE_JWT
    agent = f"Bearer {CREDENTIAL} {FAKE_JWT} {SECRET}"
    # (method, target, headers, expected fields but the duration and the timestamp)
    cases: list[tuple[str, str, dict[str, str], dict[str, Any]]] = [
        ("POST", "/mcp?session=abc", {**bearer(idp.mint()), "X-Request-Id": "case-ok"},
         {"path": "/mcp", "status": 200, "sub": "user-1", "auth_error": None}),
        ("POST", "/mcp", {"X-Request-Id": "case-refused"},
         {"path": "/mcp", "status": 401, "sub": None, "auth_error": "missing"}),
        ("GET", f"/mcp/{quote(escape + FAKE_JWT)}?access_token={FAKE_JWT}&q=%1b",
         {"User-Agent": agent, "X-Request-Id": "case-jwt"},
         {"path": "/mcp/\\x1b[1A\\x1b[2K\\u2028[redacted]", "status": 400, "sub": None,
          "auth_error": "token_in_query"}),
        ("GET", f"/mcp/{quote(f'Bearer {CREDENTIAL}')}/ünï?token={CREDENTIAL}",
         {"User-Agent": agent, "X-Request-Id": "case-bearer"},
         {"path": "/mcp/[redacted]ünï", "status": 401, "sub": None, "auth_error": "missing"}),
        ("POST", "/mcp", {**bearer(idp.mint(claims={"sub": hostile_sub})),
                          "X-Request-Id": "case-claims"},
         {"path": "/mcp", "status": 200, "sub": "\\x1b[1A\\x1b[2K\\u2028[redacted]",
          "auth_error": None}),
        ("GET", f"/mcp/{SECRET}?x={SECRET}", {"User-Agent": agent, "X-Request-Id": "case-secret"},
         {"path": f"/mcp/{MARK}", "status": 401, "sub": None, "auth_error": "missing"}),
        ("GET", "/healthz", {"X-Request-Id": SECRET},  # a secret as the request id: masked too
         {"path": "/healthz", "status": 200, "sub": None, "auth_error": None,
          "request_id": MARK}),
        ("GET", "/healthz", {"X-Request-Id": FAKE_JWT},  # an id of the allowed characters
         {"path": "/healthz", "status": 200, "sub": None, "auth_error": None,
          "request_id": "[redacted]"}),
    ]
    timeout = aiohttp.ClientTimeout(total=PROCESS_TIMEOUT, sock_connect=1)
    async with sidecar_process(env) as proc, aiohttp.ClientSession(timeout=timeout) as session:
        await wait_ready(session, base, proc)
        for method, target, headers, expected in cases:
            async with session.request(method, base + target, headers=headers, data=b"{}"
                                       if method == "POST" else None) as response:
                assert response.status == expected["status"], target
        proc.terminate()
        stdout, _ = await asyncio.wait_for(proc.communicate(), PROCESS_TIMEOUT)
    text = stdout.decode()
    lines = [json.loads(line) for line in text.splitlines()]
    access = [line for line in lines if line["event"] == "request"
              and line["path"] not in ("/readyz",)]
    assert len(access) == len(cases), access
    for line, (method, _, headers, expected) in zip(access, cases, strict=True):
        assert list(line) == LINE_KEYS  # the same keys, in the same order
        assert ISO_UTC.fullmatch(line["timestamp"])
        assert isinstance(line["duration_ms"], float)
        assert line["duration_ms"] >= 0
        want = {"method": method, "request_id": headers["X-Request-Id"], "remote": "127.0.0.1",
                "event": "request", "level": "info", **expected}
        assert {k: v for k, v in line.items() if k not in ("duration_ms", "timestamp")} == want
    for needle in (SECRET, CREDENTIAL, FAKE_JWT.rsplit(".", 1)[-1], "\x1b"):
        assert needle not in text, needle


# The texts plain() could pass: any other one it refuses for its characters alone.
PRINTABLE_ASCII = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_no_text_a_secret_shape_matches_is_plain(data: st.DataObject) -> None:
    """plain() lets a text skip redaction: every shape's matches must contain a word it checks
    (a new shape without one fails here)."""
    for shape in SECRET_SHAPES:
        text = data.draw(st.from_regex(shape, fullmatch=True, alphabet=PRINTABLE_ASCII))
        assert not plain(text), (shape.pattern, text)
