"""The upstream's answers as the caller may see them: list results without what it may not use.

Why: a tool the caller may not call is refused at call time (mcp/calls.py), and should not be
offered either (an agent plans with the list). Only the list inside a result to one of the
caller's own list requests is touched; everything else (the cursor, other fields, other messages,
notifications such as notifications/tools/list_changed) passes as it came. An SSE answer is
rewritten event by event: an event carrying such a result gets the filtered JSON, every other
event is relayed byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from oauth_sidecar.mcp.messages import LIST_METHODS, json_bytes

# kind, name -> allowed?
Allows = Callable[[str, str], bool]


def filter_result(method: str, result: Any, allows: Allows) -> tuple[Any, int]:
    """result of a LIST_METHODS request with only the items the caller may use; and how many
    were removed. An item without a string name is removed (it could not be judged)."""
    kind, field, key = LIST_METHODS[method]
    items = result.get(field) if isinstance(result, dict) else None
    if not isinstance(items, list):
        return result, 0
    kept = [item for item in items if isinstance(item, dict)
            and isinstance(item.get(key), str) and allows(kind, item[key])]
    if len(kept) == len(items):
        return result, 0
    return {**result, field: kept}, len(items) - len(kept)


def filter_message(message: Any, lists: dict[Any, str], allows: Allows) -> tuple[Any, int]:
    """One JSON-RPC message (or a batch of them) with list results filtered."""
    if isinstance(message, list):
        removed = 0
        out = []
        for item in message:
            filtered, count = filter_message(item, lists, allows)
            out.append(filtered)
            removed += count
        return out, removed
    if not isinstance(message, dict) or "result" not in message or "method" in message:
        return message, 0
    method = lists.get(_id_key(message.get("id")))
    if method is None:
        return message, 0
    result, removed = filter_result(method, message["result"], allows)
    return ({**message, "result": result}, removed) if removed else (message, 0)


def _id_key(value: Any) -> Any:
    """A JSON-RPC id as a dict key: ids are strings or numbers (1 and 1.0 are one id)."""
    return value if isinstance(value, str | int | float) and not isinstance(value, bool) else None


def lists_by_id(lists: dict[Any, str]) -> dict[Any, str]:
    return {_id_key(key): method for key, method in lists.items() if _id_key(key) is not None}


def filter_json(data: bytes, lists: dict[Any, str], allows: Allows) -> tuple[bytes, Any]:
    """A JSON answer's bytes with list results filtered (the same bytes when nothing is
    removed), and the parsed message (None when it is not JSON: relayed as it came)."""
    try:
        message = json.loads(data)
    except (ValueError, RecursionError):
        return data, None
    filtered, removed = filter_message(message, lists, allows)
    if not removed:
        return data, message
    return json_bytes(filtered), filtered


class EventRewriter:
    """Splits an SSE byte stream into events and hands each event's data to `rewrite`, which
    returns the data to send (or the same object: then the event goes out byte for byte)."""

    def __init__(self, rewrite: Callable[[str], str], limit: int) -> None:
        self._rewrite = rewrite
        self._limit = limit
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Complete events of what has arrived, rewritten; the rest is held. ValueError when
        one event grows past the limit (it could not be judged whole)."""
        data = self._pending + chunk
        out: list[bytes] = []
        start = 0
        while True:
            end, gap = _event_end(data, start)
            if end < 0:
                break
            out.append(self._event(data[start:end]) + data[end:end + gap])
            start = end + gap
        self._pending = data[start:]
        if len(self._pending) > self._limit:
            raise ValueError("an event is larger than the limit")
        return b"".join(out)

    def close(self) -> bytes:
        """What is left at the end of the stream (an unterminated event), as it came."""
        rest, self._pending = self._pending, b""
        return rest

    def _event(self, raw: bytes) -> bytes:
        lines = raw.decode("utf-8", errors="surrogateescape").splitlines()
        data_lines = [line for line in lines if line.startswith("data")]
        if not data_lines:
            return raw
        payload = "\n".join(_field_value(line) for line in data_lines)
        rewritten = self._rewrite(payload)
        if rewritten is payload:
            return raw
        kept = [line for line in lines if not line.startswith("data")]
        kept += [f"data: {line}" for line in rewritten.split("\n")]
        return "\n".join(kept).encode("utf-8", errors="surrogateescape")


def _field_value(line: str) -> str:
    """An SSE `data` line's value: after the colon, one leading space removed."""
    _, _, value = line.partition(":")
    return value[1:] if value.startswith(" ") else value


def _event_end(data: bytes, start: int) -> tuple[int, int]:
    """Where the event starting at `start` ends and how long its blank line is (-1: not yet)."""
    best, gap = -1, 0
    for separator in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        found = data.find(separator, start)
        if found >= 0 and (best < 0 or found < best):
            best, gap = found, len(separator)
    return best, gap
