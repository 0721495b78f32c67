"""The command line, run as real subprocesses: configuration errors, help, serving, shutdown."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time
from typing import Any

import aiohttp
import pytest
from conftest import FakeIdp, FakeUpstream, bearer, sidecar_env, wait_until
from processes import PROCESS_TIMEOUT, REPO, free_port, run_cli, sidecar_process, wait_ready

from oauth_sidecar import __version__
from oauth_sidecar.config import VARIABLES, load

REQUIRED = ("OIDC_ISSUER_URL", "OIDC_AUDIENCE", "RESOURCE_URL", "MCP_UPSTREAM_URL")
SHUTDOWN_TIMEOUT = 2.0
SHUTDOWN_SLACK = 4.0
Process = asyncio.subprocess.Process


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


# -- configuration errors and documentation ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("command", [(), ("serve",)], ids=["default", "serve"])
async def test_empty_environment_exits_2_listing_every_required_variable(
    command: tuple[str, ...],
) -> None:
    code, stdout, stderr = await run_cli(*command, env={})
    assert code == 2
    assert stdout == ""
    assert "cannot start" in stderr
    for name in REQUIRED:
        assert re.search(rf"^  - {name} is required", stderr, re.MULTILINE), name


@pytest.mark.slow
async def test_version_flag_prints_the_version() -> None:
    code, stdout, _ = await run_cli("--version", env={})
    assert code == 0
    assert stdout.strip() == f"oauth-sidecar {__version__}"


@pytest.mark.slow
async def test_unknown_command_exits_2_naming_the_commands() -> None:
    code, _, stderr = await run_cli("srve", env={})
    assert code == 2
    assert "invalid choice: 'srve'" in stderr


@pytest.mark.slow
async def test_help_lists_every_variable() -> None:
    code, stdout, _ = await run_cli("--help", env={})
    assert code == 0
    for name in VARIABLES:
        assert re.search(rf"^  {name}\s", stdout, re.MULTILINE), name


def test_env_example_documents_every_variable() -> None:
    example = REPO / ".env.example"
    assert example.is_file(), ".env.example is missing at the repository root"
    text = example.read_text()
    for name in VARIABLES:
        assert re.search(rf"^[#\s]*(?:export\s+)?{name}=", text, re.MULTILINE), name


def env_example_assignments(*, commented: bool) -> dict[str, str]:
    example = REPO / ".env.example"
    assert example.is_file(), ".env.example is missing at the repository root"
    prefix = r"#\s*" if commented else ""
    pattern = rf"^{prefix}(?:export\s+)?([A-Z][A-Z0-9_]*)=(.*)$"
    return {name: value.strip().strip("\"'")
            for name, value in re.findall(pattern, example.read_text(), re.MULTILINE)}


def test_env_example_as_is_is_a_valid_configuration() -> None:
    config = load(env_example_assignments(commented=False))
    assert config.warnings == ()


def test_env_example_commented_defaults_match_the_table() -> None:
    commented = env_example_assignments(commented=True)
    for name, value in commented.items():
        assert name in VARIABLES, name
        if value:
            assert value == VARIABLES[name][0], name


def test_env_example_active_lines_name_only_supported_variables() -> None:
    """Copying the example as-is must never name a variable that is silently ignored."""
    example = REPO / ".env.example"
    assert example.is_file(), ".env.example is missing at the repository root"
    active = re.findall(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=", example.read_text(),
                        re.MULTILINE)
    for name in active:
        assert name in VARIABLES, name


@pytest.mark.slow
@pytest.mark.parametrize("password", ["hunter2/x", "hunter2?x", "hunter2#x", "hunter2/x?y#z"])
async def test_a_storage_uri_whose_password_has_an_unencoded_separator_exits_2_without_it(
    password: str,
) -> None:
    """It used to print the whole URI in the start-up line, then crash with a traceback
    quoting it again; now it is a configuration problem naming the variable, never the value."""
    env = {"OIDC_ISSUER_URL": "https://idp.example.test", "OIDC_AUDIENCE": "mcp",
           "RESOURCE_URL": "https://mcp.example.test/mcp", "MCP_UPSTREAM_URL": "http://127.0.0.1:9",
           "ALLOW_ALL_AUTHENTICATED": "true", "HOST": "127.0.0.1", "PORT": str(free_port()),
           "RATE_LIMIT_STORAGE_URI": f"redis://:{password}@127.0.0.1:6379/0"}
    code, stdout, stderr = await run_cli(env=env)
    assert code == 2, stderr
    assert stdout == ""
    assert "Traceback" not in stderr
    assert re.search(r"^  - RATE_LIMIT_STORAGE_URI .*percent-encode", stderr, re.MULTILINE)
    assert "hunter2" not in stderr


# -- a real run ----------------------------------------------------------------------------------


async def sigterm_with_stream_open(
    proc: Process, session: aiohttp.ClientSession, base: str, token: str
) -> tuple[float, str, str]:
    """Open an SSE stream through the sidecar, SIGTERM it mid-stream, wait (bounded) for exit."""
    async with session.get(base + "/sse", headers=bearer(token)) as stream:
        assert stream.status == 200
        assert stream.content_type == "text/event-stream"
        received = b""
        async with asyncio.timeout(PROCESS_TIMEOUT):
            while b"event-2" not in received:
                received += await stream.content.readany()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), PROCESS_TIMEOUT)
        return time.monotonic() - started, stdout.decode(), stderr.decode()


@pytest.mark.slow
@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_serves_logs_json_and_exits_cleanly_on_sigterm_with_a_stream_open(
    idp: FakeIdp, upstream: FakeUpstream, event_loop: str
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(port),
                      SHUTDOWN_TIMEOUT_SECONDS=str(SHUTDOWN_TIMEOUT), EVENT_LOOP=event_loop)
    token = idp.mint()
    timeout = aiohttp.ClientTimeout(total=PROCESS_TIMEOUT, sock_connect=1)
    async with sidecar_process(env) as proc, aiohttp.ClientSession(timeout=timeout) as session:
        await wait_ready(session, base, proc)
        async with session.post(base + "/mcp", data=b"{}", headers=bearer(token)) as response:
            assert response.status == 200
        async with session.post(base + "/mcp") as response:
            assert response.status == 401
        async with session.get(f"{base}/mcp?access_token={token}") as response:
            assert response.status == 400
        elapsed, stdout, stderr = await sigterm_with_stream_open(proc, session, base, token)
    assert proc.returncode == 0, stderr
    # The open event stream is ended at shutdown, so the exit does not wait for the timeout.
    assert elapsed < SHUTDOWN_TIMEOUT + SHUTDOWN_SLACK
    await wait_until(upstream.stream_closed.is_set)  # the upstream stream was released too

    events = json_lines(stdout)  # LOG_FORMAT=auto and stdout is a pipe: every line is JSON
    names = [event["event"] for event in events]
    assert names[0] == "starting"
    assert events[0]["event_loop"] == event_loop
    assert names[-1] == "stopped"
    access = [e for e in events if e["event"] == "request"]
    served = [e for e in access if e["path"] == "/mcp" and e["status"] == 200]
    assert len(served) == 1
    assert served[0]["method"] == "POST"
    assert served[0]["sub"] == "user-1"
    assert served[0]["level"] == "info"
    assert "timestamp" in served[0]
    assert {"duration_ms", "request_id"} <= served[0].keys()
    assert any(e["status"] == 401 and e["auth_error"] == "missing" for e in access)
    assert any(e["status"] == 400 and e["auth_error"] == "token_in_query" for e in access)
    assert any(e["path"] == "/sse" and e["sub"] == "user-1" for e in access)
    for part in (token, *token.split(".")[1:]):
        assert part not in stdout
        assert part not in stderr


@pytest.mark.slow
async def test_sigterm_with_a_stream_open_exits_within_the_shutdown_timeout(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    shutdown_timeout = 1.0
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(port),
                      SHUTDOWN_TIMEOUT_SECONDS=str(shutdown_timeout))
    timeout = aiohttp.ClientTimeout(total=PROCESS_TIMEOUT, sock_connect=1)
    async with sidecar_process(env) as proc, aiohttp.ClientSession(timeout=timeout) as session:
        await wait_ready(session, base, proc)
        elapsed, _, stderr = await sigterm_with_stream_open(proc, session, base, idp.mint())
    assert proc.returncode == 0, stderr
    assert elapsed < shutdown_timeout + 0.75


@pytest.mark.slow
async def test_port_in_use_exits_2_with_listen_failed(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(port))
        code, stdout, _ = await run_cli(env=env)
    assert code == 2
    failures = [e for e in json_lines(stdout) if e["event"] == "listen_failed"]
    assert len(failures) == 1
    assert failures[0]["port"] == port
    assert failures[0]["level"] == "error"


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["console", "json"])
async def test_log_format_is_honoured(
    idp: FakeIdp, upstream: FakeUpstream, log_format: str
) -> None:
    """A taken port ends the run at once; the start-up line already shows the format."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(taken.getsockname()[1]),
                          LOG_FORMAT=log_format)
        code, stdout, _ = await run_cli(env=env)
    assert code == 2
    first = stdout.splitlines()[0]
    if log_format == "json":
        assert json.loads(first)["event"] == "starting"
    else:
        assert not first.startswith("{")
        assert "starting" in first


