"""Helpers for tests that run real child processes and servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket

STOP_GRACE = 10.0  # seconds a child gets between SIGTERM and SIGKILL


def free_port() -> int:
    """A loopback port free right now (another process could still take it: tests retry-free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def stop_process(process: asyncio.subprocess.Process, grace: float = STOP_GRACE) -> None:
    """Close stdin, SIGTERM, bounded wait, SIGKILL if needed; always reap (no orphans)."""
    if process.stdin is not None:
        process.stdin.close()
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            async with asyncio.timeout(grace):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    await process.wait()  # reap; after SIGKILL this returns promptly
