"""Logging: one access event per request, and never a token in any log line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import FakeIdp, FakeUpstream, bearer, sidecar_env
from hypothesis import given, settings
from hypothesis import strategies as st
from processes import free_port, sidecar_process, wait_ready
from structlog.testing import capture_logs

from oauth_sidecar.log import configure_logging, redact, shown

Client = TestClient[web.Request, web.Application]

REPO = Path(__file__).resolve().parent.parent
HEX_ID = re.compile(r"[0-9a-f]{32}")
# A JWT-shaped string that is not a real token, for the processor tests.
FAKE_JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXBhcnQ"
SUBPROCESS_TIMEOUT = 15.0


def secret_parts(token: str) -> list[str]:
    """The whole token, and for JWT-shaped ones the payload and signature segments."""
    parts = [token]
    segments = token.split(".")
    if len(segments) == 3:
        parts += [s for s in segments[1:] if len(s) >= 8]
    return parts


def everything_logged(events: list[MutableMapping[str, Any]], caplog: pytest.LogCaptureFixture
                      ) -> str:
    # aiohttp.access is the test server's own access logger; production runs with access_log=None.
    stdlib = [r.getMessage() + repr(r.args) + repr(r.exc_info)
              for r in caplog.records if r.name != "aiohttp.access"]
    return repr(events) + "\n".join(stdlib)


async def test_no_token_appears_in_any_log_event(
    sidecar: Client, idp: FakeIdp, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    now = int(time.time())
    valid = idp.mint()
    expired = idp.mint(claims={"exp": now - 3600, "iat": now - 7200, "nbf": now - 7200})
    wrong_audience = idp.mint(claims={"aud": "https://other.example.test/mcp"})
    unknown_kid = idp.mint(header={"kid": "rotated-away"})
    header, payload, signature = idp.mint().split(".")
    bad_signature = f"{header}.{payload}.{signature[::-1]}"
    malformed = f"{header}.{payload}"
    garbage = "garbage-" + uuid.uuid4().hex
    basic = "dXNlcjpzdXBlci1zZWNyZXQtcGFzc3dvcmQ="
    tokens = [valid, expired, wrong_audience, unknown_kid, bad_signature, malformed, garbage]

    caplog.set_level(logging.DEBUG)
    with capture_logs() as events:
        for token in tokens:
            await sidecar.post("/mcp", data=b"{}", headers=bearer(token))
            await sidecar.get("/mcp", headers={"Authorization": f"bearer  {token} "})
        await sidecar.get(f"/mcp?access_token={valid}")
        await sidecar.get(f"/mcp?access_token={valid}&x=1", headers=bearer(valid))
        await sidecar.get(f"/healthz?token={garbage}")
        await sidecar.post("/mcp", headers={"Authorization": f"Basic {basic}"})
        await sidecar.post("/mcp", headers={"Cookie": f"access_token={valid}"})
        await sidecar.post("/mcp", headers=[("Authorization", f"Bearer {valid}"),
                                            ("Authorization", f"Bearer {garbage}")])
    logged = everything_logged(events, caplog)
    assert len([e for e in events if e["event"] == "request"]) == 2 * len(tokens) + 6
    for token in [*tokens, basic]:
        for part in secret_parts(token):
            assert part not in logged, f"token material in logs: {part[:12]}..."


async def test_access_event_is_emitted_once_per_request_with_its_fields(
    sidecar: Client, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    now = int(time.time())
    expired = idp.mint(claims={"exp": now - 3600, "iat": now - 7200, "nbf": now - 7200})
    # (method, target, headers, status, auth_error, sub)
    cases: list[tuple[str, str, dict[str, str], int, str | None, str | None]] = [
        ("POST", "/mcp?session=abc", bearer(idp.mint()), 200, None, "user-1"),
        ("GET", "/mcp", bearer(idp.mint(claims={"sub": "user-2"})), 200, None, "user-2"),
        ("POST", "/mcp", bearer(expired), 401, "expired", None),
        ("POST", "/mcp", bearer("not-a-jwt"), 401, "malformed", None),
        ("POST", "/mcp", {}, 401, "missing", None),
        ("POST", "/mcp", {"Authorization": "Basic dTpw"}, 401, "not_bearer", None),
        ("GET", "/mcp?access_token=abc", {}, 400, "token_in_query", None),
        ("GET", "/healthz?probe=1", {}, 200, None, None),
        ("DELETE", "/readyz", {}, 405, None, None),
    ]
    with capture_logs() as events:
        ids = []
        for i, (method, target, headers, status, _, _) in enumerate(cases):
            request_id = f"case-{i}"
            response = await sidecar.request(
                method, target, headers={**headers, "X-Request-Id": request_id}
            )
            assert response.status == status, (method, target)
            assert response.headers["X-Request-Id"] == request_id
            ids.append(request_id)
    access = [e for e in events if e["event"] == "request"]
    assert len(access) == len(cases)
    by_id = {e["request_id"]: e for e in access}
    assert sorted(by_id) == sorted(ids)
    for request_id, (method, target, _, status, auth_error, sub) in zip(ids, cases, strict=True):
        event = by_id[request_id]
        assert event["log_level"] == "info"
        assert event["method"] == method
        assert event["path"] == target.partition("?")[0]  # never the query string
        assert event["status"] == status
        assert event["auth_error"] == auth_error
        assert event["sub"] == sub
        assert isinstance(event["duration_ms"], float | int)
        assert event["duration_ms"] >= 0
        assert event["remote"] == "127.0.0.1"
    assert all("?" not in str(e["path"]) for e in access)


@pytest.mark.parametrize(
    "supplied", ["has space", "x" * 129, "<script>", "a/b", "ünïcode", "id;drop"]
)
async def test_unsafe_request_id_is_replaced(sidecar: Client, supplied: str) -> None:
    with capture_logs() as events:
        response = await sidecar.get("/healthz", headers={"X-Request-Id": supplied})
    echoed = response.headers["X-Request-Id"]
    assert echoed != supplied
    assert HEX_ID.fullmatch(echoed)
    [event] = [e for e in events if e["event"] == "request"]
    assert event["request_id"] == echoed


async def test_request_id_is_generated_when_absent_and_unique(sidecar: Client) -> None:
    first = (await sidecar.post("/mcp")).headers["X-Request-Id"]
    second = (await sidecar.get("/healthz")).headers["X-Request-Id"]
    assert HEX_ID.fullmatch(first)
    assert HEX_ID.fullmatch(second)
    assert first != second


async def test_safe_request_id_is_kept_on_refusals_too(sidecar: Client) -> None:
    supplied = "Abc-123_x.y:z"
    for response in (await sidecar.post("/mcp", headers={"X-Request-Id": supplied}),
                     await sidecar.put("/healthz", headers={"X-Request-Id": supplied})):
        assert response.headers["X-Request-Id"] == supplied


# -- the redaction processor ---------------------------------------------------------------------


def run_redact(**event: Any) -> MutableMapping[str, Any]:
    return redact(None, "info", {"event": "test", **event})


@pytest.mark.parametrize(
    "value",
    [
        FAKE_JWT,
        f"token was {FAKE_JWT}, refused",
        f"b'GET /mcp?access_token={FAKE_JWT} HTTP/1.1'",
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",  # unsigned JWT
        "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d",  # JWE
        "Authorization: Bearer opaque-token.value~1",
        "bearer abc123",
        "Bearer\tabc123",
        "Basic dXNlcjpwYXNzd29yZA==",
    ],
)
def test_redact_masks_jwt_and_credential_shapes(value: str) -> None:
    event = run_redact(detail=value)
    assert "[redacted]" in event["detail"]
    for secret in ("c2lnbmF0dXJl", "opaque-token", "abc123", "dXNlcjpwYXNzd29yZA", "eyJzdWIi",
                   "YS5i"):
        assert secret not in event["detail"]


@pytest.mark.parametrize(
    "key", ["token", "access_token", "Authorization", "client_secret", "password"]
)
def test_redact_masks_secret_named_fields_whatever_their_value(key: str) -> None:
    assert run_redact(**{key: "plain"})[key] == "[redacted]"


def test_redact_leaves_ordinary_fields_alone() -> None:
    event = run_redact(path="/mcp", status=401, sub="user-1", reason="expired", note="ok")
    assert event == {"event": "test", "path": "/mcp", "status": 401, "sub": "user-1",
                     "reason": "expired", "note": "ok"}


@pytest.mark.parametrize("value", ["BEARER abc123", "Authorization: BASIC abc123"])
def test_redact_masks_upper_case_schemes(value: str) -> None:
    assert "abc123" not in run_redact(detail=value)["detail"]


def test_redact_masks_nested_values() -> None:
    event = run_redact(headers={"authorization": "Bearer abc123"}, items=[f"x {FAKE_JWT}"])
    assert "abc123" not in repr(event)
    assert "c2lnbmF0dXJl" not in repr(event)


# -- the production logging set-up (a subprocess: configure_logging changes global state) ---------

EXCEPTION_SCRIPT = f"""
import logging
import structlog
from oauth_sidecar.log import configure_logging
configure_logging("info", "json")
try:
    raise ValueError("rejected token {FAKE_JWT}")
