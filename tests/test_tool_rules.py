"""Tool rules: the real sidecar in front of a real JSON-RPC upstream on loopback.

The upstream (McpLike) answers like an MCP server: tools/list, prompts/list, resources/list and
resources/templates/list with fixed lists (a cursor included), tools/call with a text result,
anything else with an empty result; as JSON, or as SSE when the request's query has `sse=1`
(`sse=cut`: an event stream that ends before the answer). It records every body it receives, so
each refusal is proved to have never reached it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import FakeIdp, bearer, sidecar_env, wait_until
from multidict import CIMultiDict
from structlog.testing import capture_logs

from oauth_sidecar.app import create_app
from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.config import ConfigError, load, parse_rule_file
from oauth_sidecar.mcp.tool_policy import ToolPolicy

Client = TestClient[web.Request, web.Application]

TOOLS = ["search", "get_doc", "write_file", "delete_repository", "admin_reset"]
PROMPTS = ["summary", "secret_prompt"]
RESOURCES = ["file:///public/a.txt", "file:///private/b.txt"]
TEMPLATES = ["file:///public/{name}", "file:///private/{name}"]

RULES = """
# readers may search and read; admins anything; nobody deletes
[[rule]]
name = "readers"
groups = ["readers"]
allow_tools = ["search", "get_*"]
allow_resources = ["file:///public/*"]

[[rule]]
name = "admins"
groups = ["admins"]
allow_tools = ["*"]
allow_resources = ["*"]

[[rule]]
everyone = true
deny_tools = ["delete_*"]
deny_prompts = ["secret_*"]
"""


@dataclass
class McpLike:
    bodies: list[Any] = field(default_factory=list)
    server: TestServer | None = None
    description: str | None = None  # given to every tool when set

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._answer)
        return app

    def _result(self, message: dict[str, Any]) -> dict[str, Any]:
        method = message.get("method")
        if method == "tools/list":
            result: Any = {"tools": [{"name": n, "inputSchema": {"type": "object"}}
                                     for n in TOOLS], "nextCursor": "page-2"}
            if self.description is not None:
                for tool in result["tools"]:
                    tool["description"] = self.description
        elif method == "prompts/list":
            result = {"prompts": [{"name": n} for n in PROMPTS]}
        elif method == "resources/list":
            result = {"resources": [{"uri": u, "name": u} for u in RESOURCES]}
        elif method == "resources/templates/list":
            result = {"resourceTemplates": [{"uriTemplate": u, "name": u} for u in TEMPLATES]}
        elif method == "tools/call":
            if message["params"]["name"] == "get_doc":
                return {"jsonrpc": "2.0", "id": message.get("id"),
                        "error": {"code": -32602, "message": "no such doc"}}
            result = {"content": [{"type": "text", "text": "done"}], "isError": False}
        else:
            result = {}
        return {"jsonrpc": "2.0", "id": message.get("id"), "result": result}

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        self.bodies.append(body)
        answer: Any = ([self._result(m) for m in body] if isinstance(body, list)
                       else self._result(body))
        if request.query.get("weird") == "1":  # a broken upstream: ids that are objects
            answer = {**answer, "id": {"not": "an id"}}
        if request.query.get("sse") not in ("1", "cut"):
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        note = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        await response.write(f"event: message\ndata: {json.dumps(note)}\n\n".encode())
        if request.query.get("sse") == "cut":  # the stream ends before the answer
            await response.write_eof()
            return response
        for message in answer if isinstance(answer, list) else [answer]:
            text = json.dumps(message)
            half = len(text) // 2  # one event split over two writes
            await response.write(f"id: 7\nevent: message\ndata: {text[:half]}".encode())
            await asyncio.sleep(0.01)
            await response.write(f"{text[half:]}\n\n".encode())
        if request.query.get("hold") == "1":  # a long call: the stream stays open
            await asyncio.sleep(3600)
        await response.write_eof()
        return response


@pytest.fixture
async def mcp_like() -> AsyncIterator[McpLike]:
    upstream = McpLike()
    upstream.server = TestServer(upstream.app())
    await upstream.server.start_server()
    yield upstream
    await upstream.server.close()


@pytest.fixture
async def start(idp: FakeIdp, mcp_like: McpLike) -> AsyncIterator[Any]:
    clients: list[Client] = []

    async def started(**extra: str) -> Client:
        from conftest import SidecarServer

        from oauth_sidecar.app import IDP

        env = sidecar_env(idp, mcp_like, **extra)  # type: ignore[arg-type]
        env["MCP_UPSTREAM_URL"] = mcp_like.url
        config = load(env)
        app = create_app(config)
        server = SidecarServer(app, config)
        await server.start_server()
        client: Client = TestClient(server)
        await client.start_server()
        clients.append(client)
        await wait_until(lambda: app[IDP].ready)
        return client

    yield started
    for client in clients:
        await client.close()


def call(name: str, request_id: int = 1, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": name, "arguments": params}}


def request(method: str, request_id: int = 1, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


async def post(client: Client, token: str, body: Any, path: str = "/mcp",
               **headers: str) -> tuple[int, Any, dict[str, str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with client.post(path, data=data, headers={
            **bearer(token), "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream", **headers}) as response:
        text = await response.text()
        return response.status, text, dict(response.headers)


def sse_messages(text: str) -> list[Any]:
    messages = []
    for event in text.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip() for line in event.split("\n") if line.startswith("data")]
        if data:
            messages.append(json.loads("\n".join(data)))
    return messages


def token(idp: FakeIdp, *groups: str, scope: str = "", sub: str = "user-1") -> str:
    return idp.mint(claims={"sub": sub, "groups": list(groups), "scope": scope})


# -- configuration -------------------------------------------------------------------------------


def test_rule_file_problems_are_all_reported_with_their_lines() -> None:
    text = """[[rule]]
