"""What memory a caller can make a real sidecar process keep: its RSS before and after floods.

Why: a binding, a cache entry or a rate-limit key that costs what the caller chose (a 30 KB
session id, an 11 KB token, a 30 KB X-Forwarded-For hop) lets a few thousand requests grow the
sidecar past its container's limit. Each flood runs against its own fresh `python -m
oauth_sidecar` (from `--tree`, default this checkout), with a fake OpenID provider and upstream in
this process, all on 127.0.0.1; it prints the sidecar's VmRSS once warm, after the flood, and the
answers it gave. Never run as a test (it measures, it asserts nothing).

- `sessions`: a signed-in user presents a new `Mcp-Session-Id` of --session-bytes on every
  request and the upstream accepts each (the sidecar binds ids it has not seen before).
- `issued`: the upstream issues a new id of --issued-bytes in every answer (the sidecar binds it).
- `refused-tokens`: distinct valid tokens of --token-bytes (Entra-style: a long `groups` claim)
  whose subject the allow-list refuses (403).
- `admitted-tokens`: the same tokens admitted, with FORWARD_IDENTITY=true so the groups are what
  a cache hit needs (the verified-token cache's byte budget is what bounds this one).
- `ip-keys`: requests with a garbage token from a trusted proxy (TRUSTED_PROXIES=127.0.0.1)
  whose X-Forwarded-For hop is --ip-bytes of anything: each failure is counted under that hop.

    .venv/bin/python bench/memory_floods.py                        # every flood, this tree
    .venv/bin/python bench/memory_floods.py --tree /tmp/main       # another checkout, to compare
    .venv/bin/python bench/memory_floods.py --only sessions --sessions 20000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from loopback import free_port, rss_mib

REPO = Path(__file__).resolve().parent.parent
AUDIENCE = "https://mcp.bench.test/mcp"
READY_TIMEOUT = 30.0  # seconds the sidecar gets to load its keys
STOP_TIMEOUT = 10.0
LARGE_FIELD = 1 << 16  # the fake upstream and IdP accept any header the sidecar may send
GUID_CLAIM_BYTES = 52  # one `"<guid>",` of a groups list, base64url-encoded in the token
FLOODS = ("sessions", "issued", "refused-tokens", "admitted-tokens", "ip-keys")




@dataclass
class Services:
    """The fake IdP (ES256: cheap to sign thousands of tokens) and the fake MCP upstream."""

    key: ec.EllipticCurvePrivateKey
    issuer: str
    upstream: str
    issued_bytes: int
    issued: int = 0

    def token(self, sub: str, size: int = 0, **claims: object) -> str:
        now = int(time.time())
        payload: dict[str, object] = {"iss": self.issuer, "aud": AUDIENCE, "sub": sub,
                                      "iat": now, "exp": now + 3600, "jti": uuid.uuid4().hex,
                                      "scp": "mcp.read mcp.write", **claims}
        if size:  # pad to about `size` bytes with the claim that makes Entra tokens large
            payload["groups"] = [str(uuid.uuid4()) for _ in range(max(size - 400, 0)
                                                                  // GUID_CLAIM_BYTES)]
        return jwt.encode(payload, self.key, algorithm="ES256", headers={"kid": "k1"})

    def apps(self) -> tuple[web.Application, web.Application]:
        jwk = {**ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True), "kid": "k1",
               "alg": "ES256"}

        async def discovery(request: web.Request) -> web.StreamResponse:
            return web.json_response({"issuer": self.issuer, "jwks_uri": self.issuer + "/jwks"})

        async def jwks(request: web.Request) -> web.StreamResponse:
            return web.json_response({"keys": [jwk]})

        async def mcp(request: web.Request) -> web.StreamResponse:
            await request.read()
            headers = {}
            if request.query.get("issue"):  # a new session id of issued_bytes in every answer
                self.issued += 1
                headers["Mcp-Session-Id"] = f"{self.issued:08d}".ljust(self.issued_bytes, "s")
            return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}}, headers=headers)

        idp, upstream = web.Application(), web.Application()
        idp.router.add_get("/.well-known/openid-configuration", discovery)
        idp.router.add_get("/jwks", jwks)
        upstream.router.add_route("*", "/mcp", mcp)
        return idp, upstream


async def start_sidecar(tree: Path, services: Services, port: int,
                        extra: dict[str, str]) -> asyncio.subprocess.Process:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tree),  # noqa: TID251
           "HOST": "127.0.0.1", "PORT": str(port), "OIDC_ISSUER_URL": services.issuer,
           "OIDC_AUDIENCE": AUDIENCE, "RESOURCE_URL": f"http://127.0.0.1:{port}/mcp",
           "MCP_UPSTREAM_URL": services.upstream, "JWT_ALGORITHMS": "ES256",
           "ALLOW_ALL_AUTHENTICATED": "true", "RATE_LIMIT_RPM": "0", "LOG_LEVEL": "error",
           "EVENT_LOOP": "asyncio", **extra}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import runpy, sys; sys.argv = ['oauth-sidecar']; "
        "runpy.run_module('oauth_sidecar', run_name='__main__')", env=env, cwd=tree)


async def wait_ready(session: aiohttp.ClientSession, origin: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            async with session.get(origin + "/readyz") as ready:
                if ready.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the sidecar did not become ready")


Request = tuple[str, dict[str, str]]  # (path and query, headers)


async def send_all(session: aiohttp.ClientSession, origin: str, requests: Iterator[Request],
                   concurrency: int) -> Counter[int]:
    """Every request, `concurrency` at a time; how many got each status."""
    statuses: Counter[int] = Counter()

    async def worker() -> None:
        for path, headers in requests:  # one shared iterator: each request is sent once
            async with session.post(origin + path, data=b"{}", headers=headers) as response:
                await response.read()
                statuses[response.status] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


@dataclass
class Flood:
    name: str
    env: dict[str, str]
    requests: Callable[[], Iterator[Request]]
    what: str


def floods(args: argparse.Namespace, services: Services) -> list[Flood]:
    bearer = {"Authorization": "Bearer " + services.token("bench-user")}

    def presented() -> Iterator[Request]:
        for i in range(args.sessions):
            yield "/mcp", {**bearer, "Mcp-Session-Id": f"{i:08d}".ljust(args.session_bytes, "p")}

    def issued() -> Iterator[Request]:
        for _ in range(args.sessions):
            yield "/mcp?issue=1", bearer

    def tokens(sub: str) -> Callable[[], Iterator[Request]]:
        def generate() -> Iterator[Request]:
            for _ in range(args.tokens):
                token = services.token(sub, args.token_bytes, email="user@bench.test",
                                       email_verified=True)
                yield "/mcp", {"Authorization": "Bearer " + token}
        return generate

    def forwarded() -> Iterator[Request]:
        garbage = {"Authorization": "Bearer not.a.token"}
        for i in range(args.ips):
            yield "/mcp", {**garbage, "X-Forwarded-For": f"{i:08d}".ljust(args.ip_bytes, "x")}

    return [
        Flood("sessions", {}, presented,
              f"{args.sessions} new ids of {args.session_bytes} B presented"),
        Flood("issued", {}, issued,
              f"{args.sessions} new ids of {args.issued_bytes} B issued upstream"),
        Flood("refused-tokens", {"ALLOW_ALL_AUTHENTICATED": "false", "ALLOW_SUBS": "someone"},
              tokens("refused-user"), f"{args.tokens} tokens of ~{args.token_bytes} B, 403"),
        Flood("admitted-tokens", {"FORWARD_IDENTITY": "true"}, tokens("bench-user"),
              f"{args.tokens} tokens of ~{args.token_bytes} B, admitted, groups forwarded"),
        Flood("ip-keys", {"TRUSTED_PROXIES": "127.0.0.1"}, forwarded,
              f"{args.ips} X-Forwarded-For hops of {args.ip_bytes} B, bad token"),
    ]


async def measure(tree: Path, services: Services, flood: Flood, concurrency: int,
                  session: aiohttp.ClientSession) -> None:
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    proc = await start_sidecar(tree, services, port, flood.env)
    try:
        await wait_ready(session, origin)
        warm = iter([("/mcp", {"Authorization": "Bearer " + services.token("bench-user")})]
                    * 50)
        await send_all(session, origin, warm, 4)  # first-use allocations are not the flood's
        before = rss_mib(proc.pid)
        started = time.monotonic()
        statuses = await send_all(session, origin, flood.requests(), concurrency)
        seconds = time.monotonic() - started
        after = rss_mib(proc.pid)
        answers = " ".join(f"{status}x{count}" for status, count in sorted(statuses.items()))
        print(f"{flood.name:16} {before:8.1f} {after:8.1f} {after - before:+9.1f}  "
              f"{seconds:5.1f}s  {flood.what}; answers {answers}", flush=True)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)


async def run(args: argparse.Namespace) -> None:
    idp_port, upstream_port = free_port(), free_port()
    services = Services(ec.generate_private_key(ec.SECP256R1()), f"http://127.0.0.1:{idp_port}",
                        f"http://127.0.0.1:{upstream_port}", args.issued_bytes)
    runners = []
    for app, port in zip(services.apps(), (idp_port, upstream_port), strict=True):
        runner = web.AppRunner(app, access_log=None, max_field_size=LARGE_FIELD,
                               max_line_size=LARGE_FIELD)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    print(f"sidecar from {args.tree}")
    print(f"{'flood':16} {'RSS MiB':>8} {'after':>8} {'growth':>9}  {'time':>6}  what")
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            for flood in floods(args, services):
                if not args.only or flood.name in args.only:
                    await measure(args.tree, services, flood, args.concurrency, session)
    finally:
        for runner in runners:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tree", type=Path, default=REPO, help="checkout whose sidecar runs")
    parser.add_argument("--only", nargs="+", choices=FLOODS, help="these floods only")
    parser.add_argument("--sessions", type=int, default=5000, help="session ids [5000]")
    parser.add_argument("--session-bytes", type=int, default=30_000, help="presented [30000]")
    parser.add_argument("--issued-bytes", type=int, default=8000,
                        help="issued id bytes (aiohttp's client reads headers of 8190) [8000]")
    parser.add_argument("--tokens", type=int, default=10_000, help="distinct tokens [10000]")
    parser.add_argument("--token-bytes", type=int, default=11_000, help="each [11000]")
    parser.add_argument("--ips", type=int, default=4000, help="forwarded hops [4000]")
    parser.add_argument("--ip-bytes", type=int, default=30_000, help="each [30000]")
    parser.add_argument("--concurrency", type=int, default=8, help="requests at once [8]")
    args = parser.parse_args()
    args.tree = args.tree.resolve()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
