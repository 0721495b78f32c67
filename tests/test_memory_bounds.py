"""What a caller can make a real sidecar process keep, measured by its RSS, asserted in bytes.

Each test starts `python -m oauth_sidecar` (its memory alone, not this test process's), warms it
with a few requests of the kind under test, reads its VmRSS from /proc, sends a flood whose sizes
the caller chooses (30 KB session ids, 11 KB tokens, 30 KB X-Forwarded-For hops), and reads it
again. Before these bounds, each flood left tens of MiB behind (bench/memory_floods.py has the
figures at full size); the floods are small enough for a shared 2-core machine, and what they
would leave without the bound is several times what the assertion allows.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import FakeIdp, FakeUpstream, SigningKey, new_ec, sidecar_env
from processes import PROCESS_TIMEOUT, free_port, sidecar_process, wait_ready

from oauth_sidecar.auth.token_cache import MAX_CACHE_BYTES

# Every test here runs real processes (see the marker in pyproject.toml).
pytestmark = pytest.mark.slow

MiB = 1 << 20
SLACK = 10 * MiB  # what a flood may leave beyond its bound: allocator noise, buffers reused
CONCURRENCY = 8
WARM_UP = 100  # requests of the flood's own kind before the baseline: first-use allocations
# 200 Entra group ids: an 11 KB token, the size that made the cache hold 22 KB an entry.
GROUPS = [str(uuid.UUID(int=i)) for i in range(200)]

Request = tuple[str, dict[str, str]]


@pytest.fixture
def signing_key() -> SigningKey:
    """ES256: signing a few thousand tokens takes a fraction of a second (RSA: seconds)."""
    return new_ec()


@dataclass
class AcceptingUpstream:
    """An MCP server that accepts every session id it is shown and issues none, so the sidecar
    binds each id presented to it (as for a session created before a restart)."""

    url: str = ""
    sessions_seen: int = 0

    async def answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.sessions_seen += "Mcp-Session-Id" in request.headers
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})


@pytest.fixture
async def accepting_upstream() -> AsyncIterator[AcceptingUpstream]:
    upstream = AcceptingUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(max_field_size=1 << 16)  # ids as long as the sidecar passes on
    upstream.url = f"http://127.0.0.1:{server.port}"
    yield upstream
    await server.close()


def rss(pid: int) -> int:
    """The process's resident set, in bytes (VmRSS, /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def send_all(session: aiohttp.ClientSession, base: str,
                   requests: Iterator[Request]) -> Counter[int]:
    statuses: Counter[int] = Counter()

    async def worker() -> None:
        for path, headers in requests:  # one shared iterator: each request is sent once
            async with session.post(base + path, data=b"{}", headers=headers) as response:
                await response.read()
                statuses[response.status] += 1

    async with asyncio.timeout(PROCESS_TIMEOUT * 4):
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses


async def growth(idp: FakeIdp, fake_upstream: FakeUpstream, upstream: AcceptingUpstream,
                 requests: Iterator[Request], **extra: str) -> tuple[int, Counter[int]]:
    """RSS growth of a fresh sidecar process over the flood, after WARM_UP of its requests."""
    port = free_port()
    env = sidecar_env(idp, fake_upstream, MCP_UPSTREAM_URL=upstream.url, HOST="127.0.0.1",
                      PORT=str(port), LOG_LEVEL="error", EVENT_LOOP="asyncio", **extra)
    base = f"http://127.0.0.1:{port}"
    timeout = aiohttp.ClientTimeout(total=PROCESS_TIMEOUT)
    async with sidecar_process(env) as proc, aiohttp.ClientSession(timeout=timeout) as session:
        await wait_ready(session, base, proc)
        warm_up = [next(requests) for _ in range(WARM_UP)]
        await send_all(session, base, iter(warm_up))
        before = rss(proc.pid)
        statuses = await send_all(session, base, requests)
        return rss(proc.pid) - before, statuses


# Every verification of a new token spends its IP's budget (600 a minute by default), and these
# floods verify thousands of new tokens from one address: they measure the cache, not the budget.
NO_IP_BUDGET = {"RATE_LIMIT_UNAUTHENTICATED_RPM": "1000000"}


