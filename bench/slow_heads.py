"""Slow, stalled and oversized request heads against a real sidecar process: memory and time.

    .venv/bin/python bench/slow_heads.py                       # 25 connections dribbling heads
    .venv/bin/python bench/slow_heads.py --connections 200 --head-bytes 65000 --chunk 65536

Run by hand, never as a test (it measures, it asserts nothing). Everything is on 127.0.0.1: a
fake OpenID provider and an echo upstream run in this process, the sidecar is `python -m
oauth_sidecar` exactly as deployed (its JSON log goes to a temporary file, printed at the end).

1. **Fresh**: the sidecar's RSS once /readyz answers 200.
2. **Attack**: --connections connections each send a request line, then header lines of up to
   32 KiB (aiohttp's per-header limit, MAX_HEADER_BYTES' default) but never the blank line that
   ends the head: --chunk bytes every --interval seconds until --head-bytes are sent (the default,
   127 headers of 32 KiB, is the most aiohttp's parser accepts by itself), then they hold the
   connection until the sidecar closes it or --hold seconds pass. RSS is sampled every 0.2 s;
   the peak is reported, and how each connection ended (the status the sidecar answered, closed
   without an answer, or still open when we gave up).
3. **After**: every attack connection closed, --settle seconds later, RSS again (memory the
   process keeps after the attack). `--waves N` repeats 2 and 3: a process that keeps memory
   after one wave should reuse it in the next, not grow.
4. **Stalled head**: one more connection sends a request line and one header line, then nothing;
   the time until the sidecar answers or closes it, and what it answered.
5. A valid request (a real RS256 token) still gets 200.

Per-connection memory under the head cap: send a head just under MAX_REQUEST_HEAD_BYTES on many
connections and hold it (`--head-bytes 65000 --chunk 65536 --connections 500 --hold 10`); the
table prints (peak - fresh) / connections. `--busy-first` is the worst case: each connection
first sends a complete authenticated request, its head padded to --head-bytes too, which the
upstream answers only after --hold + 5 s (so its head is held by the handler and by the request
forwarded upstream), then the unterminated head behind it. Extra sidecar variables:
`--env NAME=VALUE`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from loopback import free_port, rss_mib

REPO = Path(__file__).resolve().parent.parent
HEADER_FIELD = 32768  # aiohttp's max_field_size as the sidecar sets it (MAX_HEADER_BYTES default)
MAX_HEADERS = 127  # aiohttp's max_headers (128) minus Host
AUDIENCE = "https://mcp.example.test/mcp"
READY_TIMEOUT = 30.0  # seconds the sidecar gets to load its keys
IO_TIMEOUT = 10.0  # seconds: the bound on any single connect or write
SAMPLE_EVERY = 0.2  # seconds between RSS samples


@dataclass
class Ended:
    status: int | None = None  # what the sidecar answered, if anything
    closed: bool = False  # the sidecar closed the connection
    sent: int = 0  # head bytes we managed to send
    seconds: float = 0.0  # from the first byte sent until the sidecar closed (or we gave up)

    @property
    def kind(self) -> str:
        if self.status is not None:
            return f"answered {self.status}, closed" if self.closed else f"answered {self.status}"
        return "closed without an answer" if self.closed else "still open when we gave up"




def head_bytes(size: int, first: bytes = b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n") -> bytes:
    """A request line, Host, then 32 KiB header lines, cut at `size`; never the final blank line."""
    head = bytearray(first)
    for index in range(MAX_HEADERS):
        name = f"X-Pad-{index:03d}: ".encode()
        head += name + b"a" * (HEADER_FIELD - len(name) - 8) + b"\r\n"
        if len(head) >= size:
            break
    return bytes(head[:size])


async def read_until_closed(reader: asyncio.StreamReader, ended: Ended) -> None:
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            data += chunk
    ended.closed = True
    if data.startswith(b"HTTP/1."):
        ended.status = int(data.split(b" ", 2)[1])


def busy_request(size: int, token: str) -> bytes:
    """A complete request the upstream answers late, its head padded to about `size` bytes."""
    first = f"GET /mcp/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
    head = head_bytes(size - 64, first.encode())
    return head[:head.rfind(b"\r\n") + 2] + b"\r\n"  # whole header lines, then the blank line


async def attack(port: int, size: int, chunk: int, interval: float, hold: float, *,
                 first: bytes = b"") -> Ended:
    """One connection sending an unterminated head slowly (after `first`), then holding it."""
    ended = Ended()
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port),
                                            IO_TIMEOUT)
    reading = asyncio.create_task(read_until_closed(reader, ended))
    if first:
        writer.write(first)
    head, started = head_bytes(size), time.monotonic()
    try:
        for offset in range(0, len(head), chunk):
            if reading.done():
                break
            try:
                writer.write(head[offset:offset + chunk])
                await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
            except (ConnectionError, TimeoutError):
                break
            ended.sent = offset + len(head[offset:offset + chunk])
            await asyncio.sleep(interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reading), hold)
    finally:
        ended.seconds = time.monotonic() - started
        reading.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), IO_TIMEOUT)
    return ended


async def stalled_head(port: int, bound: float) -> Ended:
    """A request line and one header line, then silence: when does the sidecar let go?"""
    ended = Ended()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await writer.drain()
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read_until_closed(reader, ended), bound)
    ended.seconds = time.monotonic() - started
    writer.close()
    return ended


class Fakes:
    """A fake OpenID provider (discovery, JWKS of a key we hold) and an echo upstream."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.idp_port, self.upstream_port = free_port(), free_port()
        self.issuer = f"http://127.0.0.1:{self.idp_port}"
        self.runners: list[web.AppRunner] = []
        self.slow_seconds = 0.0

    async def start(self) -> None:
        idp = web.Application()
        idp.router.add_get("/.well-known/openid-configuration", self.discovery)
        idp.router.add_get("/jwks", self.jwks)
        upstream = web.Application()
        upstream.router.add_route("*", "/{tail:.*}", self.echo)
        for app, port in ((idp, self.idp_port), (upstream, self.upstream_port)):
            # The upstream takes the padded heads the sidecar forwards (the busy requests).
            runner = web.AppRunner(app, access_log=None, max_field_size=HEADER_FIELD)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self.runners.append(runner)

    async def stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.issuer, "jwks_uri": self.issuer + "/jwks"})

    async def jwks(self, request: web.Request) -> web.Response:
        key = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        key.update({"kid": "bench", "alg": "RS256", "use": "sig"})
        return web.json_response({"keys": [key]})

    async def echo(self, request: web.Request) -> web.Response:
        await request.read()
        if request.path.endswith("/slow"):
            await asyncio.sleep(self.slow_seconds)
        return web.json_response({"ok": True})

    def token(self) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": AUDIENCE, "sub": "bench", "iat": now,
                  "nbf": now, "exp": now + 600}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "bench"})


