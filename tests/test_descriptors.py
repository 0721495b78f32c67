"""File descriptors: a `python -m oauth_sidecar` process started under a low RLIMIT_NOFILE.

At start-up the soft limit is raised to the hard one; the connection cap is lowered to what the
limit can carry (each proxied connection costs a client and an upstream descriptor) with a reserve
kept for listening, answering and logging, and one subject's event streams to half of that cap.
So a subject opening event streams without end gets 429s and connection-level 503s, never the
descriptors another user needs: before this, 300 streams of one user on a 512-descriptor limit
left `accept()` failing ("out of system resource") and another user with 502s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import FakeIdp, FakeUpstream, SidecarFactory, bearer, new_rsa, sidecar_env, wait_until
from processes import PROCESS_TIMEOUT, REPO, free_port, stop_process, wait_ready
from structlog.testing import capture_logs
from test_security import RawResponse, parse_responses

from oauth_sidecar import descriptors
from oauth_sidecar.config import load

LOW = 256  # descriptors: soft = hard, so raising cannot help
FLOOD = 300  # event streams one subject asks for: more than LOW can carry
BOUND = 10.0  # seconds: every connect and read of the flood (a hang fails the test)


def with_descriptor_limit(soft: int, hard: int) -> Callable[[], None]:
    """Runs in the child before exec: the limits the sidecar starts with."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


@asynccontextmanager
async def limited_sidecar(
    env: dict[str, str], soft: int, hard: int, log_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """The installed entry point under these limits; its log goes to a file (a flood's log would
    fill a pipe nobody reads). Always stopped and reaped."""
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "oauth_sidecar", env=env, cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
            preexec_fn=with_descriptor_limit(soft, hard),
        )
    try:
        yield proc
    finally:
        await stop_process(proc)


async def started(env: dict[str, str], port: int, proc: asyncio.subprocess.Process) -> None:
    timeout = aiohttp.ClientTimeout(total=PROCESS_TIMEOUT, sock_connect=1)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await wait_ready(session, f"http://127.0.0.1:{port}", proc)


def open_files(pid: int) -> tuple[int, int]:
    """The soft and hard RLIMIT_NOFILE of a running process, as the kernel reports them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


def log_events(log_path: Path, name: str) -> list[dict[str, Any]]:
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == name:
                events.append(event)
    return events


# -- the limit is raised ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_soft_descriptor_limit_is_raised_to_the_hard_one_and_logged_once(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path,
) -> None:
    port = free_port()
    env = sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(port), LOG_FORMAT="json")
    log_path = tmp_path / "sidecar.log"
    async with limited_sidecar(env, LOW, 4096, log_path) as proc:
        await started(env, port, proc)
        assert open_files(proc.pid) == (4096, 4096)
    [line] = log_events(log_path, "file_descriptors")
    assert (line["soft"], line["hard"], line["raised_from"]) == (4096, 4096, LOW)
    assert line["max_connections"] == 512  # the default: 4096 descriptors carry it


# -- one subject cannot take them all --------------------------------------------------------------


@dataclass
class Held:
    """A flood connection: what it was answered (None: nothing), kept open until the end."""

    writer: asyncio.StreamWriter | None = None
    response: RawResponse | None = None
    outcome: str = ""
    data: bytes = field(default=b"", repr=False)


async def open_stream(port: int, token: str) -> Held:
    """GET an event stream on a new connection and keep the connection, as a flood does: read
    until the response head arrived or the sidecar closed the connection (bounded)."""
    held = Held()
    request = (f"GET /sse HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
               f"Authorization: Bearer {token}\r\n\r\n").encode()
    try:
        async with asyncio.timeout(BOUND):
            reader, held.writer = await asyncio.open_connection("127.0.0.1", port)
            held.writer.write(request)
            await held.writer.drain()
            while b"\r\n\r\n" not in held.data:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                held.data += chunk
    except TimeoutError:
        held.outcome = "timeout"
        return held
    except ConnectionError as exc:
        held.outcome = type(exc).__name__
        return held
    head, _, _ = held.data.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 200"):  # an event stream: its body never ends
        held.outcome = "200"
        return held
    parsed = parse_responses(held.data)
    held.response = parsed[0] if parsed else None
    held.outcome = str(held.response.status) if held.response else "closed"
    return held


async def answered(port: int, method: str, path: str, headers: dict[str, str]) -> int:
    timeout = aiohttp.ClientTimeout(total=BOUND)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.request(
        method, f"http://127.0.0.1:{port}{path}", headers=headers, data=b"{}"
    ) as response:
        await response.read()
        return response.status


@pytest.mark.slow
@pytest.mark.parametrize("streams_per_subject", ["32", "300"])
async def test_one_subject_flooding_event_streams_leaves_room_for_another_user(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path, streams_per_subject: str,
) -> None:
    """32: the default; 300: an operator raised it, as in the incident (one subject could then
    fill every connection the limit carries)."""
    port = free_port()
    env = sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(port), LOG_FORMAT="json",
                      MAX_STREAMS_PER_SUBJECT=streams_per_subject)
    flood = idp.mint(claims={"sub": "flood"})
    log_path = tmp_path / "sidecar.log"
    async with limited_sidecar(env, LOW, LOW, log_path) as proc:
        await started(env, port, proc)
        held = await asyncio.gather(*(open_stream(port, flood) for _ in range(FLOOD)))
        try:
            # While the flood holds everything it was given: another user is served, and the
            # sidecar answers its probes.
            other = idp.mint(claims={"sub": "someone-else"})
            assert await answered(port, "POST", "/mcp", bearer(other)) == 200
            assert await answered(port, "GET", "/healthz", {}) == 200
        finally:
            for connection in held:
                if connection.writer is not None:
                    connection.writer.close()
    outcomes = [connection.outcome for connection in held]
    assert set(outcomes) <= {"200", "429", "503"}, sorted(set(outcomes))  # no 502, no hang
    [limits] = log_events(log_path, "file_descriptors")
    assert 0 < outcomes.count("200") <= limits["max_streams_per_subject"]
    assert limits["max_streams_per_subject"] <= limits["max_connections"] // 2
    assert limits["max_connections"] * descriptors.PER_CONNECTION <= LOW - descriptors.RESERVED
    for connection in held:
        if connection.response is not None:  # every refusal is our JSON, never a bare close
            assert connection.response.json()["error"] in {"rate_limited",
                                                          "service_unavailable"}
    assert not log_events(log_path, "socket.accept() out of system resource")
    assert b"out of system resource" not in log_path.read_bytes()


# -- the listener keeps its margin ----------------------------------------------------------------


def lowest_free_descriptor() -> int:
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    return probe


async def get_healthz(port: int | None) -> list[RawResponse]:
    """GET /healthz on a new connection, read until the sidecar closes it (bounded)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), BOUND)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(BOUND):
            return parse_responses(await reader.read())
    finally:
        writer.close()


