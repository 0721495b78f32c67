"""Serve the bench's fixture apps on 127.0.0.1 until SIGTERM/SIGINT or until the parent dies.

Why here: the soak's and the performance harness's fixture processes (fake_services.py,
perf_services.py) must never outlive the harness that started them, even when it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

from aiohttp import web

WATCHDOG_PERIOD = 1.0  # seconds between checks that the parent is still alive


def free_port() -> int:
    """A port on 127.0.0.1 nobody holds now, for a process the bench is about to start."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_mib(pid: int) -> float:
    """A process's resident memory in MiB; NaN once it has gone (a sampler must not crash)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def serve_until_stopped(name: str, apps: list[tuple[web.Application, int]], *,
                              shutdown_timeout: float, max_lifetime: float = 3600.0) -> None:
    runners: list[web.AppRunner] = []
    try:
        for app, port in apps:
            # handler_cancellation: a stream whose client left ends now, not at its next write.
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                   shutdown_timeout=shutdown_timeout)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        parent = os.getppid()
        deadline = time.monotonic() + max_lifetime
        while not stop.is_set():
            if os.getppid() != parent:
                print(f"{name}: parent gone, exiting", file=sys.stderr)
                break
            if time.monotonic() > deadline:
                print(f"{name}: --max-lifetime reached, exiting", file=sys.stderr)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCHDOG_PERIOD)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
