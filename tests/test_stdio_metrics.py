"""What the stdio pool tells the metrics and the log: the real sidecar with METRICS_PORT set in
front of real stdio children (tests/children/stdio_echo.py, behind a small gate that holds it
back before it starts reading), real tokens, real scrapes of the metrics listener. Children move
through their states (starting, idle, busy, stopping), exits are counted by reason from a fixed
set (an unknown reason is "other", never a new label value), refusals by cap, subjects only as
aggregates; child_started and child_exited carry subject, pid, exit status or signal and reason.
Every wait is bounded; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeIdp, SidecarFactory, wait_until
from processes import free_port
from structlog.testing import capture_logs
from test_metrics import Scrape, scrape, scrape_until
from test_stdio_bridge import (
    BOTH,
    ECHO,
    GONE_WITHIN,
    INITIALIZE,
    MCP,
    TIMEOUT,
    Client,
    all_gone,
    auth,
    call,
    initialize,
    pid_of,
    post,
    rpc,
    stdio_env,
)

from oauth_sidecar.app import STDIO_POOL
from oauth_sidecar.upstream.stdio_pool import CAPS, CHILD_STATES, EXIT_REASONS, exit_reason

# Waits for the file argv[1] to exist, then becomes the echo child (argv[2]); with argv[3] ==
# "deaf-to-sigterm" it ignores SIGTERM, which stays ignored across exec.
GATED = """
import os, signal, sys, time
if sys.argv[3:] == ["deaf-to-sigterm"]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
for _ in range(6000):
    if os.path.exists(sys.argv[1]):
        break
    time.sleep(0.01)
