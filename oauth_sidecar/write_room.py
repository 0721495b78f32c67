"""Whether a write to a client can wait for it: the one rule for skipping a write timer.

Why: every write to a client is bounded by CLIENT_WRITE_TIMEOUT_SECONDS (a client that stops
reading would otherwise hold the write, its connection and the upstream's stream forever), and a
timer costs ~5 µs, on every answer and every relayed chunk. asyncio and uvloop pause a protocol's
writing only when its transport holds more than 64 KiB unsent, and resume it at 16 KiB or less:
with at most LOW_WATER_BYTES unsent now (so not paused) and at most LOW_WATER_BYTES more (its
framing included, still under the 64 KiB mark), a write can never be paused, so it never waits.
"""

from __future__ import annotations

import asyncio

LOW_WATER_BYTES = 16 * 1024  # asyncio's default low-water mark (a quarter of 64 KiB); uvloop's too


def cannot_wait(transport: asyncio.WriteTransport | None, adding: int) -> bool:
    """Whether writing `adding` more bytes (headers, body, chunk framing) into this transport
    can never wait for the client."""
    return (transport is not None and adding <= LOW_WATER_BYTES
            and transport.get_write_buffer_size() <= LOW_WATER_BYTES)
