"""The stdio children of every caller: sessions by id, sessionless children by subject, bounds.

Why: with a stdio MCP server each session (or each subject, MCP_SPAWN_SCOPE=subject) needs a
process of its own, and a child never serves another subject, whose files and credentials it may
hold in its working directory. Processes are the scarce resource here, so they are capped per
subject (429: that caller waits) and in total (503: everyone does), an idle child is stopped
(its session then answers 404 and the client starts a new one, as the Streamable HTTP transport
says for an unknown session), and at shutdown every child's process group is stopped. Session
ids are bound in auth/sessions.py too, so the gate refuses another subject's id with the same
404 it gives for the HTTP child.

What it tells the metrics, read at scrape time (nothing per request): children by state, how
many subjects hold children and the most any one holds (never a subject as a label: callers
would grow the series), exits by reason and refusals by cap, each from a fixed set of words.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from aiohttp import web

from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.auth.sessions import SessionBindings
from oauth_sidecar.config import SpawnConfig
from oauth_sidecar.request_keys import Principal
from oauth_sidecar.upstream.stdio_child import EXITED_BY_ITSELF, LineCounters, StdioChild
from oauth_sidecar.upstream.stdio_session import StdioSession

log = structlog.get_logger("oauth_sidecar.stdio")

RETRY_AFTER = "5"  # seconds: children end as sessions close or go idle
SUBJECT_HASH_HEX = 32  # 128 bits of sha256(issuer, sub): a directory name and a log field
SESSION_ID_BYTES = 16  # 32 hex characters, as the MCP SDKs issue
MAX_REAP_INTERVAL = 5.0  # seconds between looks for idle children, at most

CHILD_STATES = ("starting", "busy", "idle", "stopping")
"""What a child is doing. starting: its process is being spawned or has written nothing yet (a
first `npx -y` may download for a while); busy: a request is in flight or a stream is open, so
it is never reaped; idle: neither, MCP_SPAWN_IDLE_SECONDS runs; stopping: its session is over
and its process group is being stopped (SIGTERM, then SIGKILL after MCP_SPAWN_STOP_TIMEOUT_SECONDS).
The caps count every state but stopping."""

EXIT_REASONS = ("idle", "deleted", "replaced", "exited", "start_failed", "shutdown", "other")
"""Why a child ended. idle: reaped; deleted: its client sent DELETE; replaced: a new initialize
of the same subject (MCP_SPAWN_SCOPE=subject); exited: it ended by itself (a crash, an exit) or
stopped taking messages on stdin; start_failed: the command could not be started, or its
session's initialize failed (the child refused it, or the client left); shutdown: the sidecar
stopped; other: a reason this list does not know (never a new label value)."""
_EXIT_REASON = {"idle": "idle", "deleted": "deleted", "replaced": "replaced",
                "shutdown": "shutdown", "child_gone": EXITED_BY_ITSELF,
                "initialize_failed": "start_failed"}

CAPS = ("process", "subject")  # the caps a start may be refused by (503 and 429)

Identity = tuple[str, str]



def env_value(claim: str) -> str:
    """A claim as an environment value: the same text, except that a lone surrogate (JSON's
    "\\ud800", which UTF-8 cannot encode and which made the spawn raise) becomes its own three
    bytes (surrogatepass), the bytes the identity headers percent-encode; no valid UTF-8 text
    has them, so two subjects never share a value."""
    if claim.isascii():
        return claim
    return claim.encode("utf-8", "surrogatepass").decode("utf-8", "surrogateescape")

class ChildRefused(Exception):
    """No child may be started now; the bridge answers `status` with Retry-After."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(error)
        self.status, self.error, self.description = status, error, description


class ChildStartFailed(Exception):
    """The command could not be started (logged)."""


def exit_reason(why: str) -> str:
    """The fixed word (EXIT_REASONS) for a reason a session is closed with, or the child's own
    child_exited reason; anything unknown is "other"."""
    if why in EXIT_REASONS:
        return why
    return _EXIT_REASON.get(why, "other")


def subject_hash(identity: Identity) -> str:
    issuer, subject = identity
    pair = f"{issuer}\0{subject}".encode("utf-8", "surrogatepass")  # "\ud800" never raises
    return hashlib.sha256(pair).hexdigest()[:SUBJECT_HASH_HEX]


