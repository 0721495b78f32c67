"""Binding of MCP session ids to the identity that created them, and the check that uses it.

Why: the MCP security best practices ("Session Hijacking") say a session id is not
authentication. A leaked `Mcp-Session-Id` presented with another user's valid token must not
reach that session, so we remember which (issuer, subject) each session id belongs to and refuse
anyone else with 404, as the transport spec answers an unknown session. Whether a caller may use
a session is an authorisation decision, so the gate makes it (check()), after the access policy;
the proxy only records what the upstream answered (bind, forget). Memory is bounded in
bytes, whatever ids callers or the upstream choose: an id must be a sane handle (valid_session_id)
in both directions, a binding keeps a fixed-size digest of it rather than the id itself, at most
MAX_SESSIONS bindings are kept (least recently used go first), and idle bindings expire.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable

from multidict import CIMultiDictProxy

from oauth_sidecar.request_keys import PresentedSession

Identity = tuple[str, str]  # (issuer, subject)
# The SDKs issue 32-36 character ids (a UUID, its hex); the transport spec's other examples, a
# hash or a server-signed JWT, stay within a few hundred bytes. Longer is no handle but a payload.
MAX_SESSION_ID_BYTES = 1024
# MCP transport: a session id "MUST only contain visible ASCII characters (0x21 to 0x7E)".
# Checked before the binding: aiohttp decodes other bytes with surrogateescape and its header
# writer drops the surrogates, so "s-1\xff" would be checked as one id and sent as another.
SESSION_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_SESSION_ID_BYTES}}}")
# 128 bits: finding a second id with a bound id's digest (another user's session) is out of
# reach, and a binding costs the same whatever the id's length.
DIGEST_BYTES = 16
# About 290 bytes a binding (digest, owner, timer, LRU links; tracemalloc): 100,000 bindings hold
# about 28 MiB whatever the ids' length (bench/memory_floods.py: RSS +34 MiB at the cap with
# 1 KB ids, against +152 MiB when bindings kept the ids themselves).
MAX_SESSIONS = 100_000
# Any other spelling of Mcp-Session-Id would reach the upstream's session unchecked by the binding
# (PEP 3333 environ: `Mcp_Session_Id` and `Mcp-Session-Id` are both HTTP_MCP_SESSION_ID).
SESSION_LOOK_ALIKE = re.compile(r"mcp[^a-z0-9]session[^a-z0-9]id", re.IGNORECASE)
SESSION_HEADER = "mcp-session-id"
SESSION_HEADER_LENGTH = len(SESSION_HEADER)  # a look-alike swaps separators, never adds any


class SessionRefused(Exception):
    """The request may not use the session it names; the gate answers `status` with `error`.
    `reason` (when set) goes to the access log and metrics."""

    def __init__(self, status: int, error: str, description: str, reason: str | None = None):
        super().__init__(error)
        self.status = status
        self.error = error
        self.description = description
        self.reason = reason


def valid_session_id(session_id: str) -> bool:
    """Whether an id, presented by a client or issued by the upstream, may be bound."""
    return SESSION_ID.fullmatch(session_id) is not None


def _look_alike(names: Iterable[str]) -> bool:
    """A second spelling of Mcp-Session-Id (`Mcp_Session_Id`): the binding checks the real
    header, a WSGI or CGI upstream would read this one as the session."""
    return any(
        len(name) == SESSION_HEADER_LENGTH and name.lower() != SESSION_HEADER
        and SESSION_LOOK_ALIKE.fullmatch(name) is not None
        for name in names
    )


def _digest(session_id: str) -> bytes:
    return hashlib.blake2b(session_id.encode(), digest_size=DIGEST_BYTES).digest()


class SessionBindings:
    def __init__(self, ttl: float, max_sessions: int = MAX_SESSIONS) -> None:
        self._ttl = ttl
        self._max = max_sessions
        self._owners: OrderedDict[bytes, tuple[Identity, float]] = OrderedDict()

    def owner(self, session_id: str) -> Identity | None:
        """The identity bound to this session, refreshing its idle timer; None if unknown."""
        key = _digest(session_id)
        entry = self._owners.get(key)
        if entry is None:
            return None
        identity, last_used = entry
        now = time.monotonic()
        if now - last_used > self._ttl:
            del self._owners[key]
            return None
        self._owners[key] = (identity, now)
        self._owners.move_to_end(key)
        return identity

    def check(
        self, headers: CIMultiDictProxy[str], identity: Identity
    ) -> PresentedSession | None:
        """The session this request presents, if any, once it is known the caller may use it;
        raises SessionRefused otherwise. An id bound to nobody is let through (created before
        a restart, or on another replica): the proxy binds it to the caller if the upstream
        accepts it."""
        if _look_alike(headers):
            raise SessionRefused(400, "invalid_request",
                                 "Mcp-Session-Id must be spelled with dashes",
                                 "session_id_look_alike")
        session_ids = headers.getall("Mcp-Session-Id", [])
        if not session_ids:
            return None
        if len(session_ids) > 1:  # which one would the upstream use? Never guess.
            raise SessionRefused(400, "invalid_request", "More than one Mcp-Session-Id header")
        [session_id] = session_ids
        if not valid_session_id(session_id):
            raise SessionRefused(400, "invalid_request", "The Mcp-Session-Id header is "
                                 f"malformed: visible ASCII, at most {MAX_SESSION_ID_BYTES} bytes")
        owner = self.owner(session_id)
        if owner is not None and owner != identity:
            raise SessionRefused(404, "session_not_found", "No such session",
                                 "session_owned_by_another_identity")
        return PresentedSession(session_id, bound=owner is not None)

    def bind(self, session_id: str, identity: Identity) -> None:
        """Bind a valid id (see valid_session_id; the proxy checks it in both directions)."""
        if not valid_session_id(session_id):
            raise ValueError("not a session id that may be bound")
        key = _digest(session_id)
        issuer, subject = identity  # interned: one copy per user, however many sessions it opens
        self._owners[key] = ((sys.intern(issuer), sys.intern(subject)), time.monotonic())
        self._owners.move_to_end(key)
        while len(self._owners) > self._max:
            self._owners.popitem(last=False)

    def forget(self, session_id: str) -> None:
        self._owners.pop(_digest(session_id), None)

    def __len__(self) -> int:
        return len(self._owners)
