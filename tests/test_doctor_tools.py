"""`oauth-sidecar check` with tool rules: the configuration names them, a bad rule file stops
`check` with every problem and its line, and `check --token` lists what the token may call,
judged by ToolPolicy on the names a real JSON-RPC upstream on loopback lists (initialize, a
session id, cursor pages, JSON or an event stream), or the rules that apply when it cannot.

The upstream (Lister) answers as an MCP server would and records every request, so the tests also
prove what the doctor sends it: the upstream credential and the forwarded identity, never the
caller's token, and a DELETE of the session at the end.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import FakeIdp, FakeUpstream, SidecarServer, bearer, sidecar_env, wait_until
from processes import free_port, run_cli

from oauth_sidecar.app import IDP, create_app
from oauth_sidecar.config import load, parse_rule_file
from oauth_sidecar.doctor import Report, diagnose, render
from oauth_sidecar.doctor.mcp_lists import MAX_PAGES, PROTOCOL_VERSION
from oauth_sidecar.doctor.report import CallerTools

STDIO_CHILD = Path(__file__).resolve().parent / "children" / "stdio_echo.py"
TOOLS = ["search", "get_doc", "write_file", "delete_repository", "admin_reset"]
PROMPTS = ["summary", "secret_prompt"]
RESOURCES = ["file:///public/a.txt", "file:///private/b.txt"]
TEMPLATES = ["file:///public/{name}"]
SESSION = "session-7"
UPSTREAM_SECRET = "upstream-credential-4711"

RULES = """# readers may search and read; admins anything; nobody deletes
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
READERS, ADMINS, EVERYONE = ("rule 'readers' (line 2)", "rule 'admins' (line 8)",
                             "rule at line 14")


def lowered(request: web.Request) -> dict[str, str]:
    return {name.lower(): value for name, value in request.headers.items()}


@dataclass
class Seen:
    method: str
    rpc: str
    headers: dict[str, str]


@dataclass
class Lister:
    """An MCP server on loopback: initialize issues a session, which every later request must
    present; tools/list comes in two cursor pages."""

    sse: bool = False
    endless: bool = False
    """tools/list always offers another page."""
    seen: list[Seen] = field(default_factory=list)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        return app

    def _result(self, method: str, params: dict[str, Any]) -> Any:
        if method == "initialize":
            return {"protocolVersion": params["protocolVersion"],
                    "capabilities": {"tools": {}, "prompts": {}, "resources": {}},
                    "serverInfo": {"name": "lister", "version": "1.0"}}
        if method == "tools/list":
            if self.endless:
                page = int(params.get("cursor", "0"))
                return {"tools": [{"name": f"tool_{page}"}], "nextCursor": str(page + 1)}
            if params.get("cursor") == "p2":
                return {"tools": [{"name": n} for n in TOOLS[3:]]}
            return {"tools": [{"name": n} for n in TOOLS[:3]] + [{"title": "unnamed"}],
                    "nextCursor": "p2"}
        if method == "prompts/list":
            return {"prompts": [{"name": n} for n in PROMPTS]}
        if method == "resources/list":
            return {"resources": [{"uri": u, "name": u} for u in RESOURCES]}
        if method == "resources/templates/list":
            return {"resourceTemplates": [{"uriTemplate": u, "name": u} for u in TEMPLATES]}
        return {"content": [{"type": "text", "text": "done"}], "isError": False}

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            self.seen.append(Seen(request.method, "", lowered(request)))
            return web.Response(status=204 if request.method == "DELETE" else 405)
        message = json.loads(await request.read())
        self.seen.append(Seen("POST", message["method"], lowered(request)))
        if message["method"] != "initialize" and request.headers.get("Mcp-Session-Id") != SESSION:
            return web.Response(status=400, text="no session")
        if "id" not in message:
            return web.Response(status=202)
        answer = {"jsonrpc": "2.0", "id": message["id"],
                  "result": self._result(message["method"], message.get("params", {}))}
        headers = {"Mcp-Session-Id": SESSION} if message["method"] == "initialize" else {}
        if not self.sse:
            return web.json_response(answer, headers=headers)
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info"}}
        await response.write(f"event: message\ndata: {json.dumps(note)}\n\n".encode())
        text = json.dumps(answer)
        await response.write(f"event: message\ndata: {text[:9]}".encode())  # one event, 2 writes
        await response.write(f"{text[9:]}\n\n".encode())
        await response.write_eof()
        return response


