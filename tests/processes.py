"""Helpers for tests that run real child processes and servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from asyncio.subprocess import Process
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

STOP_GRACE = 10.0  # seconds a child gets between SIGTERM and SIGKILL
REPO = Path(__file__).resolve().parent.parent
PROCESS_TIMEOUT = 15.0  # seconds a sidecar process gets to start, answer or exit (loaded CI)


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


@asynccontextmanager
async def sidecar_process(env: dict[str, str]) -> AsyncIterator[Process]:
    """The installed entry point in its own process; always reaped, killed if it hangs."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "oauth_sidecar", env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.communicate(), PROCESS_TIMEOUT)


async def run_to_end(
    *argv: str, env: dict[str, str], within: float = PROCESS_TIMEOUT
) -> tuple[int, str, str]:
    """Run argv in the repository to its end, killed after `within` s: code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), within)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """`python -m oauth_sidecar ARGS` to its end (bounded): exit code, stdout, stderr."""
    return await run_to_end(sys.executable, "-m", "oauth_sidecar", *args, env=env)


async def wait_ready(session: aiohttp.ClientSession, base: str, proc: Process) -> None:
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while True:
        if proc.returncode is not None:
            raise AssertionError(f"sidecar exited early with {proc.returncode}")
        try:
            async with session.get(base + "/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("sidecar never became ready")
        await asyncio.sleep(0.05)
