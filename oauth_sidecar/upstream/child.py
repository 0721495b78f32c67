"""The spawned MCP server: start it, know when it is ready, keep it alive, stop it completely.

Why: the one-container setup (a Claude.ai connector in front of `npx some-mcp-server`) needs the
sidecar to own the MCP server's lifetime. The failures to avoid: crashing on a missing binary,
orphaning a child that never became ready, never restarting it, staying green while it is dead,
and handing it every secret. Here the child runs in its own session (so `npx` grandchildren are
stopped with it), gets an allow-listed environment (config.SpawnConfig.env), is watched for
readiness racing its own exit, restarted with exponential backoff until it crash-loops, and on
shutdown its whole process group gets SIGTERM, then SIGKILL after a grace period, and is reaped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import structlog

from oauth_sidecar.config import SpawnConfig

log = structlog.get_logger("oauth_sidecar.child")

BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0  # seconds between restarts, doubling
HEALTHY_PERIOD = 60.0  # a child that ran this long starts a fresh backoff and crash count
CRASH_WINDOW = 300.0  # crashes counted against MCP_SPAWN_MAX_RESTARTS within this window
READY_POLL = 0.1  # seconds between readiness probes
MAX_LINE = 4096  # bytes of one output line kept; the rest is cut
LINES_PER_SECOND, LINE_BURST = 200, 1000  # a chatty child cannot flood the log or memory


class ChildState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPED = "stopped"


class ChildStartError(Exception):
    """The child could not be started or never became ready; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def port_accepts(port: int, within: float = 0.5) -> bool:
    try:
        async with asyncio.timeout(within):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


async def _exited(process: asyncio.subprocess.Process) -> int:
    """The child's exit code. Process.wait() on Python 3.11 also waits for its pipes to close,
    and a grandchild (npx's node) that inherited them keeps them open after the child died."""
    while process.returncode is None:  # noqa: ASYNC110 - asyncio offers no exit-only event
        await asyncio.sleep(READY_POLL)
    return process.returncode


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed credentials: still alive
        return True
    return True


class _LineBudget:
    """Token bucket for output lines; counts what it drops."""

    def __init__(self) -> None:
        self._tokens = float(LINE_BURST)
        self._at = time.monotonic()
        self.dropped = 0

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(LINE_BURST, self._tokens + (now - self._at) * LINES_PER_SECOND)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.dropped += 1
        return False


