"""The one rate-limit service: named budgets (per subject, per client IP) over `limits`.

Why: one user (or one stolen token) must not be able to monopolise the MCP server, and a flood
of garbage tokens must not burn CPU without bound. Budgets are sliding-window counters:
RATE_LIMIT_RPM requests a minute, counted as this minute's requests plus the last minute's,
weighted by how much of it still overlaps the last 60 seconds. A client may spend its whole
minute at once (MCP clients open a session with a burst of initialize / tools/list calls); what
it spent comes back gradually. Two counters per key make a request cost the same whatever the
limit and the subject's rate (a moving window kept one entry per request: a subject at a high
limit slowed everyone down). The price is an estimate: a burst at the very end of one minute
counts less than fully in the next, so a client timing its bursts can pass up to twice the limit
in one 60-second span, never more. The counters are in memory by default
(window_counters.py), or in Redis through `limits` so several replicas share one budget. When
the storage fails, the operator chose fail-open or fail-closed; either way it is logged once per
incident and never a 500.

Every budget is spent with `hit`, which counts and decides in one atomic step (no await in
memory, one Lua script in Redis), before the work it pays for. Checking first and counting after
the work let every request in flight pass the check: 500 concurrent connections ran 1,098 token
verifications against a per-IP budget of 600.

Every budget is decided here and mapped to HTTP here (429, or 503 when the storage is down and
the operator chose fail-closed): the gate spends budgets for protected requests, and `guard`
wraps the unauthenticated sign-in and registration handlers, so no caller keeps its own copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import structlog
from aiohttp import web
from limits import RateLimitItemPerMinute
from limits.aio.storage import Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

from oauth_sidecar.auth.window_counters import MemoryWindowCounters
from oauth_sidecar.client_ip import ClientAddress, budget_key, forwarded_chain
from oauth_sidecar.config import RateLimitConfig
from oauth_sidecar.http_errors import json_error
from oauth_sidecar.metrics import Metrics
from oauth_sidecar.outcome import Handler

log = structlog.get_logger("oauth_sidecar.ratelimit")

STORAGE_TIMEOUT = 1.0  # seconds: a slow Redis must not hold every request hostage
# After a failure, apply the failure policy at once for this long instead of making every
# request wait STORAGE_TIMEOUT for a storage that is down; then one request tries again.
RETRY_STORAGE_AFTER = 5.0
UNAVAILABLE_RETRY_AFTER = "5"  # seconds, when failing closed: the storage is retried sooner
NAMESPACE = "oauth_sidecar"
# O(1) per request whatever the limit and the subject's rate: two counters per key (this
# window, the last one), where a moving window keeps one entry per hit. Redis: limits' strategy;
# memory: the same rule in window_counters.py.
Strategy = SlidingWindowCounterRateLimiter | MemoryWindowCounters


@dataclass(frozen=True, slots=True)
class Budget:
    """A named budget. `scope` names it in metrics, log reasons and storage keys; a hashed
    budget stores a digest of its key (an issuer and subject may be long, and are personal)."""

    scope: str
    hashed: bool = False


PER_SUBJECT = Budget("subject", hashed=True)  # RATE_LIMIT_RPM: requests of one signed-in subject
# RATE_LIMIT_UNAUTHENTICATED_RPM: work done for a caller not known yet (token verifications,
# refused credentials, sign-in and registration calls), by client address.
PER_CLIENT_IP = Budget("client_ip")
PER_TOOL = Budget("tool", hashed=True)  # TOOL_RATE_LIMITS: one subject's calls of a tool glob


class RateLimited(Exception):
    """Over budget: `retry_after` seconds until one more request fits."""

    def __init__(self, scope: str, limit: int, retry_after: int, reset_at: float) -> None:
        super().__init__(scope)
        self.scope = scope
        self.limit = limit
        self.retry_after = retry_after
        self.reset_at = reset_at


class RateLimitUnavailable(Exception):
    """The storage failed and the operator chose fail-closed."""


class RateLimiter:
    def __init__(
        self, config: RateLimitConfig, metrics: Metrics | None = None,
        addresses: ClientAddress | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics or Metrics()
        # No trusted proxies unless told: then the TCP peer is the client, never a header.
        self._addresses = addresses or ClientAddress(())
        self._items = {  # a budget of 0 is off: no entry
            budget: RateLimitItemPerMinute(rpm)
            for budget, rpm in ((PER_SUBJECT, config.per_subject_rpm),
                                (PER_CLIENT_IP, config.unauthenticated_rpm))
            if rpm > 0
        }
        self._extra_items: dict[int, RateLimitItemPerMinute] = {}  # by limit (few: config's)
        self._strategy: Strategy | None = None
        self._failing = False
        self._skip_storage_until = 0.0
        self._in_memory = config.storage_uri.startswith("async+memory")

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RateLimiter]:
        if self._in_memory:  # our counters: limits' memory storage scans every key per request
            self._strategy = MemoryWindowCounters()
            try:
                yield self
            finally:
                self._strategy = None
            return
        storage = storage_from_string(
            self._config.storage_uri, wrap_exceptions=True, implementation="redispy",
            socket_timeout=STORAGE_TIMEOUT, socket_connect_timeout=STORAGE_TIMEOUT)
        if not isinstance(storage, Storage):
            raise TypeError(f"{self._config.storage_uri} is not an async storage")
        self._strategy = SlidingWindowCounterRateLimiter(storage)
        try:
            yield self
        finally:
            await _close(storage)
            self._strategy = None

    def client_ip(self, request: web.Request) -> str:
        """The PER_CLIENT_IP key of a request: its client as the trusted proxies tell it, an
        IPv6 client by its /64 (client_ip.budget_key)."""
        return budget_key(self._addresses.client(request.remote, forwarded_chain(request.headers)))

    async def admit(self, budget: Budget, *key: str) -> None:
        """Spend one unit of this budget before the work it pays for; raise RateLimited when
        it is spent (or RateLimitUnavailable when the storage is down and we fail closed)."""
        item = self._items.get(budget)
        if item is not None:
            name = _key(budget, key)
            if not await self._call(lambda s: s.hit(item, NAMESPACE, budget.scope, name)):
                raise await self._limited(item, budget.scope, name)

    async def admit_at(self, budget: Budget, per_minute: int, *key: str) -> None:
        """admit() for a budget whose limit is given with it (TOOL_RATE_LIMITS: one per glob),
        on the same storage and with the same failure policy."""
        item = self._extra_items.get(per_minute)
        if item is None:
            item = self._extra_items[per_minute] = RateLimitItemPerMinute(per_minute)
        name = _key(budget, key)
        if not await self._call(lambda s: s.hit(item, NAMESPACE, budget.scope, name)):
            raise await self._limited(item, budget.scope, name)

    async def spend(self, budget: Budget, *key: str) -> None:
        """Count one unit for a refusal already decided (a malformed or oversized credential,
        one in the query): being over budget, or the storage being down, changes nothing."""
        item = self._items.get(budget)
        if item is not None:
            name = _key(budget, key)
            with suppress(RateLimitUnavailable):
                await self._call(lambda s: s.hit(item, NAMESPACE, budget.scope, name))

    async def over_budget(self, budget: Budget, *key: str) -> web.Response | None:
        """admit(), its refusal as the HTTP answer; None when the request may go on."""
        try:
            await self.admit(budget, *key)
        except (RateLimited, RateLimitUnavailable) as exc:
            return refusal(exc)
        return None

    def guard(self, handler: Handler) -> Handler:
        """handler behind the PER_CLIENT_IP budget: for unauthenticated endpoints, where each
        call is work for a caller not known yet (sign-in, the token relay, registration)."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            refused = await self.over_budget(PER_CLIENT_IP, self.client_ip(request))
            return refused if refused is not None else await handler(request)

        return guarded

    async def _limited(self, item: RateLimitItemPerMinute, scope: str, key: str) -> RateLimited:
        self._metrics.rate_limited(scope)  # every RateLimited becomes a 429 (refusal)
        window: list[float] = []

        async def stats(strategy: Strategy) -> bool:
            window.append((await strategy.get_window_stats(item, NAMESPACE, scope, key)).reset_time)
            return True

        with suppress(RateLimitUnavailable):
            await self._call(stats)
        # limits reports reset_time as epoch seconds (not a delay); a full window if unknown.
        reset_at = window[0] if window else time.time() + 60
        return RateLimited(scope, item.amount, max(1, math.ceil(reset_at - time.time())), reset_at)

    async def _call(self, operation: Callable[[Strategy], Awaitable[bool]]) -> bool:
        """Run one storage operation with a timeout and the configured failure policy."""
        strategy = self._strategy
        if strategy is None:
            raise RuntimeError("rate limiter used outside its cleanup context")
        if self._failing and time.monotonic() < self._skip_storage_until:
            return self._on_failure()
        try:
            if self._in_memory:  # nothing to wait for: a timer would only cost time
                result = await operation(strategy)
            else:
                async with asyncio.timeout(STORAGE_TIMEOUT):
                    result = await operation(strategy)
        except (StorageError, TimeoutError, OSError) as exc:
            self._skip_storage_until = time.monotonic() + RETRY_STORAGE_AFTER
            if not self._failing:
                self._failing = True
                log.error("rate_limit_storage_failed", error=type(exc).__name__,
                          policy="allow" if self._config.fail_open else "deny")
            return self._on_failure()
        if self._failing:
            self._failing = False
            log.info("rate_limit_storage_recovered")
        return result

    def _on_failure(self) -> bool:
        if self._config.fail_open:
            return True
        raise RateLimitUnavailable


