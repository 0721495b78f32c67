"""Microbenchmark: the access log line, in process, µs per request.

    .venv/bin/python bench/access_log_micro.py [--calls 20000] [--repeats 7] [--out /dev/null]
                                               [--json]

Logging is set up as `oauth-sidecar` sets it up (`configure_logging(level, "json", stream,
mask)`, a SecretMask of a configuration's secrets), writing to --out (/dev/null by default: the
cost measured is the sidecar's, not a disk's). The `access_log` middleware itself is driven, with
a handler that answers at once, on a request shaped like an MCP client's POST (a verified caller,
an X-Request-Id, a peer address). Each figure is the best of --repeats passes (timeit's rule:
the minimum is the cost, the rest is noise):

- `LOG_LEVEL=info`: the middleware with its line, what every request pays;
- `LOG_LEVEL=warning`: the middleware with the line off (the request id, the handler call);
- `line`: the difference, the access line alone.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any, TextIO

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from oauth_sidecar.log import access_log, configure_logging
from oauth_sidecar.request_keys import PRINCIPAL, Principal
from oauth_sidecar.secret_mask import SecretMask

# What a configuration holds (a client secret, STATE_SECRET, a Redis password, an upstream
# credential): every line is searched for each of them in every spelling.
SECRETS = ["client-secret-0123456789abcdef", "state-secret-fedcba9876543210abcdef",
           "redis-pass/word+1", "upstream-token-0d9e8f7a6b5c"]
HEADERS = [
    ("Host", "mcp.bench.test"),
    ("User-Agent", "python-httpx/0.28.1"),
    ("Content-Type", "application/json"),
    ("Mcp-Session-Id", "1868a90c-4f1d-4d8b-9a7e-2b1f0c3d5e6f"),
    ("X-Request-Id", "0f8e2c7a9b1d4e3f"),
]
CALLER = Principal(issuer="https://idp.bench.test", subject="user-1",
                   claims={"sub": "user-1"}, expires_at=time.time() + 3600, kid="k1")
ANSWER = web.Response(status=200)


class PeerTransport:
    """Enough of a transport for request.remote: the peer a loopback client would have."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50123) if name == "peername" else default


async def answer(_: web.Request) -> web.StreamResponse:
    return ANSWER


def drive(coroutine: Coroutine[Any, Any, Any]) -> None:
    """Run a coroutine that never suspends (the handler answers at once) without a loop."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise RuntimeError("the middleware suspended")


def best_us(repeats: int, calls: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def measure(calls: int, repeats: int, out: TextIO) -> dict[str, float]:
    request = make_mocked_request("POST", "/mcp", headers=CIMultiDict(HEADERS),
                                  transport=PeerTransport())
    request[PRINCIPAL] = CALLER
    mask = SecretMask(SECRETS)
    figures: dict[str, float] = {}
    for level in ("info", "warning"):
        configure_logging(level, "json", out, mask)
        figures[f"LOG_LEVEL={level}"] = best_us(
            repeats, calls, lambda: drive(access_log(request, answer)))
    figures["line"] = figures["LOG_LEVEL=info"] - figures["LOG_LEVEL=warning"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="/dev/null", help="where the lines go")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with open(args.out, "w", encoding="utf-8") as out:
        figures = measure(args.calls, args.repeats, out)
    if args.json:
        print(json.dumps(figures))
        return
    for name, us in figures.items():
        print(f"{name:<20} {us:7.2f} µs")


if __name__ == "__main__":
    main()
