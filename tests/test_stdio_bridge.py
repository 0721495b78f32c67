"""The stdio bridge end to end: the real sidecar (create_app(load(env)) on loopback) in front of
real stdio children (tests/children/stdio_echo.py), driven over Streamable HTTP with real
tokens. Covers sessions and their 404s, JSON and SSE answers, 202s, the GET stream, DELETE,
subjects kept apart, the caps, idle reaping, crashes, client disconnects, bad stdout lines and
shutdown. Every wait is bounded, and every pid a test saw must be gone at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import AUDIENCE, RESOURCE_URL, FakeIdp, SidecarFactory, bearer, wait_until
from mcp_client_probe import call_echo
from processes import PROCESS_TIMEOUT, free_port, sidecar_process, wait_ready
from structlog.testing import capture_logs

from oauth_sidecar.app import STDIO_POOL
from oauth_sidecar.config import ConfigError, load
from oauth_sidecar.upstream import stdio_child
from oauth_sidecar.upstream.stdio_pool import subject_hash

ECHO = Path(__file__).resolve().parent / "children" / "stdio_echo.py"
MCP = "/mcp"
JSON_ONLY = {"Accept": "application/json"}
BOTH = {"Accept": "application/json, text/event-stream"}
TIMEOUT = aiohttp.ClientTimeout(total=20)
GONE_WITHIN = 10.0  # seconds a stopped child gets to disappear

Client = TestClient[web.Request, web.Application]
Events = Sequence[Mapping[str, Any]]


def stdio_env(**extra: str) -> dict[str, str]:
    return {"MCP_SPAWN_CMD": json.dumps([sys.executable, str(ECHO)]), "MCP_UPSTREAM_URL": "",
            "FORWARD_IDENTITY": "true", "MCP_SPAWN_STOP_TIMEOUT_SECONDS": "2", **extra}


def auth(idp: FakeIdp, sub: str = "user-1", **claims: Any) -> dict[str, str]:
    return bearer(idp.mint(claims={"sub": sub, **claims}))


def rpc(request_id: int | str | None, method: str, **params: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params:
        message["params"] = params
    if request_id is not None:
        message["id"] = request_id
    return message


INITIALIZE = rpc(1, "initialize", protocolVersion="2025-11-25", capabilities={},
                 clientInfo={"name": "test", "version": "1"})


async def post(client: Client, body: object, headers: Mapping[str, str],
               session: str | None = None, accept: Mapping[str, str] = JSON_ONLY
               ) -> aiohttp.ClientResponse:
    extra = {"Mcp-Session-Id": session} if session else {}
    return await client.post(MCP, json=body, headers={**headers, **accept, **extra},
                             timeout=TIMEOUT)


async def initialize(client: Client, headers: Mapping[str, str]) -> str:
    response = await post(client, INITIALIZE, headers)
    assert response.status == 200, await response.text()
    assert (await response.json())["result"]["serverInfo"]["name"] == "stdio-echo"
    session = response.headers["Mcp-Session-Id"]
    initialized = await post(client, rpc(None, "notifications/initialized"), headers, session)
    assert initialized.status == 202
    return session


async def call(client: Client, headers: Mapping[str, str], session: str | None, name: str,
               request_id: int = 2, **arguments: Any) -> dict[str, Any]:
    response = await post(client, rpc(request_id, "tools/call", name=name, arguments=arguments),
                          headers, session)
    assert response.status == 200, await response.text()
    answer: dict[str, Any] = await response.json()
    return answer


def text(answer: Mapping[str, Any]) -> str:
    return str(answer["result"]["content"][0]["text"])


async def pid_of(client: Client, headers: Mapping[str, str], session: str | None
                 ) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(text(await call(client, headers, session, "pid")))
    return found


def events(body: str) -> list[dict[str, Any]]:
    return [json.loads(line.removeprefix("data: ")) for line in body.splitlines()
            if line.startswith("data: ")]


def gone(pid: int) -> bool:
    """Gone, or a zombie nobody here must reap (a grandchild's parent is init)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] == "Z" and int(fields[1]) != os.getpid()
    return False


async def all_gone(pids: Sequence[int]) -> None:
    await wait_until(lambda: all(gone(pid) for pid in pids), within=GONE_WITHIN)


def child_lines(logs: Events) -> list[str]:
    return [str(e["line"]) for e in logs if e["event"] == "child_output"]


@pytest.mark.slow
async def test_initialize_issues_a_session_and_requests_are_answered_as_json(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env())
    headers = auth(idp)
    session = await initialize(client, headers)
    answer = await call(client, headers, session, "echo", text="hello")
    assert answer["id"] == 2
    assert text(answer) == "hello"
    batch = await post(client, [rpc(7, "tools/call", name="echo", arguments={"text": "a"}),
                                rpc("x", "ping")], headers, session)
    answers = await batch.json()
    assert [a["id"] for a in answers] == [7, "x"]
    assert text(answers[0]) == "a"
    pid = (await pid_of(client, headers, session))["pid"]
    deleted = await client.delete(MCP, headers={**headers, "Mcp-Session-Id": session})
    assert deleted.status == 204
    assert (await post(client, rpc(3, "ping"), headers, session)).status == 404
    await all_gone([pid])


@pytest.mark.slow
async def test_lone_surrogates_in_a_subject_or_a_request_are_never_a_500(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    """JSON can carry "\\ud800", which no UTF-8 text holds: in a request it is relayed to the
    child still escaped, and a subject holding one gets its budget, its child and its
    forwarded identity like any other (a re-encoding once raised: a 500)."""
    client = await make_sidecar(**stdio_env(RATE_LIMIT_RPM="100"))
    headers = auth(idp, sub="user-\ud800")
    session = await initialize(client, headers)
    answer = await call(client, headers, session, "echo", text="a\ud800b")
    assert text(answer) == "a\ud800b"
    raw = await post(client, rpc(9, "tools/call", name="echo", arguments={"text": "\udfff"}),
                     headers, session)
    assert raw.status == 200
    assert b'"\\udfff"' in await raw.read()  # escaped as it came, never raw bytes
    # The child's MCP_USER_SUB holds the surrogate's own bytes (what the headers percent-encode).
    seen = (await pid_of(client, headers, session))["sub"]
    assert seen.encode("utf-8", "surrogateescape") == b"user-\xed\xa0\x80"


@pytest.mark.slow
async def test_requests_accepting_event_streams_get_progress_then_the_answer(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env())
    headers = auth(idp)
    session = await initialize(client, headers)
    response = await post(client, rpc(5, "tools/call", name="slow", arguments={"seconds": 0.3},
                                      _meta={"progressToken": "p"}), headers, session, BOTH)
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    received = events(await response.text())
    progress = [e for e in received if e.get("method") == "notifications/progress"]
    assert progress
    assert all(e["params"]["progressToken"] == "p" for e in progress)
    assert received[-1]["id"] == 5
    assert text(received[-1]) == "slept 0.3"


@pytest.mark.slow
async def test_subjects_get_their_own_children_and_never_each_others_sessions(
    make_sidecar: SidecarFactory, idp: FakeIdp, tmp_path: Path
) -> None:
    client = await make_sidecar(**stdio_env(MCP_SPAWN_WORKDIR_ROOT=str(tmp_path)))
    alice, bob = auth(idp, "alice"), auth(idp, "bob")
    alice_session = await initialize(client, alice)
    bob_session = await initialize(client, bob)
    seen_by_alice = await pid_of(client, alice, alice_session)
    seen_by_bob = await pid_of(client, bob, bob_session)
    assert seen_by_alice["pid"] != seen_by_bob["pid"]
    assert (seen_by_alice["sub"], seen_by_bob["sub"]) == ("alice", "bob")
    assert seen_by_alice["issuer"] == idp.issuer
    workdir = tmp_path / subject_hash((idp.issuer, "alice"))
    assert seen_by_alice["cwd"] == str(workdir)
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
    stolen = await post(client, rpc(9, "tools/call", name="pid"), bob, alice_session)
    assert stolen.status == 404
    assert (await pid_of(client, alice, alice_session))["pid"] == seen_by_alice["pid"]


@pytest.mark.slow
async def test_the_email_goes_to_the_child_only_when_verified(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env())
    verified = auth(idp, "v", email="v@example.com", email_verified=True)
    unverified = auth(idp, "u", email="u@example.com")
    assert (await pid_of(client, verified, await initialize(client, verified)))["email"] == (
        "v@example.com")
    assert (await pid_of(client, unverified, await initialize(client, unverified)))[
        "email"] is None


@pytest.mark.slow
async def test_requests_without_a_session_share_the_subjects_sessionless_child(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env())
    headers = auth(idp)
    first, second = await pid_of(client, headers, None), await pid_of(client, headers, None)
    assert first["pid"] == second["pid"]
    listed = await post(client, rpc(1, "tools/list"), headers)
    assert (await listed.json())["result"]["tools"][0]["name"] == "echo"
    other = await pid_of(client, auth(idp, "other"), None)
    assert other["pid"] != first["pid"]


@pytest.mark.slow
async def test_the_caps_answer_429_for_a_subject_and_503_for_everyone(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env(MCP_SPAWN_MAX_PER_SUBJECT="1",
                                            MCP_SPAWN_MAX_PROCESSES="2"))
    alice, bob, carol = auth(idp, "alice"), auth(idp, "bob"), auth(idp, "carol")
    await initialize(client, alice)
    again = await post(client, INITIALIZE, alice)
    assert again.status == 429
    assert again.headers["Retry-After"].isdigit()
    assert (await again.json())["error"] == "rate_limited"
    await initialize(client, bob)
    full = await post(client, INITIALIZE, carol)
    assert full.status == 503
    assert full.headers["Retry-After"].isdigit()
    assert (await full.json())["error"] == "temporarily_unavailable"


@pytest.mark.slow
async def test_scope_subject_keeps_one_child_per_subject(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env(MCP_SPAWN_SCOPE="subject",
                                            MCP_SPAWN_MAX_PER_SUBJECT="2"))
    headers = auth(idp)
    first = await initialize(client, headers)
    old_pid = (await pid_of(client, headers, first))["pid"]
    second = await initialize(client, headers)  # the old child is no longer counted
    assert (await post(client, rpc(3, "ping"), headers, first)).status == 404
    assert (await pid_of(client, headers, second))["pid"] != old_pid
    await all_gone([old_pid])
    racing = await asyncio.gather(*(post(client, INITIALIZE, headers) for _ in range(3)))
    assert all(response.status in (200, 429) for response in racing)
    pool = client.app[STDIO_POOL]
    await wait_until(lambda: pool.children() == 1, within=GONE_WITHIN)


@pytest.mark.slow
async def test_an_idle_child_is_stopped_and_its_session_answers_404(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env(MCP_SPAWN_IDLE_SECONDS="0.3"))
    headers = auth(idp)
    session = await initialize(client, headers)
    pid = (await pid_of(client, headers, session))["pid"]
    pool = client.app[STDIO_POOL]
    await wait_until(lambda: pool.children() == 0, within=GONE_WITHIN)
    await all_gone([pid])
    assert (await post(client, rpc(3, "ping"), headers, session)).status == 404


@pytest.mark.slow
async def test_a_crash_answers_its_request_with_an_error_then_the_session_is_gone(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env())
    headers = auth(idp)
    session = await initialize(client, headers)
    pid = (await pid_of(client, headers, session))["pid"]
    with capture_logs() as logs:
        crashed = await call(client, headers, session, "crash")
    assert crashed["error"]["code"] == -32603
    assert crashed["id"] == 2
    exits = [e for e in logs if e["event"] == "child_exited"]
    assert exits[0]["pid"] == pid
    assert exits[0]["how"] == "exit code 3"
    assert (await post(client, rpc(3, "ping"), headers, session)).status == 404
    await all_gone([pid])


@pytest.mark.slow
async def test_a_client_that_leaves_makes_the_child_receive_a_cancellation(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env())
    headers = auth(idp)
    session = await initialize(client, headers)
    with capture_logs() as logs:
        response = await post(client, rpc(5, "tools/call", name="slow",
                                          arguments={"seconds": 30},
                                          _meta={"progressToken": 1}), headers, session, BOTH)
        assert response.status == 200
        async with asyncio.timeout(10):
            await response.content.readline()  # the first progress event has come
        response.close()
        await wait_until(lambda: any(line.startswith("cancelled ") for line in
                                     child_lines(logs)), within=10)
    [line] = [line for line in child_lines(logs) if line.startswith("cancelled ")]
    assert line.endswith("client disconnected")
    assert text(await call(client, headers, session, "echo", text="still here")) == "still here"


@pytest.mark.slow
async def test_lines_too_long_or_not_json_are_dropped_without_losing_the_stream(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env(MCP_SPAWN_MAX_LINE_BYTES="2048"))
    headers = auth(idp)
    session = await initialize(client, headers)
    with capture_logs() as logs:
        assert text(await call(client, headers, session, "noise", size=200_000)) == (
            "after noise")
        assert text(await call(client, headers, session, "echo", 3, text="ok")) == "ok"
    kinds = {e["event"] for e in logs}
    assert {"child_line_not_json", "child_line_too_long"} <= kinds
    assert client.app[STDIO_POOL].counters.dropped == 2


@pytest.mark.slow
async def test_stderr_is_logged_with_the_subjects_hash(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env())
    headers = auth(idp)
    session = await initialize(client, headers)
    with capture_logs() as logs:
        await call(client, headers, session, "stderr", text="to the log")
        await wait_until(lambda: "to the log" in child_lines(logs))
    [event] = [e for e in logs if e.get("line") == "to the log"]
    assert event["subject"] == subject_hash((idp.issuer, "user-1"))
    assert event["stream"] == "stderr"


@pytest.mark.slow
async def test_the_get_stream_carries_messages_tied_to_no_request(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env())
    headers = auth(idp)
    session = await initialize(client, headers)
    stream = await client.get(MCP, headers={**headers, "Mcp-Session-Id": session,
                                            "Accept": "text/event-stream"}, timeout=TIMEOUT)
    assert stream.status == 200
    assert text(await call(client, headers, session, "later")) == "soon"
    async with asyncio.timeout(10):
        while not (line := (await stream.content.readline()).decode()).startswith("data: "):
            pass
    assert json.loads(line.removeprefix("data: "))["method"] == (
        "notifications/tools/list_changed")
    stream.close()


@pytest.mark.slow
async def test_a_server_request_goes_to_the_request_in_flight_and_its_answer_back(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env())
    headers = auth(idp)
    session = await initialize(client, headers)
    response = await post(client, rpc(4, "tools/call", name="elicit"), headers, session, BOTH)
    async with asyncio.timeout(10):
        while not (line := (await response.content.readline()).decode()).startswith("data: "):
            pass
    asked = json.loads(line.removeprefix("data: "))
    assert asked["method"] == "elicitation/create"
    reply = {"jsonrpc": "2.0", "id": asked["id"], "result": {"action": "accept"}}
    assert (await post(client, reply, headers, session)).status == 202
    final = events(await response.text())[-1]
    assert final["id"] == 4
    assert json.loads(text(final)) == {"action": "accept"}


@pytest.mark.slow
async def test_shutdown_stops_every_child_and_grandchild(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env())
    pids = []
    for sub in ("alice", "bob"):
        headers = auth(idp, sub)
        session = await initialize(client, headers)
        pids.append((await pid_of(client, headers, session))["pid"])
        pids.append(int(text(await call(client, headers, session, "grandchild"))))
    pids.append((await pid_of(client, auth(idp, "carol"), None))["pid"])
    assert not any(gone(pid) for pid in pids)
    await client.close()
    await all_gone(pids)


@pytest.mark.parametrize(("extra", "problem"), [
    ({"MCP_SPAWN_TRANSPORT": "stdio", "MCP_SPAWN_PORT": "8765"}, "MCP_SPAWN_TRANSPORT=stdio"),
    ({"MCP_SPAWN_TRANSPORT": "http"}, "MCP_SPAWN_TRANSPORT=http needs MCP_SPAWN_PORT"),
    ({"MCP_UPSTREAM_URL": "http://127.0.0.1:1"}, "MCP_UPSTREAM_URL and MCP_SPAWN_CMD"),
    ({"MCP_SPAWN_SCOPE": "user"}, "MCP_SPAWN_SCOPE"),
])
def test_stdio_settings_that_cannot_work_are_start_up_problems(
    extra: dict[str, str], problem: str
) -> None:
    env = {"OIDC_ISSUER_URL": "https://idp.example.test", "OIDC_AUDIENCE": "a",
           "RESOURCE_URL": "https://mcp.example.test/mcp", "ALLOW_ALL_AUTHENTICATED": "true",
           **stdio_env(), **extra}
    with pytest.raises(ConfigError) as raised:
        load(env)
    assert any(problem in p for p in raised.value.problems)


def test_a_command_without_a_port_is_stdio_and_needs_no_upstream_url() -> None:
    config = load({"OIDC_ISSUER_URL": "https://idp.example.test", "OIDC_AUDIENCE": "a",
                   "RESOURCE_URL": "https://mcp.example.test/mcp",
                   "ALLOW_ALL_AUTHENTICATED": "true", **stdio_env()})
    assert config.spawn is not None
    assert config.spawn.stdio
    assert (config.spawn.scope, config.spawn.max_processes, config.spawn.max_per_subject) == (
        "session", 32, 4)


@pytest.mark.slow
async def test_a_json_answer_that_takes_too_long_is_504_and_the_child_is_told(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env(UPSTREAM_RESPONSE_TIMEOUT_SECONDS="0.5"))
    headers = auth(idp)
    session = await initialize(client, headers)
    with capture_logs() as logs:
        late = await post(client, rpc(5, "tools/call", name="slow", arguments={"seconds": 30}),
                          headers, session)
        assert late.status == 504
        await wait_until(lambda: any(line.startswith("cancelled ") for line in
                                     child_lines(logs)), within=10)
    assert any(line.endswith("timed out") for line in child_lines(logs))


SDK_STDIO_SERVER = """
from mcp.server.mcpserver import MCPServer

server = MCPServer("sdk-stdio", log_level="WARNING")


@server.tool()
def echo(text: str) -> str:
    return text


server.run("stdio")
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_the_official_sdk_client_reaches_an_official_sdk_stdio_server(
    make_sidecar: SidecarFactory, idp: FakeIdp, mode: Literal["legacy", "auto"]
) -> None:
    command = json.dumps([sys.executable, "-c", SDK_STDIO_SERVER])
    client = await make_sidecar(**stdio_env(MCP_SPAWN_CMD=command))
    url = str(client.make_url(MCP))
    assert await call_echo(url, idp.mint(), "via stdio", mode=mode, http_timeout=20) == (
        "via stdio")


@pytest.mark.slow
async def test_a_child_that_stops_reading_stdin_ends_its_session(
    make_sidecar: SidecarFactory, idp: FakeIdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stdio_child, "STDIN_TIMEOUT", 0.5)
    client = await make_sidecar(**stdio_env())
    headers = auth(idp)
    session = await initialize(client, headers)
    pid = (await pid_of(client, headers, session))["pid"]
    assert text(await call(client, headers, session, "deaf", 3)) == "not listening"
    big = rpc(None, "notifications/message", data="x" * 1_000_000)
    with capture_logs() as logs:
        assert (await post(client, big, headers, session)).status == 404
    assert any(e["event"] == "child_stdin_stalled" for e in logs)
    await all_gone([pid])
    assert (await post(client, rpc(4, "ping"), headers, session)).status == 404


@pytest.mark.slow
async def test_a_message_sent_while_no_stream_is_open_waits_for_the_next_one(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env())
    headers = auth(idp)
    session = await initialize(client, headers)
    assert text(await call(client, headers, session, "later")) == "soon"
    # the child's notification comes 200 ms after its answer, with no stream open
    await wait_until(lambda: _backlogged(client), within=10)
    stream = await client.get(MCP, headers={**headers, "Mcp-Session-Id": session},
                              timeout=TIMEOUT)
    async with asyncio.timeout(10):
        while not (line := (await stream.content.readline()).decode()).startswith("data: "):
            pass
    assert json.loads(line.removeprefix("data: "))["method"] == (
        "notifications/tools/list_changed")
    stream.close()


def _backlogged(client: Client) -> bool:
    pool = client.app[STDIO_POOL]
    return any(session.backlogged for session in pool.all_sessions())


@pytest.mark.slow
async def test_event_streams_count_against_max_streams_per_subject(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env(MAX_STREAMS_PER_SUBJECT="1"))
    headers = auth(idp)
    session = await initialize(client, headers)
    stream = await client.get(MCP, headers={**headers, "Mcp-Session-Id": session},
                              timeout=TIMEOUT)
    assert stream.status == 200
    refused = await post(client, rpc(2, "ping"), headers, session, BOTH)
    assert refused.status == 429
    assert (await refused.json())["error"] == "rate_limited"
    assert (await post(client, rpc(3, "ping"), headers, session)).status == 200  # JSON only
    stream.close()


@pytest.mark.slow
async def test_readyz_has_no_upstream_to_reach_in_stdio_mode(
    make_sidecar: SidecarFactory
) -> None:
    client = await make_sidecar(**stdio_env())
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["checks"] == {"idp": "ready"}


@pytest.mark.slow
async def test_the_metrics_count_children_sessions_and_dropped_lines(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    port = free_port()
    client = await make_sidecar(**stdio_env(METRICS_PORT=str(port)))
    headers = auth(idp)
    session = await initialize(client, headers)
    await call(client, headers, session, "noise", size=10)  # one line that is not JSON
    await pid_of(client, headers, None)  # a sessionless child
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http, http.get(
        f"http://127.0.0.1:{port}/metrics"
    ) as response:
        scraped = await response.text()
    values = {line.split()[0]: float(line.split()[1]) for line in scraped.splitlines()
              if line.startswith("oauth_sidecar_stdio")}
    assert {'oauth_sidecar_stdio_children{state="idle"}': 2.0,
            "oauth_sidecar_stdio_sessions": 1.0,
            "oauth_sidecar_stdio_lines_dropped_total": 2.0}.items() <= values.items()


@pytest.mark.slow
async def test_an_initialize_the_child_refuses_leaves_no_session_behind(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env())
    headers = auth(idp)
    refused = await post(client, {**INITIALIZE, "params": {"protocolVersion": "refuse"}},
                         headers)
    assert (await refused.json())["error"]["code"] == -32602
    assert "Mcp-Session-Id" not in refused.headers
    await wait_until(lambda: client.app[STDIO_POOL].children() == 0, within=GONE_WITHIN)


@pytest.mark.slow
async def test_what_is_not_the_transport_is_refused(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env())
    headers = auth(idp)
    unknown = {**headers, "Mcp-Session-Id": "0" * 32}
    assert (await client.post("/elsewhere", json=rpc(1, "ping"), headers=headers)).status == 404
    assert (await client.put(MCP, json=rpc(1, "ping"), headers=headers)).status == 405
    assert (await client.get(MCP, headers=headers)).status == 405  # a stream needs a session
    assert (await client.get(MCP, headers=unknown)).status == 404
    assert (await client.delete(MCP, headers=unknown)).status == 404
    assert (await post(client, rpc(1, "ping"), unknown)).status == 404
    not_json = await client.post(MCP, data=b"{", headers={**headers, **JSON_ONLY,
                                                          "Content-Type": "application/json"})
    assert not_json.status == 400
    assert (await not_json.json())["error"]["code"] == -32700
    assert (await post(client, [], headers)).status == 400
    assert (await post(client, [INITIALIZE, rpc(2, "ping")], headers)).status == 400
    assert client.app[STDIO_POOL].children() == 0


@pytest.mark.slow
async def test_sigterm_to_the_sidecar_process_leaves_no_child_behind(idp: FakeIdp) -> None:
    port = free_port()
    env = {"OIDC_ISSUER_URL": idp.issuer, "OIDC_AUDIENCE": AUDIENCE,
           "RESOURCE_URL": RESOURCE_URL, "ALLOW_ALL_AUTHENTICATED": "true",
           "HOST": "127.0.0.1", "PORT": str(port), **stdio_env()}
    base = f"http://127.0.0.1:{port}"
    async with sidecar_process(env) as proc, aiohttp.ClientSession(timeout=TIMEOUT) as http:
        await wait_ready(http, base, proc)
        headers = {**auth(idp), **JSON_ONLY}
        async with http.post(base + MCP, json=INITIALIZE, headers=headers) as response:
            session = response.headers["Mcp-Session-Id"]
        pids = []
        for name in ("pid", "grandchild"):
            async with http.post(base + MCP, json=rpc(2, "tools/call", name=name),
                                 headers={**headers, "Mcp-Session-Id": session}) as response:
                found = text(await response.json())
            pids.append(json.loads(found)["pid"] if name == "pid" else int(found))
        assert not any(gone(pid) for pid in pids)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(PROCESS_TIMEOUT):
            await proc.communicate()
        assert proc.returncode == 0
    await all_gone(pids)


CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"


@pytest.mark.slow
@pytest.mark.parametrize("roots", ["drop", "pass"])
async def test_the_clients_roots_reach_the_child_only_when_passed(
    make_sidecar: SidecarFactory, idp: FakeIdp, roots: str
) -> None:
    """Remote clients' roots name paths on the sidecar's host (stdio_roots.py): dropped by
    default from initialize, from 2026-07-28 _meta, list_changed notifications and the child's
    roots/list requests (answered by the bridge)."""
    client = await make_sidecar(**stdio_env(MCP_SPAWN_CLIENT_ROOTS=roots))
    headers = auth(idp)
    declared = {"roots": {"listChanged": True}, "elicitation": {}}
    response = await post(client, rpc(1, "initialize", protocolVersion="2025-11-25",
                                      capabilities=declared,
                                      clientInfo={"name": "t", "version": "1"}), headers)
    session = response.headers["Mcp-Session-Id"]
    meta: dict[str, Any] = {CAPABILITIES_META: {"roots": {}, "sampling": {}}}
    asked_caps = await post(client, rpc(2, "tools/call", name="caps", arguments={}, _meta=meta),
                            headers, session)
    seen = json.loads(text(await asked_caps.json()))
    with capture_logs() as logs:
        for method in ("notifications/roots/list_changed", "notifications/marker"):
            assert (await post(client, rpc(None, method), headers, session)).status == 202
        await wait_until(lambda: "got notifications/marker" in child_lines(logs))
    asked = await post(client, rpc(3, "tools/call", name="roots"), headers, session, BOTH)
    if roots == "drop":
        assert seen == {"initialize": {"elicitation": {}}, "meta": {"sampling": {}}}
        assert "got notifications/roots/list_changed" not in child_lines(logs)
        [answer] = events(await asked.text())  # the client was never asked
        assert json.loads(text(answer))["error"]["code"] == -32601
        return
    assert seen == {"initialize": declared, "meta": meta[CAPABILITIES_META]}
    assert "got notifications/roots/list_changed" in child_lines(logs)
    async with asyncio.timeout(10):
        while not (line := (await asked.content.readline()).decode()).startswith("data: "):
            pass
    request = json.loads(line.removeprefix("data: "))
    assert request["method"] == "roots/list"
    reply = {"jsonrpc": "2.0", "id": request["id"], "result": {"roots": [{"uri": "file:///x"}]}}
    assert (await post(client, reply, headers, session)).status == 202
    final = events(await asked.text())[-1]
    assert json.loads(text(final)) == {"roots": [{"uri": "file:///x"}]}