@pytest.mark.slow
async def test_start_up_line_summarises_the_configuration_without_secrets(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Any
) -> None:
    """What an operator needs to see what is in force; no secret and no allow-list entry."""
    secrets = {"STATIC_CLIENT_SECRET": "client-secret-7f3a", "STATE_SECRET": "s" * 40,
               "redis password": "hunter2-redis"}
    groups = tmp_path / "groups"
    groups.write_text("mcp-users\nstaff\n", encoding="utf-8")
    with socket.socket() as taken:  # a taken port ends the run right after the start-up line
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = sidecar_env(
            idp, upstream, HOST="127.0.0.1", PORT=str(taken.getsockname()[1]),
            ALLOW_ALL_AUTHENTICATED="false", ALLOW_EMAILS="alice@example.com",
            ALLOW_GROUPS_FILE=str(groups), AUTH_SERVER_MODE="facade", STATIC_CLIENT_ID="mcp-app",
            STATIC_CLIENT_SECRET=secrets["STATIC_CLIENT_SECRET"],
            STATE_SECRET=secrets["STATE_SECRET"], RATE_LIMIT_RPM="120",
            RATE_LIMIT_STORAGE_URI=f"redis://:{secrets['redis password']}@127.0.0.1:1/0",
        )
        code, stdout, stderr = await run_cli(env=env)
    assert code == 2, stderr
    starting = json_lines(stdout)[0]
    assert starting["event"] == "starting"
    assert starting["auth_server_mode"] == "facade"
    assert starting["static_client_id"] == "mcp-app"
    assert starting["static_client_secret"] == "(set)"
    assert starting["allow"] == {"subs": 0, "emails": 1, "email_domains": 0, "groups": 2,
                                 "files": [str(groups)], "all_authenticated": False}
    assert starting["rate_limit_rpm"] == 120
    assert starting["rate_limit_storage"] == "redis://***@127.0.0.1:1/0"
    for secret in (*secrets.values(), "alice@example.com", "staff"):
        assert secret not in stdout + stderr
