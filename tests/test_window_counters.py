"""The in-memory sliding-window counter: limits' rule, O(1) state, walked through windows with an
injected clock (no waiting)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from limits import RateLimitItemPerMinute

from oauth_sidecar.auth.window_counters import WINDOW, MemoryWindowCounters

START = 1_800_000_000.0  # a window boundary (a multiple of 60)
KEY = ("oauth_sidecar", "subject", "alice")


@dataclass
class Clock:
    now: float = START

    def __call__(self) -> float:
        return self.now


async def spend(counters: MemoryWindowCounters, limit: int, times: int) -> list[bool]:
    item = RateLimitItemPerMinute(limit)
    return [await counters.hit(item, *KEY) for _ in range(times)]


async def test_a_whole_minute_may_be_spent_at_once_and_not_one_more() -> None:
    counters = MemoryWindowCounters(Clock())
    assert await spend(counters, 10, 11) == [True] * 10 + [False]


async def test_each_key_has_its_own_budget() -> None:
    counters = MemoryWindowCounters(Clock())
    item = RateLimitItemPerMinute(1)
    assert [await counters.hit(item, "a"), await counters.hit(item, "b"),
            await counters.hit(item, "a")] == [True, True, False]


@pytest.mark.parametrize(("elapsed", "admitted"), [
    # 10 spent at the very start of the last window; at `elapsed` s into this one they weigh
    # 10 * (60 - elapsed) / 60, and a request fits while floor(that + current) + 1 <= 10.
    (0.0, 0), (6.0, 1), (30.0, 5), (54.0, 9), (59.9, 10),
])
async def test_the_last_windows_requests_come_back_gradually(
    elapsed: float, admitted: int,
) -> None:
    clock = Clock()
    counters = MemoryWindowCounters(clock)
    await spend(counters, 10, 10)
    clock.now = START + WINDOW + elapsed
    assert (await spend(counters, 10, 11)).count(True) == admitted


async def test_two_windows_later_the_whole_budget_is_back() -> None:
    clock = Clock()
    counters = MemoryWindowCounters(clock)
    await spend(counters, 10, 10)
    clock.now = START + 2 * WINDOW + 1
    assert await spend(counters, 10, 11) == [True] * 10 + [False]
    assert counters.count() == 1  # the old windows' keys went with them


async def test_keys_not_seen_for_two_windows_are_forgotten() -> None:
    clock = Clock()
    counters = MemoryWindowCounters(clock)
    item = RateLimitItemPerMinute(5)
    for subject in range(1000):
        await counters.hit(item, str(subject))
    clock.now = START + WINDOW + 1
    await counters.hit(item, "new")
    assert counters.count() == 1001  # the last window still weighs
    clock.now = START + 2 * WINDOW + 1
    await counters.hit(item, "new")
    assert counters.count() == 1


async def test_window_stats_say_when_the_next_request_fits() -> None:
    clock = Clock()
    counters = MemoryWindowCounters(clock)
    item = RateLimitItemPerMinute(10)
    await spend(counters, 10, 10)
    # This window is spent: the next request fits once its 10 weigh under 10, just after the
    # next window starts.
    clock.now = START + 20
    stats = await counters.get_window_stats(item, *KEY)
    assert stats.remaining == 0
    assert stats.reset_time == pytest.approx(START + WINDOW)
    clock.now = stats.reset_time + 0.001
    assert await counters.hit(item, *KEY)
    # Now 10 in the previous window and 1 in this one: a request fits once
    # 10 * (60 - e) / 60 < 9, at e = 6 s.
    stats = await counters.get_window_stats(item, *KEY)
    assert stats.remaining == 0
    assert stats.reset_time == pytest.approx(START + WINDOW + 6)
    clock.now = stats.reset_time - 0.01
    assert not await counters.hit(item, *KEY)
    clock.now = stats.reset_time + 0.01
    assert await counters.hit(item, *KEY)


async def test_a_fresh_key_has_its_whole_budget_now() -> None:
    clock = Clock()
    counters = MemoryWindowCounters(clock)
    stats = await counters.get_window_stats(RateLimitItemPerMinute(7), *KEY)
    assert (stats.reset_time, stats.remaining) == (START, 7)
