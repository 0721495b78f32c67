"""A small stdio MCP server (standard library only) for tests/test_stdio_bridge.py.

It reads one JSON-RPC message per line on stdin and writes one per line on stdout. Methods:
``initialize`` (refused with an error when its protocolVersion is ``refuse``), ``tools/list``,
``server/discover``, ``ping`` and ``tools/call`` with these tools:

* ``echo {text}``: answers the text.
* ``pid``: answers JSON ``{"pid", "sub", "issuer", "email", "cwd"}`` (its environment's
  MCP_USER_* variables).
* ``slow {seconds}``: sends ``notifications/progress`` every 50 ms (when the request has a
  ``_meta.progressToken``) until ``seconds`` passed or ``notifications/cancelled`` names it;
  a cancellation is reported on stderr as ``cancelled <requestId> <reason>``.
* ``crash``: exits at once with code 3, answering nothing.
* ``noise {size}``: prints a line that is not JSON and a line of ``size`` bytes, then answers.
* ``stderr {text}``: writes the text to stderr, then answers.
* ``later``: answers, then 200 ms later sends ``notifications/tools/list_changed`` (tied to
  no request).
* ``elicit``: sends an ``elicitation/create`` request and answers with the client's response.
* ``roots``: sends a ``roots/list`` request and answers with the response (result or error).
* ``caps``: answers JSON ``{"initialize", "meta"}``: the client capabilities its ``initialize``
  declared, and those in this request's ``_meta`` (MCP 2026-07-28).
* ``grandchild``: starts ``sleep 600`` in its process group and answers its pid.
* ``deaf``: answers, then stops reading stdin (sleeps).

Every received ``notifications/*`` is reported on stderr as ``got <method>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

TOOLS = ("echo", "pid", "slow", "crash", "noise", "stderr", "later", "elicit", "roots", "caps",
         "grandchild", "deaf")
CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"
DECLARED: dict[str, Any] = {}  # the initialize's client capabilities
LOCK = threading.Lock()
CANCELLED: dict[Any, threading.Event] = {}
WAITING: dict[Any, tuple[threading.Event, list[Any]]] = {}  # our requests to the client


def send(message: dict[str, Any]) -> None:
    with LOCK:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def answer(request_id: Any, text: str) -> None:
    send({"jsonrpc": "2.0", "id": request_id,
          "result": {"content": [{"type": "text", "text": text}], "isError": False}})


def slow(request_id: Any, params: dict[str, Any]) -> None:
    token = (params.get("_meta") or {}).get("progressToken")
    seconds = float(params.get("arguments", {}).get("seconds", 30))
    event = CANCELLED.setdefault(request_id, threading.Event())
    deadline, step = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        if event.wait(0.05):
            return
        step += 1
        if token is not None:
            send({"jsonrpc": "2.0", "method": "notifications/progress",
                  "params": {"progressToken": token, "progress": step}})
    answer(request_id, f"slept {seconds}")


def ask(request_id: Any, key: str, method: str, params: dict[str, Any]) -> None:
    """Send the client a request; answer request_id with its response."""
    done, box = threading.Event(), list[Any]()
    WAITING[key] = (done, box)
    send({"jsonrpc": "2.0", "id": key, "method": method, "params": params})
    if done.wait(30):
        answer(request_id, json.dumps(box[0]))


def call(request_id: Any, params: dict[str, Any]) -> None:
    name, arguments = params.get("name"), params.get("arguments") or {}
    if name == "echo":
        return answer(request_id, str(arguments.get("text", "")))
    if name == "pid":
        env = os.environ  # noqa: TID251 - reporting what the sidecar gave it is the point
        return answer(request_id, json.dumps({
            "pid": os.getpid(), "sub": env.get("MCP_USER_SUB"),
            "issuer": env.get("MCP_USER_ISSUER"), "email": env.get("MCP_USER_EMAIL"),
            "cwd": os.getcwd()}))
    if name == "slow":
        threading.Thread(target=slow, args=(request_id, params), daemon=True).start()
        return None
    if name == "crash":
        os._exit(3)
    if name == "noise":
        with LOCK:
            sys.stdout.write("this is not json\n")
            sys.stdout.write("{" + "x" * int(arguments.get("size", 100)) + "\n")
            sys.stdout.flush()
        return answer(request_id, "after noise")
    if name == "stderr":
        sys.stderr.write(str(arguments.get("text", "")) + "\n")
        sys.stderr.flush()
        return answer(request_id, "written")
    if name == "later":
        answer(request_id, "soon")
        threading.Timer(0.2, send, ({"jsonrpc": "2.0",
                                     "method": "notifications/tools/list_changed"},)).start()
        return None
    if name == "elicit":
        threading.Thread(target=ask, args=(request_id, "e-1", "elicitation/create", {
            "message": "Your name?", "requestedSchema": {"type": "object"}}), daemon=True).start()
        return None
    if name == "roots":
        threading.Thread(target=ask, args=(request_id, "r-1", "roots/list", {}),
                         daemon=True).start()
        return None
    if name == "caps":
        meta = params.get("_meta") or {}
        return answer(request_id, json.dumps({"initialize": DECLARED.get("capabilities"),
                                              "meta": meta.get(CAPABILITIES_META)}))
    if name == "deaf":
        answer(request_id, "not listening")
        time.sleep(600)
    if name == "grandchild":
        sleeper = subprocess.Popen(["sleep", "600"])  # noqa: S607 - a test's grandchild
        return answer(request_id, str(sleeper.pid))
    return send({"jsonrpc": "2.0", "id": request_id,
                 "error": {"code": -32602, "message": f"unknown tool {name}"}})


def handle(message: dict[str, Any]) -> None:
    method, request_id = message.get("method"), message.get("id")
    params = message.get("params") or {}
    if method is None:  # a response to our request
        waiting = WAITING.pop(request_id, None)
        if waiting is not None:
            waiting[1].append(message["result"] if "result" in message
                              else {"error": message.get("error")})
            waiting[0].set()
        return
    if request_id is None:
        sys.stderr.write(f"got {method}\n")
        if method == "notifications/cancelled":
            cancelled = params.get("requestId")
            sys.stderr.write(f"cancelled {cancelled} {params.get('reason')}\n")
            CANCELLED.setdefault(cancelled, threading.Event()).set()
        sys.stderr.flush()
        return
    if method == "initialize" and params.get("protocolVersion") == "refuse":
        send({"jsonrpc": "2.0", "id": request_id,
              "error": {"code": -32602, "message": "unsupported protocol version"}})
    elif method == "initialize":
        DECLARED["capabilities"] = params.get("capabilities")
        send({"jsonrpc": "2.0", "id": request_id, "result": {
            "protocolVersion": params.get("protocolVersion", "2025-11-25"),
            "capabilities": {"tools": {"listChanged": True}},
            "serverInfo": {"name": "stdio-echo", "version": "1"}}})
    elif method in ("tools/list", "server/discover"):
        send({"jsonrpc": "2.0", "id": request_id, "result": {"tools": [
            {"name": name, "inputSchema": {"type": "object"}} for name in TOOLS]}})
    elif method == "tools/call":
        call(request_id, params)
    elif method == "ping":
        send({"jsonrpc": "2.0", "id": request_id, "result": {}})
    else:
        send({"jsonrpc": "2.0", "id": request_id,
              "error": {"code": -32601, "message": f"no method {method}"}})


def main() -> None:
    for line in sys.stdin:
        if line.strip():
            handle(json.loads(line))


if __name__ == "__main__":
    main()
