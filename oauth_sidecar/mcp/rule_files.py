"""TOOL_POLICY_FILE, re-read when it changes.

Why: the rules live beside the allow-lists (a ConfigMap) and change as often: a new tool for a
team must not need a restart. A changed file is parsed by the same function as at start-up
(config.parse_rule_file); a version with any problem is refused whole and the last good rules
stay (half a rule set could grant what the rest denied). Problems are logged with their line.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog

from oauth_sidecar.config import MAX_RULE_FILE_BYTES, parse_rule_file
from oauth_sidecar.config.files import read_capped_text
from oauth_sidecar.config.watched_file import POLL_SECONDS, WatchedFile, polling
from oauth_sidecar.mcp.tool_policy import ToolPolicy

log = structlog.get_logger("oauth_sidecar.tool_rules")


class ToolRuleFile:
    def __init__(self, path: str, tools: ToolPolicy, poll_seconds: float = POLL_SECONDS) -> None:
        self._tools = tools
        self._poll = poll_seconds
        self._watched = WatchedFile(path)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ToolRuleFile]:
        stamp = self._watched.changed()  # config.load read it once: only later edits reload
        if stamp is not None:
            self._watched.mark_read(stamp)
        async with polling(self.check, "tool-policy-file-watch", self._poll):
            yield self

    async def check(self) -> None:
        await asyncio.to_thread(self._reload_if_changed)

    def _reload_if_changed(self) -> None:
        path = str(self._watched.path)
        try:
            stamp = self._watched.changed()
            if stamp is None:
                return
            rules, problems = parse_rule_file(read_capped_text(path, MAX_RULE_FILE_BYTES), path)
        except (OSError, UnicodeDecodeError) as exc:
            log.error("tool_policy_unreadable", path=path, error=str(exc),
                      action="kept the last good rules")
            return
        self._watched.mark_read(stamp)  # a bad version is reported once, not at every poll
        if problems:
            log.error("tool_policy_invalid", path=path, problems=problems,
                      action="kept the last good rules")
            return
        before = len(self._tools.file_rules)
        self._tools.replace_file_rules(rules)
        log.info("tool_policy_reloaded", path=path, rules=len(rules), before=before)
