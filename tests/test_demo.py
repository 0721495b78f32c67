"""`oauth-sidecar demo` as a newcomer runs it: a real subprocess, its printout parsed and its
commands run as printed (curl), the official SDK client through the sidecar with the printed
token and with a full OAuth sign-in at the development provider, then the refusals that prove
the sidecar validates for real, the loopback-only rule, a taken port and a clean SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shlex
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from dev_browser import DevProviderSdkClient
from mcp_client_probe import call_echo, call_whoami
from processes import PROCESS_TIMEOUT, REPO, run_cli, run_to_end, stop_process

# Every test here runs real processes (see the marker in pyproject.toml).
pytestmark = pytest.mark.slow

Process = asyncio.subprocess.Process
CLIENT_TIMEOUT = 30.0
CURL_TIMEOUT = 10.0


@dataclass
class Demo:
    proc: Process
    printed: str
    log: list[str] = field(default_factory=list)
    """stdout after the printout: the log, one JSON object per line (stdout is a pipe)."""

    def after(self, heading: str) -> str:
        """The line after the one starting with `heading`, unindented."""
        lines = self.printed.splitlines()
        index = next(i for i, line in enumerate(lines) if line.startswith(heading))
        return lines[index + 1].strip()

    @property
    def url(self) -> str:
        return self.after("MCP server URL")

    @property
    def issuer(self) -> str:
        return self.after("Development OpenID provider")

    @property
    def token(self) -> str:
        return self.after("Bearer token for alice@example.com")

    def commands(self, program: str) -> list[list[str]]:
        return [shlex.split(line) for line in self.printed.splitlines()
                if line.startswith(f"  {program} ")]

    grew: asyncio.Event = field(default_factory=asyncio.Event)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log if line.startswith("{")]

    async def log_shows(self, predicate: Callable[[list[dict[str, Any]]], bool]) -> None:
        """Until the log satisfies predicate; the caller bounds the wait."""
        while True:
            self.grew.clear()
            if predicate(self.events()):
                return
            await self.grew.wait()


@asynccontextmanager
async def running_demo(*args: str) -> AsyncIterator[Demo]:
    """`python -m oauth_sidecar demo --port 0 ARGS`, until its printout is complete; its later
    output is drained in the background (a full pipe would block it). Always stopped."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "oauth_sidecar", "demo", "--port", "0", *args, env={}, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    drain: asyncio.Task[None] | None = None
    try:
        lines: list[str] = []
        async with asyncio.timeout(PROCESS_TIMEOUT):
            while not lines or not lines[-1].startswith("Stop with Ctrl-C"):
                line = await proc.stdout.readline()
                if not line:
                    raise AssertionError(f"demo exited early: {lines}")
                lines.append(line.decode().rstrip("\n"))
        start = next(i for i, line in enumerate(lines) if line.startswith("oauth-sidecar demo:"))
        demo = Demo(proc, "\n".join(lines[start:]), log=lines[:start])

        async def read_log() -> None:
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                demo.log.append(line.decode().rstrip("\n"))
                demo.grew.set()

        drain = asyncio.create_task(read_log())
        yield demo
    finally:
        await stop_process(proc)
        if drain is not None:
            await asyncio.wait_for(drain, PROCESS_TIMEOUT)