def mint_many(idp: FakeIdp, count: int, sub: str) -> Iterator[Request]:
    for _ in range(count):
        token = idp.mint(claims={"sub": sub, "groups": GROUPS, "email": "user@example.test",
                                 "email_verified": True})
        yield "/mcp", {"Authorization": f"Bearer {token}"}


async def test_a_flood_of_long_session_ids_leaves_nothing_behind(
    idp: FakeIdp, upstream: FakeUpstream, accepting_upstream: AcceptingUpstream
) -> None:
    """1,200 ids of 30,000 bytes, each accepted by the upstream: before, each was bound as it
    came (34 MiB kept); now an id over MAX_SESSION_ID_BYTES is refused before the upstream."""
    bearer = {"Authorization": f"Bearer {idp.mint(claims={'sub': 'alice'})}"}
    requests = (("/mcp", {**bearer, "Mcp-Session-Id": f"{i:08d}".ljust(30_000, "s")})
                for i in range(WARM_UP + 1200))
    grown, statuses = await growth(idp, upstream, accepting_upstream, requests)
    assert grown < SLACK, f"{grown / MiB:.1f} MiB kept ({statuses})"
    assert set(statuses) == {400}
    assert accepting_upstream.sessions_seen == 0


async def test_a_flood_of_refused_large_tokens_is_bounded(
    idp: FakeIdp, upstream: FakeUpstream, accepting_upstream: AcceptingUpstream
) -> None:
    """1,500 distinct valid 11 KB tokens of a subject the allow-list refuses: before, each was
    cached with every claim parsed (34 MiB); now a refused token keeps only the claims the
    policy reads, on the refused quarter of the cache."""
    grown, statuses = await growth(idp, upstream, accepting_upstream,
                                   mint_many(idp, WARM_UP + 1500, "mallory"),
                                   ALLOW_ALL_AUTHENTICATED="false", ALLOW_SUBS="alice",
                                   **NO_IP_BUDGET)
    assert grown < SLACK, f"{grown / MiB:.1f} MiB kept ({statuses})"
    assert set(statuses) == {403}


async def test_the_token_cache_holds_no_more_than_its_byte_budget(
    idp: FakeIdp, upstream: FakeUpstream, accepting_upstream: AcceptingUpstream
) -> None:
    """2,000 distinct admitted 11 KB tokens whose groups are forwarded upstream, so a hit needs
    them (about 20 KB an entry): before, the cache held them all (45 MiB); now at most
    MAX_CACHE_BYTES, the oldest going first."""
    grown, statuses = await growth(idp, upstream, accepting_upstream,
                                   mint_many(idp, WARM_UP + 2000, "alice"),
                                   FORWARD_IDENTITY="true", **NO_IP_BUDGET)
    assert grown < MAX_CACHE_BYTES + SLACK, f"{grown / MiB:.1f} MiB kept ({statuses})"
    assert set(statuses) == {200}


async def test_forwarded_hops_that_are_no_address_are_no_rate_limit_keys(
    idp: FakeIdp, upstream: FakeUpstream, accepting_upstream: AcceptingUpstream
) -> None:
    """1,000 failed verifications from a trusted proxy, each with a 30,000-byte X-Forwarded-For
    hop: before, each hop was a rate-limit key kept for a minute (30 MiB); now a hop that is no
    address counts against the proxy that passed it on, so they share one budget."""
    requests = (("/mcp", {"Authorization": "Bearer not.a.token",
                          "X-Forwarded-For": f"{i:08d}".ljust(30_000, "x")})
                for i in range(WARM_UP + 1000))
    grown, statuses = await growth(idp, upstream, accepting_upstream, requests,
                                   TRUSTED_PROXIES="127.0.0.1")
    assert grown < SLACK, f"{grown / MiB:.1f} MiB kept ({statuses})"
    # One key, the peer's: its budget of failures (600 a minute) runs out within the flood.
    assert set(statuses) == {401, 429}
