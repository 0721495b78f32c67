"""No blocking call on the event loop, proven without a stopwatch.

Why: one blocking call on the loop (a file read, a DNS lookup, a sleep, a child process) stalls
every request and every open SSE stream at once, and a shared, noisy machine makes timing-based
checks flaky. So the real sidecar runs with the loop in asyncio debug mode and a PEP 578 audit
hook that records, on the loop's own thread only, the audit events that mean blocking I/O or a
blocking wait. Realistic traffic then goes through it and the record must stay empty; asyncio's
debug-mode errors (a task destroyed while pending, an unclosed transport, an exception nobody
retrieved) must not be logged and no warning (a coroutine never awaited) may be raised. Control
tests prove both checks can fail.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import FakeIdp, FakeUpstream, SidecarFactory, bearer, new_rsa

Client = TestClient[web.Request, web.Application]

# Audit events meaning blocking I/O or a blocking wait, each checked to be raised by CPython 3.11
# (https://docs.python.org/3.11/library/audit_events.html). Not counted: socket.__new__,
# socket.connect, socket.bind, socket.sendto — asyncio raises them on the loop thread for its own
# non-blocking sockets. loop.getaddrinfo() runs socket.getaddrinfo in an executor thread, which
# the thread filter leaves out, as it should.
BLOCKING_EVENTS = frozenset({
    "open",  # open(), io.open, os.open, Path.read_text, io.open_code (so imports too)
    "time.sleep",  # raised by CPython itself only from 3.13 (gh-108294); see _sleep_audited
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
    "subprocess.Popen", "os.system", "os.posix_spawn", "os.fork",
    "sqlite3.connect",
    "os.listdir", "os.scandir", "glob.glob", "os.mkdir", "os.rmdir", "os.remove", "os.rename",
    "os.truncate", "tempfile.mkstemp", "tempfile.mkdtemp",
})  # fmt: skip
BLOCKING_PREFIXES = ("shutil.",)  # shutil.copyfile, shutil.rmtree, shutil.make_archive, ...
TIME_SLEEP_AUDITED = sys.version_info >= (3, 13)
FRAMES_SHOWN = 24  # enough to see which library made the call
TRAFFIC_TIMEOUT = 60.0  # seconds, for a whole scenario; each step is far quicker
STEP_TIMEOUT = 10.0  # seconds, for one bounded wait inside a scenario
PRM_PATHS = ("/.well-known/oauth-protected-resource",
             "/.well-known/oauth-protected-resource/mcp")
# A JSON-RPC body as an MCP client sends it.
INITIALIZE = b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}'
MCP_HEADERS = {"Content-Type": "application/json",
               "Accept": "application/json, text/event-stream"}


@dataclass
class _AuditState:
    """What the one process-wide hook reads. Audit hooks cannot be removed (PEP 578), so the
    hook is installed once, on first use, and does nothing unless `thread` names a thread."""

    installed: bool = False
    thread: int | None = None
    events: list[str] = field(default_factory=list)


_STATE = _AuditState()
_EXTRACT_STACK_CODE = traceback.extract_stack.__code__
_CALLBACK_CODE = asyncio.events.Handle._run.__code__


def _where() -> str:
    """The Python frames that raised the event, innermost first, without reading any source
    (traceback's line lookup would open files and re-enter the hook)."""
    frame: FrameType | None = sys._getframe(2)  # skip _where and the hook
    parts: list[str] = []
    while frame is not None and len(parts) < FRAMES_SHOWN:
        code = frame.f_code
        parts.append(f"{code.co_name} ({os.path.basename(code.co_filename)}:{frame.f_lineno})")
        if code is _CALLBACK_CODE:  # the loop called this callback: what lies below is asyncio's
            break
        frame = frame.f_back
    return " <- ".join(parts)


def _debug_mode_stack_capture() -> bool:
    """True inside traceback.extract_stack(): in debug mode CPython 3.11's C Future and Task
    record where they were created with it, and it reads source lines through linecache (an
    open() of each source file the first time it appears in a stack). That is the measuring
    instrument's own I/O, not the sidecar's; nothing in the sidecar calls extract_stack."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _EXTRACT_STACK_CODE:
            return True
        frame = frame.f_back
    return False


def _audit_hook(event: str, args: tuple[object, ...]) -> None:
    # Runs for every audit event in the process for the rest of the session: stay cheap, and
    # never raise (an exception here would abort the audited operation).
    if _STATE.thread != threading.get_ident():
        return
    if event in BLOCKING_EVENTS or event.startswith(BLOCKING_PREFIXES):
        if event == "open" and _debug_mode_stack_capture():
            return
        detail = repr(args[0]) if args else ""
        _STATE.events.append(f"{event} {detail[:200]} at {_where()}")


def _sleep_audited(real: Callable[[float], None]) -> Callable[[float], None]:
    """Python 3.11 and 3.12 raise no time.sleep event: emulate the 3.13 one for callers that
    look up `time.sleep` when they call it (not for an earlier `from time import sleep`)."""

    def sleep(seconds: float) -> None:
        sys.audit("time.sleep", seconds)
        real(seconds)

    return sleep


@contextmanager
def blocking_calls_on_this_thread() -> Iterator[list[str]]:
    """Records blocking calls made on the calling thread (the event loop's) while open."""
    if not _STATE.installed:
        sys.addaudithook(_audit_hook)
        _STATE.installed = True
    with pytest.MonkeyPatch.context() as patch:
        if not TIME_SLEEP_AUDITED:
            patch.setattr(time, "sleep", _sleep_audited(time.sleep))
        events: list[str] = []
        _STATE.events = events
        _STATE.thread = threading.get_ident()
        try:
            yield events
        finally:
            _STATE.thread = None


@dataclass
class LoopWatch:
    blocking: list[str]
    warned: list[warnings.WarningMessage]
    caplog: pytest.LogCaptureFixture

    def asyncio_errors(self) -> list[str]:
        return [record.getMessage() for record in self.caplog.records
                if record.name == "asyncio" and record.levelno >= logging.ERROR]


@asynccontextmanager
async def watching_the_loop(caplog: pytest.LogCaptureFixture) -> AsyncIterator[LoopWatch]:
    """asyncio debug mode, warnings recorded, asyncio's log captured and blocking calls on the
    loop thread recorded, for the duration of the block; the loop's debug flag is restored."""
    loop = asyncio.get_running_loop()
    # asyncio's default exception handler is what logs debug-mode errors to "asyncio".
    assert loop.get_exception_handler() is None
    caplog.set_level(logging.DEBUG, logger="asyncio")
    gc.collect()  # garbage of earlier tests is theirs: finalise it before watching
    was_debug = loop.get_debug()
    loop.set_debug(True)
    # Under `filterwarnings = error` a warning raised in a finaliser (a coroutine never awaited,
    # an unclosed transport's ResourceWarning) cannot propagate: it becomes an "unraisable"
    # that pytest reports after the test. Recording warnings instead names them here.
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            await asyncio.sleep(0)  # set_debug applies coroutine origin tracking on the loop
            assert loop.get_debug()
            with blocking_calls_on_this_thread() as blocking:
                yield LoopWatch(blocking, warned, caplog)
                gc.collect()  # finalise what the block dropped while still watching
        finally:
            loop.set_debug(was_debug)
            await asyncio.sleep(0)


async def post_mcp(client: Client, token: str | None) -> int:
    headers = dict(MCP_HEADERS)
    if token is not None:
        headers.update(bearer(token))
    async with client.post("/mcp", data=INITIALIZE, headers=headers) as response:
        await response.read()
        return response.status


async def read_events(client: Client, token: str, count: int) -> list[str]:
    """Open the upstream's event stream through the sidecar, read `count` events, leave."""
    headers = {**bearer(token), "Accept": "text/event-stream"}
    data: list[str] = []
    async with client.get("/sse", headers=headers) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        async with asyncio.timeout(STEP_TIMEOUT):
            while len(data) < count:
                line = await response.content.readline()
                assert line, "the stream ended early"
                if line.startswith(b"data: "):
                    data.append(line.decode().removeprefix("data: ").strip())
        response.close()  # leave mid-stream, as a client that goes away does
    return data


async def rotated_key_accepted(client: Client, idp: FakeIdp, token: str) -> None:
    """A token signed by a key the sidecar has not seen yet: the unknown kid makes it fetch the
    key set again (through aiohttp, on the loop). Within JWKS_COOLDOWN_SECONDS of the last fetch
    it refuses without fetching, so ask again until the fetch happened."""
    jwks_fetches = idp.hits.get("jwks", 0)
    async with asyncio.timeout(STEP_TIMEOUT):
        while (status := await post_mcp(client, token)) != 200:
            assert status == 401
            await asyncio.sleep(0.05)
    assert idp.hits.get("jwks", 0) > jwks_fetches


async def warm_up(client: Client, idp: FakeIdp) -> None:
    """Left out of the record: the first request through each layer may import a module lazily
    or read a file once, a one-time start-up cost rather than a per-request one. The first
    run_in_executor of the process imports concurrent.futures.thread; the rate limiter's memory
    storage makes that call from a background task at a time of its own after a refusal, so it
    is made here, at a known time."""
    assert await post_mcp(client, idp.mint(claims={"sub": "warm-up"})) == 200
    assert await post_mcp(client, "warm-up") == 401
    await asyncio.get_running_loop().run_in_executor(None, int)
    _STATE.events.clear()


async def drive_traffic(client: Client, idp: FakeIdp, upstream: FakeUpstream) -> None:
    """Every request path a deployed sidecar serves, each with its expected answer."""
    now = int(time.time())
    rotated, unpublished = new_rsa("rsa-rotated"), new_rsa("rsa-unpublished")  # CPU only
    valid = idp.mint()
    async with asyncio.timeout(TRAFFIC_TIMEOUT):
        # Valid token: a cache miss (full verification), then cache hits.
        assert await post_mcp(client, valid) == 200
        for _ in range(3):
            assert await post_mcp(client, idp.mint(claims={"sub": "user-2"})) == 200
            assert await post_mcp(client, valid) == 200
        # Invalid tokens and no token at all.
        assert await post_mcp(client, "garbage") == 401
        assert await post_mcp(client, "a.b.c") == 401
        expired = {"exp": now - 600, "iat": now - 900, "nbf": now - 900}
        assert await post_mcp(client, idp.mint(claims=expired)) == 401
        assert await post_mcp(client, idp.mint(claims={"aud": "https://other.test/mcp"})) == 401
        assert await post_mcp(client, idp.mint(claims={"iss": "https://other.test"})) == 401
        assert await post_mcp(client, None) == 401
        async with client.post("/mcp", data=INITIALIZE,
                               headers={"Authorization": "Basic dXNlcjpwYXNz"}) as response:
            assert response.status == 401
        # Unknown kids: a rotated key (fetch, then accepted) and one never published.
        idp.keys.append(rotated)
        await rotated_key_accepted(client, idp, idp.mint(rotated))
        assert await post_mcp(client, idp.mint(unpublished)) == 401
        # An event stream read for a few events, then abandoned by the client.
        assert await read_events(client, valid, 3) == ["event-0", "event-1", "event-2"]
        await asyncio.wait_for(upstream.stream_closed.wait(), STEP_TIMEOUT)
        # Public documents and probes.
        for path in ("/healthz", "/readyz", *PRM_PATHS):
            async with client.get(path) as response:
                assert response.status == 200, path
                await response.read()
        # The end of the MCP session the first POST opened (the upstream issued session-1).
        headers = {**bearer(valid), "Mcp-Session-Id": "session-1"}
        async with client.delete("/mcp", headers=headers) as response:
            assert response.status == 200
            await response.read()
    assert [r.method for r in upstream.requests].count("DELETE") == 1


async def test_request_paths_make_no_blocking_call_on_the_loop(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await make_sidecar(JWKS_COOLDOWN_SECONDS="0.1")
    async with watching_the_loop(caplog) as watch:
        await warm_up(client, idp)
        await drive_traffic(client, idp, upstream)
        # Shutdown too: cleanup contexts close the IdP and upstream sessions and stop tasks.
        await client.close()
    assert not watch.blocking, "blocking calls on the loop:\n" + "\n".join(watch.blocking)
    assert watch.asyncio_errors() == []
    assert [str(w.message) for w in watch.warned] == []


async def test_the_recorder_sees_blocking_calls_made_on_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The control: the same recorder, around calls that do block the loop."""
    here, elsewhere = __file__, str(Path(__file__).with_name("conftest.py"))

    async def careless() -> None:
        time.sleep(0)  # noqa: ASYNC251 - the blocking call under test
        open(here, "rb").close()  # noqa: ASYNC230 - the blocking call under test
        socket.getaddrinfo("127.0.0.1", 80)

    def in_a_worker() -> None:
        open(elsewhere, "rb").close()  # off the loop, as it should be

    async with watching_the_loop(caplog) as watch:
        await careless()
        await asyncio.to_thread(in_a_worker)
        await asyncio.get_running_loop().getaddrinfo("127.0.0.1", 80)  # in the executor
    recorded = [event.split(" ")[0] for event in watch.blocking]
    assert recorded.count("time.sleep") == 1
    assert recorded.count("socket.getaddrinfo") == 1
    assert any(event.startswith(f"open {here!r} at careless") for event in watch.blocking)
    assert not any(repr(elsewhere) in event for event in watch.blocking)


async def test_the_debug_checks_see_a_lost_task_and_an_unawaited_coroutine(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The control for the other half: the mistakes asyncio debug mode reports are caught."""

    async def waits(future: asyncio.Future[None]) -> None:
        await future

    async def forgotten() -> None:
        return None

    async with watching_the_loop(caplog) as watch:
        loop = asyncio.get_running_loop()
        task = loop.create_task(waits(loop.create_future()))
        await asyncio.sleep(0)  # it now waits on a future nothing else holds
        del task  # only a cycle keeps it: gc destroys it while pending
        gc.collect()
        _ = forgotten()
        del _
    assert any("Task was destroyed but it is pending" in m for m in watch.asyncio_errors())
    assert any(issubclass(w.category, RuntimeWarning) and "was never awaited" in str(w.message)
               for w in watch.warned)


@pytest.fixture
def bearer_file(tmp_path: Path) -> Path:
    path = tmp_path / "upstream-token"
    path.write_text("first-token\n", encoding="utf-8")
    return path


async def test_upstream_credential_rotation_is_read_off_the_loop(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream, bearer_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """MCP_UPSTREAM_BEARER_FILE is re-read when it changes: the stat and the read must run in a
    worker thread (upstream/credential.py uses asyncio.to_thread), never on the loop. The first
    read happens in create_app, before the server runs (in __main__, before the loop starts)."""
    from oauth_sidecar import app as app_module
    from oauth_sidecar.upstream.credential import UpstreamCredential

    # The constructor's own poll interval, shortened so a rotation is seen in 50 ms, not 2 s.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app_module, "UpstreamCredential",
                      partial(UpstreamCredential, poll_seconds=0.05))
        client = await make_sidecar(MCP_UPSTREAM_BEARER_FILE=str(bearer_file))
    token = idp.mint()

    def upstream_saw(value: str) -> bool:
        return upstream.requests[-1].headers.get("Authorization") == f"Bearer {value}"

    async with watching_the_loop(caplog) as watch:
        await warm_up(client, idp)
        assert await post_mcp(client, token) == 200
        assert upstream_saw("first-token")
        # The rotation is written from a worker thread: the test must not block the loop either.
        # A different length, so the (mtime, size) stamp changes even on a coarse clock.
        await asyncio.to_thread(bearer_file.write_text, "second-token-rotated\n", "utf-8")
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                assert await post_mcp(client, token) == 200
                if upstream_saw("second-token-rotated"):
                    break
                await asyncio.sleep(0.05)
    assert not watch.blocking, "blocking calls on the loop:\n" + "\n".join(watch.blocking)
    assert watch.asyncio_errors() == []
    assert [str(w.message) for w in watch.warned] == []
