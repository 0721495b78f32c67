"""CallRules: the tool rules applied to one MCP POST, and what its answer may show.

Why in the proxy's path: a rule must hold for what the MCP server will execute, so it is applied
to the body the server receives (mcp/messages.py reads it), after the gate admitted the caller.
For each request, in order: the body must be JSON-RPC (400 otherwise), the 2026-07-28 headers must
agree with it (400/-32020), every named thing must be allowed (a JSON-RPC error naming it, per
message, and the whole body refused: the upstream never sees any part of a refused batch), then
every tool's TOOL_SCOPES must be held (403 insufficient_scope naming every scope the call needs:
MCP step-up), then the tool's TOOL_RATE_LIMITS are spent (429). An admitted request goes on as it
came; its answer's list results are filtered and each call gets one audit line (mcp/audit.py),
read from the answer only when that line or its count reaches anyone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from oauth_sidecar.auth.challenge import INSUFFICIENT_SCOPE_DESCRIPTION, Challenges
from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.auth.ratelimit import (
    PER_TOOL,
    RateLimited,
    RateLimiter,
    RateLimitUnavailable,
    refusal,
    refusal_reason,
)
from oauth_sidecar.http_errors import json_error
from oauth_sidecar.mcp.audit import Audit
from oauth_sidecar.mcp.list_filter import EventRewriter, filter_json, filter_message, lists_by_id
from oauth_sidecar.mcp.messages import (
    INVALID_PARAMS,
    Body,
    BodyRefused,
    Message,
    check_headers,
    error_object,
    json_text,
    parse,
    valid_id,
)
from oauth_sidecar.mcp.tool_policy import CallerRules, ToolPolicy, glob_pattern
from oauth_sidecar.request_keys import AUTH_FAILURE, Principal

KIND_WORD = {"tools": "Tool", "prompts": "Prompt", "resources": "Resource"}
# A list answer is read whole to be filtered: at most this much (a 200-tool list with schemas
# is well under a megabyte), and so is one SSE event of such an answer.
MAX_ANSWER_BYTES = 16 << 20


@dataclass
class Judged:
    """An admitted body: what its answer needs (filtered lists, audit lines)."""

    caller: CallerRules
    principal: Principal
    request_id: str
    lists: dict[Any, str]
    """id -> list method, of the list requests in the body."""
    calls: tuple[Message, ...]
    """The named calls, each audited when its answer comes (or the request ends); none when
    no audit line or count would reach anyone (Audit.observed)."""
    started: float = field(default_factory=time.perf_counter)
    answered: set[Any] = field(default_factory=set)

    @property
    def watches_answer(self) -> bool:
        return bool(self.lists or self.calls)


class CallRules:
    def __init__(
        self, tools: ToolPolicy, policy: AccessPolicy, challenges: Challenges,
        limiter: RateLimiter, audit: Audit,
    ) -> None:
        self._tools = tools
        self._policy = policy
        self._challenges = challenges
        self._limiter = limiter
        self._audit = audit
        self._rate_limits = tuple((glob, per_minute, glob_pattern(glob))
                                  for glob, per_minute in tools.config.rate_limits)

    async def judge(self, request: web.Request, principal: Principal, data: bytes,
                    request_id: str) -> Judged | web.Response:
        """The refusal to send, or what the admitted body's answer needs."""
        try:
            body = parse(data)
            check_headers(request.headers, body)
        except BodyRefused as refused:
            request[AUTH_FAILURE] = "mcp_invalid_body"
            return _jsonrpc_answer(refused.status, error_object(
                refused.request_id, refused.code, refused.message))
        caller = self._tools.for_caller(principal.subject, principal.claims)
        named = body.named
        denied = [(m, v) for m in named if not (v := caller.verdict(m.kind or "", m.name or
                                                                     "")).allowed]
        if denied:
            request[AUTH_FAILURE] = "mcp_denied"
            for message, verdict in denied:
                self._audit.refused(principal, message, "denied", verdict.because, request_id)
            return self._denial(body, {id(m) for m, _ in denied})
        stopped = (self._missing_scopes(request, principal, named, request_id)
                   if self._tools.scoped else None)
        if stopped is None and self._rate_limits:
            stopped = await self._spend_tool_budgets(request, principal, named, request_id)
        if stopped is not None:
            return stopped
        # Refusals are audited above whatever the level; an answer is read for its calls'
        # outcomes only when their audit line or count reaches anyone (mcp/audit.py).
        audited = named if self._audit.observed() else ()
        lists = body.lists
        return Judged(caller, principal, request_id, lists_by_id(lists) if lists else {}, audited)

    def _missing_scopes(self, request: web.Request, principal: Principal,
                        named: tuple[Message, ...], request_id: str) -> web.Response | None:
        tools = [message.name or "" for message in named if message.kind == "tools"]
        if not tools:
            return None
        held = self._policy.scopes(principal.claims)
        if not any(self._tools.missing_scopes(tool, held) for tool in tools):
            return None
        needed: dict[str, None] = {}  # the challenge names every scope the call needs
        for tool in tools:
            needed.update(dict.fromkeys(self._tools.needed_scopes(tool)))
        request[AUTH_FAILURE] = "mcp_insufficient_scope"
        for message in named:
            self._audit.refused(principal, message, "scope_missing", "TOOL_SCOPES", request_id)
        return json_error(403, "insufficient_scope", INSUFFICIENT_SCOPE_DESCRIPTION,
                          {"WWW-Authenticate": self._challenges.scopes_needed(tuple(needed))})

    async def _spend_tool_budgets(self, request: web.Request, principal: Principal,
                                  named: tuple[Message, ...], request_id: str
                                  ) -> web.Response | None:
        for message in named:
            if message.kind != "tools":
                continue
            for glob, per_minute, pattern in self._rate_limits:
                if pattern.match(message.name or "") is None:
                    continue
                try:
                    await self._limiter.admit_at(PER_TOOL, per_minute, principal.issuer,
                                                 principal.subject, glob)
                except (RateLimited, RateLimitUnavailable) as exc:
                    request[AUTH_FAILURE] = refusal_reason(exc)
                    self._audit.refused(principal, message, "rate_limited", glob, request_id)
                    return refusal(exc)
        return None

    def _denial(self, body: Body, denied: set[int]) -> web.Response:
        """One JSON-RPC error per request of the body: the denied ones name what they may not
        use; the others were refused with them (a batch is admitted whole or not at all)."""
        answers = []
        for message in body.messages:
            if not message.has_id or message.method is None:
                continue
            if id(message) in denied:
                word = KIND_WORD[message.kind or "tools"]
                text = f"{word} {message.name!r} is not allowed for this caller"
                answers.append(error_object(message.id, INVALID_PARAMS, text,
                                            {"reason": "forbidden_by_policy"}))
            else:
                answers.append(error_object(
                    message.id, INVALID_PARAMS, "Not sent: another call in this batch is not "
                    "allowed for this caller", {"reason": "batch_refused"}))
        if not answers:  # only notifications: there is nobody to answer, but nothing went on
            answers.append(error_object(None, INVALID_PARAMS, "Not allowed for this caller"))
        return _jsonrpc_answer(200, answers if body.batch else answers[0])

    # -- the answer ------------------------------------------------------------------------

    def whole_answer(self, judged: Judged, status: int, data: bytes) -> bytes:
        """A JSON answer: filtered, and its calls audited."""
        filtered, message = filter_json(data, judged.lists, judged.caller.allows)
        self._learn(message, judged)
        self._record(judged, message, status)
        return filtered

    def event_rewriter(self, judged: Judged, status: int) -> EventRewriter:
        """An SSE answer: each event carrying a response is filtered and audited."""

        def rewrite(payload: str) -> str:
            try:
                message = json.loads(payload)
            except (ValueError, RecursionError):
                return payload
            filtered, removed = self._answer(judged, status, message)
            if not removed:
                return payload
            return json_text(filtered)

        return EventRewriter(rewrite, MAX_ANSWER_BYTES)

    def answered(self, judged: Judged, status: int, message: Any) -> Any:
        """One parsed message (or batch) of the answer, as the caller may see it: for a
        server that answers in messages, not bytes (the stdio bridge)."""
        return self._answer(judged, status, message)[0]

    def _answer(self, judged: Judged, status: int, message: Any) -> tuple[Any, int]:
        """The message with its list results filtered, and how many items were removed; its
        calls' audit lines written."""
        self._learn(message, judged)
        self._record(judged, message, status)
        return filter_message(message, judged.lists, judged.caller.allows)

    def finish(self, judged: Judged, status: int | None) -> None:
        """The request ended: every call not answered yet gets its audit line now (the answer
        was not JSON-RPC, was cut off, or the upstream failed). A request left without its
        JSON-RPC answer failed, whatever the HTTP status: an event stream begins with 200 and
        can end (the server died, the client left) before the answer; only a notification,
        which no answer follows, is ok on a success status."""
        for message in judged.calls:
            if message.id not in judged.answered or not message.has_id:
                judged.answered.add(message.id)
                failed = message.has_id or status is None or status >= 400
                self._audit.answered(judged.principal, message, status=status, error_code=None,
                                     seconds=time.perf_counter() - judged.started,
                                     request_id=judged.request_id,
                                     outcome="failed" if failed else "ok")

    def _learn(self, message: Any, judged: Judged) -> None:
        """Names the upstream lists become metric labels (bounded: audit.py)."""
        if not judged.lists:
            return
        for item in message if isinstance(message, list) else [message]:
            if (isinstance(item, dict) and isinstance(item.get("result"), dict)
                    and valid_id(item.get("id"))):  # an upstream's id may be anything
                method = judged.lists.get(item.get("id"))
                if method is not None:
                    self._audit.learn(method, item["result"])

    def _record(self, judged: Judged, message: Any, status: int) -> None:
        if not judged.calls:
            return
        by_id = {m.id: m for m in judged.calls if m.has_id}
        for item in message if isinstance(message, list) else [message]:
            # dict, not Mapping: json.loads makes dicts, and an ABC check costs microseconds
            if not isinstance(item, dict) or "method" in item or not valid_id(item.get("id")):
                continue
            call = by_id.get(item.get("id"))
            if call is None or call.id in judged.answered:
                continue
            judged.answered.add(call.id)
            error = item.get("error")
            code = error.get("code") if isinstance(error, dict) else None
            is_error = isinstance(item.get("result"), dict) and item["result"].get("isError")
            self._audit.answered(
                judged.principal, call, status=status,
                error_code=code if isinstance(code, int) else None,
                seconds=time.perf_counter() - judged.started, request_id=judged.request_id,
                outcome="error" if error is not None or is_error is True else "ok")


def _jsonrpc_answer(status: int, payload: Any) -> web.Response:
    response = web.Response(status=status, body=json.dumps(payload).encode(),
                            content_type="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response