except ValueError:
    structlog.get_logger("t").exception("boom")
    logging.getLogger("aiohttp.server").exception("Error handling request")
"""


def run_python(script: str) -> str:
    result = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", script], capture_output=True, text=True, check=False,
        timeout=SUBPROCESS_TIMEOUT, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr  # say why, if the interpreter failed
    return result.stdout


@pytest.mark.slow
def test_configured_logging_renders_json_and_redacts_messages() -> None:
    stdout = run_python(f"""
import logging
import structlog
from oauth_sidecar.log import configure_logging
configure_logging("info", "json")
structlog.get_logger("t").info("seen", detail="Bearer {FAKE_JWT}")
structlog.get_logger("t").debug("hidden")
logging.getLogger("aiohttp.server").warning("bad request %s", "{FAKE_JWT}")
""")
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [line["event"] for line in lines] == ["seen", "bad request [redacted]"]
    assert lines[0]["detail"] == "[redacted]"
    assert lines[1]["logger"] == "aiohttp.server"
    assert "c2lnbmF0dXJl" not in stdout


@pytest.mark.slow
def test_exception_text_is_redacted() -> None:
    stdout = run_python(EXCEPTION_SCRIPT)
    assert stdout.count("\n") == 2
    assert "c2lnbmF0dXJl" not in stdout




async def send_raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.slow
async def test_malformed_requests_carrying_a_token_do_not_log_it(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    port = free_port()
    env = sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(port), LOG_FORMAT="json")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "oauth_sidecar", env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    token = idp.mint()
    failure: OSError | None = None
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while True:
            try:
                await send_raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                               b"Connection: close\r\n\r\n")
                break
            except OSError:
                assert time.monotonic() < deadline, "sidecar did not start"
                await asyncio.sleep(0.05)
        for request in (
            f"GET /mcp?access_token={token}\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
            f"GET /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\x7f\r\n\r\n",
            f"GET /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}{'a' * 40000}\r\n\r\n",
        ):
            assert (await send_raw(port, request.encode("latin-1"))).startswith(b"HTTP/1.")
    except OSError as exc:  # the sidecar went away: say why below
        failure = exc
    finally:
        proc.terminate()
        stdout, stderr = await asyncio.wait_for(proc.communicate(), SUBPROCESS_TIMEOUT)
    if failure is not None:
        pytest.fail(f"{failure!r}; the sidecar exited {proc.returncode}: {stderr.decode()[-3000:]}")
    text = stdout.decode()
    assert "request_malformed" in text  # the malformed requests were logged ...
    for part in secret_parts(token):
        assert part not in text  # ... but never with the token in them


# -- control characters: no log line can be forged -------------------------------------------------

# Every character a terminal or a log viewer acts on, spelled out here independently of log.py.
RAW_CONTROL = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# Moves up a line and erases it, sets the window title (OSC ... BEL), then a line separator, a
# right-to-left override, NEL and a one-character CSI: no space, quote, "=", CR or LF in it, so
# the console renderer has no reason of its own to quote it.
FORGERY = "\x1b[1A\x1b[2K\x1b]0;pwned\x07\u2028\u202eevil\x85\x9b31m"
RECORD_START = re.compile(r"\d{4}-\d\d-\d\dT")  # every record begins with its timestamp
TRACEBACK = "Traceback (most recent call last):"  # the console renderer's own line after it


def decoded_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *decoded_strings(v)]]
    if isinstance(value, list):
        return [s for item in value for s in decoded_strings(item)]
    return []


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["console", "json"])
async def test_escape_sequences_from_paths_headers_and_claims_reach_no_log_line_raw(
    idp: FakeIdp, upstream: FakeUpstream, log_format: str
) -> None:
    """`curl -g 'http://host/%1b[1A%1b[2K...'` needs no token: the access line carries the path.
    A signed-in user's claims (sub) reach it too, and a raw header breaks the parser's line."""
    port = free_port()
    env = sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(port), LOG_FORMAT=log_format)
    token = idp.mint(claims={"sub": FORGERY})
    path = "/mcp/" + quote(FORGERY, safe="")
    raw_forgery = FORGERY.encode("utf-8")
    requests = [
        f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode(),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: " + raw_forgery + b"\r\nX-Request-Id: "
        + raw_forgery + b"\r\nConnection: close\r\n\r\n",
        b"GET /" + raw_forgery + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ]
    timeout = aiohttp.ClientTimeout(total=SUBPROCESS_TIMEOUT, sock_connect=1)
    async with sidecar_process(env) as proc, aiohttp.ClientSession(timeout=timeout) as session:
        await wait_ready(session, f"http://127.0.0.1:{port}", proc)
        answers = [await send_raw(port, request) for request in requests]
        proc.terminate()
        stdout, _ = await asyncio.wait_for(proc.communicate(), SUBPROCESS_TIMEOUT)
    assert [answer[9:12] for answer in answers] == [b"401", b"200", b"400", b"400"]
    text = stdout.decode()
    assert "\x1b[2K" not in text
    assert not RAW_CONTROL.search(text), RAW_CONTROL.findall(text)
    lines = text.splitlines()
    if log_format == "json":
        events = [json.loads(line) for line in lines]  # one record a line, none forged or split
        for value in decoded_strings(events):  # what a log viewer shows
            assert not RAW_CONTROL.search(value), value
        access = [e for e in events if e["event"] == "request" and e["path"].startswith("/mcp/")]
        shown_text = "\n".join(decoded_strings(events))
    else:
        assert all(RECORD_START.match(line) for line in lines)  # none forged or split
        access = [{"line": line} for line in lines if " request " in line and "/mcp/" in line]
        shown_text = text
    assert len(access) == 2  # the path without a token, the path and the sub with one
    # Both are there, escaped: the path twice, the sub once.
    assert shown_text.count(
        "\\x1b[1A\\x1b[2K\\x1b]0;pwned\\x07\\u2028\\u202eevil\\x85\\x9b31m") == 3


def test_values_without_control_characters_come_back_as_they_are() -> None:
    for value in ("/mcp", "user-1", "ünïcödé ✓", "a\\x1b is already escaped text"):
        assert shown(value) is value


@contextmanager
def configured(log_format: str) -> Iterator[io.StringIO]:
    """configure_logging in this process, writing to a buffer; everything put back after."""
    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure_logging("info", log_format, stream)
        yield stream
    finally:
        structlog.configure(**saved)
        root.handlers, root.level = handlers, level  # "info" left access logging on


def test_a_lone_surrogate_is_escaped_and_never_breaks_a_console_line() -> None:
    """A claim may hold one (JSON's "\\ud800"); a UTF-8 stream cannot write it raw, so the
    console renderer's write would raise (a 500 from the access log)."""
    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    try:
        configure_logging("info", "console", stream)
        structlog.get_logger("oauth_sidecar.access").info(
            "request", method="GET", path="/mcp", status=200, sub="a\ud800b", auth_error=None)
    finally:
        structlog.configure(**saved)
        root.handlers, root.level = handlers, level
    assert "a\\ud800b" in raw.getvalue().decode("utf-8")


TEXT = st.text(st.characters(codec=None, exclude_categories=["Cs"]), max_size=12) | (
    st.lists(st.sampled_from(["\x1b[2K", "\r", "\n", "\u2028", "\u202e", "\x85", "\x9b", "\x00",
                              "\x7f", "\t", "plain", " "]), max_size=6).map("".join))


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(key=TEXT, value=TEXT, nested=TEXT)
def test_no_control_character_reaches_a_rendered_line_whatever_the_text(
    key: str, value: str, nested: str
) -> None:
    """The production configuration, both renderers: a text anywhere in an event (the event
    itself, a value, a key of a nested dict, a list item, an exception message, a stdlib
    record's arguments) comes out with no raw control character, and each record is one line
    (a traceback's own lines indented)."""
    for log_format in ("console", "json"):
        with configured(log_format) as stream:
            logger = structlog.get_logger("property")
            logger.info(value, detail=value, nested={nested: [value, {key: nested}]})
            try:
                raise ValueError(value)
            except ValueError:
                logger.exception("failed", detail=key)
                logging.getLogger("aiohttp.server").exception("bad %s", value)
        text = stream.getvalue()
        assert not RAW_CONTROL.search(text), (log_format, text)
        lines = text.splitlines()
        if log_format == "json":
            events = [json.loads(line) for line in lines]
            assert len(events) == 3
            for shown_value in decoded_strings(events):  # a traceback keeps its line breaks
                assert not RAW_CONTROL.search(shown_value), shown_value
        else:
            assert len([line for line in lines if RECORD_START.match(line)]) == 3, repr(text)
            assert all(RECORD_START.match(line) or line.startswith((" ", TRACEBACK))
                       for line in lines), repr(text)
