"""End to end with the official MCP SDK on both sides of the sidecar.

A real `tests/mcp_echo_server.py` child process (official-SDK server, Streamable HTTP at /mcp)
sits behind the production sidecar; the official-SDK client talks to the sidecar with tokens
minted by the fake IdP. Every wait is bounded and the child is always terminated and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest
from conftest import FakeIdp, SidecarFactory
from mcp_client_probe import Mode, call_echo, call_whoami, expect_unauthorized
from processes import free_port, stop_process

# Every test here runs real processes (see the marker in pyproject.toml).
pytestmark = pytest.mark.slow

ECHO_SERVER = Path(__file__).with_name("mcp_echo_server.py")
STARTUP_TIMEOUT = 20.0  # the SDK server needs ~0.8 s; leave room for a loaded CI machine
SHUTDOWN_TIMEOUT = 10.0
CLIENT_TIMEOUT = 20.0  # around each whole SDK client interaction
METADATA_URL = "https://mcp.example.test/.well-known/oauth-protected-resource/mcp"
MODES: list[Mode] = ["legacy", "auto"]


@dataclass
class EchoServer:
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Exchange:
    method: str
    status: int
    request_headers: httpx2.Headers
    response_headers: httpx2.Headers


@dataclass
class Recorder:
    """Every HTTP exchange the SDK client made, as the SDK client saw it."""

    exchanges: list[Exchange] = field(default_factory=list)

    async def __call__(self, response: httpx2.Response) -> None:
        self.exchanges.append(
            Exchange(
                response.request.method,
                response.status_code,
                response.request.headers,
                response.headers,
            )
        )

    def summary(self) -> list[tuple[str, int]]:
        return [(e.method, e.status) for e in self.exchanges]






@pytest.fixture
async def echo_server(tmp_path: Path) -> AsyncIterator[EchoServer]:
    """The official-SDK echo server as a real child process on a free loopback port."""
    port = free_port()
    log_path = tmp_path / "mcp_echo_server.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ECHO_SERVER),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.returncode is not None:
                pytest.fail(
                    f"echo server exited with {process.returncode}:\n"
                    f"{log_path.read_text(errors='replace')}"
                )
            try:
                async with asyncio.timeout(1.0):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"echo server not listening on {port} after {STARTUP_TIMEOUT} s:"
                        f"\n{log_path.read_text(errors='replace')}"
                    )
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            break
        yield EchoServer(port)
    finally:
        await stop_process(process)


@pytest.fixture
async def mcp_url(make_sidecar: SidecarFactory, echo_server: EchoServer) -> str:
    """The sidecar's real loopback /mcp URL, proxying to the echo server."""
    sidecar = await make_sidecar(MCP_UPSTREAM_URL=echo_server.url)
    return str(sidecar.make_url("/mcp"))


@pytest.mark.parametrize("mode", MODES)
async def test_sdk_client_calls_echo_through_sidecar(
    mcp_url: str, idp: FakeIdp, mode: Mode
) -> None:
    recorder = Recorder()
    async with asyncio.timeout(CLIENT_TIMEOUT):
        text = await call_echo(
            mcp_url, idp.mint(), "hello through the sidecar", mode=mode, on_response=recorder
        )
    assert text == "hello through the sidecar"
    statuses = recorder.summary()
    assert all(status < 400 for _, status in statuses), statuses
    if mode == "legacy":
        # initialize answered with a session id; every later request carried it, including
        # the session-closing DELETE, which the upstream accepted through the sidecar.
        first = recorder.exchanges[0]
        assert first.method == "POST"
        session_id = first.response_headers.get("mcp-session-id")
        assert session_id, statuses
        later = recorder.exchanges[1:]
        assert later, statuses
        assert all(e.request_headers.get("mcp-session-id") == session_id for e in later)
        assert ("GET", 200) in statuses, statuses  # the standalone SSE stream, through the proxy
        assert ("DELETE", 200) in statuses or ("DELETE", 204) in statuses, statuses


@pytest.mark.parametrize("mode", MODES)
async def test_upstream_gets_no_credentials_but_protocol_version(
    mcp_url: str, idp: FakeIdp, echo_server: EchoServer, mode: Mode
) -> None:
    token = idp.mint()
    async with asyncio.timeout(CLIENT_TIMEOUT):
        seen = await call_whoami(
            mcp_url, token, mode=mode, extra_headers={"Cookie": "session=secret-cookie"}
        )
    assert "authorization" not in seen, seen
    assert "cookie" not in seen, seen
    assert "origin" not in seen, seen
    assert token not in repr(seen)
    assert "secret-cookie" not in repr(seen)
    assert seen.get("mcp-protocol-version"), seen
    assert seen.get("host") == f"127.0.0.1:{echo_server.port}", seen
    assert seen.get("x-forwarded-host") == "mcp.example.test", seen
    assert seen.get("x-forwarded-proto") == "https", seen


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("credentials", ["none", "expired"])
async def test_sdk_client_without_valid_token_is_refused(
    mcp_url: str, idp: FakeIdp, mode: Mode, credentials: str
) -> None:
    token = None
    if credentials == "expired":
        past = int(time.time()) - 3600  # far beyond the default 30 s leeway
        token = idp.mint(claims={"exp": past, "iat": past - 300, "nbf": past - 300})
    recorder = Recorder()
    async with asyncio.timeout(CLIENT_TIMEOUT):
        await expect_unauthorized(mcp_url, mode=mode, token=token, on_response=recorder)
    statuses = recorder.summary()
    assert statuses, "the SDK client made no HTTP request"
    assert all(status == 401 for _, status in statuses), statuses  # nothing got through
    for exchange in recorder.exchanges:
        challenge = exchange.response_headers.get_list("www-authenticate")
        assert len(challenge) == 1, challenge
        assert challenge[0].startswith("Bearer "), challenge
        assert f'resource_metadata="{METADATA_URL}"' in challenge[0], challenge
        if credentials == "expired":
            assert 'error="invalid_token"' in challenge[0], challenge
        else:
            assert "error=" not in challenge[0], challenge  # RFC 6750 §3.1
