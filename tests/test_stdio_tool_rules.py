"""Tool rules in front of stdio children: the real sidecar's stdio bridge and real children
(tests/children/stdio_echo.py), with real tokens. A refused call never reaches the child (its
process and its stderr prove it), lists are filtered in JSON and in event-stream answers, calls
are audited with their outcome, TOOL_SCOPES and TOOL_RATE_LIMITS answer as in the proxy, and a
2026-07-28 request whose Mcp-Method/Mcp-Name disagree with its body is refused by the bridge,
rules or not (the child never sees headers).
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import FakeIdp, SidecarFactory, wait_until
from structlog.testing import capture_logs
from test_stdio_bridge import (
    BOTH,
    auth,
    call,
    child_lines,
    events,
    initialize,
    pid_of,
    post,
    rpc,
    stdio_env,
    text,
)

pytestmark = pytest.mark.slow


def tool_names(answer: dict[str, Any]) -> list[str]:
    return [tool["name"] for tool in answer["result"]["tools"]]


async def test_a_denied_call_never_reaches_the_child_and_lists_are_filtered(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env(TOOLS_DENY="crash,stderr"))
    headers = auth(idp)
    session = await initialize(client, headers)
    before = (await pid_of(client, headers, session))["pid"]
    with capture_logs() as logs:
        for name in ("crash", "stderr"):
            refused = await call(client, headers, session, name, text="must not be logged")
            assert refused["error"]["code"] == -32602
            assert refused["error"]["message"] == f"Tool {name!r} is not allowed for this caller"
        # the child is the same process (crash was not run) and wrote nothing (stderr was not)
        assert (await pid_of(client, headers, session))["pid"] == before
        assert "must not be logged" not in child_lines(logs)
    refusals = [e for e in logs if e["event"] == "mcp_call" and e["decision"] == "denied"]
    assert [e["name"] for e in refusals] == ["crash", "stderr"]
    assert all(e["rule"] == "TOOLS_DENY" for e in refusals)

    listed = await post(client, rpc(7, "tools/list"), headers, session)
    names = tool_names(await listed.json())
    assert "echo" in names
    assert "pid" in names
    assert "crash" not in names
    assert "stderr" not in names
    streamed = await post(client, rpc(8, "tools/list"), headers, session, BOTH)
    assert streamed.content_type == "text/event-stream"
    [answer] = events(await streamed.text())
    assert tool_names(answer) == names


async def test_a_batch_with_one_denied_call_is_refused_whole(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env(TOOLS_ALLOW="echo,pid"))
    headers = auth(idp)
    session = await initialize(client, headers)
    before = (await pid_of(client, headers, session))["pid"]
    batch = [rpc(3, "tools/call", name="echo", arguments={"text": "a"}),
             rpc(4, "tools/call", name="crash", arguments={})]
    response = await post(client, batch, headers, session)
    assert response.status == 200
    answers = {a["id"]: a["error"]["data"]["reason"] for a in await response.json()}
    assert answers == {3: "batch_refused", 4: "forbidden_by_policy"}
    assert (await pid_of(client, headers, session))["pid"] == before


async def test_calls_are_audited_with_their_outcome_in_both_answer_forms(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env(TOOLS_DENY="stderr"))
    headers = auth(idp, "alice")
    session = await initialize(client, headers)
    with capture_logs() as logs:
        assert text(await call(client, headers, session, "echo", text="hi")) == "hi"
        streamed = await post(client, rpc(9, "tools/call", name="slow",
                                          arguments={"seconds": 0.1}), headers, session, BOTH)
        assert events(await streamed.text())[-1]["id"] == 9
        crashed = await call(client, headers, session, "crash", request_id=10)
        assert crashed["error"]["code"] == -32603
    audit = {e["name"]: e for e in logs if e["event"] == "mcp_call"}
    assert audit["echo"]["outcome"] == "ok"
    assert audit["echo"]["sub"] == "alice"
    assert audit["slow"]["outcome"] == "ok"
    assert audit["crash"]["outcome"] == "error"
    assert audit["crash"]["error_code"] == -32603


async def test_a_call_cut_off_mid_stream_is_audited_as_failed(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env(TOOLS_DENY="stderr"))
    headers = auth(idp)
    session = await initialize(client, headers)
    with capture_logs() as logs:
        response = await post(client, rpc(5, "tools/call", name="slow", arguments={"seconds": 30},
                                          _meta={"progressToken": "p"}), headers, session, BOTH)
        first = await response.content.readline()
        assert first.startswith(b"event: message")
        response.close()  # the client leaves before the answer
        await wait_until(lambda: any(e["event"] == "mcp_call" for e in logs))
    [audit] = [e for e in logs if e["event"] == "mcp_call"]
    assert audit["name"] == "slow"
    assert audit["outcome"] == "failed"


async def test_tool_scopes_and_per_tool_budgets_answer_as_in_the_proxy(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(**stdio_env(TOOL_SCOPES="pid=mcp:admin",
                                            TOOL_RATE_LIMITS="echo=1",
                                            SCOPES_SUPPORTED="mcp:admin"))
    headers = auth(idp, scope="mcp:use")
    session = await initialize(client, headers)
    stepped = await post(client, rpc(2, "tools/call", name="pid", arguments={}), headers,
                         session)
    assert stepped.status == 403
    assert 'error="insufficient_scope"' in stepped.headers["WWW-Authenticate"]
    assert 'scope="mcp:admin"' in stepped.headers["WWW-Authenticate"]
    assert text(await call(client, headers, session, "echo", text="once")) == "once"
    spent = await post(client, rpc(3, "tools/call", name="echo", arguments={"text": "twice"}),
                       headers, session)
    assert spent.status == 429
    assert "Retry-After" in spent.headers
    admin = auth(idp, scope="mcp:admin")
    admin_session = await initialize(client, admin)
    assert (await pid_of(client, admin, admin_session))["pid"] > 0


@pytest.mark.parametrize("rules", [{}, {"TOOLS_DENY": "crash"}], ids=["no-rules", "rules"])
async def test_mcp_headers_that_disagree_with_the_body_are_refused_by_the_bridge(
    make_sidecar: SidecarFactory, idp: FakeIdp, rules: dict[str, str]
) -> None:
    client = await make_sidecar(**stdio_env(**rules))
    headers = auth(idp)
    body = rpc(4, "tools/call", name="echo", arguments={"text": "x"},
               _meta={"protocolVersion": "2026-07-28"})
    for sent, mismatch in [({"Mcp-Method": "tools/list"}, "Mcp-Method"),
                           ({"Mcp-Method": "tools/call", "Mcp-Name": "pid"}, "Mcp-Name"),
                           ({"Mcp-Method": "tools/call"}, "needs Mcp-Name")]:
        response = await post(client, body, {**headers, **sent})
        assert response.status == 400, sent
        answer = await response.json()
        assert answer["error"]["code"] == -32020
        assert answer["id"] == 4
        assert mismatch in answer["error"]["message"]
    agreed = await post(client, body, {**headers, "Mcp-Method": "tools/call",
                                       "Mcp-Name": "=?base64?ZWNobw==?="})
    assert agreed.status == 200
    assert text(await agreed.json()) == "x"
