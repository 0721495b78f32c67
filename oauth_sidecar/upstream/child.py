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
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import structlog

from oauth_sidecar.config import SpawnConfig
from oauth_sidecar.upstream.process_group import (
    LINE_BURST,
    LINES_PER_SECOND,
    MAX_LINE,
    OutputLog,
    describe_exit,
    exited,
    start_in_group,
    stop_group,
)

log = structlog.get_logger("oauth_sidecar.child")

BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0  # seconds between restarts, doubling
HEALTHY_PERIOD = 60.0  # a child that ran this long starts a fresh backoff and crash count
CRASH_WINDOW = 300.0  # crashes counted against MCP_SPAWN_MAX_RESTARTS within this window
READY_POLL = 0.1  # seconds between readiness probes
__all__ = ["LINES_PER_SECOND", "LINE_BURST", "MAX_LINE", "ChildProcess", "ChildStartError",
           "ChildState", "port_accepts"]


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
        self._output = OutputLog()
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
                code = await exited(process)
                self.last_exit = describe_exit(code)
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
            self._process = await start_in_group(
                config.argv, config.env, stdin=asyncio.subprocess.DEVNULL
            )
        except OSError as exc:
            raise ChildStartError(f"cannot start {config.argv[0]!r}: {exc.strerror}") from None
        process = self._process
        log.info("child_started", pid=process.pid, argv0=config.argv[0])
        for stream, name in ((process.stdout, "stdout"), (process.stderr, "stderr")):
            if stream is not None:
                pump = asyncio.create_task(self._output.pump(stream, name), name=f"child-{name}")
                self._pumps.add(pump)
                pump.add_done_callback(self._pumps.discard)
        deadline = time.monotonic() + config.ready_timeout
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise ChildStartError(
                    f"exited before listening ({describe_exit(process.returncode)})"
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

    async def _stop(self) -> None:
        """SIGTERM the whole group, SIGKILL what is left after the grace period, reap."""
        process = self._process
        if process is None:
            return
        await stop_group(process, self._config.stop_timeout)
        if self._pumps:  # every writer is gone, so the pipes are at EOF
            _, late = await asyncio.wait(self._pumps, timeout=1.0)
            for pump in late:
                pump.cancel()
        if process.returncode is not None and self.last_exit is None:
            self.last_exit = describe_exit(process.returncode)
