"""Single use of the sign-in relay's sealed values: each state and each code is redeemed once.

Why: a sealed state or code travels through browsers, histories and logs; its signature proves
the sidecar made it, not that nobody used it yet. RFC 6749 §4.1.2 requires a code to be used
once, and a state replayed at the callback would mint a second code. Every sealed value carries
a random id; redeeming it remembers the id until the value's own expiry (after which the codec
refuses the value anyway, so the id can be forgotten).

In memory by default (one replica). When the rate limits already share a Redis, the ids go
there too, so a value redeemed on one replica is refused on every other. Both stores fail
closed (RedemptionUnavailable, answered 503): accepting a value they cannot record would
silently turn replay protection off.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Protocol

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = structlog.get_logger("oauth_sidecar.redemptions")

# Ids remembered at once in memory. Only /authorize mints values (one state, then one code),
# and it spends the client IP's budget; 100k unexpired ids take about 17 MB (173 B each).
MAX_REMEMBERED = 100_000
STORE_TIMEOUT = 1.0  # seconds: a slow Redis must not hold a sign-in for long
# Replicas each judge a value's expiry by their own clock: Redis keeps an id this much longer,
# so a replica whose clock lags by up to a minute cannot accept a value after its id is gone.
CLOCK_SKEW = 60  # seconds
KEY_PREFIX = "oauth_sidecar:redeemed:"
# `limits` URI schemes (config.RATE_LIMIT_SCHEMES' values) and redis-py's for the same server.
REDIS_SCHEMES = {"async+redis": "redis", "async+rediss": "rediss", "async+redis+unix": "unix"}


class RedemptionUnavailable(Exception):
    """The store cannot say whether a value was used: refuse the value for now."""


class RedemptionStore(Protocol):
    def running(self) -> AbstractAsyncContextManager[object]: ...

    async def redeem(self, value_id: str, expires_at: float) -> bool:
        """True the first time an id is redeemed, False ever after (until expires_at)."""
        ...


class MemoryRedemptions:
    """Ids in a dict, forgotten in expiry order (a heap) as they expire.

    At MAX_REMEMBERED unexpired ids it refuses new redemptions instead of forgetting an id
    early: forgetting would make that value replayable, refusing only delays sign-ins until
    the oldest ids expire (at most the values' lifetime)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._expiry: dict[str, float] = {}
        self._queue: list[tuple[float, str]] = []
        self._full = False

    @asynccontextmanager
    async def running(self) -> AsyncIterator[MemoryRedemptions]:
        yield self

    async def redeem(self, value_id: str, expires_at: float) -> bool:
        now = time.time()
        while self._queue and self._queue[0][0] < now:
            del self._expiry[heapq.heappop(self._queue)[1]]
        if value_id in self._expiry:
            return False
        if len(self._expiry) >= self._capacity:
            if not self._full:
                self._full = True
                log.error("redemption_store_full", capacity=self._capacity)
            raise RedemptionUnavailable
        self._full = False
        self._expiry[value_id] = expires_at
        heapq.heappush(self._queue, (expires_at, value_id))
        return True

    def __len__(self) -> int:
        return len(self._expiry)


class RedisRedemptions:
    """One `SET key 1 NX EX ttl` per redemption: atomic, so two replicas racing on one value
    cannot both win, and Redis forgets the id when the value expires."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._client: Redis | None = None
        self._failing = False

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RedisRedemptions]:
        client = Redis.from_url(self._url, socket_timeout=STORE_TIMEOUT,
                                socket_connect_timeout=STORE_TIMEOUT)
        self._client = client
        try:
            yield self
        finally:
            self._client = None
            with suppress(RedisError, OSError):  # already gone: nothing to release
                await client.aclose()

    async def redeem(self, value_id: str, expires_at: float) -> bool:
        client = self._client
        if client is None:
            raise RuntimeError("redemption store used outside its cleanup context")
        ttl = max(1, math.ceil(expires_at - time.time())) + CLOCK_SKEW
        try:
            async with asyncio.timeout(STORE_TIMEOUT):
                first = await client.set(KEY_PREFIX + value_id, b"1", nx=True, ex=ttl)
        except (RedisError, OSError, TimeoutError) as exc:
            if not self._failing:
                self._failing = True
                log.error("redemption_store_failed", error=type(exc).__name__, policy="deny")
            raise RedemptionUnavailable from None
        if self._failing:
            self._failing = False
            log.info("redemption_store_recovered")
        return bool(first)


def redemption_store(storage_uri: str) -> RedemptionStore:
    """The store beside the rate limits' storage (`storage_uri` in the `limits` form)."""
    scheme, _, rest = storage_uri.partition("://")
    if scheme in REDIS_SCHEMES:
        return RedisRedemptions(f"{REDIS_SCHEMES[scheme]}://{rest}")
    return MemoryRedemptions(MAX_REMEMBERED)
