"""One audit line per tools/call, prompts/get and resources/read, and their metrics.

Why: an auditor asks who called which tool, when, and what came of it, and the access line
(one per HTTP request, a batch included) cannot say. Each call gets one `mcp_call` event:
subject, method, name (or URI), decision and the rule that made it, the upstream's status, the
JSON-RPC error code if any, duration, request id. Arguments are personal or secret more often
than not: logged only with AUDIT_LOG_ARGUMENTS=true, then redacted like every log value and
capped. Metric labels stay bounded: a name is its own label only if the upstream listed it
(at most MAX_LABEL_NAMES); any other name a caller sends is "other".
"""

from __future__ import annotations

import json
import logging
from typing import Any

import structlog

from oauth_sidecar.log import redacted
from oauth_sidecar.mcp.messages import LIST_METHODS, Message
from oauth_sidecar.metrics import Metrics
from oauth_sidecar.request_keys import Principal

MAX_LABEL_NAMES = 500
MAX_ARGUMENT_CHARS = 2048
OTHER = "other"

log = structlog.get_logger("oauth_sidecar.audit")


class Audit:
    def __init__(self, metrics: Metrics, log_arguments: bool) -> None:
        self._metrics = metrics
        self._counting = metrics.counting
        self._observed: bool | None = None
        self._log_arguments = log_arguments
        self._known: dict[str, set[str]] = {"tools": set(), "prompts": set(), "resources": set()}

    def observed(self) -> bool:
        """Whether an answered call's line or count reaches anyone: with LOG_LEVEL above info
        and no metrics, nothing would, and the answer need not be read to find its outcome."""
        if self._observed is None:  # the level is set once, before the first request
            self._observed = self._counting or bool(log.is_enabled_for(logging.INFO))
        return self._observed

    def learn(self, method: str, result: dict[str, Any]) -> None:
        """Remember the names a list answer carried (before filtering), as metric labels."""
        kind, field, key = LIST_METHODS[method]
        known = self._known[kind]
        items = result.get(field)
        for item in items if isinstance(items, list) else []:
            if len(known) >= MAX_LABEL_NAMES:
                return
            if isinstance(item, dict) and isinstance(item.get(key), str):
                known.add(item[key])

    def label(self, message: Message) -> str:
        name = message.name or ""
        return name if name in self._known.get(message.kind or "", ()) else OTHER

    def refused(self, principal: Principal, message: Message, decision: str, because: str,
                request_id: str) -> None:
        """A call the sidecar refused: the upstream never saw it."""
        self._metrics.mcp_call(message.method or "", self.label(message), decision)
        log.info("mcp_call", sub=principal.subject, method=message.method, name=message.name,
                 decision=decision, rule=because, upstream_status=None, error_code=None,
                 duration_ms=0.0, request_id=request_id, **self._arguments(message))

    def answered(self, principal: Principal, message: Message, *, status: int | None,
                 error_code: int | None, seconds: float, request_id: str, outcome: str) -> None:
        """A call the upstream was sent; outcome: ok, error (a JSON-RPC error or a tool's
        isError) or failed (no JSON-RPC answer: the upstream failed or the client left)."""
        self._metrics.mcp_call(message.method or "", self.label(message), outcome)
        log.info("mcp_call", sub=principal.subject, method=message.method, name=message.name,
                 decision="allowed", outcome=outcome, upstream_status=status,
                 error_code=error_code, duration_ms=round(seconds * 1000, 2),
                 request_id=request_id, **self._arguments(message))

    def _arguments(self, message: Message) -> dict[str, Any]:
        if not self._log_arguments or message.arguments is None:
            return {}
        text = json.dumps(redacted(message.arguments), ensure_ascii=False, default=str)
        if len(text) > MAX_ARGUMENT_CHARS:
            return {"arguments": text[:MAX_ARGUMENT_CHARS], "arguments_truncated": len(text)}
        return {"arguments": text}
