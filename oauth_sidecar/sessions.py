"""Binding of MCP session ids to the identity that created them.

Why: the MCP security best practices ("Session Hijacking") say a session id is not
authentication. A leaked `Mcp-Session-Id` presented with another user's valid token must not
reach that session, so we remember which (issuer, subject) each session id belongs to and refuse
anyone else with 404, as the transport spec answers an unknown session. Memory is bounded (least
recently used entries go first) and idle bindings expire.
"""

from __future__ import annotations

import time
from collections import OrderedDict

Identity = tuple[str, str]  # (issuer, subject)
MAX_SESSIONS = 100_000  # ~20 MB at most; the oldest idle bindings are dropped first


class SessionBindings:
    def __init__(self, ttl: float, max_sessions: int = MAX_SESSIONS) -> None:
        self._ttl = ttl
        self._max = max_sessions
        self._owners: OrderedDict[str, tuple[Identity, float]] = OrderedDict()

    def owner(self, session_id: str) -> Identity | None:
        """The identity bound to this session, refreshing its idle timer; None if unknown."""
        entry = self._owners.get(session_id)
        if entry is None:
            return None
        identity, last_used = entry
        now = time.monotonic()
        if now - last_used > self._ttl:
            del self._owners[session_id]
            return None
        self._owners[session_id] = (identity, now)
        self._owners.move_to_end(session_id)
        return identity

    def bind(self, session_id: str, identity: Identity) -> None:
        self._owners[session_id] = (identity, time.monotonic())
        self._owners.move_to_end(session_id)
        while len(self._owners) > self._max:
            self._owners.popitem(last=False)

    def forget(self, session_id: str) -> None:
        self._owners.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._owners)
