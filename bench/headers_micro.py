"""Microbenchmark: the proxy's request-header filter, in process, µs per request.

    .venv/bin/python bench/headers_micro.py [--calls 20000] [--repeats 7] [--json]

The proxy is built exactly as the app builds it (`UpstreamProxy(load(env), ...)`) and given a
request shaped like an MCP client's POST (the official SDK's headers, a session, a protocol
version, the 2026 Mcp-Method/Mcp-Name, a request id). Measured, each the best of --repeats passes
(timeit's rule: the minimum is the cost, the rest is noise):

- `_request_headers` (`proxy.headers.request`): the caller's headers filtered and ours added,
  what every proxied request pays;
- `session check`: the gate's Mcp-Session-Id checks (a second spelling, the id's form, its
  binding), which the proxy made before they moved to the gate;
- both again with FORWARD_IDENTITY=true and STRIP_REQUEST_HEADERS set (names and a prefix).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial

from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.auth.sessions import SessionBindings
from oauth_sidecar.client_ip import ClientAddress
from oauth_sidecar.config import load
from oauth_sidecar.request_keys import Principal
from oauth_sidecar.upstream.proxy import UpstreamProxy

ENV = {
    "OIDC_ISSUER_URL": "https://idp.bench.test",
    "OIDC_AUDIENCE": "https://mcp.bench.test/mcp",
    "RESOURCE_URL": "https://mcp.bench.test/mcp",
    "MCP_UPSTREAM_URL": "http://127.0.0.1:3000",
    "ALLOW_ALL_AUTHENTICATED": "true",
}
# What an MCP client sends with a tools/call (the official Python SDK over httpx, 2026 headers).
MCP_HEADERS = [
    ("Host", "mcp.bench.test"),
    ("Accept", "application/json, text/event-stream"),
    ("Accept-Encoding", "gzip, deflate"),
    ("Connection", "keep-alive"),
    ("User-Agent", "python-httpx/0.28.1"),
    ("Authorization", "Bearer " + "x" * 900),
    ("Content-Type", "application/json"),
    ("Content-Length", "187"),
    ("Mcp-Session-Id", "1868a90c-4f1d-4d8b-9a7e-2b1f0c3d5e6f"),
    ("MCP-Protocol-Version", "2025-11-25"),
    ("Mcp-Method", "tools/call"),
    ("Mcp-Name", "get_weather"),
    ("X-Request-Id", "0f8e2c7a9b1d4e3f"),
]
PRINCIPAL = Principal(
    issuer="https://idp.bench.test", subject="user-1",
    claims={"sub": "user-1", "email": "user@example.com", "email_verified": True,
            "groups": ["mcp-users", "ops"]},
    expires_at=time.time() + 3600, kid="k1",
)


def best_us(repeats: int, calls: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def measure(calls: int, repeats: int) -> dict[str, float]:
    request = make_mocked_request("POST", "/mcp", headers=CIMultiDict(MCP_HEADERS))
    figures: dict[str, float] = {}
    for label, extra in (("", {}), (" (identity, strip list)", {
        "FORWARD_IDENTITY": "true", "STRIP_REQUEST_HEADERS": "x-tenant, x-internal-*"
    })):
        config = load({**ENV, **extra})  # an older tree ignores STRIP_REQUEST_HEADERS
        bindings = SessionBindings(60)
        proxy = UpstreamProxy(config, policy=AccessPolicy(config.policy),
                              addresses=ClientAddress(()), sessions=bindings)
        figures["_request_headers" + label] = best_us(
            repeats, calls, partial(proxy.headers.request, request, PRINCIPAL))
        # The session header checks (look-alike spellings included) now run in the gate.
        figures["session check" + label] = best_us(repeats, calls, partial(
            bindings.check, request.headers, (PRINCIPAL.issuer, PRINCIPAL.subject)))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = measure(args.calls, args.repeats)
    if args.json:
        print(json.dumps(figures))
        return
    for name, us in figures.items():
        print(f"{name:<50} {us:7.2f} µs")


if __name__ == "__main__":
    main()
