"""A static credential for the upstream, read from a file and re-read when it changes.

Why: the caller's token must never go upstream, but some MCP servers want a bearer token of
their own. Kubernetes mounts such secrets as files and rotates them in place, so the file is
watched (see watched_file.py) and a rotation needs no restart.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import structlog

from oauth_sidecar.config.files import MAX_SECRET_FILE_BYTES, read_capped_text
from oauth_sidecar.config.watched_file import POLL_SECONDS, WatchedFile, polling

log = structlog.get_logger("oauth_sidecar.upstream_credential")


def read_token(path: str) -> str:
    """The token in the file; OSError (also when it is larger than any token),
    UnicodeDecodeError or ValueError when it is unusable."""
    token = read_capped_text(path, MAX_SECRET_FILE_BYTES).strip()
    if not token or any(c in token for c in "\r\n\0"):
        raise ValueError("the file is empty or has more than one line")
    return token


class UpstreamCredential:
    def __init__(self, path: str, poll_seconds: float = POLL_SECONDS,
                 on_token: Callable[[str], None] | None = None) -> None:
        """on_token: told each token read, the first and every rotation (the log's mask)."""
        self._file = WatchedFile(path)
        self._poll = poll_seconds
        self._on_token = on_token
        self._header: str | None = None
        self._reload()  # config.load checked it is readable; fail loudly here if it no longer is

    @property
    def authorization(self) -> str | None:
        """The `Authorization` value to send upstream."""
        return self._header

    def _reload(self) -> bool:
        stamp = self._file.changed()
        if stamp is None:
            return False
        token = read_token(os.fspath(self._file.path))
        if self._on_token is not None:
            self._on_token(token)
        self._file.mark_read(stamp)
        self._header = f"Bearer {token}"
        return True

    @asynccontextmanager
    async def running(self) -> AsyncIterator[UpstreamCredential]:
        async with polling(self._check, "upstream-credential-watch", self._poll):
            yield self

    async def _check(self) -> None:
        path = os.fspath(self._file.path)
        try:
            if await asyncio.to_thread(self._reload):
                log.info("upstream_credential_reloaded", path=path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:  # keep the last good one
            log.error("upstream_credential_unreadable", path=path, error=str(exc))