async def run_printed(words: list[str]) -> tuple[int, dict[str, str], str]:
    """Run a printed curl command word for word (no proxy variables: env is empty) and parse
    its `-i` output: status, headers (lower-case names), body."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    code, stdout, stderr = await run_to_end(*words, env={}, within=CURL_TIMEOUT)
    assert code == 0, stderr
    head, _, body = stdout.partition("\r\n\r\n")
    status_line, *header_lines = head.split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def get_status(url: str, token: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(trust_env=False) as http, http.get(
        url, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        return response.status, response.headers.get("WWW-Authenticate", "")


@pytest.fixture
async def demo() -> AsyncIterator[Demo]:
    async with running_demo() as running:
        yield running


# --- as printed -------------------------------------------------------------------------------


async def test_the_printed_curl_commands_work_as_printed(demo: Demo) -> None:
    origin = demo.url.removesuffix("/mcp")
    unauthenticated, initialize = demo.commands("curl")
    status, headers, _ = await run_printed(unauthenticated)
    assert status == 401
    assert headers["www-authenticate"] == (
        f'Bearer resource_metadata="{origin}/.well-known/oauth-protected-resource/mcp"')

    status, headers, body = await run_printed(initialize)
    assert status == 200, body
    answer = json.loads(body)
    assert answer["jsonrpc"] == "2.0"
    assert answer["id"] == 1
    assert answer["result"]["protocolVersion"] == "2025-11-25"
    assert answer["result"]["serverInfo"]["name"] == "oauth-sidecar-example"
    assert headers["mcp-session-id"]

    # The log that follows the printout shows both requests, and never the token.
    async with asyncio.timeout(PROCESS_TIMEOUT):
        await demo.log_shows(lambda events: len([e for e in events if e["event"] == "request"]) > 1)
    requests = [e for e in demo.events() if e.get("event") == "request"]
    assert [(e["method"], e["path"], e["status"], e["sub"]) for e in requests] == [
        ("GET", "/mcp", 401, None), ("POST", "/mcp", 200, "alice")]
    assert demo.token.split(".")[2] not in "\n".join(demo.log)


async def test_the_printed_client_commands_carry_the_url_and_token(demo: Demo) -> None:
    bearer = f"Authorization: Bearer {demo.token}"
    [claude] = demo.commands("claude")
    assert claude == ["claude", "mcp", "add", "--transport", "http", "oauth-sidecar-demo",
                      demo.url, "--header", bearer]
    [inspector] = demo.commands("npx")
    assert inspector[:3] == ["npx", "@modelcontextprotocol/inspector", "--cli"]
    assert inspector[3] == demo.url  # v2 reads the target first
    assert inspector[inspector.index("--transport") + 1] == "http"
    assert inspector[inspector.index("--header") + 1] == bearer
    claims = jwt.decode(demo.token, options={"verify_signature": False})
    assert (claims["iss"], claims["aud"], claims["sub"]) == (demo.issuer, demo.url, "alice")
    assert claims["exp"] - claims["iat"] == 3600


async def test_the_printed_token_works_with_the_official_sdk_client(demo: Demo) -> None:
    async with asyncio.timeout(CLIENT_TIMEOUT):
        assert await call_echo(demo.url, demo.token, "hello, demo") == "hello, demo"
        assert await call_echo(demo.url, demo.token, "auto", mode="auto") == "auto"
        seen = await call_whoami(demo.url, demo.token)
    assert seen == {"user": "alice", "email": "alice@example.com", "groups": "mcp-users",
                    "issuer": demo.issuer}


# --- a client that signs in by itself ---------------------------------------------------------


async def test_full_oauth_sign_in_at_the_dev_provider_then_refresh(demo: Demo) -> None:
    client = DevProviderSdkClient(demo.url)
    result = await client.session((("echo", {"text": "signed in"}), ("whoami", {})))
    assert result.results[0] == "signed in"
    assert json.loads(result.results[1])["email"] == "alice@example.com"
    # Discovery the way a client does it: 401 challenge -> RFC 9728 -> the provider's metadata.
    summary = result.summary()
    assert summary[0][1:] == (demo.url, 401)
    assert result.protected_resource_metadata is not None
    assert [str(s).rstrip("/") for s in
            result.protected_resource_metadata.authorization_servers] == [demo.issuer]
    assert result.authorization_server_metadata is not None
    assert str(result.authorization_server_metadata.issuer).rstrip("/") == demo.issuer
    assert ("POST", f"{demo.issuer}/register", 201) in summary
    params = result.authorization_params()
    assert params["resource"] == demo.url
    assert params["code_challenge_method"] == "S256"
    assert result.iss == demo.issuer  # RFC 9207
    token_requests = [e for e in result.exchanges if e.url == f"{demo.issuer}/token"]
    assert [e.status for e in token_requests] == [200]
    assert token_requests[0].form["resource"] == demo.url
    assert result.claims is not None
    assert (result.claims["aud"], result.claims["iss"]) == (demo.url, demo.issuer)

    # Refresh as a client does when its access token expires; the old refresh token is spent.
    assert result.tokens is not None
    assert result.client_info is not None
    refresh_token = result.tokens.refresh_token
    assert refresh_token is not None
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token,
            "client_id": str(result.client_info.client_id), "resource": demo.url}
    async with aiohttp.ClientSession(trust_env=False) as http:
        async with http.post(f"{demo.issuer}/token", data=form) as response:
            assert response.status == 200
            renewed = await response.json()
        async with http.post(f"{demo.issuer}/token", data=form) as response:
            assert response.status == 400
    assert renewed["access_token"] != result.tokens.access_token
    async with asyncio.timeout(CLIENT_TIMEOUT):
        assert await call_echo(demo.url, renewed["access_token"], "refreshed") == "refreshed"
    # The ID token is signed by the same key but names the client, not the resource: refused.
    status, challenge = await get_status(demo.url, renewed["id_token"])
    assert status == 401
    assert 'error="invalid_token"' in challenge


async def test_bob_signs_in_but_is_on_no_allow_list_so_the_sidecar_answers_403(
    demo: Demo,
) -> None:
    client = DevProviderSdkClient(demo.url, user="bob")
    result = await client.session(allow_failure=True)
    assert result.error is not None
    assert result.claims is not None
    assert result.claims["sub"] == "bob"
    assert (demo.url, 403) in [(e.url, e.status) for e in result.exchanges], result.describe()
    assert not result.results


# --- the sidecar validates for real -----------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_tampered_unsigned_and_forged_tokens_are_refused_with_401(demo: Demo) -> None:
    header, payload, signature = demo.token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    kid = jwt.get_unverified_header(demo.token)["kid"]
    as_bob = _b64(json.dumps({**claims, "sub": "bob"}).encode())
    forged_key = ec.generate_private_key(ec.SECP256R1())
    refused = {
        "tampered payload": f"{header}.{as_bob}.{signature}",
        "alg none": f"{_b64(json.dumps({'alg': 'none', 'typ': 'at+jwt'}).encode())}.{payload}.",
        "same kid, another key": jwt.encode(claims, forged_key, algorithm="ES256",
                                            headers={"kid": kid, "typ": "at+jwt"}),
    }
    for why, token in refused.items():
        status, challenge = await get_status(demo.url, token)
        assert status == 401, why
        assert 'error="invalid_token"' in challenge, why
    # The genuine token passes the gate; the example server then answers GET with 405.
    assert (await get_status(demo.url, demo.token))[0] == 405


# --- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.com"])  # noqa: S104
async def test_a_non_loopback_host_is_refused_with_the_reason(host: str) -> None:
    code, stdout, stderr = await run_cli("demo", "--host", host, env={})
    assert code == 2
    assert stdout == ""
    assert f"refusing to listen on {host}" in stderr
    assert "without a password" in stderr
    assert "loopback" in stderr
    assert "Traceback" not in stderr


async def test_a_taken_port_exits_2_suggesting_another() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stdout, stderr = await run_cli("demo", "--port", str(port), env={})
    assert code == 2
    assert stdout == ""
    assert re.search(rf"port {port} on 127.0.0.1 is already in use: choose another with --port",
                     stderr), stderr
    assert "Traceback" not in stderr


async def test_help_names_the_options() -> None:
    code, stdout, _ = await run_cli("demo", "--help", env={})
    assert code == 0
    for option in ("--host", "--port", "--idp-port", "--mcp-port", "loopback"):
        assert option in stdout


async def test_sigterm_exits_0_and_leaves_nothing_listening() -> None:
    async with running_demo() as demo:
        upstream = demo.printed.split("MCP_UPSTREAM_URL=", 1)[1].split()[0]
        addresses = [demo.url, f"{demo.issuer}/jwks", upstream]
        for url in addresses:
            async with aiohttp.ClientSession(trust_env=False) as http, http.get(url) as response:
                assert response.status in (200, 401, 405)
        demo.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(PROCESS_TIMEOUT):
            await demo.proc.wait()
        assert demo.proc.returncode == 0
        assert demo.proc.stderr is not None
        stderr = (await demo.proc.stderr.read()).decode()
        assert "Traceback" not in stderr
    for url in addresses:
        async with aiohttp.ClientSession(trust_env=False) as http:
            with pytest.raises(aiohttp.ClientConnectionError):
                await http.get(url)