@pytest.fixture
async def lister() -> AsyncIterator[Lister]:
    upstream = Lister()
    upstream.server = TestServer(upstream.app())
    await upstream.server.start_server()
    yield upstream
    await upstream.server.close()


def rules_env(idp: FakeIdp, upstream: FakeUpstream, url: str, tmp_path: Path,
              **extra: str) -> dict[str, str]:
    rules, secret = tmp_path / "tools.toml", tmp_path / "upstream-token"
    rules.write_text(RULES)
    secret.write_text(UPSTREAM_SECRET + "\n")
    idp.document_changes.setdefault("registration_endpoint", idp.origin + "/register")
    return sidecar_env(idp, upstream, **{
        "ALLOW_ALL_AUTHENTICATED": "false", "ALLOW_GROUPS": "readers,admins",
        "MCP_UPSTREAM_URL": url, "TOOL_POLICY_FILE": str(rules),
        "TOOL_SCOPES": "write_*=mcp:write", "TOOL_RATE_LIMITS": "search=100",
        "MCP_UPSTREAM_BEARER_FILE": str(secret), "FORWARD_IDENTITY": "true", **extra})


def token(idp: FakeIdp, *groups: str, scope: str = "mcp:read", sub: str = "user-1") -> str:
    return idp.mint(claims={"sub": sub, "groups": list(groups), "scope": scope})


def verdicts(tools: CallerTools) -> dict[str, tuple[bool, str, tuple[str, ...]]]:
    return {item.name: (item.allowed, item.because, item.missing_scopes) for item in tools.items}


def tools_of(report: Report) -> CallerTools:
    assert report.token is not None
    assert report.token.accepted, report.token
    assert report.token.tools is not None
    return report.token.tools


# -- without a token: the configuration ------------------------------------------------------


async def test_check_names_the_tool_rules_in_the_configuration(
    idp: FakeIdp, upstream: FakeUpstream, lister: Lister, tmp_path: Path
) -> None:
    env = rules_env(idp, upstream, lister.url, tmp_path, TOOLS_DENY="admin_*,drop_*")
    report = await diagnose(load(env))
    assert report.summary["tool_rules"] == {
        "allow_globs": 0, "deny_globs": 2, "scope_pairs": 1, "rate_limit_pairs": 1,
        "file": str(tmp_path / "tools.toml"), "rules": [READERS, ADMINS, EVERYONE]}
    assert report.token is None
    assert not any(seen.method == "POST" for seen in lister.seen)  # no token: no MCP exchange
    text = render(report)
    assert (f" allow_globs=0, deny_globs=2, scope_pairs=1, rate_limit_pairs=1, "
            f"file={tmp_path / 'tools.toml'}, rules={READERS}, {ADMINS}, {EVERYONE}\n") in text
    assert re.search(r"^  tool_rules +allow_globs=0,", text, re.MULTILINE)
    assert "tool_rules" not in (await diagnose(load(sidecar_env(idp, upstream)))).summary