groups = ["a"]
allow_tools = ["x"]

[[rule]]
name = "broken"
groups = "not-a-list"
allow_tool = ["y"]

[[rule]]
allow_tools = ["z"]

[[rule]]
everyone = true
groups = ["b"]
deny_prompts = ["\\u0007"]
"""
    rules, problems = parse_rule_file(text, "rules.toml")
    assert len(rules) == 1  # the first rule is good; each bad one is refused alone
    joined = "\n".join(problems)
    assert "line 7: `groups` must be a list of strings" in joined
    assert "line 8: unknown key 'allow_tool'" in joined
    assert "rule at line 10 applies to nobody" in joined
    assert "rule at line 13: `everyone = true` and a list" in joined
    assert "line 16: deny_prompts entry '\\x07' holds a control character" in joined
    _, problems = parse_rule_file("[[rule]\n", "rules.toml")
    assert "not valid TOML" in problems[0]
    assert "line 1" in problems[0]


def test_start_up_lists_every_tool_rule_problem(idp: FakeIdp, tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text("[[rule]]\neveryone = true\n")
    env = {"OIDC_ISSUER_URL": idp.issuer, "OIDC_AUDIENCE": "a", "RESOURCE_URL":
           "https://mcp.example.test/mcp", "MCP_UPSTREAM_URL": "http://127.0.0.1:9",
           "ALLOW_ALL_AUTHENTICATED": "true", "TOOL_SCOPES": "write_*,x=",
           "TOOL_RATE_LIMITS": "search=0", "TOOLS_DENY": "ok,\x01", "TOOL_POLICY_FILE": str(path)}
    with pytest.raises(ConfigError) as raised:
        load(env)
    text = str(raised.value)
    assert "TOOL_SCOPES entry 'write_*' has no `=`" in text
    assert "TOOL_SCOPES entry 'x=' names no scope" in text
    assert "TOOL_RATE_LIMITS entry 'search=0' is not a number" in text
    assert "TOOLS_DENY entry '\\x01' holds a control character" in text
    assert "grants and denies nothing" in text


def policy_of(text: str, **env: Any) -> ToolPolicy:
    from oauth_sidecar.config import ToolRulesConfig
    from oauth_sidecar.config.model import PolicyConfig

    rules, problems = parse_rule_file(text, "t")
    assert problems == []
    config = ToolRulesConfig(file="t", file_rules=rules, **env)
    access = AccessPolicy(PolicyConfig(frozenset(), frozenset(), frozenset(), frozenset(),
                                       ("groups",), True, False, ()))
    return ToolPolicy(config, access)


def test_evaluation_order_deny_wins_then_allow_then_open() -> None:
    tools = policy_of(RULES)
    reader = tools.for_caller("u", {"groups": ["readers"]})
    admin = tools.for_caller("u", {"groups": ["admins", "readers"]})
    nobody = tools.for_caller("u", {"groups": []})
    assert reader.allows("tools", "search")
    assert reader.allows("tools", "get_doc")
    assert not reader.allows("tools", "write_file")
    assert admin.allows("tools", "write_file")
    assert not admin.allows("tools", "delete_repository")  # deny wins over admins' "*"
    assert not nobody.allows("tools", "search")  # tools are restricted: nothing allows it
    assert nobody.allows("prompts", "summary")  # prompts are not restricted: open
    assert not nobody.allows("prompts", "secret_prompt")  # but a deny still applies
    assert reader.verdict("tools", "write_file").because == (
        "no rule allows this caller these tools")
    assert admin.verdict("tools", "delete_repository").because.startswith("deny_tools of rule")
    env_only = policy_of("[[rule]]\neveryone = true\ndeny_prompts = [\"x\"]\n",
                         allow=("search",), deny=("search_all",))
    anyone = env_only.for_caller("u", {})
    assert anyone.allows("tools", "search")
    assert not anyone.allows("tools", "get_doc")
    assert env_only.needed_scopes("x") == ()


def test_rules_match_verified_emails_and_domains_only() -> None:
    tools = policy_of('[[rule]]\nemails = ["Kim@Example.com"]\nallow_tools = ["a"]\n'
                      '[[rule]]\nemail_domains = ["corp.example"]\nallow_tools = ["b"]\n')
    kim = tools.for_caller("u", {"email": "kim@example.com", "email_verified": True})
    unverified = tools.for_caller("u", {"email": "kim@example.com"})
    corp = tools.for_caller("u", {"email": "x@corp.example", "email_verified": True})
    suffix = tools.for_caller("u", {"email": "x@evil-corp.example", "email_verified": True})
    assert kim.allows("tools", "a")
    assert not kim.allows("tools", "b")
    assert not unverified.allows("tools", "a")
    assert corp.allows("tools", "b")
    assert not suffix.allows("tools", "b")


def test_answers_are_read_for_the_audit_only_when_someone_sees_it() -> None:
    import logging

    import structlog

    from oauth_sidecar.mcp.audit import Audit
    from oauth_sidecar.metrics import Metrics

    class Counting(Metrics):
        counting = True

    saved = structlog.get_config()
    try:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
        assert Audit(Metrics(), log_arguments=False).observed()
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        assert not Audit(Metrics(), log_arguments=False).observed()  # no line, no count
        assert Audit(Counting(), log_arguments=False).observed()
    finally:
        structlog.configure(**saved)


def test_remembered_verdicts_and_callers_are_per_rule_set_bounded_and_dropped_on_reload() -> None:
    from oauth_sidecar.mcp.tool_policy import (
        CACHED_NAME_CHARS,
        CALLER_CACHE_ENTRIES,
        VERDICT_CACHE_ENTRIES,
    )

    tools = policy_of(RULES)
    reader = tools.for_caller("u", {"groups": ["readers"]})
    admin = tools.for_caller("u", {"groups": ["admins"]})
    assert not reader.allows("tools", "write_file")
    assert admin.allows("tools", "write_file")  # not the reader's remembered verdict
    assert not reader.allows("tools", "write_file")
    names = [f"get_{i}" for i in range(VERDICT_CACHE_ENTRIES + 10)]
    assert all(reader.allows("tools", name) for name in names)
    assert len(tools.version.verdicts) <= VERDICT_CACHE_ENTRIES
    long_name = "get_" + "x" * CACHED_NAME_CHARS
    assert reader.allows("tools", long_name)
    assert all(key[2] != long_name for key in tools.version.verdicts)  # judged, not kept
    claims = {"groups": ["readers"]}
    assert not tools.for_caller("u", claims).allows("tools", "write_file")
    assert tools.for_caller("v", {"groups": ["admins"]}).allows("tools", "write_file")
    assert not tools.for_caller("u", claims).allows("tools", "write_file")  # remembered
    assert tools.for_caller("u", {"groups": ["admins"]}).allows("tools", "write_file")
    for i in range(CALLER_CACHE_ENTRIES + 10):
        assert tools.for_caller(f"u{i}", {"groups": ["admins"]}).allows("tools", "write_file")
    assert len(tools.version.callers) <= CALLER_CACHE_ENTRIES
    rules, _ = parse_rule_file('[[rule]]\ngroups = ["readers"]\nallow_tools = ["write_*"]\n', "t")
    tools.replace_file_rules(rules)
    assert tools.version.verdicts == {}
    assert tools.for_caller("u", claims).allows("tools", "write_file")  # the new version's
    reader = tools.for_caller("u", {"groups": ["readers"]})
    assert reader.allows("tools", "write_file")
    assert not reader.allows("tools", "get_1")


# -- enforcement ---------------------------------------------------------------------------------


async def test_a_denied_call_never_reaches_the_upstream_and_names_the_tool(
    start: Any, idp: FakeIdp, mcp_like: McpLike
) -> None:
    client = await start(TOOLS_DENY="delete_*")
    status, text, _ = await post(client, token(idp), call("delete_repository", 5))
    assert status == 200
    answer = json.loads(text)
    assert answer["id"] == 5
    assert answer["error"]["code"] == -32602
    assert "delete_repository" in answer["error"]["message"]
    assert mcp_like.bodies == []
    status, text, _ = await post(client, token(idp), call("search", 6))
    assert status == 200
    assert json.loads(text)["result"]["content"][0]["text"] == "done"
    assert mcp_like.bodies == [call("search", 6)]


async def test_a_batch_with_one_denied_call_is_refused_whole(
    start: Any, idp: FakeIdp, mcp_like: McpLike
) -> None:
    client = await start(TOOL_POLICY_FILE=str(_rules_file(mcp_like)))
    batch = [call("search", 1), call("write_file", 2),
             {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}]
    status, text, _ = await post(client, token(idp, "readers"), batch)
    assert status == 200
    answers = json.loads(text)
    assert [a["id"] for a in answers] == [1, 2]
    assert answers[0]["error"]["data"]["reason"] == "batch_refused"
    assert "write_file" in answers[1]["error"]["message"]
    assert mcp_like.bodies == []
    status, text, _ = await post(client, token(idp, "admins"), batch)
    assert status == 200
    assert len(json.loads(text)) == 3
    assert mcp_like.bodies == [batch]


def _rules_file(mcp_like: McpLike, text: str = RULES) -> Path:
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="tool-rules-"))
    path = directory / "rules.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("sse", [False, True])
async def test_lists_show_only_what_the_caller_may_use(
    start: Any, idp: FakeIdp, mcp_like: McpLike, sse: bool
) -> None:
    client = await start(TOOL_POLICY_FILE=str(_rules_file(mcp_like)))
    path = "/mcp?sse=1" if sse else "/mcp"
    body = [request("tools/list", 1, cursor="page-1"), request("prompts/list", 2),
            request("resources/list", 3), request("resources/templates/list", 4)]
    status, text, headers = await post(client, token(idp, "readers"), body, path)
    assert status == 200
    if sse:
        messages = sse_messages(text)
        assert messages[0]["method"] == "notifications/tools/list_changed"  # passed through
        assert "id: 7" in text
        assert "event: message" in text
        answers = messages[1:]
    else:
        answers = json.loads(text)
        assert int(headers["Content-Length"]) == len(text.encode())
    by_id = {a["id"]: a["result"] for a in answers}
    assert [t["name"] for t in by_id[1]["tools"]] == ["search", "get_doc"]
    assert by_id[1]["nextCursor"] == "page-2"  # untouched
    assert by_id[1]["tools"][0]["inputSchema"] == {"type": "object"}
    assert [p["name"] for p in by_id[2]["prompts"]] == ["summary"]
    assert [r["uri"] for r in by_id[3]["resources"]] == ["file:///public/a.txt"]
    assert [r["uriTemplate"] for r in by_id[4]["resourceTemplates"]] == [
        "file:///public/{name}"]
    assert mcp_like.bodies[0][0]["params"] == {"cursor": "page-1"}  # forwarded unchanged


@pytest.mark.parametrize("sse", [False, True])
async def test_a_filtered_list_with_a_lone_surrogate_is_answered_escaped(
    start: Any, idp: FakeIdp, mcp_like: McpLike, sse: bool
) -> None:
    """A server may write "\\ud800" (valid JSON, not UTF-8): the filtered answer keeps it
    escaped instead of failing to encode it (a 500, or an event stream cut mid-answer)."""
    mcp_like.description = "x\ud800y"
    client = await start(TOOL_POLICY_FILE=str(_rules_file(mcp_like)))
    status, text, _ = await post(client, token(idp, "readers"), request("tools/list", 1),
                                 "/mcp?sse=1" if sse else "/mcp")
    assert status == 200
    answer = sse_messages(text)[-1] if sse else json.loads(text)
    assert [t["name"] for t in answer["result"]["tools"]] == ["search", "get_doc"]
    assert {t["description"] for t in answer["result"]["tools"]} == {"x\ud800y"}


async def test_a_tool_without_its_scope_gets_the_step_up_challenge(
    start: Any, idp: FakeIdp, mcp_like: McpLike
) -> None:
    client = await start(TOOL_SCOPES="write_*=mcp:write files:rw, *=mcp:use",
                         REQUIRED_SCOPES="mcp:use")
    status, _text, headers = await post(client, token(idp, scope="mcp:use"),
                                       call("write_file"))
    assert status == 403
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer error="insufficient_scope", '
                                'scope="mcp:use mcp:write files:rw"')
    assert "resource_metadata=" in challenge
    assert mcp_like.bodies == []
    status, _, _ = await post(client, token(idp, scope="mcp:use mcp:write files:rw"),
                              call("write_file"))
    assert status == 200
    assert len(mcp_like.bodies) == 1


async def test_headers_must_agree_with_the_body(
    start: Any, idp: FakeIdp, mcp_like: McpLike
) -> None:
    client = await start(TOOLS_DENY="delete_*")
    good = token(idp)
    status, text, _ = await post(client, good, call("delete_repository", 3),
                                 **{"Mcp-Method": "tools/call", "Mcp-Name": "search"})
    assert status == 400
    assert json.loads(text)["error"]["code"] == -32020
    assert json.loads(text)["id"] == 3
    status, text, _ = await post(client, good, call("search"), **{"Mcp-Method": "tools/list"})
    assert status == 400
    assert json.loads(text)["error"]["code"] == -32020
    status, text, _ = await post(client, good, call("search"), **{"Mcp-Method": "tools/call"})
    assert status == 400  # a 2026-07-28 call must name its tool in Mcp-Name
    name = "caf\u00e9_search"
    encoded = "=?base64?" + base64.b64encode(name.encode()).decode() + "?="
    status, _, _ = await post(client, good, call(name),
                              **{"Mcp-Method": "tools/call", "Mcp-Name": encoded})
    assert status == 200
    status, _, _ = await post(client, good, call("search"),
                              **{"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?!!?="})
    assert status == 400
    assert [b["params"]["name"] for b in mcp_like.bodies] == [name]


@pytest.mark.parametrize("repeated", [
    [("Mcp-Method", "tools/call"), ("Mcp-Name", "get_doc"), ("Mcp-Name", "search")],
    [("Mcp-Method", "tools/call"), ("Mcp-Method", "tools/list"), ("Mcp-Name", "get_doc")],
])
async def test_a_repeated_mcp_header_is_refused(
    start: Any, idp: FakeIdp, mcp_like: McpLike, repeated: list[tuple[str, str]]
) -> None:
    """The first agrees with the body; a reader of the last (or of both joined) sees another
    call: refused, as a repeated key is."""
    client = await start(TOOLS_DENY="delete_*")
    headers = CIMultiDict([*bearer(token(idp)).items(), ("Content-Type", "application/json"),
                           *repeated])
    async with client.post("/mcp", data=json.dumps(call("get_doc", 4)).encode(),
                           headers=headers) as response:
        assert response.status == 400
        answer = await response.json()
    assert answer["error"]["code"] == -32020
    assert answer["id"] == 4
    assert mcp_like.bodies == []


@pytest.mark.parametrize("body", [
    b"not json", b"\xff\xfe{}", b"",
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search",'
    b'"name":"delete_repository"}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}',
    b"[]",
    b'{"jsonrpc":"2.0","id":[1],"method":"tools/list"}',
    b'{"jsonrpc":"2.0","id":true,"method":"tools/call","params":{"name":"search"}}',
])
async def test_a_body_that_cannot_be_judged_is_refused(
    start: Any, idp: FakeIdp, mcp_like: McpLike, body: bytes
) -> None:
    client = await start(TOOLS_DENY="delete_*")
    status, text, _ = await post(client, token(idp), body)
    assert status == 400
    assert json.loads(text)["error"]["code"] in (-32700, -32600, -32602)
    assert mcp_like.bodies == []


async def test_the_rule_file_is_reloaded_and_a_bad_edit_keeps_the_last_good_rules(
    start: Any, idp: FakeIdp, mcp_like: McpLike
) -> None:
    path = _rules_file(mcp_like, '[[rule]]\ngroups = ["readers"]\nallow_tools = ["search"]\n')
    from oauth_sidecar.app import TOOL_RULE_FILE

    client = await start(TOOL_POLICY_FILE=str(path))
    reader = token(idp, "readers")
    _, text, _ = await post(client, reader, call("get_doc"))
    assert "error" in json.loads(text)
    assert mcp_like.bodies == []
    rule_file = client.server.app[TOOL_RULE_FILE]
    path.write_text('[[rule]]\ngroups = ["readers"]\nallow_tools = ["search", "get_doc"]\n')
    with capture_logs() as logs:
        await rule_file.check()
    assert any(e["event"] == "tool_policy_reloaded" for e in logs)
    _, text, _ = await post(client, reader, call("get_doc"))
    assert json.loads(text)["error"]["message"] == "no such doc"  # the upstream's own answer
    path.write_text('[[rule]]\ngroups = ["readers"]\nallow_tool = ["*"]\n')
    with capture_logs() as logs:
        await rule_file.check()
    invalid = [e for e in logs if e["event"] == "tool_policy_invalid"]
    assert invalid
    assert "line 3" in invalid[0]["problems"][0]
    _status, text, _ = await post(client, reader, call("write_file"))
    assert "write_file" in json.loads(text)["error"]["message"]  # still the last good rules


async def test_each_call_gets_one_audit_line_without_arguments_by_default(
    start: Any, idp: FakeIdp, mcp_like: McpLike
) -> None:
    client = await start(TOOLS_DENY="delete_*")
    secret_args = {"password": "hunter2", "query": "Bearer abc.def"}
    with capture_logs() as logs:
        await post(client, token(idp), request("tools/list", 1))
        await post(client, token(idp), call("search", 2, **secret_args))
        await post(client, token(idp), call("get_doc", 3), "/mcp?sse=1")
        await post(client, token(idp), call("delete_repository", 4))
        await post(client, token(idp), call("not_listed_tool", 5))
    audit = [e for e in logs if e["event"] == "mcp_call"]
    assert [(e["name"], e["decision"], e.get("outcome")) for e in audit] == [
        ("search", "allowed", "ok"), ("get_doc", "allowed", "error"),
        ("delete_repository", "denied", None), ("not_listed_tool", "allowed", "ok")]
    assert audit[1]["error_code"] == -32602
    assert audit[1]["upstream_status"] == 200
    assert all(e["sub"] == "user-1" and e["request_id"] for e in audit)
    assert all("arguments" not in e for e in audit)
    assert audit[2]["rule"] == "TOOLS_DENY"
    assert audit[2]["upstream_status"] is None


@pytest.mark.parametrize("request_id", [{"a": 1}, [1], True])
@pytest.mark.parametrize("sse", ["0", "1"])
async def test_an_id_that_is_not_a_string_or_number_is_refused(
    start: Any, idp: FakeIdp, mcp_like: McpLike, request_id: Any, sse: str
) -> None:
    """An object or array id cannot be matched to its answer: it was a 500 (after the call
    had reached the upstream), and in an event stream a broken response."""
    client = await start(TOOLS_DENY="delete_*")
    for body in (request("tools/list"), call("search")):
        body["id"] = request_id
        status, text, _ = await post(client, token(idp), body, f"/mcp?sse={sse}")
        assert status == 400, text
        assert json.loads(text)["error"]["code"] == -32600
    assert mcp_like.bodies == []


async def test_a_call_whose_event_stream_ends_without_its_answer_is_audited_failed(
    start: Any, idp: FakeIdp, mcp_like: McpLike
) -> None:
    """HTTP 200 and an event stream, but no JSON-RPC answer: the call failed, not ok."""
    client = await start(TOOLS_DENY="delete_*")
    with capture_logs() as logs:
        status, _, _ = await post(client, token(idp), call("search", 2), "/mcp?sse=cut")
    assert status == 200
    audit = [e for e in logs if e["event"] == "mcp_call"]
    assert [(e["name"], e["outcome"], e["upstream_status"]) for e in audit] == [
        ("search", "failed", 200)]


async def test_arguments_are_logged_redacted_when_asked(
    start: Any, idp: FakeIdp, mcp_like: McpLike
) -> None:
    client = await start(TOOLS_DENY="delete_*", AUDIT_LOG_ARGUMENTS="true")
    with capture_logs() as logs:
        await post(client, token(idp), call("search", 2, password="hunter2",
                                           query="Bearer abc.def", text="x" * 5000))
    audit = [e for e in logs if e["event"] == "mcp_call"]
    assert len(audit) == 1
    assert "hunter2" not in audit[0]["arguments"]
    assert "abc.def" not in audit[0]["arguments"]
    assert audit[0]["arguments_truncated"] > 2048
    assert len(audit[0]["arguments"]) == 2048


async def test_per_tool_rate_limits(start: Any, idp: FakeIdp, mcp_like: McpLike) -> None:
    client = await start(TOOL_RATE_LIMITS="search=2")
    caller = token(idp)
    statuses = [(await post(client, caller, call("search", i)))[0] for i in range(3)]
    assert statuses == [200, 200, 429]
    status, _, headers = await post(client, caller, call("search", 9))
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    assert (await post(client, caller, call("get_doc", 10)))[0] == 200  # another tool
    assert (await post(client, token(idp, sub="user-2"), call("search", 11)))[0] == 200
    assert len(mcp_like.bodies) == 4


async def test_without_rules_bodies_are_not_parsed(
    start: Any, idp: FakeIdp, mcp_like: McpLike
) -> None:
    client = await start()
    async with client.post("/mcp", data=b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}',
                           headers=bearer(token(idp))) as response:
        answer = await response.json()
    assert len(answer["result"]["tools"]) == len(TOOLS)


async def test_the_app_has_no_rule_machinery_without_rules(idp: FakeIdp) -> None:
    config = load({"OIDC_ISSUER_URL": idp.issuer, "OIDC_AUDIENCE": "a",
                   "RESOURCE_URL": "https://mcp.example.test/mcp",
                   "MCP_UPSTREAM_URL": "http://127.0.0.1:9", "ALLOW_ALL_AUTHENTICATED": "true"})
    assert not config.tool_rules.configured
    from oauth_sidecar.app import PROXY

    assert create_app(config)[PROXY]._calls is None


async def test_judged_event_streams_count_against_the_subjects_streams(
    start: Any, idp: FakeIdp, mcp_like: McpLike
) -> None:
    client = await start(TOOLS_DENY="delete_*", MAX_STREAMS_PER_SUBJECT="1")
    caller = token(idp)
    headers = {**bearer(caller), "Accept": "application/json, text/event-stream"}
    async with client.post("/mcp?sse=1&hold=1", json=call("search", 1),
                           headers=headers) as held:
        assert held.status == 200
        first = await asyncio.wait_for(held.content.readuntil(b"\n\n"), 5)
        assert b"list_changed" in first  # the stream is being relayed
        status, _, _ = await post(client, caller, call("search", 2), "/mcp?sse=1")
        assert status == 429
    await wait_until(lambda: len(mcp_like.bodies) == 1)
    status, _, _ = await post(client, caller, call("search", 3), "/mcp?sse=1")
    for _ in range(50):  # bounded: the slot comes back when the held stream's handler ends
        if status == 200:
            break
        await asyncio.sleep(0.1)
        status, _, _ = await post(client, caller, call("search", 3), "/mcp?sse=1")
    assert status == 200


@pytest.mark.slow
async def test_replicas_share_per_tool_budgets_through_redis(
    start: Any, idp: FakeIdp, mcp_like: McpLike, tmp_path: Path
) -> None:
    from conftest import clear_of_a_minute_edge
    from processes import free_port
    from redis_server import RedisServer

    redis = RedisServer(free_port(), tmp_path)
    await redis.start()
    try:
        replicas = [await start(TOOL_RATE_LIMITS="search=3", RATE_LIMIT_STORAGE_URI=redis.uri)
                    for _ in range(2)]
        await clear_of_a_minute_edge()
        caller = token(idp)
        statuses = [(await post(replicas[i % 2], caller, call("search", i)))[0]
                    for i in range(6)]
        assert statuses == [200, 200, 200, 429, 429, 429]  # one budget for both replicas
        assert len(mcp_like.bodies) == 3
    finally:
        await redis.stop()


async def test_an_upstream_answering_with_odd_ids_is_relayed_not_crashed_on(
    start: Any, idp: FakeIdp, mcp_like: McpLike
) -> None:
    client = await start(TOOLS_DENY="delete_*")
    with capture_logs() as logs:
        status, text, _ = await post(client, token(idp), call("search", 1), "/mcp?weird=1")
        listed, listing, _ = await post(client, token(idp), request("tools/list", 2),
                                        "/mcp?weird=1")
    assert status == 200
    assert json.loads(text)["id"] == {"not": "an id"}
    assert listed == 200
    assert len(json.loads(listing)["result"]["tools"]) == len(TOOLS)  # not ours: untouched
    audit = [e for e in logs if e["event"] == "mcp_call"]
    assert [(e["name"], e["outcome"]) for e in audit] == [("search", "failed")]  # unanswered


def test_tool_scopes_missing_from_scopes_supported_are_warned_about(idp: FakeIdp) -> None:
    env = {"OIDC_ISSUER_URL": idp.issuer, "OIDC_AUDIENCE": "a",
           "RESOURCE_URL": "https://mcp.example.test/mcp", "MCP_UPSTREAM_URL": "http://127.0.0.1:9",
           "ALLOW_ALL_AUTHENTICATED": "true", "SCOPES_SUPPORTED": "mcp:use mcp:write",
           "TOOL_SCOPES": "write_*=mcp:write, admin_*=mcp:admin"}
    warnings = [w for w in load(env).warnings if w.startswith("TOOL_SCOPES")]
    assert len(warnings) == 1
    assert "names mcp:admin," in warnings[0]
    env["SCOPES_SUPPORTED"] = "mcp:use mcp:write mcp:admin"
    assert not [w for w in load(env).warnings if w.startswith("TOOL_SCOPES")]


async def test_with_rules_other_methods_bodies_are_judged_and_streams_never_resume(
    start: Any, idp: FakeIdp, mcp_like: McpLike, upstream: Any
) -> None:
    client = await start(TOOLS_DENY="delete_*")
    headers = {**bearer(token(idp)), "Content-Type": "application/json"}
    async with client.put("/mcp", data=json.dumps(call("delete_repository")),
                          headers=headers) as response:
        assert response.status == 200  # the JSON-RPC refusal
        assert "delete_repository" in (await response.json())["error"]["message"]
    async with client.patch("/mcp", data=b"not json", headers=headers) as response:
        assert response.status == 400
    assert mcp_like.bodies == []


async def test_with_rules_last_event_id_is_not_forwarded(
    idp: FakeIdp, upstream: Any
) -> None:
    from conftest import SidecarServer

    from oauth_sidecar.app import IDP

    for rules, forwarded in (({"TOOLS_DENY": "x"}, False), ({}, True)):
        config = load(sidecar_env(idp, upstream, **rules))
        app = create_app(config)
        server = SidecarServer(app, config)
        await server.start_server()
        client: Client = TestClient(server)
        await client.start_server()
        try:
            await wait_until(lambda app=app: app[IDP].ready)  # type: ignore[misc]
            async with client.get("/mcp", headers={**bearer(token(idp)),
                                                   "Last-Event-ID": "7"}) as response:
                assert response.status == 200
            assert ("Last-Event-ID" in upstream.requests[-1].headers) is forwarded
        finally:
            await client.close()