class StdioPool:
    """Owns every stdio child for the app's lifetime (running() is its cleanup context)."""

    def __init__(self, spawn: SpawnConfig, *, policy: AccessPolicy, forward_identity: bool,
                 sessions: SessionBindings) -> None:
        self._spawn = spawn
        self._policy = policy
        self._forward_identity = forward_identity
        self._bindings = sessions
        self._sessions: dict[str, StdioSession] = {}
        self._sessionless: dict[Identity, StdioSession] = {}
        self._latest: dict[Identity, StdioSession] = {}  # scope=subject: its one session
        self._per_subject: collections.Counter[Identity] = collections.Counter()
        self._all: set[StdioSession] = set()
        # One sessionless child per subject, even when first requests race (held while a
        # process starts: milliseconds, never while one stops).
        self._starting = asyncio.Lock()
        self._stopping = False
        self._stops: set[asyncio.Task[None]] = set()
        self._halting: collections.Counter[StdioChild] = collections.Counter()  # stop()s running
        self.counters = LineCounters()
        self.exits: collections.Counter[str] = collections.Counter()  # by EXIT_REASONS
        self.refused: collections.Counter[str] = collections.Counter()  # by CAPS

    def children(self) -> int:
        """Children counted against the caps (every state but stopping)."""
        return len(self._all)

    def by_state(self) -> dict[str, int]:
        """Children by CHILD_STATES (a look at each: at most MCP_SPAWN_MAX_PROCESSES)."""
        states = dict.fromkeys(CHILD_STATES, 0)
        for session in self._all:
            states[session.state] += 1
        states["stopping"] = len(self._halting)
        return states

    def limits(self) -> dict[str, int]:
        """The caps by CAPS: MCP_SPAWN_MAX_PROCESSES and MCP_SPAWN_MAX_PER_SUBJECT."""
        return {"process": self._spawn.max_processes, "subject": self._spawn.max_per_subject}

    def subjects(self) -> int:
        """Subjects holding at least one child."""
        return len(self._per_subject)

    def most_per_subject(self) -> int:
        """The most children one subject holds: at MCP_SPAWN_MAX_PER_SUBJECT that user's next
        session is refused (429)."""
        return max(self._per_subject.values(), default=0)

    def sessions(self) -> int:
        return len(self._sessions)

    def all_sessions(self) -> list[StdioSession]:
        """Every live session, sessionless ones included (for tests and diagnostics)."""
        return list(self._all)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[StdioPool]:
        reaper = asyncio.create_task(self._reap(), name="stdio-reaper")
        try:
            yield self
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            await self.stop_all()

    async def stop(self, app: web.Application) -> None:
        """on_shutdown: no new children; the GET streams end (they never end by themselves)."""
        self._stopping = True
        for session in list(self._all):
            session.end_listener()

    async def stop_all(self) -> None:
        self._stopping = True
        await asyncio.gather(*(self.close(s, "shutdown") for s in list(self._all)))
        if self._stops:
            await asyncio.wait(set(self._stops))

    def find(self, session_id: str, identity: Identity) -> StdioSession | None:
        session = self._sessions.get(session_id)
        if session is None or session.identity != identity or session.closed:
            return None
        return session

    async def open(self, principal: Principal) -> StdioSession:
        """A new session and its child (an `initialize`); scope=subject ends the subject's
        previous session first. Raises ChildRefused or ChildStartFailed."""
        identity = (principal.issuer, principal.subject)
        one = self._spawn.scope == "subject"
        if one and (previous := self._latest.pop(identity, None)):
            await self.close(previous, "replaced")  # first: it counts against the caps
        session = self._opened(await self._start(principal, secrets.token_hex(SESSION_ID_BYTES)))
        if one:  # an initialize that raced this one started a child too: the last one stays
            racer, self._latest[identity] = self._latest.get(identity), session
            if racer is not None:
                await self.close(racer, "replaced")
        return session

    def _opened(self, session: StdioSession) -> StdioSession:
        if session.id is not None:
            self._sessions[session.id] = session
            self._bindings.bind(session.id, session.identity)
        return session

    async def sessionless(self, principal: Principal) -> StdioSession:
        """The subject's child for requests without a session, started on first use."""
        identity = (principal.issuer, principal.subject)
        async with self._starting:
            session = self._sessionless.get(identity)
            if session is None or session.closed:
                session = await self._start(principal, None)
                self._sessionless[identity] = session
        return session

    async def _start(self, principal: Principal, session_id: str | None) -> StdioSession:
        identity = (principal.issuer, principal.subject)
        if self._stopping:
            raise ChildRefused(503, "temporarily_unavailable", "The sidecar is shutting down")
        if self._per_subject[identity] >= self._spawn.max_per_subject:
            self.refused["subject"] += 1
            raise ChildRefused(429, "rate_limited", "Too many MCP sessions of this user are "
                               "open: end one (DELETE) or wait until one is idle")
        if len(self._all) >= self._spawn.max_processes:
            self.refused["process"] += 1
            raise ChildRefused(503, "temporarily_unavailable", "Too many MCP sessions are open")
        subject = subject_hash(identity)
        session = StdioSession(session_id, identity, subject, self._spawn.max_line_bytes,
                               client_roots=self._spawn.client_roots)
        child = StdioChild(
            self._spawn.argv, self._environment(principal), cwd=self._workdir(subject),
            subject=subject, max_line_bytes=self._spawn.max_line_bytes,
            stop_timeout=self._spawn.stop_timeout, counters=self.counters,
            on_message=session.route, on_exit=lambda how: self._exited(session),
        )
        session.child = child
        self._per_subject[identity] += 1  # counted before the await: racing starts see it
        self._all.add(session)
        try:
            await child.start()
        except OSError as exc:
            self._forget(session)
            self.exits["start_failed"] += 1
            log.error("child_start_failed", subject=subject, reason=exc.strerror or str(exc))
            raise ChildStartFailed from None
        return session

    def _environment(self, principal: Principal) -> dict[str, str]:
        env = dict(self._spawn.env)
        if self._forward_identity:
            env["MCP_USER_SUB"] = env_value(principal.subject)
            env["MCP_USER_ISSUER"] = env_value(principal.issuer)
            email = self._policy.verified_email(principal.claims)
            if email:
                env["MCP_USER_EMAIL"] = env_value(email)
        return env

    def _workdir(self, subject: str) -> str | None:
        root = self._spawn.workdir_root
        if not root:
            return None
        path = os.path.join(root, subject)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def _exited(self, session: StdioSession) -> None:
        """The child ended by itself (or was stopped): its session is over. Called once per
        started child, so each exit is counted here, by the reason its child_exited logged."""
        session.fail()
        self._forget(session)
        child = session.child
        if child is not None:
            self.exits[exit_reason(child.stop_reason or EXITED_BY_ITSELF)] += 1
            # grandchildren may live on: stop the whole group
            task = asyncio.get_running_loop().create_task(self._stop(child, EXITED_BY_ITSELF))
            self._stops.add(task)
            task.add_done_callback(self._stops.discard)

    async def _stop(self, child: StdioChild, reason: str) -> None:
        """child.stop(), the child counted as stopping meanwhile."""
        self._halting[child] += 1
        try:
            await child.stop(reason)
        finally:
            self._halting[child] -= 1
            if self._halting[child] <= 0:
                del self._halting[child]

    def _forget(self, session: StdioSession) -> None:
        if session not in self._all:
            return
        self._all.discard(session)
        self._per_subject[session.identity] -= 1
        if self._per_subject[session.identity] <= 0:
            del self._per_subject[session.identity]
        if session.id is not None and self._sessions.get(session.id) is session:
            del self._sessions[session.id]
            self._bindings.forget(session.id)
        if self._sessionless.get(session.identity) is session:
            del self._sessionless[session.identity]
        if self._latest.get(session.identity) is session:
            del self._latest[session.identity]

    async def close(self, session: StdioSession, why: str) -> None:
        """End a session and stop its child (DELETE, idle, replaced, shutdown); `why` is
        logged as said and given to the child as its exit_reason()."""
        if session in self._all:
            log.info("session_ended", subject=session.subject, why=why)
        session.fail()
        self._forget(session)
        if session.child is not None:
            await self._stop(session.child, exit_reason(why))

    async def _reap(self) -> None:
        idle = self._spawn.idle_seconds
        while True:
            await asyncio.sleep(min(max(idle / 4, 0.05), MAX_REAP_INTERVAL))
            now = time.monotonic()
            await asyncio.gather(*(self.close(session, "idle") for session in list(self._all)
                                   if not session.busy and now - session.last_active > idle))