class ChildProcess:
    """Supervises one MCP server process for the app's lifetime."""

    def __init__(self, config: SpawnConfig, on_give_up: Callable[[], None] | None = None) -> None:
        self._config = config
        self._on_give_up = on_give_up
        self.state = ChildState.STARTING
        self.restarts = 0
        self.last_exit: str | None = None
        self.gave_up = False
        self._process: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._budget = _LineBudget()
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def ready(self) -> bool:
        return self.state is ChildState.READY

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ChildProcess]:
        # Never proxy to a stranger: a port already taken before we start is a start-up error.
        if await port_accepts(self._config.port):
            raise ChildStartError(
                f"port {self._config.port} on 127.0.0.1 is already in use by another process"
            )
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            self._session = session
            task = asyncio.create_task(self._supervise(), name="child-supervisor")
            try:
                yield self
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await self._stop()
                self.state = ChildState.STOPPED
                self._session = None

    async def _supervise(self) -> None:
        crashes: collections.deque[float] = collections.deque()
        backoff = BACKOFF_FIRST
        while True:
            started = time.monotonic()
            self.state = ChildState.STARTING
            try:
                process = await self._start()
                self.state = ChildState.READY
                log.info("child_ready", pid=process.pid, port=self._config.port,
                         seconds=round(time.monotonic() - started, 2))
                code = await _exited(process)
                self.last_exit = _describe_exit(code)
                log.error("child_exited", pid=self.pid, how=self.last_exit,
                          uptime=round(time.monotonic() - started, 1))
            except ChildStartError as exc:
                self.last_exit = exc.reason
                log.error("child_start_failed", reason=exc.reason)
            finally:
                self.state = ChildState.BACKOFF
                await self._stop()  # the group too: no grandchild outlives its parent
            if not self._config.restart:
                self._give_up("MCP_SPAWN_RESTART=never")
                return
            now = time.monotonic()
            if now - started >= HEALTHY_PERIOD:
                backoff, crashes = BACKOFF_FIRST, collections.deque()
            crashes.append(now)
            while crashes and now - crashes[0] > CRASH_WINDOW:
                crashes.popleft()
            if len(crashes) > self._config.max_restarts:
                self._give_up(f"{len(crashes)} failures within {int(CRASH_WINDOW)} s")
                return
            log.info("child_restart_scheduled", in_seconds=backoff, restarts=self.restarts)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            self.restarts += 1

    def _give_up(self, why: str) -> None:
        self.state, self.gave_up = ChildState.FAILED, True
        log.error("child_given_up", why=why, last_exit=self.last_exit)
        if self._on_give_up is not None:
            self._on_give_up()

    async def _start(self) -> asyncio.subprocess.Process:
        config = self._config
        if await port_accepts(config.port):
            raise ChildStartError(f"port {config.port} is already in use by another process")
        try:
            self._process = await asyncio.create_subprocess_exec(
                *config.argv, env=config.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group: stopped as a whole
            )
        except OSError as exc:
            raise ChildStartError(f"cannot start {config.argv[0]!r}: {exc.strerror}") from None
        process = self._process
        log.info("child_started", pid=process.pid, argv0=config.argv[0])
        for stream, name in ((process.stdout, "stdout"), (process.stderr, "stderr")):
            if stream is not None:
                pump = asyncio.create_task(self._pump(stream, name), name=f"child-{name}")
                self._pumps.add(pump)
                pump.add_done_callback(self._pumps.discard)
        deadline = time.monotonic() + config.ready_timeout
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise ChildStartError(
                    f"exited before listening ({_describe_exit(process.returncode)})"
                )
            if await port_accepts(config.port) and await self._probe():
                return process
            await asyncio.sleep(READY_POLL)
        raise ChildStartError(f"not ready after {config.ready_timeout:g} s")

    async def _probe(self) -> bool:
        """The optional HTTP readiness probe: any answer below 500 counts."""
        if not self._config.ready_path or self._session is None:
            return True
        url = f"http://127.0.0.1:{self._config.port}{self._config.ready_path}"
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                return response.status < 500
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _pump(self, stream: asyncio.StreamReader, name: str) -> None:
        """Child output -> `child_output` events; read continuously so the child never blocks."""
        pending, cutting = b"", False
        while chunk := await stream.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            if cutting:  # the rest of a line already emitted, cut: drop it
                if not lines:
                    pending = b""
                    continue
                lines, cutting = lines[1:], False
            for line in lines:
                self._emit(name, line)
            if len(pending) > MAX_LINE:
                self._emit(name, pending)
                pending, cutting = b"", True
        if pending and not cutting:
            self._emit(name, pending)

    def _emit(self, name: str, line: bytes) -> None:
        if not self._budget.take():
            return
        if self._budget.dropped:
            log.warning("child_output_dropped", lines=self._budget.dropped)
            self._budget.dropped = 0
        text = line[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
        log.info("child_output", stream=name, line=text)

    async def _stop(self) -> None:
        """SIGTERM the whole group, SIGKILL what is left after the grace period, reap."""
        process = self._process
        if process is None:
            return
        pgid = process.pid  # session leader: its pid is the group id
        if not _group_alive(pgid) and process.returncode is not None:
            return  # already gone: no needless wait
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self._config.stop_timeout
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                await _exited(process)
        while _group_alive(pgid) and time.monotonic() < deadline:  # noqa: ASYNC110 - no event
            await asyncio.sleep(0.05)  # to wait on: grandchildren are not our children
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        await _exited(process)
        if self._pumps:  # every writer is gone, so the pipes are at EOF
            _, late = await asyncio.wait(self._pumps, timeout=1.0)
            for pump in late:
                pump.cancel()
        if process.returncode is not None and self.last_exit is None:
            self.last_exit = _describe_exit(process.returncode)
