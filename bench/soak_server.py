"""The production sidecar, served as `oauth-sidecar` serves it, plus a stats endpoint for the soak.

Run by bench/soak.py, never by hand (it exits when its parent does). The sidecar part is exactly
the product: `create_app(load(environment))`, the logging `__main__` configures, and the
production listener's runner (`listener.make_runner`: handler cancellation, the head, time and
connection bounds, the shutdown timeout, no aiohttp access log) on HOST:PORT with its backlog.
Only the measurement plumbing is added, in this file and on its own loopback
port: `GET /stats` answers, for this process,

    {"tasks", "fds", "fd_kinds", "rss_kb", "threads", "gc_objects", "cpu_s", "loop_lag_ms"}

`?gc=1` runs a full collection first; `?detail=1` adds the live tasks counted by coroutine name.
`loop_lag_ms` is the worst event-loop lag since the previous call (a 50 ms ticker's overshoot).
The stats server's own keep-alive connection and the ticker cost a constant 1 fd and 2-3 tasks,
present in every sample alike.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import os
import signal
import sys
import time
from pathlib import Path

import structlog
from aiohttp import web

from oauth_sidecar import __version__
from oauth_sidecar.app import create_app
from oauth_sidecar.config import ConfigError, load
from oauth_sidecar.listener import BACKLOG, make_runner
from oauth_sidecar.log import configure_logging

WATCHDOG_PERIOD = 1.0  # seconds between checks that the parent is still alive
LAG_TICK = 0.05  # seconds


def _status() -> dict[str, int]:
    """VmRSS (kB) and Threads from /proc/self/status."""
    found = {"rss_kb": -1, "threads": -1}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            found["rss_kb"] = int(line.split()[1])
        elif line.startswith("Threads:"):
            found["threads"] = int(line.split()[1])
    return found


def _fd_kinds() -> dict[str, int]:
    kinds: collections.Counter[str] = collections.Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed between listdir and readlink (the listdir fd itself)
            continue
        kind = target.split(":", 1)[0] if ":" in target else "file"
        kinds[kind] += 1
    return dict(kinds)


def _task_name(task: asyncio.Task[object]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or type(coro).__name__


class Stats:
    def __init__(self) -> None:
        self.worst_lag = 0.0

    async def ticker(self) -> None:
        """Measures how late the loop wakes a 50 ms sleeper: a saturated loop shows here."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(LAG_TICK)
            self.worst_lag = max(self.worst_lag, loop.time() - started - LAG_TICK)

    async def handle(self, request: web.Request) -> web.Response:
        if request.query.get("gc") == "1":
            gc.collect()
        user, system = os.times()[:2]
        body: dict[str, object] = {
            "tasks": len(asyncio.all_tasks()),
            "fds": len(os.listdir("/proc/self/fd")),
            "fd_kinds": _fd_kinds(),
            **_status(),
            "gc_objects": len(gc.get_objects()),
            "cpu_s": user + system,
            "loop_lag_ms": round(self.worst_lag * 1000, 1),
        }
        self.worst_lag = 0.0
        if request.query.get("detail") == "1":
            names = collections.Counter(_task_name(t) for t in asyncio.all_tasks())
            body["task_names"] = dict(names.most_common())
        return web.json_response(body)


async def serve(stats_port: int, max_lifetime: float) -> int:
    try:
        config = load(os.environ)  # noqa: TID251 - this is the process's __main__
    except ConfigError as exc:
        print("soak_server: the configuration has problems:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    log = structlog.get_logger("oauth_sidecar")
    log.info("starting", version=__version__, bench="soak_server")
    for warning in config.warnings:
        log.warning("config_warning", message=warning)

    app = create_app(config)
    runner = make_runner(app, config)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port, backlog=BACKLOG).start()

    stats = Stats()
    stats_app = web.Application()
    stats_app.router.add_get("/stats", stats.handle)
    stats_runner = web.AppRunner(stats_app, access_log=None, shutdown_timeout=1.0)
    await stats_runner.setup()
    await web.TCPSite(stats_runner, "127.0.0.1", stats_port).start()
    ticker = asyncio.create_task(stats.ticker())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    deadline = time.monotonic() + max_lifetime
    try:
        while not stop.is_set():
            if os.getppid() != parent:
                log.warning("bench_parent_gone")
                break
            if time.monotonic() > deadline:
                log.warning("bench_max_lifetime_reached")
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCHDOG_PERIOD)
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await stats_runner.cleanup()
        await runner.cleanup()  # the product's graceful shutdown (as serve does on SIGTERM)
        log.info("stopped")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats-port", type=int, required=True)
    parser.add_argument("--max-lifetime", type=float, default=3600.0)
    args = parser.parse_args()
    return asyncio.run(serve(args.stats_port, args.max_lifetime))


if __name__ == "__main__":
    sys.exit(main())
