"""A static credential for the upstream, read from a file and re-read when it changes.

Why: the caller's token must never go upstream, but some MCP servers want a bearer token of
their own. Kubernetes mounts such secrets as files and rotates them in place, so the file is
watched (a stat every few seconds, off the request path) and a rotation needs no restart.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import structlog

log = structlog.get_logger("oauth_sidecar.upstream_credential")

POLL_SECONDS = 2.0  # a stat every 2 s is free; rotations apply quickly


class UpstreamCredential:
    def __init__(self, path: str, poll_seconds: float = POLL_SECONDS) -> None:
        self._path = Path(path)
        self._poll = poll_seconds
        self._stamp: tuple[float, int] | None = None
        self._header: str | None = None
        self._reload()  # config.load checked it is readable; fail loudly here if it no longer is

    @property
    def authorization(self) -> str | None:
        """The `Authorization` value to send upstream."""
        return self._header

    def _reload(self) -> bool:
        stat = self._path.stat()
        stamp = (stat.st_mtime, stat.st_size)
        if stamp == self._stamp:
            return False
        token = self._path.read_text(encoding="utf-8").strip()
        if not token or any(c in token for c in "\r\n\0"):
            raise ValueError("the file is empty or has more than one line")
        self._stamp, self._header = stamp, f"Bearer {token}"
        return True

    @asynccontextmanager
    async def running(self) -> AsyncIterator[UpstreamCredential]:
        task = asyncio.create_task(self._watch(), name="upstream-credential-watch")
        try:
            yield self
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            try:
                if await asyncio.to_thread(self._reload):
                    log.info("upstream_credential_reloaded", path=os.fspath(self._path))
            except (OSError, ValueError, UnicodeDecodeError) as exc:  # keep the last good one
                log.error("upstream_credential_unreadable", path=os.fspath(self._path),
                          error=str(exc))
