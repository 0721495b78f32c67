"""Microbenchmark: the tool rules (issue 16) in process, µs per operation.

    .venv/bin/python bench/tool_rules_micro.py [--calls N] [--repeats 7] [--json]

The product's CallRules, built as create_app builds it from `load(env)` with TOOL_POLICY_FILE =
bench/tool_workload.py's 50 globs (two group rules of 20 allowed globs, an `everyone` rule of 10
denied), logging configured as `oauth-sidecar` configures it at LOG_LEVEL=warning (the audit line
off, as in bench/run.py's sidecars) writing to /dev/null. The caller is in both groups. Each
figure is the best of --repeats passes (the minimum is the cost, the rest is noise):

- judge: CallRules.judge of a 510-byte tools/call whose tool matches the last allow glob (the
  strict parse, the headers check, the caller's rules, the verdict, scopes, budgets), with its
  parts: messages.parse alone, json.loads of the same bytes without the duplicate-key hook (what
  the hook costs), ToolPolicy.for_caller, CallerRules.verdict;
- call answer: CallRules.whole_answer of the tools/call's JSON answer (parse, audit record),
  which the proxy pays only when the audit line or its count reaches anyone (LOG_LEVEL=info or
  METRICS_PORT; the line itself is not written here); at LOG_LEVEL=warning without metrics the
  answer is relayed as without rules;
- list200 JSON: CallRules.whole_answer of a 200-tool, ~110 KB tools/list answer, 100 tools
  removed (parse, learn the names, filter, serialise), with json.loads and json.dumps alone;
- list200 SSE: the same answer as one SSE event through CallRules.event_rewriter().feed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from tool_workload import (
    ALLOWED_NAMES,
    CALL_BODY,
    CALLED,
    GLOBS,
    GROUPS_CLAIM_VALUE,
    LIST_BODY,
    RULES,
    TOOL_NAMES,
    sse_event,
    tools_list,
)

from oauth_sidecar.auth.challenge import Challenges
from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.auth.ratelimit import RateLimiter
from oauth_sidecar.client_ip import ClientAddress
from oauth_sidecar.config import load
from oauth_sidecar.log import configure_logging
from oauth_sidecar.mcp.audit import Audit
from oauth_sidecar.mcp.calls import CallRules, Judged
from oauth_sidecar.mcp.messages import parse
from oauth_sidecar.mcp.tool_policy import ToolPolicy
from oauth_sidecar.metrics import Metrics
from oauth_sidecar.request_keys import Principal

CALL_ANSWER = (b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":'
               b'"12 signups, 3 referrers up more than 20 %"}],"isError":false}}')
HEADERS = [("Host", "mcp.bench.test"), ("Content-Type", "application/json"),
           ("Accept", "application/json, text/event-stream")]


def drive(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (no budget to spend) without a loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("judge suspended")


def best_us(repeats: int, calls: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def build(directory: Path) -> tuple[CallRules, ToolPolicy, Principal]:
    rules = directory / "tools.toml"
    rules.write_text(RULES)
    config = load({
        "OIDC_ISSUER_URL": "https://idp.bench.test", "OIDC_AUDIENCE": "https://mcp.bench.test/mcp",
        "RESOURCE_URL": "https://mcp.bench.test/mcp", "MCP_UPSTREAM_URL": "http://127.0.0.1:9",
        "ALLOW_ALL_AUTHENTICATED": "true", "RATE_LIMIT_RPM": "0", "LOG_LEVEL": "warning",
        "TOOL_POLICY_FILE": str(rules)})
    metrics = Metrics()
    policy = AccessPolicy(config.policy, forwarded=config.forward_identity,
                          groups_read_elsewhere=bool(config.tool_rules.file))
    limiter = RateLimiter(config.rate_limits, metrics, ClientAddress(config.trusted_proxies))
    tools = ToolPolicy(config.tool_rules, policy)
    calls = CallRules(tools, policy, Challenges(config), limiter,
                      Audit(metrics, config.tool_rules.audit_arguments))
    claims = {"sub": "bench-user-0", "scope": "mcp", "email": "bench-user-0@bench.test",
              "email_verified": True, "groups": GROUPS_CLAIM_VALUE}
    principal = Principal(issuer="https://idp.bench.test", subject="bench-user-0",
                          claims=claims, expires_at=time.time() + 3600, kid="k1")
    return calls, tools, principal


def measure(calls_per_pass: int, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="tool-rules-micro-") as directory:
        calls, tools, principal = build(Path(directory))
    request = make_mocked_request("POST", "/mcp", headers=CIMultiDict(HEADERS))
    call_data = CALL_BODY.encode()
    list_data = LIST_BODY.encode()
    answer = tools_list().encode()
    event = sse_event(answer.decode())

    def judge(data: bytes) -> Judged:
        verdict = drive(calls.judge(request, principal, data, "req-1"))
        if not isinstance(verdict, Judged):
            raise RuntimeError(f"refused: {verdict.status} {verdict.text}")
        return verdict

    # Correctness first: what is measured is what the sidecar does.
    # As with LOG_LEVEL=info or METRICS_PORT: the call's answer is read for its outcome.
    judged_call = dataclasses.replace(judge(call_data), calls=parse(call_data).named)
    judged_list = judge(list_data)
    filtered = json.loads(calls.whole_answer(judged_list, 200, answer))
    names = tuple(t["name"] for t in filtered["result"]["tools"])
    if names != ALLOWED_NAMES or filtered["result"].get("nextCursor") != "page-2":
        raise RuntimeError("the 200-tool list was not filtered to the caller's half")
    rewritten = calls.event_rewriter(judge(list_data), 200).feed(event)
    if json.loads(rewritten.decode().partition("data: ")[2])["result"]["tools"] != (
            filtered["result"]["tools"]):
        raise RuntimeError("the SSE rewrite differs from the JSON filter")
    caller = tools.for_caller(principal.subject, principal.claims)
    if not caller.verdict("tools", CALLED).allowed:
        raise RuntimeError(f"{CALLED} should be allowed")

    n, big = calls_per_pass, max(1, calls_per_pass // 50)
    f: dict[str, float] = {}
    f["judge: tools/call, 50 globs"] = best_us(repeats, n, lambda: judge(call_data))
    f["  messages.parse (duplicate-key hook)"] = best_us(repeats, n, lambda: parse(call_data))
    f["  json.loads, no hook (reference)"] = best_us(
        repeats, n, lambda: json.loads(call_data.decode("utf-8")))
    f["  ToolPolicy.for_caller"] = best_us(
        repeats, n, lambda: tools.for_caller(principal.subject, principal.claims))
    f["  CallerRules.verdict (last glob)"] = best_us(
        repeats, n, lambda: caller.verdict("tools", CALLED))
    f["whole_answer: tools/call answer"] = best_us(
        repeats, n, lambda: calls.whole_answer(judged_call, 200, CALL_ANSWER))
    f["list200 JSON: whole_answer (filter)"] = best_us(
        repeats, big, lambda: calls.whole_answer(judged_list, 200, answer))
    f["  json.loads of the answer"] = best_us(repeats, big, lambda: json.loads(answer))
    f["  200 verdicts (allows)"] = best_us(
        repeats, big, lambda: [caller.allows("tools", name) for name in TOOL_NAMES])
    kept = filtered["result"]
    f["  json.dumps of the filtered answer"] = best_us(repeats, big, lambda: json.dumps(
        {**filtered, "result": kept}, separators=(",", ":"), ensure_ascii=False))

    def sse() -> bytes:
        return calls.event_rewriter(judged_list, 200).feed(event)

    f["list200 SSE: one event rewritten"] = best_us(repeats, big, sse)
    return f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000,
                        help="calls per pass of the small operations (the list ones: / 50)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with open(os.devnull, "w", encoding="utf-8") as out:
        configure_logging("warning", "json", out)
        figures = measure(args.calls, args.repeats)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"tool rules in process: {GLOBS} globs, tools/call of {len(CALL_BODY)} bytes, "
          f"tools/list answer of {len(tools_list()):,} bytes ({len(TOOL_NAMES)} tools, "
          f"{len(ALLOWED_NAMES)} kept); best of {args.repeats}, Python {sys.version.split()[0]}")
    for name, us in figures.items():
        print(f"{name:<40} {us:9.2f} µs")


if __name__ == "__main__":
    main()