async def _close(storage: Storage) -> None:
    """Release the Redis connections the storage holds."""
    client = getattr(getattr(storage, "bridge", None), "storage", None)
    close = getattr(client, "aclose", None)
    if close is not None:
        with suppress(OSError, StorageError):  # already gone: nothing to release
            await close()


def _key(budget: Budget, parts: tuple[str, ...]) -> str:
    joined = "\0".join(parts)
    if not budget.hashed:
        return joined
    # surrogatepass: a lone surrogate in a subject (JSON's "\ud800") hashes, never raises.
    return hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def refusal_reason(refused: RateLimited | RateLimitUnavailable) -> str:
    """What the access log and metrics record for this refusal."""
    if isinstance(refused, RateLimited):
        return f"rate_limited_{refused.scope}"
    return "rate_limit_unavailable"


def refusal(refused: RateLimited | RateLimitUnavailable) -> web.Response:
    """The one HTTP answer to a spent budget (429) or an unavailable storage (503)."""
    if isinstance(refused, RateLimited):
        return rate_limited(refused)
    return json_error(503, "temporarily_unavailable", "Rate limiting is unavailable",
                      {"Retry-After": UNAVAILABLE_RETRY_AFTER})


def rate_limited(limited: RateLimited) -> web.Response:
    """429 with when to come back (RFC 6585 §4, RFC 9110 §10.2.3) and the RateLimit fields."""
    return json_error(429, "rate_limited", "Too many requests", {
        "Retry-After": str(limited.retry_after),
        "RateLimit-Limit": str(limited.limit),
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": str(limited.retry_after),
    })
