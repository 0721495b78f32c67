"""Allow-lists kept in files (ALLOW_*_FILE), re-read when they change.

Why: in Kubernetes the list of who may use a server lives in a ConfigMap, and adding a colleague
must not need a restart. A changed file is parsed with the same rules as at start-up; a file that
is unreadable or has a bad entry is refused as a whole and the last good list stays in force (a
half-applied list could admit someone meant to be removed, or lock everyone out by a typo).
Only counts are logged: the entries are personal data.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog

from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.config import AllowFile, allow_entries, read_allow_file
from oauth_sidecar.config.watched_file import POLL_SECONDS, WatchedFile, polling

log = structlog.get_logger("oauth_sidecar.allow_files")


class AllowListFiles:
    def __init__(
        self, files: tuple[AllowFile, ...], policy: AccessPolicy,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._policy = policy
        self._poll = poll_seconds
        self._watched = [(file, WatchedFile(file.path)) for file in files]

    @asynccontextmanager
    async def running(self) -> AsyncIterator[AllowListFiles]:
        # config.load read each file once; take their versions now so only later edits reload
        # (an edit in between is at worst read twice).
        for _, watched in self._watched:
            stamp = watched.changed()
            if stamp is not None:
                watched.mark_read(stamp)
        async with polling(self.check, "allow-list-files-watch", self._poll):
            yield self

    async def check(self) -> None:
        """Reload every file that changed since it was last read."""
        for file, watched in self._watched:
            await asyncio.to_thread(self._reload_if_changed, file, watched)

    def _reload_if_changed(self, file: AllowFile, watched: WatchedFile) -> None:
        try:
            stamp = watched.changed()
            if stamp is None:
                return
            entries, problems = allow_entries(file.kind, read_allow_file(file.path), file.path)
        except (OSError, UnicodeDecodeError) as exc:
            log.error("allow_list_unreadable", list=file.kind, path=file.path, error=str(exc),
                      action="kept the last good list")
            return
        watched.mark_read(stamp)  # a bad version is reported once, not at every poll
        if problems:
            log.error("allow_list_invalid", list=file.kind, path=file.path, problems=problems,
                      action="kept the last good list")
            return
        entries |= file.from_variable
        before = self._policy.allow_list(file.kind)
        self._policy.replace_allow_list(file.kind, entries)
        log.info("allow_list_reloaded", list=file.kind, path=file.path, entries=len(entries),
                 added=len(entries - before), removed=len(before - entries))