os.execv(sys.executable, [sys.executable, sys.argv[2]])
"""


def gated_env(gate: Path, *extra_args: str, **extra: str) -> dict[str, str]:
    command = [sys.executable, "-c", GATED, str(gate), str(ECHO), *extra_args]
    return stdio_env(MCP_SPAWN_CMD=json.dumps(command), **extra)


async def metered(make_sidecar: SidecarFactory, env: Mapping[str, str]) -> tuple[Client, int]:
    port = free_port()
    return await make_sidecar(**env, METRICS_PORT=str(port)), port


def by(found: Scrape, name: str, label: str) -> dict[str, float]:
    """One labelled family as {label value: value}; every series must carry just that label."""
    series = found.series(name)
    assert all(len(labels) == 1 and labels[0][0] == label for labels in series), series
    return {labels[0][1]: value for labels, value in series.items()}


def states(found: Scrape) -> dict[str, float]:
    return by(found, "stdio_children", "state")


def in_state(**expected: float) -> Any:
    """A scrape_until condition: these states have these counts, every other state 0."""
    want = {state: float(expected.get(state, 0)) for state in CHILD_STATES}
    return lambda found: states(found) == want


def exits(found: Scrape) -> dict[str, float]:
    return by(found, "stdio_child_exits_total", "reason")


def counted(**expected: float) -> dict[str, float]:
    """Exits by every reason of the fixed set: these counts, the rest 0."""
    return {reason: float(expected.get(reason, 0)) for reason in EXIT_REASONS}


@pytest.mark.slow
async def test_a_child_is_starting_until_it_speaks_then_idle_busy_idle_and_stopping(
    make_sidecar: SidecarFactory, idp: FakeIdp, tmp_path: Path
) -> None:
    gate = tmp_path / "open"
    client, port = await metered(make_sidecar, gated_env(
        gate, "deaf-to-sigterm", MCP_SPAWN_STOP_TIMEOUT_SECONDS="60"))
    headers = auth(idp)
    assert states(await scrape(port)) == dict.fromkeys(CHILD_STATES, 0.0)

    starting = asyncio.create_task(post(client, INITIALIZE, headers))
    await scrape_until(port, in_state(starting=1), within=10)  # spawned, nothing said yet
    gate.touch()
    answered = await starting
    assert answered.status == 200
    session = answered.headers["Mcp-Session-Id"]
    await scrape_until(port, in_state(idle=1), within=10)

    slow = await post(client, rpc(5, "tools/call", name="slow", arguments={"seconds": 60},
                                  _meta={"progressToken": 1}), headers, session, BOTH)
    async with asyncio.timeout(10):
        await slow.content.readline()  # a progress event: the call is in flight
    await scrape_until(port, in_state(busy=1), within=10)
    slow.close()  # the client leaves: the call is abandoned, the child told
    await scrape_until(port, in_state(idle=1), within=10)

    pid = (await pid_of(client, headers, session))["pid"]
    await call(client, headers, session, "deaf", 6)  # it no longer reads stdin: sees no EOF
    deleting = asyncio.create_task(
        client.delete(MCP, headers={**headers, "Mcp-Session-Id": session}, timeout=TIMEOUT))
    # it ignores SIGTERM: stopping, no longer counted against the caps, until it is killed
    await scrape_until(port, in_state(stopping=1), within=10)
    assert client.app[STDIO_POOL].children() == 0
    os.kill(pid, signal.SIGKILL)
    assert (await deleting).status == 204
    found = await scrape_until(port, in_state(), within=10)
    assert exits(found) == counted(deleted=1)
    await all_gone([pid])


@pytest.mark.slow
async def test_exits_are_counted_by_reason_and_an_unknown_reason_is_other(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client, port = await metered(make_sidecar, stdio_env())
    headers = auth(idp)
    pool = client.app[STDIO_POOL]
    assert exits(await scrape(port)) == counted()

    deleted = await initialize(client, headers)
    response = await client.delete(MCP, headers={**headers, "Mcp-Session-Id": deleted})
    assert response.status == 204

    crashing = await initialize(client, headers)
    assert (await call(client, headers, crashing, "crash"))["error"]["code"] == -32603

    refused = await post(client, {**INITIALIZE, "params": {"protocolVersion": "refuse"}},
                         headers)
    assert (await refused.json())["error"]["code"] == -32602

    await initialize(client, headers)
    [session] = pool.all_sessions()
    await pool.close(session, "a reason nobody listed")

    found = await scrape_until(port, lambda f: sum(exits(f).values()) == 4, within=GONE_WITHIN)
    assert exits(found) == counted(deleted=1, exited=1, start_failed=1, other=1)
    assert set(states(found)) == set(CHILD_STATES)
    assert set(by(found, "stdio_refused_total", "cap")) == set(CAPS)
    await client.close()  # nothing left to stop at shutdown
    assert pool.exits == {"deleted": 1, "exited": 1, "start_failed": 1, "other": 1}


@pytest.mark.slow
async def test_idle_reaping_replacing_and_shutdown_are_counted(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    idle_client, idle_port = await metered(make_sidecar, stdio_env(MCP_SPAWN_IDLE_SECONDS="0.3"))
    await initialize(idle_client, auth(idp))
    found = await scrape_until(idle_port, lambda f: exits(f)["idle"] == 1 and in_state()(f),
                               within=GONE_WITHIN)  # stopping until its pipes are read out
    assert exits(found) == counted(idle=1)

    client, port = await metered(make_sidecar, stdio_env(MCP_SPAWN_SCOPE="subject"))
    headers = auth(idp)
    await initialize(client, headers)
    await initialize(client, headers)  # ends the subject's first session and child
    found = await scrape_until(port, lambda f: exits(f)["replaced"] == 1, within=GONE_WITHIN)
    assert exits(found) == counted(replaced=1)
    pool = client.app[STDIO_POOL]
    await client.close()
    assert pool.exits == {"replaced": 1, "shutdown": 1}


@pytest.mark.slow
async def test_refusals_are_counted_by_cap_beside_the_caps_and_subjects_as_aggregates(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client, port = await metered(make_sidecar, stdio_env(MCP_SPAWN_MAX_PER_SUBJECT="2",
                                                         MCP_SPAWN_MAX_PROCESSES="3"))
    alice, bob, carol = auth(idp, "alice"), auth(idp, "bob"), auth(idp, "carol")
    found = await scrape(port)
    assert by(found, "stdio_children_limit", "cap") == {"process": 3.0, "subject": 2.0}
    assert (found.value("stdio_subjects"), found.value("stdio_children_per_subject_max")) == (
        0.0, 0.0)

    await initialize(client, alice)
    await initialize(client, alice)
    assert (await post(client, INITIALIZE, alice)).status == 429
    await initialize(client, bob)
    assert (await post(client, INITIALIZE, carol)).status == 503
    assert (await post(client, INITIALIZE, carol)).status == 503

    found = await scrape(port)
    assert by(found, "stdio_refused_total", "cap") == {"process": 2.0, "subject": 1.0}
    assert found.value("stdio_subjects") == 2.0  # alice and bob; carol holds none
    assert found.value("stdio_children_per_subject_max") == 2.0  # alice, at her cap
    assert states(found) == {**dict.fromkeys(CHILD_STATES, 0.0), "idle": 3.0}
    assert exits(found) == counted()  # a refusal starts nothing, so nothing exits
    assert not any("alice" in line or "bob" in line for line in found.text.splitlines())


@pytest.mark.slow
async def test_child_started_and_child_exited_carry_subject_pid_status_and_reason(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env())
    headers = auth(idp)
    with capture_logs() as logs:
        crashing = await initialize(client, headers)
        crashed_pid = (await pid_of(client, headers, crashing))["pid"]
        await call(client, headers, crashing, "crash")
        deleted = await initialize(client, headers)
        deleted_pid = (await pid_of(client, headers, deleted))["pid"]
        response = await client.delete(MCP, headers={**headers, "Mcp-Session-Id": deleted})
        assert response.status == 204
        await wait_until(lambda: len([e for e in logs if e["event"] == "child_exited"]) == 2,
                         within=GONE_WITHIN)
    started = [e for e in logs if e["event"] == "child_started"]
    subject = started[0]["subject"]
    assert [(e["pid"], e["subject"]) for e in started] == [
        (crashed_pid, subject), (deleted_pid, subject)]
    ended = {e["pid"]: e for e in logs if e["event"] == "child_exited"}
    fields = ("subject", "how", "exit_code", "signal", "reason")
    assert {key: ended[crashed_pid][key] for key in fields} == {
        "subject": subject, "how": "exit code 3", "exit_code": 3, "signal": None,
        "reason": "exited"}
    assert {key: ended[deleted_pid][key] for key in fields} == {
        "subject": subject, "how": "killed by SIGTERM", "exit_code": None, "signal": "SIGTERM",
        "reason": "deleted"}
    await all_gone([crashed_pid, deleted_pid])


def test_close_reasons_map_onto_the_fixed_set() -> None:
    assert [exit_reason(why) for why in (
        "idle", "deleted", "replaced", "shutdown", "child_gone", "initialize_failed", "exited",
        "start_failed", "", "something new", "IDLE",
    )] == ["idle", "deleted", "replaced", "shutdown", "exited", "start_failed", "exited",
           "start_failed", "other", "other", "other"]
    assert set(EXIT_REASONS) == {exit_reason(why) for why in EXIT_REASONS}
