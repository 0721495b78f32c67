"""A child process in a process group of its own: start it, log its output, stop it whole.

Why one module: the HTTP child (child.py) and each stdio child (stdio_child.py) must be stopped
the same way, grandchildren included (`npx` starts node, node may start more), and must not
flood the log or memory with their output. A child runs in its own session, so its pid is its
process group's id; stopping sends SIGTERM to the group, waits for the grace period, sends
SIGKILL to what is left and reaps the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("oauth_sidecar.child")

EXIT_POLL = 0.05  # seconds between looks at a child's exit status
MAX_LINE = 4096  # bytes of one output line kept; the rest is cut
LINES_PER_SECOND, LINE_BURST = 200, 1000  # a chatty child cannot flood the log or memory


def describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    killer = exit_signal(code)
    if killer is not None:
        return f"killed by {killer}" if killer.startswith("SIG") else f"killed by signal {killer}"
    return f"exit code {code}"


def exit_signal(code: int | None) -> str | None:
    """The signal that ended a child (its name, or its number when it has none), from a
    returncode; None when it exited by itself or is running."""
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return str(-code)


async def exited(process: asyncio.subprocess.Process) -> int:
    """The child's exit code. Process.wait() on Python 3.11 also waits for its pipes to close,
    and a grandchild (npx's node) that inherited them keeps them open after the child died."""
    while process.returncode is None:  # noqa: ASYNC110 - asyncio offers no exit-only event
        await asyncio.sleep(EXIT_POLL)
    return process.returncode


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed credentials: still alive
        return True
    return True


async def start_in_group(
    argv: tuple[str, ...], env: Mapping[str, str], *, stdin: int, cwd: str | None = None,
) -> asyncio.subprocess.Process:
    """The started child, stdout and stderr piped, in a new session (its own process group).
    Raises OSError when it cannot be started."""
    return await asyncio.create_subprocess_exec(
        *argv, env=dict(env), cwd=cwd, stdin=stdin,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: stopped as a whole
    )


async def stop_group(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the whole group, SIGKILL what is left after the grace period, reap the child."""
    pgid = process.pid  # session leader: its pid is the group id
    if not group_alive(pgid) and process.returncode is not None:
        return  # already gone: no needless wait
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
            await exited(process)
    while group_alive(pgid) and time.monotonic() < deadline:  # noqa: ASYNC110 - no event
        await asyncio.sleep(EXIT_POLL)  # to wait on: grandchildren are not our children
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    await exited(process)


class LineBudget:
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


class OutputLog:
    """A child's output stream -> `child_output` events, line by line, each cut at MAX_LINE,
    within the line budget; read continuously so the child never blocks on a full pipe.
    `fields` go on every event (the stdio children's subject hash, say)."""

    def __init__(self, budget: LineBudget | None = None, **fields: object) -> None:
        self._budget = budget or LineBudget()
        self._fields = fields

    async def pump(self, stream: asyncio.StreamReader, name: str) -> None:
        pending, cutting = b"", False
        while chunk := await stream.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            if cutting:  # the rest of a line already emitted, cut: drop it
                if not lines:
                    pending = b""
                    continue
                lines, cutting = lines[1:], False
            for line in lines:
                self.emit(name, line)
            if len(pending) > MAX_LINE:
                self.emit(name, pending)
                pending, cutting = b"", True
        if pending and not cutting:
            self.emit(name, pending)

    def emit(self, name: str, line: bytes) -> None:
        if not self._budget.take():
            return
        if self._budget.dropped:
            log.warning("child_output_dropped", lines=self._budget.dropped, **self._fields)
            self._budget.dropped = 0
        text = line[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
        log.info("child_output", stream=name, line=text, **self._fields)
