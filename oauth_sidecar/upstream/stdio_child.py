"""One stdio MCP server process: JSON-RPC messages as single lines on its stdin and stdout.

Why: a stdio server (`npx some-mcp-server` without an HTTP transport) is spoken to through
pipes, and a pipe has neither size limits nor deadlines of its own. So writes wait for room in
the pipe only so long (a child that stops reading stdin fails its session instead of holding
requests forever), stdout lines are capped (an over-long line is dropped and reading resumes at
the next newline: one bad line never desynchronises the stream), a line that is not JSON is
logged and counted but never passed on, stderr goes to the log as `child_output` with the
subject's hash, and the exit (or stdout closing) is reported once. Starting and stopping the
process group is process_group.py's, shared with the HTTP child.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from oauth_sidecar.upstream.process_group import (
    LineBudget,
    OutputLog,
    describe_exit,
    exit_signal,
    exited,
    start_in_group,
    stop_group,
)

log = structlog.get_logger("oauth_sidecar.child")

READ_CHUNK = 65536  # bytes read from stdout at a time
STDIN_TIMEOUT = 10.0  # seconds a write may wait for the child to read its stdin
EOF_AFTER_EXIT = 1.0  # seconds between stdout's end and the exit status, waited for either way
SHOWN_BYTES = 200  # bytes of a dropped line shown in its log event
EXITED_BY_ITSELF = "exited"  # child_exited's reason when nobody stopped it (a crash, an exit)

OnMessage = Callable[[dict[str, Any], int], None]
OnExit = Callable[[str], None]


class ChildGone(Exception):
    """The child cannot take messages any more (exited, or stopped reading its stdin)."""


@dataclass
class LineCounters:
    """Shared by every stdio child, read by the metrics."""

    too_long: int = 0
    not_json: int = 0

    @property
    def dropped(self) -> int:
        return self.too_long + self.not_json


class StdioChild:
    """Start with start(); send() lines; on_message gets each JSON object the child writes
    (with its line's length), on_exit once when it exits or closes stdout; stop() ends it."""

    def __init__(
        self, argv: tuple[str, ...], env: Mapping[str, str], *, cwd: str | None,
        subject: str, max_line_bytes: int, stop_timeout: float, counters: LineCounters,
        on_message: OnMessage, on_exit: OnExit,
    ) -> None:
        self._argv, self._env, self._cwd = argv, env, cwd
        self.subject = subject
        self._max_line = max_line_bytes
        self._stop_timeout = stop_timeout
        self._counters = counters
        self._on_message, self._on_exit = on_message, on_exit
        self._budget = LineBudget()
        self._output = OutputLog(self._budget, subject=subject)
        self._process: asyncio.subprocess.Process | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.exit: str | None = None
        """How it ended (exit status), once it did."""
        self.stop_reason: str | None = None
        """Why stop() was called (the first caller's word); None while nobody asked."""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self.exit is None

    async def start(self) -> None:
        """Raises OSError when the program cannot be started."""
        self._process = process = await start_in_group(
            self._argv, self._env, stdin=asyncio.subprocess.PIPE, cwd=self._cwd
        )
        log.info("child_started", subject=self.subject, pid=process.pid, transport="stdio")
        stdout, stderr = process.stdout, process.stderr
        if stdout is None or stderr is None:
            raise OSError("the child's output is not piped")
        self._spawn(self._output.pump(stderr, "stderr"))
        self._spawn(self._watch(process, self._spawn(self._read(stdout))))

    def _spawn(self, work: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def send(self, line: bytes) -> None:
        """Write one message (`line` has no newline) and wait, within STDIN_TIMEOUT, until the
        pipe has room again; raises ChildGone."""
        stdin = self._stdin()
        stdin.write(line + b"\n")
        try:
            async with asyncio.timeout(STDIN_TIMEOUT):
                await stdin.drain()
        except TimeoutError:
            log.warning("child_stdin_stalled", subject=self.subject, pid=self.pid,
                        seconds=STDIN_TIMEOUT)
            raise ChildGone from None
        except ConnectionError:
            raise ChildGone from None

    def send_nowait(self, line: bytes) -> None:
        """Write one message without waiting (a cancellation sent while a handler unwinds);
        a child that is gone is no error here."""
        with contextlib.suppress(ChildGone):
            self._stdin().write(line + b"\n")

    def _stdin(self) -> asyncio.StreamWriter:
        process = self._process
        if process is None or process.stdin is None or self.exit is not None or (
            process.stdin.is_closing()
        ):
            raise ChildGone
        return process.stdin

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        """Lines of at most max_line bytes; a longer one is dropped up to its newline."""
        buffer, skipping = bytearray(), False
        while chunk := await stdout.read(READ_CHUNK):
            start = 0
            while True:
                end = chunk.find(b"\n", start)
                if end < 0:
                    if not skipping:
                        buffer += chunk[start:]
                        if len(buffer) > self._max_line:
                            self._too_long(len(buffer))
                            buffer.clear()
                            skipping = True
                    break
                piece, start = chunk[start:end], end + 1
                if skipping:
                    skipping = False
                elif len(buffer) + len(piece) > self._max_line:
                    self._too_long(len(buffer) + len(piece))
                    buffer.clear()
                else:
                    buffer += piece
                    self._line(bytes(buffer))
                    buffer.clear()

    def _too_long(self, size: int) -> None:
        self._counters.too_long += 1
        if self._budget.take():
            log.warning("child_line_too_long", subject=self.subject, pid=self.pid,
                        at_least=size, limit=self._max_line)

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        messages = message if isinstance(message, list) else [message]
        if not messages or not all(isinstance(m, dict) for m in messages):
            self._counters.not_json += 1
            if self._budget.take():
                log.warning("child_line_not_json", subject=self.subject, pid=self.pid,
                            line=line[:SHOWN_BYTES].decode("utf-8", "replace"))
            return
        for one in messages:
            self._on_message(one, len(line))

    async def _watch(self, process: asyncio.subprocess.Process,
                     reader: asyncio.Task[None]) -> None:
        """Report the end once: stdout closed (nothing more can come), or the process exited
        and its last lines were read (within EOF_AFTER_EXIT: a grandchild may hold the pipe)."""
        exit_task = asyncio.create_task(exited(process))
        try:
            await asyncio.wait({reader, exit_task}, return_when=asyncio.FIRST_COMPLETED)
            # The other end comes soon after: its status (or its last lines) is worth the wait.
            await asyncio.wait({reader, exit_task}, timeout=EOF_AFTER_EXIT)
        finally:
            exit_task.cancel()
        self._ended(process)

    def _ended(self, process: asyncio.subprocess.Process) -> None:
        """Logged once with the exit status or signal, and why: `reason` is stop()'s, or
        EXITED_BY_ITSELF when the child ended before anyone asked it to."""
        if self.exit is not None:
            return
        code = process.returncode
        self.exit = describe_exit(code) if code is not None else "closed its stdout"
        log.info("child_exited", subject=self.subject, pid=process.pid, how=self.exit,
                 exit_code=code if code is not None and code >= 0 else None,
                 signal=exit_signal(code), reason=self.stop_reason or EXITED_BY_ITSELF)
        self._on_exit(self.exit)

    async def stop(self, reason: str = "stopped") -> None:
        """Close stdin, stop the whole process group (SIGTERM, grace, SIGKILL), reap it.
        `reason` goes into child_exited unless the child had already ended or another stop()
        came first."""
        process = self._process
        if process is None:
            return
        if self.stop_reason is None and self.exit is None:
            self.stop_reason = reason
        if process.stdin is not None:
            process.stdin.close()
        await stop_group(process, self._stop_timeout)
        if self._tasks:  # every writer of the pipes is gone: the readers are at their end
            _, late = await asyncio.wait(set(self._tasks), timeout=1.0)
            for task in late:
                task.cancel()
        self._ended(process)