@pytest.mark.slow
async def test_a_bad_rule_file_stops_check_with_every_problem_and_its_line(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    rules = tmp_path / "tools.toml"
    rules.write_text('x = 1\n\n[[rule]]\nname = "r"\ngroups = "admins"\nallow_tool = ["a"]\n\n'
                     '[[rule]]\nsubs = ["u"]\n')
    env = sidecar_env(idp, upstream, TOOL_POLICY_FILE=str(rules), TOOL_SCOPES="write_*")
    code, stdout, stderr = await run_cli("check", env=env)
    assert code == 2, stdout + stderr
    assert stdout == ""
    problems = [line.removeprefix("  - ") for line in stderr.splitlines()
                if line.startswith("  - ")]
    where = f"TOOL_POLICY_FILE {rules}: "
    assert problems == [
        "TOOL_SCOPES entry 'write_*' has no `=` (expected glob=value)",
        f"{where}line 1: unknown top-level key 'x' (expected [[rule]] tables)",
        f"{where}line 6: unknown key 'allow_tool' in rule at line 3 (known: allow_prompts, "
        "allow_resources, allow_tools, deny_prompts, deny_resources, deny_tools, "
        "email_domains, emails, everyone, groups, name, subs)",
        f"{where}line 5: `groups` must be a list of strings, like groups = [\"a\", \"b\"]",
        f"{where}rule at line 3 applies to nobody: name subs, emails, email_domains or groups, "
        "or set everyone = true",
        f"{where}rule at line 3 grants and denies nothing: add allow_tools, deny_tools, "
        "allow_prompts, deny_prompts, allow_resources or deny_resources",
        f"{where}rule at line 8 grants and denies nothing: add allow_tools, deny_tools, "
        "allow_prompts, deny_prompts, allow_resources or deny_resources",
    ], stderr


def test_rules_written_as_an_inline_array_are_refused_with_the_line_to_fix() -> None:
    """An inline `rule = [...]` has no line per rule: every message would name line 0."""
    text = '# tools\nrule = [{everyone = true, deny_tools = ["x"]}]\n'
    assert parse_rule_file(text, "t.toml") == (
        (), ["TOOL_POLICY_FILE t.toml: line 2: write each rule as a [[rule]] table"])
    rules, problems = parse_rule_file('[[ "rule" ]]\neveryone = true\ndeny_tools = ["x"]\n',
                                      "t.toml")
    assert problems == []
    assert rules[0].line == 1


# -- with a token: what it may call ----------------------------------------------------------


@pytest.mark.slow
async def test_check_token_lists_each_tool_with_the_rule_that_decided(
    idp: FakeIdp, upstream: FakeUpstream, lister: Lister, tmp_path: Path
) -> None:
    env = rules_env(idp, upstream, lister.url, tmp_path)
    reader = tmp_path / "reader.jwt"
    reader.write_text(token(idp, "readers", sub="reader-1"))
    code, stdout, stderr = await run_cli("check", "--token-file", str(reader), env=env)
    assert code == 0, stdout + stderr
    rows = re.findall(r"^    (allowed|refused|403) +(\S+) +(.*)$", stdout, re.MULTILINE)
    assert rows == [
        ("allowed", "search", f"allow_tools of {READERS}"),
        ("allowed", "get_doc", f"allow_tools of {READERS}"),
        ("refused", "write_file", "no rule allows this caller these tools: a JSON-RPC error, "
                                  "never sent upstream"),
        ("refused", "delete_repository", f"deny_tools of {EVERYONE}: a JSON-RPC error, never "
                                         "sent upstream"),
        ("refused", "admin_reset", "no rule allows this caller these tools: a JSON-RPC error, "
                                   "never sent upstream"),
        ("allowed", "summary", "no rule restricts prompts"),
        ("refused", "secret_prompt", f"deny_prompts of {EVERYONE}: a JSON-RPC error, never "
                                     "sent upstream"),
        ("allowed", "file:///public/a.txt", f"allow_resources of {READERS}"),
        ("refused", "file:///private/b.txt", "no rule allows this caller these resources: a "
                                             "JSON-RPC error, never sent upstream"),
        ("allowed", "file:///public/{name}", f"allow_resources of {READERS}"),
    ]
    assert (f"What this token may call (tool rules, judged on the upstream's lists at "
            f"{lister.url}/mcp (server lister 1.0))") in stdout
    assert ("  note: tools/list: 1 item(s) without a string name, which the sidecar hides from "
            "every caller") in stdout
    assert (f"    {READERS}: allow_tools search, get_*; allow_resources file:///public/*"
            in stdout)
    assert f"    {EVERYONE} (everyone): deny_tools delete_*; deny_prompts secret_*" in stdout
    assert ADMINS + ":" not in stdout  # it does not apply to a reader
    assert "    TOOL_SCOPES write_*: mcp:write\n    the token's scopes: mcp:read\n" in stdout
    assert "    TOOL_RATE_LIMITS search: 100 calls a minute" in stdout
    assert "MCP lists as the token's caller: 5 tools, 2 prompts, 3 resources" in stdout

    code, stdout, stderr = await run_cli("check", "--token-file", str(reader), "--json", env=env)
    assert code == 0, stderr
    listed = json.loads(stdout)["token"]["tools"]
    assert listed["unlisted"] == ""
    assert {"kind": "tools", "name": "search", "allowed": True,
            "because": f"allow_tools of {READERS}", "missing_scopes": []} in listed["items"]


@pytest.mark.slow
async def test_check_token_of_an_admin_shows_the_scopes_a_tool_still_needs(
    idp: FakeIdp, upstream: FakeUpstream, lister: Lister, tmp_path: Path
) -> None:
    env = rules_env(idp, upstream, lister.url, tmp_path)
    admin = tmp_path / "admin.jwt"
    admin.write_text(token(idp, "admins", sub="admin-1"))
    code, stdout, stderr = await run_cli("check", "--token-file", str(admin), env=env)
    assert code == 0, stdout + stderr
    rows = dict(re.findall(r"^    (?:allowed|refused|403) +(\S+) +(.*)$", stdout, re.MULTILINE))
    assert rows["write_file"] == (
        f"allow_tools of {ADMINS}, but TOOL_SCOPES needs mcp:write, which the token lacks: 403 "
        "insufficient_scope (the client may step up)")
    assert re.search(r"^    403 +write_file ", stdout, re.MULTILINE)
    assert rows["admin_reset"] == f"allow_tools of {ADMINS}"
    assert rows["delete_repository"].startswith(f"deny_tools of {EVERYONE}")  # deny wins
    assert rows["file:///private/b.txt"] == f"allow_resources of {ADMINS}"

    report = await diagnose(load(env), token(idp, "admins", scope="mcp:read mcp:write"))
    assert verdicts(tools_of(report))["write_file"] == (True, f"allow_tools of {ADMINS}", ())


async def test_the_exchange_is_the_sidecars_and_never_carries_the_callers_token(
    idp: FakeIdp, upstream: FakeUpstream, lister: Lister, tmp_path: Path
) -> None:
    env = rules_env(idp, upstream, lister.url, tmp_path)
    reader = token(idp, "readers", sub="reader-1")
    report = await diagnose(load(env), reader)
    assert len(tools_of(report).items) == 10
    posts = [seen for seen in lister.seen if seen.method == "POST"]
    assert [seen.rpc for seen in posts] == [
        "initialize", "notifications/initialized", "tools/list", "tools/list", "prompts/list",
        "resources/list", "resources/templates/list"]
    assert lister.seen[-1].method == "DELETE"  # the session is ended
    assert lister.seen[-1].headers["mcp-session-id"] == SESSION
    for seen in lister.seen:
        assert reader not in json.dumps(seen.headers)
        assert seen.headers.get("authorization") in (None, f"Bearer {UPSTREAM_SECRET}")
    for seen in posts:
        assert seen.headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"
        assert seen.headers["x-forwarded-user"] == "reader-1"
        assert seen.headers["x-forwarded-groups"] == "readers"
        assert seen.headers["x-forwarded-host"] == "mcp.example.test"
        assert seen.headers["accept"] == "application/json, text/event-stream"
        assert "accept-encoding" not in seen.headers
    for seen in posts[1:]:
        assert seen.headers["mcp-session-id"] == SESSION
        assert seen.headers["mcp-protocol-version"] == PROTOCOL_VERSION


async def test_event_stream_answers_are_read_as_json_ones(
    idp: FakeIdp, upstream: FakeUpstream, lister: Lister, tmp_path: Path
) -> None:
    env = rules_env(idp, upstream, lister.url, tmp_path)
    reader = token(idp, "readers")
    as_json = verdicts(tools_of(await diagnose(load(env), reader)))
    lister.sse = True
    assert verdicts(tools_of(await diagnose(load(env), reader))) == as_json


async def test_an_endless_list_is_read_up_to_its_page_bound(
    idp: FakeIdp, upstream: FakeUpstream, lister: Lister, tmp_path: Path
) -> None:
    lister.endless = True
    report = await diagnose(load(rules_env(idp, upstream, lister.url, tmp_path)),
                            token(idp, "admins"))
    tools = tools_of(report)
    assert [i.name for i in tools.items if i.kind == "tools"] == [
        f"tool_{page}" for page in range(MAX_PAGES)]
    assert (f"tools/list has more than {MAX_PAGES} pages: only the first {MAX_PAGES} are "
            "judged here") in tools.notes


async def test_unreachable_upstream_lists_the_rules_that_apply_instead(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    env = rules_env(idp, upstream, f"http://127.0.0.1:{free_port()}", tmp_path,
                    TOOLS_ALLOW="search")
    report = await diagnose(load(env), token(idp, "readers", sub="reader-1"))
    tools = tools_of(report)
    assert tools.items == []
    assert tools.unlisted == "the upstream is unreachable (ClientConnectorError)"
    assert tools.rules == [
        "TOOLS_ALLOW (every caller): search",
        f"{READERS}: allow_tools search, get_*; allow_resources file:///public/*",
        f"{EVERYONE} (everyone): deny_tools delete_*; deny_prompts secret_*",
        "TOOL_SCOPES write_*: mcp:write",
        "the token's scopes: mcp:read",
        "TOOL_RATE_LIMITS search: 100 calls a minute",
        "restricted to what is allowed: tools, resources; open (no rule allows any, so all "
        "but the denied): prompts",
    ]
    text = render(report)
    assert ("What this token may call (tool rules)\n  the upstream's lists could not be read: "
            "the upstream is unreachable (ClientConnectorError)\n  the rules that apply to this "
            "caller instead:\n    TOOLS_ALLOW (every caller): search\n") in text


async def test_an_upstream_that_does_not_speak_mcp_is_said_so(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The recording upstream answers every request with JSON that is no JSON-RPC answer."""
    env = rules_env(idp, upstream, upstream.url, tmp_path)
    report = await diagnose(load(env), token(idp, "readers"))
    tools = tools_of(report)
    assert tools.unlisted == "initialize got no answer with its id"
    assert tools.rules[0].startswith(READERS)
    assert not any(r.method == "POST" and r.path_qs != "/mcp" for r in upstream.requests)


async def test_a_refused_token_gets_no_tool_list(
    idp: FakeIdp, upstream: FakeUpstream, lister: Lister, tmp_path: Path
) -> None:
    env = rules_env(idp, upstream, lister.url, tmp_path, ALLOW_GROUPS="admins")
    report = await diagnose(load(env), token(idp, "readers"))
    assert report.token is not None
    assert not report.token.accepted
    assert report.token.tools is None
    assert not any(seen.method == "POST" for seen in lister.seen)


# -- the doctor agrees with the sidecar ------------------------------------------------------


async def test_each_verdict_is_what_the_running_sidecar_does_with_the_call(
    idp: FakeIdp, upstream: FakeUpstream, lister: Lister, tmp_path: Path
) -> None:
    """For a reader and an admin, every listed tool is called through the real sidecar: the
    doctor's allowed / refused / 403 is the answer the caller gets."""
    env = rules_env(idp, upstream, lister.url, tmp_path)
    config = load(env)
    app = create_app(config)
    server = SidecarServer(app, config)
    client: TestClient[web.Request, web.Application] = TestClient(server)
    await client.start_server()
    try:
        await wait_until(lambda: app[IDP].ready)
        for caller in (token(idp, "readers"), token(idp, "admins")):
            report = await diagnose(config, caller)
            headers = {**bearer(caller), "Accept": "application/json, text/event-stream",
                       "Mcp-Session-Id": SESSION}
            for item in tools_of(report).items:
                if item.kind != "tools":
                    continue
                body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                        "params": {"name": item.name, "arguments": {}}}
                async with client.post("/mcp", json=body, headers=headers) as response:
                    answer = await response.json()
                    status = response.status
                expected = (403 if item.allowed and item.missing_scopes else 200,
                            not item.allowed)
                assert (status, status == 200 and "error" in answer) == expected, item
    finally:
        await client.close()


@pytest.mark.slow
async def test_check_token_judges_a_stdio_commands_own_tools(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """stdio mode: the tools are those the command lists when check starts it once."""
    env = rules_env(idp, upstream, "", tmp_path, MCP_SPAWN_CMD=json.dumps(
        [sys.executable, str(STDIO_CHILD)]), TOOLS_DENY="crash,deaf")
    for name in ("MCP_UPSTREAM_URL", "MCP_UPSTREAM_BEARER_FILE"):
        env.pop(name)
    report = await diagnose(load(env), token(idp, "admins", sub="admin-1"))
    tools = tools_of(report)
    assert tools.source == "the stdio command's own tools/list (started once, no caller)"
    judged = verdicts(tools)
    assert judged["echo"] == (True, f"allow_tools of {ADMINS}", ())
    assert judged["crash"][0] is False
    assert judged["crash"][1].startswith("TOOLS_DENY")
    assert judged["deaf"][0] is False
    assert set(judged) >= {"echo", "pid", "slow", "crash", "deaf"}
