"""Peak memory of a real sidecar process while it relays large uploads.

Why: a chunked request body used to be read whole (up to MAX_REQUEST_BODY_BYTES, 10 MiB) before
the upstream saw a byte of it; now it streams. This starts `python -m oauth_sidecar` (from
`--tree`, default this checkout) in front of an upstream that reads and discards bodies, sends
`--uploads` rounds of `--parallel` bodies of `--mib` MiB each (chunked, then with a
Content-Length), and prints the process's peak RSS (VmHWM) before and after each kind, from
/proc. Everything is on loopback; the fake IdP and upstream run in this process. Never run as a
test.

    .venv/bin/python bench/upload_memory.py                      # this tree
    .venv/bin/python bench/upload_memory.py --tree ../main      # another checkout, to compare
    .venv/bin/python bench/upload_memory.py --parallel 8        # eight uploads at once
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

REPO = Path(__file__).resolve().parent.parent
AUDIENCE = "https://mcp.bench.test/mcp"
PIECE = 64 * 1024  # bytes per piece the client writes
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def peak_rss_kib(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of the process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[name] = int(value.split()[0])
    return fields["VmHWM"], fields["VmRSS"]


async def pieces(total: int) -> AsyncIterator[bytes]:
    piece = os.urandom(PIECE)
    for _ in range(total // PIECE):
        yield piece


async def upload(session: aiohttp.ClientSession, url: str, headers: dict[str, str], kind: str,
                 total: int) -> None:
    """One body: an async generator is sent chunked, bytes with a Content-Length."""
    data: object = pieces(total)
    if kind == "content-length":
        data = b"".join([piece async for piece in pieces(total)])
    async with session.post(url, data=data, headers=headers) as response:
        if response.status != 200:
            raise SystemExit(f"upload answered {response.status}: {await response.text()}")
        await response.read()


async def run(tree: Path, mib: int, uploads: int, parallel: int) -> None:  # noqa: PLR0915 (the scenario reads top to bottom)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1", "alg": "RS256"}
    idp_port, upstream_port, port = free_port(), free_port(), free_port()
    issuer = f"http://127.0.0.1:{idp_port}"
    received: list[int] = []

    async def discovery(request: web.Request) -> web.StreamResponse:
        return web.json_response({"issuer": issuer, "jwks_uri": issuer + "/jwks"})

    async def jwks(request: web.Request) -> web.StreamResponse:
        return web.json_response({"keys": [jwk]})

    async def sink(request: web.Request) -> web.StreamResponse:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        received.append(size)
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})

    idp_app, upstream_app = web.Application(), web.Application()
    idp_app.router.add_get("/.well-known/openid-configuration", discovery)
    idp_app.router.add_get("/jwks", jwks)
    upstream_app.router.add_post("/mcp", sink)
    runners = []
    for app, app_port in ((idp_app, idp_port), (upstream_app, upstream_port)):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", app_port).start()
        runners.append(runner)

    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tree),  # noqa: TID251
           "HOST": "127.0.0.1", "PORT": str(port), "OIDC_ISSUER_URL": issuer,
           "OIDC_AUDIENCE": AUDIENCE, "RESOURCE_URL": f"http://127.0.0.1:{port}/mcp",
           "MCP_UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}",
           "ALLOW_ALL_AUTHENTICATED": "true", "RATE_LIMIT_RPM": "0", "LOG_LEVEL": "warning",
           "EVENT_LOOP": "asyncio"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import runpy, sys, oauth_sidecar; "
        "print('sidecar from', oauth_sidecar.__file__, flush=True); "
        "sys.argv = ['oauth-sidecar']; runpy.run_module('oauth_sidecar', run_name='__main__')",
        env=env, cwd=tree)
    now = int(time.time())
    token = jwt.encode({"iss": issuer, "aud": AUDIENCE, "sub": "bench", "iat": now,
                        "exp": now + 600}, key, algorithm="RS256", headers={"kid": "k1"})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the sidecar did not become ready")
                await asyncio.sleep(0.2)
            total = mib << 20
            hwm, rss = peak_rss_kib(proc.pid)
            print(f"ready:          VmHWM {hwm / 1024:7.1f} MiB  VmRSS {rss / 1024:7.1f} MiB")
            for kind in ("chunked", "content-length"):
                for _ in range(uploads):
                    await asyncio.gather(*(upload(session, url, headers, kind, total)
                                           for _ in range(parallel)))
                if received.count(total) != len(received):
                    raise SystemExit(f"the upstream received {received}, not {total} each")
                hwm, rss = peak_rss_kib(proc.pid)
                print(f"{uploads} x {parallel} x {mib} MiB {kind + ':':15} VmHWM "
                      f"{hwm / 1024:7.1f} MiB  VmRSS {rss / 1024:7.1f} MiB")
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
        for runner in runners:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tree", type=Path, default=REPO, help="checkout whose sidecar runs")
    parser.add_argument("--mib", type=int, default=10, help="MiB per upload [10]")
    parser.add_argument("--uploads", type=int, default=3, help="rounds of each kind [3]")
    parser.add_argument("--parallel", type=int, default=1, help="uploads at once per round [1]")
    args = parser.parse_args()
    asyncio.run(run(args.tree.resolve(), args.mib, args.uploads, args.parallel))


if __name__ == "__main__":
    main()
