"""A file re-read when it changes, polled off the request path.

Why: Kubernetes mounts Secrets and ConfigMaps as files and updates them in place (a new
directory, then an atomic symlink swap), and operators expect the change to apply without a
restart. inotify misses a swap made through a parent symlink, so we poll: one stat every few
seconds is free, and the file's identity (device, inode), mtime and size together notice both an
edit and a swap.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

POLL_SECONDS = 2.0  # a stat every 2 s is free; changes apply quickly


Stamp = tuple[int, int, int, int]


class WatchedFile:
    """Remembers which version of a file was last read."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._stamp: Stamp | None = None

    def changed(self) -> Stamp | None:
        """The version now there if it is not the one last read (OSError if the file is gone).

        Taken before reading: a change racing the read is then seen again at the next poll.
        """
        stat = self.path.stat()
        stamp = (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)
        return None if stamp == self._stamp else stamp

    def mark_read(self, stamp: Stamp) -> None:
        self._stamp = stamp


@asynccontextmanager
async def polling(
    check: Callable[[], Awaitable[None]], name: str, poll_seconds: float = POLL_SECONDS
) -> AsyncIterator[None]:
    """Run `check` every poll_seconds while the context is open; `check` handles its errors."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(poll_seconds)
            await check()

    task = asyncio.create_task(loop(), name=name)
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
