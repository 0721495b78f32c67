"""The in-memory sliding-window counter: the same rule as the `limits` library's, O(1) per request.

Why our own: limits' async MemoryStorage schedules an expiry pass after every counted request
that walks every key it holds, so with 10,000 subjects each request cost a scan of 20,000 keys
(bench: 2,160 req/s against 3,185 with one subject). Here every key of a budget shares one
60-second window, aligned as limits aligns it, so expiry is a swap of two dictionaries when a
window ends: this window's counts become the previous window's, and older ones are dropped
whole. Memory holds the subjects seen in the last two minutes. Redis keeps using limits.

The rule (limits' sliding window counter): a request is admitted while
floor(previous * (window - elapsed) / window + current) + 1 <= limit.
Nothing here awaits, so each call is atomic on the event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

WINDOW = 60  # seconds: every budget is per minute


class WindowStats(NamedTuple):
    """As limits reports it: when one more request fits (epoch seconds), and how many fit now."""

    reset_time: float
    remaining: int


class MemoryWindowCounters:
    """Duck-types the two calls RateLimiter makes on a limits strategy: hit, get_window_stats.
    `clock` is injectable so tests can walk through windows without waiting."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._window = -1
        self._current: dict[tuple[str, ...], int] = {}
        self._previous: dict[tuple[str, ...], int] = {}

    def _roll(self, now: float) -> float:
        """Advance to the window `now` falls in; the seconds elapsed in it."""
        window = int(now // WINDOW)
        if window != self._window:
            self._previous = self._current if window == self._window + 1 else {}
            self._current = {}
            self._window = window
        return now - window * WINDOW

    def _weighted(self, key: tuple[str, ...], elapsed: float) -> float:
        return self._previous.get(key, 0) * (WINDOW - elapsed) / WINDOW + self._current.get(key, 0)

    async def hit(self, item: Any, *identifiers: str) -> bool:
        """Count one request if it fits in `item.amount` a minute; False when it does not."""
        elapsed = self._roll(self._clock())
        if math.floor(self._weighted(identifiers, elapsed)) + 1 > item.amount:
            return False
        self._current[identifiers] = self._current.get(identifiers, 0) + 1
        return True

    async def get_window_stats(self, item: Any, *identifiers: str) -> WindowStats:
        """When the next request fits: the previous window's weight decays continuously, and a
        full current window waits for its own count to become the previous one."""
        now = self._clock()
        elapsed = self._roll(now)
        limit = item.amount
        previous = self._previous.get(identifiers, 0)
        current = self._current.get(identifiers, 0)
        remaining = max(0, limit - math.floor(self._weighted(identifiers, elapsed)))
        if remaining > 0:
            return WindowStats(now, remaining)
        if current < limit:  # needs previous * (WINDOW - e) / WINDOW < limit - current
            fits_at = WINDOW - (limit - current) * WINDOW / previous
            return WindowStats(now + max(0.0, fits_at - elapsed), 0)
        # This window is spent: in the next, its count decays as the previous one.
        fits_at = WINDOW - limit * WINDOW / current
        return WindowStats(now + (WINDOW - elapsed) + max(0.0, fits_at), 0)

    def count(self) -> int:
        """Keys held: the subjects (or addresses) seen in this window and the previous one."""
        return len(self._current.keys() | self._previous.keys())
