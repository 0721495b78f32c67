"""The JSON-RPC messages of an MCP POST body, as the tool rules see them.

Why: a rule about a tool is only as good as the sidecar's reading of which tool a request calls.
The body is read as strictly as any MCP server reads it (one UTF-8 JSON value: a message or,
before 2025-06-18, a batch; an object that repeats a key is refused, since parsers disagree on
which one wins), and every message that names a thing (a tool, a prompt, a resource URI) is
found, whatever else the body holds. The 2026-07-28 `Mcp-Method` and `Mcp-Name` headers must
agree with the body (SEP-2243: a mismatch is 400 with JSON-RPC error -32020), so no header can
show one call to an intermediary while the body makes another.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from multidict import MultiMapping

# Methods that name one thing: (kind of thing, the param naming it).
NAMED_METHODS = {
    "tools/call": ("tools", "name"),
    "prompts/get": ("prompts", "name"),
    "resources/read": ("resources", "uri"),
}
# Methods whose answer lists things: (kind, the result's list, each item's naming field).
LIST_METHODS = {
    "tools/list": ("tools", "tools", "name"),
    "prompts/list": ("prompts", "prompts", "name"),
    "resources/list": ("resources", "resources", "uri"),
    "resources/templates/list": ("resources", "resourceTemplates", "uriTemplate"),
}
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
HEADER_MISMATCH = -32020  # MCP 2026-07-28 (SEP-2243)
BASE64_SENTINEL = re.compile(r"=\?base64\?([A-Za-z0-9+/=]*)\?=")


class BodyRefused(Exception):
    """The body cannot be judged: answered with this JSON-RPC error (`status` over HTTP)."""

    def __init__(self, status: int, code: int, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.request_id = status, code, message, request_id


@dataclass(frozen=True, slots=True)
class Message:
    """One JSON-RPC message of the body."""

    method: str | None
    """None: a response (to a request of the server's) or not a request at all."""
    id: Any
    """The request id (None for a notification)."""
    has_id: bool
    kind: str | None = None
    """For a NAMED_METHODS request: tools, prompts or resources."""
    name: str | None = None
    """The tool or prompt name, or the resource URI."""
    arguments: Any = None
    """tools/call `arguments`, prompts/get `arguments` (for the audit line, when asked)."""


@dataclass(frozen=True, slots=True)
class Body:
    messages: tuple[Message, ...]
    batch: bool

    @property
    def named(self) -> tuple[Message, ...]:
        return tuple(message for message in self.messages if message.kind is not None)

    @property
    def lists(self) -> dict[Any, str]:
        """id -> method, for the list requests whose answers are filtered."""
        return {m.id: m.method for m in self.messages
                if m.method in LIST_METHODS and m.has_id}


def parse(data: bytes) -> Body:
    """The messages of a JSON-RPC body; BodyRefused when it is not one, or names a thing in
    a way that cannot be judged (a name that is not a string)."""
    try:
        value = _DECODER.decode(data.decode("utf-8"))
    except DuplicateKey:
        raise BodyRefused(400, INVALID_REQUEST,
                          "Invalid Request: an object repeats a key") from None
    except (ValueError, RecursionError):  # UnicodeDecodeError included: JSON is UTF-8 here
        raise BodyRefused(400, PARSE_ERROR, "Parse error: the body is not JSON") from None
    if not isinstance(value, list):
        return Body((_message(value),), False)
    if not value:
        raise BodyRefused(400, INVALID_REQUEST, "Invalid Request: an empty batch")
    return Body(tuple([_message(item) for item in value]), True)


class DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Parsers disagree on a repeated key (the first or the last wins): a body with one could
    name one tool to the rules and another to the MCP server, so it is refused."""
    value = dict(pairs)
    if len(value) != len(pairs):
        raise DuplicateKey
    return value


# Built once: json.loads(..., object_pairs_hook=) builds a decoder (and its scanner) per call.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _message(item: Any) -> Message:
    if not isinstance(item, dict):
        raise BodyRefused(400, INVALID_REQUEST, "Invalid Request: a message is not an object")
    has_id = "id" in item
    request_id = item.get("id")
    if not valid_id(request_id):
        raise BodyRefused(400, INVALID_REQUEST, "Invalid Request: an id must be a string, a "
                          "number or null")
    method = item.get("method")
    if not isinstance(method, str):
        if "method" in item:
            raise BodyRefused(400, INVALID_REQUEST, "Invalid Request: method is not a string",
                              request_id)
        return Message(None, request_id, has_id)
    named = NAMED_METHODS.get(method)
    if named is None:
        return Message(method, request_id, has_id)
    kind, param = named
    params = item.get("params")
    name = params.get(param) if isinstance(params, dict) else None
    if not isinstance(name, str):
        raise BodyRefused(400, INVALID_PARAMS, f"Invalid params: {method} needs params.{param} "
                          "as a string", request_id)
    arguments = params.get("arguments") if isinstance(params, dict) else None
    return Message(method, request_id, has_id, kind, name, arguments)


def valid_id(value: Any) -> bool:
    """A JSON-RPC id: a string, a number or null (never a boolean, a list or an object)."""
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


def header_value(value: str) -> str | None:
    """An Mcp-Name (or Mcp-Param-*) value as meant: `=?base64?...?=` decoded (UTF-8); None
    when the sentinel is not valid base64 of UTF-8 text."""
    found = BASE64_SENTINEL.fullmatch(value)
    if found is None:
        return value
    try:
        return base64.b64decode(found.group(1), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def check_headers(headers: MultiMapping[str], body: Body) -> None:
    """SEP-2243: a present Mcp-Method names the body's one message's method; a present
    Mcp-Name its tool, prompt or URI (and a 2026-07-28 request, one with Mcp-Method, that names
    a thing must send it). Each at most once: readers disagree on which of two counts (the first
    here, the last or both joined elsewhere), as with a repeated key. BodyRefused 400/-32020
    otherwise."""
    method = headers.get("Mcp-Method")
    name = headers.get("Mcp-Name")
    if method is None and name is None:
        return
    first = body.messages[0]
    if len(headers.getall("Mcp-Method", ())) > 1 or len(headers.getall("Mcp-Name", ())) > 1:
        raise BodyRefused(400, HEADER_MISMATCH, "Header mismatch: Mcp-Method or Mcp-Name is "
                          "repeated", None if body.batch else first.id)
    if body.batch:
        raise BodyRefused(400, HEADER_MISMATCH, "Header mismatch: Mcp-Method or Mcp-Name with "
                          "a batch", None)
    if method is not None and method != first.method:
        raise BodyRefused(400, HEADER_MISMATCH, "Header mismatch: Mcp-Method does not match "
                          "the body's method", first.id)
    if first.kind is None:
        if name is not None:
            raise BodyRefused(400, HEADER_MISMATCH, "Header mismatch: Mcp-Name on a method "
                              "that names nothing", first.id)
        return
    if name is None:
        raise BodyRefused(400, HEADER_MISMATCH, f"Header mismatch: {first.method} needs "
                          "Mcp-Name", first.id)
    if header_value(name) != first.name:
        raise BodyRefused(400, HEADER_MISMATCH, "Header mismatch: Mcp-Name does not match the "
                          "body", first.id)


def error_object(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def json_bytes(message: object) -> bytes:
    """Compact JSON as UTF-8, non-ASCII as itself (as MCP peers send it). A lone surrogate, which
    only an escape like `\\ud800` can carry and UTF-8 cannot encode, stays escaped: re-encoding a
    parsed message must never fail (a 500, or a stream dropped mid-answer)."""
    try:
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(message, separators=(",", ":")).encode()


def json_text(message: object) -> str:
    """json_bytes as text, for what is encoded later (an SSE event's data)."""
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return json.dumps(message, separators=(",", ":"))
    return text