async def test_a_connection_that_finds_the_process_short_of_descriptors_is_answered_503(
    make_sidecar: SidecarFactory,
) -> None:
    """Whatever holds the descriptors (not only client connections), a connection arriving in
    the last RESERVED / 2 of them is refused with an answer, never left to a failing accept()."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = lowest_free_descriptor() + 300
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    fillers: list[int] = []
    try:
        client = await make_sidecar()  # its listener reads the limit now
        ceiling = low - descriptors.RESERVED // 2
        with contextlib.suppress(OSError):  # bounded: at most `low` descriptors
            while lowest_free_descriptor() < ceiling - 1:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        with capture_logs() as logs:
            [answer] = await get_healthz(client.port)  # the accepted socket gets >= ceiling
        assert answer.status == 503
        assert answer.json()["error"] == "service_unavailable"
        [refused] = [e for e in logs if e["event"] == "connections_refused"]
        assert refused["short_of_descriptors"] == 1
        for fd in fillers:
            os.close(fd)
        fillers.clear()
        [answer] = await get_healthz(client.port)
        assert answer.status == 200
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- no descriptor left for the upstream -----------------------------------------------------------


@contextmanager
def no_descriptor_left() -> Iterator[None]:
    """This process (the in-process sidecar's) cannot open one more descriptor until the end."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = lowest_free_descriptor()
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe + 64, hard))
    try:
        with contextlib.suppress(OSError):  # bounded: the limit stops it within probe + 64
            for _ in range(probe + 64):
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        with pytest.raises(OSError, match="Too many open files"):
            os.close(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_an_upstream_connection_that_finds_no_descriptor_is_503_not_502(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream,
) -> None:
    """The sidecar is overloaded, the upstream is not at fault: 503 with Retry-After, so clients
    and load balancers retry instead of reporting a broken MCP server."""
    client = await make_sidecar(JWKS_COOLDOWN_SECONDS="0.1")
    release = asyncio.Event()

    async def held_back(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"keys": [key.jwk() for key in idp.keys]})

    idp.jwks_override = held_back  # the sidecar fetches a new key, and waits for it
    idp.keys.append(new_rsa("rotated-in"))
    await asyncio.sleep(0.2)  # past the start-up fetch's cooldown: a new kid fetches at once
    token = idp.mint(idp.keys[-1])
    fetches = idp.hits.get("jwks", 0)
    request = asyncio.create_task(client.post("/mcp", data=b"{}", headers=bearer(token)))
    await wait_until(lambda: idp.hits.get("jwks", 0) > fetches)
    with no_descriptor_left():  # the request's client and IdP connections are open already
        release.set()
        async with asyncio.timeout(BOUND):
            response = await request
            body = await response.json()
    assert response.status == 503, body
    assert body["error"] == "temporarily_unavailable"
    assert response.headers["Retry-After"] == "1"
    assert upstream.requests == []
    async with client.post("/mcp", data=b"{}", headers=bearer(token)) as again:
        assert again.status == 200  # with descriptors back, served again


# -- the arithmetic --------------------------------------------------------------------------------


def test_the_caps_fit_the_limit_and_redis_costs_more_per_connection(
    idp: FakeIdp, upstream: FakeUpstream,
) -> None:
    memory = load(sidecar_env(idp, upstream, MAX_STREAMS_PER_SUBJECT="300"))
    redis = load(sidecar_env(idp, upstream, RATE_LIMIT_STORAGE_URI="redis://127.0.0.1:1/0"))
    unlimited = load(sidecar_env(idp, upstream, MAX_STREAMS_PER_SUBJECT="0"))

    fitted = descriptors.fit(memory, 256)
    assert fitted.listener.max_connections == (256 - descriptors.RESERVED) // 2
    assert fitted.upstream.max_streams_per_subject == fitted.listener.max_connections // 2
    assert descriptors.fit(redis, 256).listener.max_connections == (256 - 64) // 4
    assert descriptors.fit(unlimited, 256).upstream.max_streams_per_subject == 0  # "no limit"
    roomy = descriptors.fit(memory, 1 << 20)  # a high limit changes nothing configured
    assert roomy.listener.max_connections == 512
    assert descriptors.fit(redis, 1 << 20).upstream.max_streams_per_subject == 32
    assert descriptors.fit(memory, 10).listener.max_connections == 1  # never 0: still serves
