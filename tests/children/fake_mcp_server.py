"""A scriptable stand-in for a spawned MCP server (standard library only), for tests/test_child.py.

Usage: ``python fake_mcp_server.py MODE [ARGS...]``; every server listens on 127.0.0.1:PORT and
answers every request with a JSON object holding at least its ``pid``, ``method`` and ``path``;
``GET /env`` adds ``env`` (its whole os.environ), ``GET /count`` adds ``lines_written`` (chatty).

Modes:

* ``serve PORT``: serves; prints one line to stdout, one to stderr and a CRLF-terminated line.
* ``probe-status PORT FILE``: serves; ``GET /ready`` answers with the status code read from
  FILE on every request (and prints ``probe answered <code>``).
* ``never-listen``: prints its pid and sleeps forever without opening a port.
* ``crash-after PORT N``: serves N requests, then exits with code 3.
* ``exit-now CODE``: exits at once with CODE.
* ``ignore-sigterm PORT``: serves and ignores SIGTERM (printing ``ignoring SIGTERM``).
* ``fork-grandchild PORT PIDFILE``: serves, and starts a grandchild that writes its own pid to
  PIDFILE and sleeps forever (it shares our process group and our stdout/stderr).
* ``chatty PORT``: serves and writes ~20,000 lines a second to stdout and stderr, including a
  10,000-byte line in every batch.
* ``long-line PORT SIZE``: prints one line of SIZE bytes, then ``after-long-line``, then serves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

FOREVER = 3600.0
CHATTY_BATCH = 100  # lines per stream per batch
CHATTY_PAUSE = 0.01  # seconds between batches
CHATTY_LONG_LINE = 10_000  # bytes


class State:
    lock = threading.Lock()
    served = 0
    crash_after: int | None = None
    probe_file: Path | None = None
    lines_written = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests read the child's output and want only the lines they expect."""

    def do_GET(self) -> None:
        self._answer()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status = 200
        payload: dict[str, object] = {"pid": os.getpid(), "method": self.command,
                                      "path": self.path}
        if self.path == "/env":
            payload["env"] = dict(os.environ)  # noqa: TID251 - reporting it is the point
        if self.path == "/count":
            payload["lines_written"] = State.lines_written
        if self.path == "/ready" and State.probe_file is not None:
            status = int(State.probe_file.read_text().strip())
            print(f"probe answered {status}", flush=True)
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()
        with State.lock:
            State.served += 1
            crash = State.crash_after is not None and State.served >= State.crash_after
        if crash:
            os._exit(3)


def listen(port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


def sleep_forever() -> None:
    while True:
        time.sleep(FOREVER)


def chatter() -> None:
    long_line = "L" * CHATTY_LONG_LINE
    n = 0
    while True:
        for stream in (sys.stdout, sys.stderr):
            lines = [f"chatty {stream.name} line {n + i}" for i in range(CHATTY_BATCH - 1)]
            stream.write("\n".join([*lines, long_line]) + "\n")
            stream.flush()
            n += CHATTY_BATCH
            State.lines_written += CHATTY_BATCH
        time.sleep(CHATTY_PAUSE)


GRANDCHILD = """
import os, sys, time
path = sys.argv[1]
with open(path + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(path + ".tmp", path)
while True:
    time.sleep(3600)
"""


def main(argv: list[str]) -> None:
    mode, args = argv[0], argv[1:]
    if mode == "exit-now":
        print(f"exiting with {args[0]}", flush=True)
        sys.exit(int(args[0]))
    if mode == "never-listen":
        print(f"never listening, pid {os.getpid()}", flush=True)
        sleep_forever()
    port = int(args[0])
    if mode == "ignore-sigterm":
        def ignore(signum: int, frame: FrameType | None) -> None:
            print("ignoring SIGTERM", flush=True)

        signal.signal(signal.SIGTERM, ignore)
    elif mode == "crash-after":
        State.crash_after = int(args[1])
    elif mode == "probe-status":
        State.probe_file = Path(args[1])
    elif mode == "fork-grandchild":
        subprocess.Popen([sys.executable, "-c", GRANDCHILD, args[1]])  # noqa: S603 - fixed argv
    elif mode == "long-line":
        sys.stdout.write("x" * int(args[1]) + "\nafter-long-line\n")
        sys.stdout.flush()
    elif mode not in ("serve", "chatty"):
        sys.exit(f"unknown mode {mode!r}")
    server = listen(port)
    if mode == "serve":
        print(f"serving on 127.0.0.1:{port}", flush=True)
        print("a line on stderr", file=sys.stderr, flush=True)
        sys.stdout.write("a line ending in CRLF\r\n")
        sys.stdout.flush()
    if mode == "chatty":
        threading.Thread(target=server.serve_forever, daemon=True).start()
        chatter()
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