async def wait_ready(session: aiohttp.ClientSession, base: str, proc: Any) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise SystemExit(f"the sidecar exited with {proc.returncode}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(base + "/readyz") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise SystemExit("the sidecar did not become ready")


async def sample_peak(pid: int, stop: asyncio.Event) -> float:
    peak = 0.0
    while not stop.is_set():
        peak = max(peak, rss_mib(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)
    return max(peak, rss_mib(pid))


def log_events(path: Path) -> Counter[str]:
    counted: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            counted[json.loads(line).get("event", "?")] += 1
    return counted


async def run(args: argparse.Namespace) -> int:  # noqa: PLR0915 (the scenario reads top to bottom)
    fakes = Fakes()
    await fakes.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        "PATH": os.environ.get("PATH", ""),  # noqa: TID251 - this script is a __main__
        "OIDC_ISSUER_URL": fakes.issuer, "OIDC_AUDIENCE": AUDIENCE, "RESOURCE_URL": AUDIENCE,
        "MCP_UPSTREAM_URL": f"http://127.0.0.1:{fakes.upstream_port}",
        "ALLOW_ALL_AUTHENTICATED": "true", "RATE_LIMIT_RPM": "0", "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_LEVEL": "info", "LOG_FORMAT": "json", "EVENT_LOOP": args.event_loop,
        "SHUTDOWN_TIMEOUT_SECONDS": "2",
    }
    for assignment in args.env:
        name, _, value = assignment.partition("=")
        env[name] = value
    log_path = Path(tempfile.mkdtemp(prefix="slow-heads-")) / "sidecar.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "oauth_sidecar", env=env, cwd=REPO, stdout=log_file,
            stderr=asyncio.subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, base, proc)
            fresh = rss_mib(proc.pid)
            fakes.slow_seconds = args.hold + 5
            first = busy_request(args.head_bytes, fakes.token()) if args.busy_first else b""
            waves: list[tuple[float, float, float]] = []  # seconds, peak, after
            results: list[Ended | BaseException] = []
            for _ in range(args.waves):
                stop = asyncio.Event()
                sampler = asyncio.create_task(sample_peak(proc.pid, stop))
                started = time.monotonic()
                results += await asyncio.gather(*(
                    attack(port, args.head_bytes, args.chunk, args.interval, args.hold,
                           first=first)
                    for _ in range(args.connections)), return_exceptions=True)
                seconds = time.monotonic() - started
                stop.set()
                peak = await sampler
                await asyncio.sleep(args.settle)
                waves.append((seconds, peak, rss_mib(proc.pid)))
            stalled = await stalled_head(port, args.stall_bound)
            async with session.get(base + "/mcp", headers={
                    "Authorization": f"Bearer {fakes.token()}"}) as response:
                valid_status = response.status
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
        await fakes.stop()

    ended = [r for r in results if isinstance(r, Ended)]
    failed = [r for r in results if not isinstance(r, Ended)]
    kinds = Counter(e.kind for e in ended)
    print(f"sidecar: python -m oauth_sidecar, EVENT_LOOP={args.event_loop}, extra env "
          f"{args.env or 'none'}; log: {log_path}")
    print(f"attack: {args.waves} wave(s) of {args.connections} connections x {args.head_bytes} "
          f"head bytes, {args.chunk} B every {args.interval} s, hold {args.hold} s"
          f"{', each after a busy request' if args.busy_first else ''}")
    print(f"RSS fresh   {fresh:8.1f} MiB")
    for number, (seconds, peak, after) in enumerate(waves, 1):
        print(f"wave {number} ({seconds:.1f} s): RSS peak {peak:.1f} MiB (+{peak - fresh:.1f} MiB, "
              f"{(peak - fresh) * 1024 / max(1, args.connections):.0f} KiB per connection), "
              f"{args.settle:.0f} s after its last connection closed {after:.1f} MiB")
    sent = sorted(e.sent for e in ended)
    if sent:
        print(f"head bytes sent per connection: min {sent[0]}, max {sent[-1]}")
    for kind, count in kinds.most_common():
        print(f"  {count:5d} x {kind}")
    for error in failed[:3]:
        print(f"  connect/IO failure: {error!r}")
    print(f"stalled head: {stalled.kind} after {stalled.seconds:.2f} s")
    print(f"a valid request afterwards: {valid_status}")
    print(f"sidecar log events: {dict(log_events(log_path).most_common())}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=25)
    parser.add_argument("--head-bytes", type=int, default=MAX_HEADERS * HEADER_FIELD)
    parser.add_argument("--chunk", type=int, default=4096, help="bytes per write")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between writes")
    parser.add_argument("--hold", type=float, default=5.0,
                        help="seconds to hold a connection after its last byte")
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--stall-bound", type=float, default=120.0,
                        help="longest wait for the sidecar to drop the stalled head")
    parser.add_argument("--waves", type=int, default=1, help="attacks one after another")
    parser.add_argument("--busy-first", action="store_true",
                        help="first a complete authenticated request the upstream answers late")
    parser.add_argument("--event-loop", default="asyncio", choices=("asyncio", "uvloop"))
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
