"""Soak/load harness for oauth_sidecar: long-held SSE streams plus a steady POST load, on loopback.

    .venv/bin/python bench/soak.py --streams 300 --duration 120 --post-rate 50

Processes (all on 127.0.0.1, each in its own session, all reaped at the end, on Ctrl-C and on
failure; the children also exit by themselves if this process dies):

- bench/fake_services.py: a fake OpenID provider (discovery + JWKS; this script holds the RSA
  key and mints RS256 tokens) and a fake MCP upstream (`GET /mcp`, the Streamable HTTP event
  stream, sends an event every --event-interval seconds and holds the stream open; `POST /mcp`
  answers at once); the sidecar proxies both from its own /mcp (RESOURCE_URL's path);
- bench/soak_server.py: the production sidecar, `create_app(load(env))` served through the
  production listener (`listener.make_runner`), plus a loopback stats endpoint (tasks, fds, RSS,
  GC objects, CPU).

Phases: start and wait ready -> "cold" stats -> a warm-up cycle (the same streams and POST rate
for --warmup seconds, so pools, caches and allocator arenas reach their working size) -> settle
-> BASELINE -> the soak cycle (open --streams authenticated SSE streams, then --post-rate POSTs a
second for --duration seconds while every stream stays open) -> all clients leave -> settle ->
FINAL -> SIGTERM the sidecar (it must exit 0 in time). Both settles last --settle seconds (default
35: an idle pooled upstream connection of the sidecar lives up to ~31 s, because aiohttp closes
it at the first 15 s cleanup tick after 15 s idle), so baseline and final are measured in the
same state. With --warmup 0 the baseline is the cold sample.

POSTs are open-loop at a fixed rate (latency includes any queueing). Their mix: valid tokens
answered with JSON or with a one-event SSE stream (--sse-reply-fraction); --invalid-fraction with
no token, garbage, a bad signature, an expired token, a wrong audience or an unknown kid (each must
be a 401 with a `Bearer` challenge naming resource_metadata, and `error="invalid_token"` unless
no token was sent); --forbidden-fraction with a valid token of a subject not in ALLOW_SUBS (must
be 403). Every answer is checked (status, content type, JSON-RPC id echoed). Each stream checks
its `id:` sequence (no gap, duplicate or reordering) and times every event from the send time in
its `data:`; a stream that gets no byte for max(10 s, 5 event intervals) counts as stalled.

Exit 0 only if every check passes: every stream opened, none ended or stalled before the clients
left, no event was lost or duplicated, every POST got its expected answer, no credential reached
the upstream (nor a mangled body, nor a request without X-Forwarded-For), the upstream's streams
all closed after the clients left, the sidecar logged no error and no unexpected warning and
wrote nothing to stderr, it exited 0 on SIGTERM within SHUTDOWN_TIMEOUT_SECONDS + 2 s, and after
the settle its fds are within --fd-tolerance, its tasks and threads within --task-tolerance
(default 2 each) of the baseline and its RSS within --rss-tolerance-mb (default 16 MiB). The
checks apply to the warm-up cycle's clients too; the summary describes the soak cycle. Exit 1
when a check fails, 2 when the set-up fails (a child does not start) or the run is interrupted
(Ctrl-C). Logs stay in --log-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import random
import resource
import shlex
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
AUDIENCE = "https://mcp.bench.test/mcp"
RESOURCE_URL = AUDIENCE
START_TIMEOUT = 30.0  # seconds for a child to become ready
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
SHUTDOWN_TIMEOUT = 5.0  # the sidecar's SHUTDOWN_TIMEOUT_SECONDS
OPEN_TIMEOUT = 60.0  # seconds for all streams of a cycle to open
POST_TIMEOUT = 10.0  # seconds for one POST, answer included
DRAIN_TIMEOUT = POST_TIMEOUT + 5.0
STATS_TIMEOUT = 10.0
KEY_ID = "bench-key-1"
PROTOCOL_VERSION = "2025-11-25"
INVALID_KINDS = ("missing", "garbage", "bad_signature", "expired", "wrong_audience",
                 "unknown_kid")
# Warnings the sidecar may log in this set-up without anything being wrong.
EXPECTED_WARNINGS = frozenset({"config_warning"})

Json = dict[str, Any]


# -- options -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    streams: int
    duration: float
    post_rate: float
    warmup: float
    settle: float
    event_interval: float
    event_bytes: int
    users: int
    invalid_fraction: float
    forbidden_fraction: float
    sse_reply_fraction: float
    sample_interval: float
    open_concurrency: int
    max_inflight: int
    fd_tolerance: int
    task_tolerance: int
    rss_tolerance_mb: float
    rate_limit_rpm: int
    log_dir: str | None
    seed: int


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=300, help="concurrent SSE streams [300]")
    p.add_argument("--duration", type=float, default=120.0,
                   help="seconds the streams are held and POSTs sent [120]")
    p.add_argument("--post-rate", type=float, default=50.0, help="POSTs per second [50]")
    p.add_argument("--warmup", type=float, default=15.0,
                   help="seconds of the warm-up cycle before the baseline (0: none) [15]")
    p.add_argument("--settle", type=float, default=35.0,
                   help="seconds after clients leave before baseline/final stats [35]")
    p.add_argument("--event-interval", type=float, default=1.0,
                   help="seconds between upstream SSE events on each stream [1]")
    p.add_argument("--event-bytes", type=int, default=200, help="padding per SSE event [200]")
    p.add_argument("--users", type=int, default=20, help="distinct subjects (tokens) [20]")
    p.add_argument("--invalid-fraction", type=float, default=0.1,
                   help="POSTs with a missing/invalid token, answered 401 [0.1]")
    p.add_argument("--forbidden-fraction", type=float, default=0.02,
                   help="POSTs with a valid token of a subject not allowed, answered 403 [0.02]")
    p.add_argument("--sse-reply-fraction", type=float, default=0.2,
                   help="valid POSTs the upstream answers with a one-event SSE stream [0.2]")
    p.add_argument("--sample-interval", type=float, default=5.0, help="seconds per row [5]")
    p.add_argument("--open-concurrency", type=int, default=50,
                   help="streams being opened at once (the sidecar's listen backlog is 128) [50]")
    p.add_argument("--max-inflight", type=int, default=500,
                   help="POSTs in flight before new ones count as errors [500]")
    p.add_argument("--fd-tolerance", type=int, default=2)
    p.add_argument("--task-tolerance", type=int, default=2)
    p.add_argument("--rss-tolerance-mb", type=float, default=16.0)
    p.add_argument("--rate-limit-rpm", type=int, default=1_000_000,
                   help="RATE_LIMIT_RPM and RATE_LIMIT_UNAUTHENTICATED_RPM for the sidecar: "
                   "high so the limiter runs but never refuses; 0 disables it [1000000]")
    p.add_argument("--log-dir", help="where children's logs go [a new temporary directory]")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    o = Options(**vars(a))
    problems = []
    if o.streams < 0 or o.users < 1 or o.open_concurrency < 1 or o.max_inflight < 1:
        problems.append("--streams must be >= 0; --users, --open-concurrency, --max-inflight >= 1")
    if o.duration <= 0 or o.post_rate < 0 or o.warmup < 0 or o.settle < 0:
        problems.append("--duration must be > 0; --post-rate, --warmup, --settle >= 0")
    if o.event_interval < 0.01 or o.sample_interval < 0.5:
        problems.append("--event-interval must be >= 0.01 and --sample-interval >= 0.5")
    if not 0 <= o.invalid_fraction + o.forbidden_fraction <= 1:
        problems.append("--invalid-fraction + --forbidden-fraction must be within [0, 1]")
    if problems:
        p.error("; ".join(problems))
    return o


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


# -- child processes -----------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    stdout: Path
    stderr: Path
    exit_code: int | None = None
    stop_seconds: float | None = None


class Children:
    """Starts children in their own sessions and always stops and reaps them (SIGTERM, SIGKILL)."""

    started: list[Child]
    live_pids: ClassVar[set[int]] = set()  # for the synchronous last-resort kill in main()

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started = []

    async def start(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        out, err = self.log_dir / f"{name}.stdout", self.log_dir / f"{name}.stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=stdout,
                stderr=stderr, start_new_session=True,
            )
        Children.live_pids.add(process.pid)
        child = Child(name, process, out, err)
        self.started.append(child)
        return child

    async def stop(self, child: Child) -> None:
        process = child.process
        started = time.monotonic()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                async with asyncio.timeout(STOP_GRACE):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # anything left in its session
        Children.live_pids.discard(process.pid)
        if child.exit_code is None:
            child.exit_code = process.returncode
            child.stop_seconds = time.monotonic() - started

    async def stop_all(self) -> None:
        for child in reversed(self.started):
            await asyncio.shield(self.stop(child))

    @staticmethod
    def kill_leftovers() -> None:
        """Last resort if the event loop died before stop_all finished (a second Ctrl-C)."""
        for pid in list(Children.live_pids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            Children.live_pids.discard(pid)


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


async def wait_http(session: aiohttp.ClientSession, url: str, child: Child) -> None:
    """Until `url` answers 200; fails if the child exits or START_TIMEOUT passes."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if child.process.returncode is not None:
            raise SetupError(f"{child.name} exited with {child.process.returncode}:\n"
                             f"{tail(child.stderr)}\n{tail(child.stdout)}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise SetupError(f"{child.name} not ready at {url} within {START_TIMEOUT} s")
        await asyncio.sleep(0.1)


class SetupError(Exception):
    pass


# -- tokens --------------------------------------------------------------------------------------


class Tokens:
    def __init__(self, issuer: str, users: int, lifetime: float) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.issuer = issuer
        self.lifetime = lifetime
        self.subjects = [f"bench-user-{i}" for i in range(users)]
        self.valid = [self.mint(sub) for sub in self.subjects]
        self.forbidden = self.mint("bench-intruder")
        self.invalid = {
            "missing": None,
            "garbage": "not-a-jwt",
            "bad_signature": self.mint("bench-user-0", key=self.other),
            "expired": self.mint("bench-user-0", claims={"exp": int(time.time()) - 3600,
                                                         "iat": int(time.time()) - 7200,
                                                         "nbf": int(time.time()) - 7200}),
            "wrong_audience": self.mint("bench-user-0", claims={"aud": "https://other.test/"}),
            "unknown_kid": self.mint("bench-user-0", key=self.other, kid="rotated-away"),
        }

    def jwks(self) -> Json:
        data: Json = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        data.update({"kid": KEY_ID, "use": "sig", "alg": "RS256"})
        return {"keys": [data]}

    def mint(self, sub: str, *, key: rsa.RSAPrivateKey | None = None, kid: str = KEY_ID,
             claims: Json | None = None) -> str:
        now = int(time.time())
        payload: Json = {"iss": self.issuer, "aud": AUDIENCE, "sub": sub, "iat": now, "nbf": now,
                         "exp": now + int(self.lifetime), "jti": uuid.uuid4().hex}
        payload.update(claims or {})
        return jwt.encode(payload, key or self.key, algorithm="RS256", headers={"kid": kid})


# -- measurements --------------------------------------------------------------------------------


class StatsClient:
    """One keep-alive connection to each stats endpoint (a constant cost in every sample)."""

    def __init__(self, sidecar_stats: str, upstream_stats: str, idp: str) -> None:
        self.sidecar_url, self.upstream_url, self.idp = sidecar_stats, upstream_stats, idp
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=4),
            timeout=aiohttp.ClientTimeout(total=STATS_TIMEOUT))

    async def sidecar(self, *, collect: bool = False, detail: bool = False) -> Json:
        query = {"gc": "1" if collect else "0", "detail": "1" if detail else "0"}
        async with self.session.get(self.sidecar_url, params=query) as response:
            response.raise_for_status()
            data: Json = await response.json()
            return data

    async def upstream(self) -> Json:
        async with self.session.get(self.upstream_url) as response:
            response.raise_for_status()
            data: Json = await response.json()
            return data


@dataclass
class StreamResult:
    index: int
    opened: bool = False
    open_seconds: float = math.nan
    opened_at: float = math.nan
    ended_at: float = math.nan
    events: int = 0
    last_seq: int = -1
    gaps: int = 0  # events lost, duplicated or out of order
    closed_by_client: bool = False
    failure: str | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # opened, or failed to


@dataclass
class Load:
    """Everything one cycle's clients saw."""

    streams: list[StreamResult] = field(default_factory=list)
    streams_open: int = 0
    events: int = 0
    event_latency: list[float] = field(default_factory=list)
    posts_sent: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latency: dict[str, list[float]] = field(
        default_factory=lambda: collections.defaultdict(list))
    recent_latency: list[float] = field(default_factory=list)  # since the last row
    generator_late_max: float = 0.0
    load_started: float = math.nan
    load_ended: float = math.nan

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@dataclass
class Sample:
    phase: str
    t: float
    sidecar: Json
    upstream: Json
    cpu_pct: float
    harness_cpu_pct: float


class Monitor:
    """Prints one compact row every --sample-interval seconds and keeps every sample."""

    HEADER = (f"{'phase':<9}{'t/s':>6}{'strm':>6}{'events':>8}{'posts':>7}{'ok':>7}{'401':>6}"
              f"{'403':>5}{'err':>5}{'p99ms':>7} |{'fds':>6}{'tasks':>6}{'thr':>4}{'rssMB':>7}"
              f"{'gcobj':>8}{'cpu%':>6}{'lagms':>7} |{'up.open':>8}{'gen.cpu%':>9}")

    def __init__(self, stats: StatsClient, interval: float) -> None:
        self.stats = stats
        self.interval = interval
        self.samples: list[Sample] = []
        self._last_cpu: tuple[float, float] | None = None
        self._last_harness = (time.monotonic(), sum(os.times()[:2]))

    async def sample(self, phase: str, t: float, load: Load | None, *,
                     collect: bool = False) -> Sample:
        sidecar = await self.stats.sidecar(collect=collect)
        upstream = await self.stats.upstream()
        now = time.monotonic()
        cpu_pct = math.nan
        if self._last_cpu is not None:
            cpu_pct = 100 * (sidecar["cpu_s"] - self._last_cpu[1]) / max(now - self._last_cpu[0],
                                                                         1e-6)
        self._last_cpu = (now, sidecar["cpu_s"])
        harness_cpu = sum(os.times()[:2])
        harness_pct = 100 * (harness_cpu - self._last_harness[1]) / max(
            now - self._last_harness[0], 1e-6)
        self._last_harness = (now, harness_cpu)
        sample = Sample(phase, t, sidecar, upstream, cpu_pct, harness_pct)
        self.samples.append(sample)
        self._print(sample, load)
        return sample

    def _print(self, s: Sample, load: Load | None) -> None:
        if load is not None:
            o = load.outcomes
            client = (f"{load.streams_open:>6}{load.events:>8}{load.posts_sent:>7}{o['ok']:>7}"
                      f"{o['401']:>6}{o['403']:>5}{load.error_count:>5}"
                      f"{ms(percentile(load.recent_latency, 99)):>7}")
            load.recent_latency = []
        else:
            client = f"{'':>6}{'':>8}{'':>7}{'':>7}{'':>6}{'':>5}{'':>5}{'':>7}"
        sc = s.sidecar
        cpu = "-" if math.isnan(s.cpu_pct) else f"{s.cpu_pct:.0f}"
        print(f"{s.phase:<9}{s.t:>6.0f}{client} |{sc['fds']:>6}{sc['tasks']:>6}"
              f"{sc['threads']:>4}{sc['rss_kb'] / 1024:>7.1f}{sc['gc_objects']:>8}{cpu:>6}"
              f"{sc['loop_lag_ms']:>7.1f} |{s.upstream['streams_open']:>8}"
              f"{s.harness_cpu_pct:>9.0f}", flush=True)

    async def every(self, phase: str, load: Load | None, started: float) -> None:
        """Sample until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await self.sample(phase, time.monotonic() - started, load)


# -- load ----------------------------------------------------------------------------------------


async def hold_stream(session: aiohttp.ClientSession, url: str, token: str, result: StreamResult,
                      load: Load, *, gate: asyncio.Semaphore, read_timeout: float) -> None:
    """GET the event stream and read it until cancelled (the client leaves) or it fails."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream",
               "MCP-Protocol-Version": PROTOCOL_VERSION}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=OPEN_TIMEOUT, sock_read=read_timeout)
    response: aiohttp.ClientResponse | None = None
    started = time.monotonic()
    try:
        async with gate:
            response = await session.get(url, headers=headers, timeout=timeout)
        if response.status != 200 or response.content_type != "text/event-stream":
            result.failure = f"open: {response.status} {response.content_type}"
            return
        result.opened, result.opened_at = True, time.monotonic()
        result.open_seconds = result.opened_at - started
        load.streams_open += 1
        result.ready.set()
        seq, sent = -1, math.nan
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("id: "):
                seq = int(line[4:])
            elif line.startswith("data: "):
                sent = float(line[6:].split(" ", 1)[0])
            elif not line:  # the end of one event
                if seq != result.last_seq + 1:
                    result.gaps += 1
                result.last_seq = seq
                result.events += 1
                load.events += 1
                load.event_latency.append(time.time() - sent)
        result.failure = "ended by the server"
    except asyncio.CancelledError:
        result.closed_by_client = True
        raise
    except TimeoutError:
        result.failure = f"stalled (nothing for {read_timeout:.0f} s)"
    except (aiohttp.ClientError, ValueError) as exc:
        result.failure = f"{type(exc).__name__}: {exc}"[:120]
    finally:
        result.ended_at = time.monotonic()
        if result.opened:
            load.streams_open -= 1
        if response is not None:
            response.close()
        result.ready.set()


def check_answer(kind: str, request_id: int, response: aiohttp.ClientResponse,
                 body: bytes) -> tuple[str, str | None]:
    """(outcome, problem or None) for one POST answer."""
    status = response.status
    if kind in INVALID_KINDS:
        challenge = response.headers.get("WWW-Authenticate", "")
        if status != 401:
            return "401", f"status {status}"
        if not challenge.startswith("Bearer ") or "resource_metadata=" not in challenge:
            return "401", "no Bearer challenge with resource_metadata"
        if ('error="invalid_token"' in challenge) == (kind == "missing"):
            return "401", "wrong error code in the challenge"
        return "401", None
    if kind == "forbidden":
        return "403", None if status == 403 else f"status {status}"
    expected = "text/event-stream" if kind == "valid_sse" else "application/json"
    if status != 200 or response.content_type != expected:
        return "ok", f"status {status} {response.content_type}"
    text = body.decode()
    if kind == "valid_sse":
        data = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
        text = data[0] if len(data) == 1 else ""
    try:
        message = json.loads(text)
    except ValueError:
        return "ok", "body is not the JSON-RPC answer"
    return "ok", None if message.get("id") == request_id else "JSON-RPC id not echoed"


async def post_one(session: aiohttp.ClientSession, url: str, load: Load, *, kind: str,
                   token: str | None, request_id: int, scheduled: float) -> None:
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": PROTOCOL_VERSION}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if kind == "valid_sse":
        headers["X-Bench-Reply"] = "sse"
    body = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                       "params": {"name": "echo", "arguments": {"text": f"hello {request_id}"}}})
    try:
        async with session.post(url, data=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT)) as response:
            outcome, problem = check_answer(kind, request_id, response, await response.read())
    except (aiohttp.ClientError, TimeoutError) as exc:
        outcome, problem = "error", type(exc).__name__
    elapsed = time.monotonic() - scheduled
    load.latency[kind].append(elapsed)
    load.recent_latency.append(elapsed)
    if problem is None:
        load.outcomes[outcome] += 1
    else:
        load.errors[f"POST {kind}: {problem}"] += 1


async def post_load(session: aiohttp.ClientSession, url: str, load: Load, *, tokens: Tokens,
                    o: Options, seconds: float, rng: random.Random) -> None:
    """Open loop: POST number i is due at start + i / rate, whatever the earlier ones do."""
    load.load_started = start = time.monotonic()
    inflight: set[asyncio.Task[None]] = set()
    for i in range(int(seconds * o.post_rate)):
        due = start + i / o.post_rate
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        load.generator_late_max = max(load.generator_late_max, time.monotonic() - due)
        load.posts_sent += 1
        if len(inflight) >= o.max_inflight:
            load.errors["POST not sent: --max-inflight reached"] += 1
            continue
        r = rng.random()
        token: str | None
        if r < o.invalid_fraction:
            kind = rng.choice(INVALID_KINDS)
            token = tokens.invalid[kind]
        elif r < o.invalid_fraction + o.forbidden_fraction:
            kind, token = "forbidden", tokens.forbidden
        else:
            kind = "valid_sse" if rng.random() < o.sse_reply_fraction else "valid_json"
            token = rng.choice(tokens.valid)
        load.kinds[kind] += 1
        task = asyncio.create_task(post_one(session, url, load, kind=kind, token=token,
                                            request_id=i, scheduled=start + i / o.post_rate))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    remaining = start + seconds - time.monotonic()
    if remaining > 0:
        await asyncio.sleep(remaining)
    load.load_ended = time.monotonic()
    if inflight:
        _, pending = await asyncio.wait(inflight, timeout=DRAIN_TIMEOUT)
        for task in pending:
            task.cancel()
            load.errors["POST still pending at the end"] += 1


# -- phases --------------------------------------------------------------------------------------


@dataclass
class Bench:
    o: Options
    children: Children
    sidecar: Child
    base_url: str
    tokens: Tokens
    stats: StatsClient
    monitor: Monitor
    started: float = field(default_factory=time.monotonic)


async def cycle(b: Bench, phase: str, seconds: float) -> Load:
    """Open every stream, run the POST load for `seconds`, then every client leaves."""
    load, o = Load(), b.o
    monitor = asyncio.create_task(b.monitor.every(phase, load, b.started))
    gate = asyncio.Semaphore(o.open_concurrency)
    read_timeout = max(10.0, 5 * o.event_interval)
    streams: list[asyncio.Task[None]] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as stream_http, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as post_http:
            for i in range(o.streams):
                load.streams.append(result := StreamResult(i))
                token = b.tokens.valid[i % len(b.tokens.valid)]
                streams.append(asyncio.create_task(hold_stream(
                    stream_http, b.base_url + "/mcp", token, result, load, gate=gate,
                    read_timeout=read_timeout)))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OPEN_TIMEOUT):
                    await asyncio.gather(*(r.ready.wait() for r in load.streams))
            rng = random.Random(f"{o.seed}-{phase}")  # noqa: S311 - a reproducible mix, no secret
            await post_load(post_http, b.base_url + "/mcp", load, tokens=b.tokens, o=o,
                            seconds=seconds, rng=rng)
            for task in streams:  # the clients leave
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
    finally:
        for task in [*streams, monitor]:
            task.cancel()
        await asyncio.gather(*streams, monitor, return_exceptions=True)
    return load


async def settle(b: Bench, phase: str) -> Sample:
    """Wait --settle seconds (printing rows), then sample after a full GC."""
    monitor = asyncio.create_task(b.monitor.every("settle", None, b.started))
    try:
        await asyncio.sleep(b.o.settle)
    finally:
        monitor.cancel()
        await asyncio.gather(monitor, return_exceptions=True)
    return await b.monitor.sample(phase, time.monotonic() - b.started, None, collect=True)


def load_problems(phase: str, load: Load) -> list[str]:
    problems = [f"{phase}: {n} x {what}" for what, n in load.errors.most_common()]
    failures = collections.Counter(
        "never opened" if not r.opened and r.failure is None else r.failure
        for r in load.streams if r.failure is not None or not r.opened)
    problems += [f"{phase}: {n} stream(s): {why}" for why, n in failures.most_common()]
    gaps = sum(r.gaps for r in load.streams)
    if gaps:
        problems.append(f"{phase}: {gaps} event(s) lost, duplicated or out of order")
    return problems


def log_problems(child: Child) -> list[str]:
    problems = []
    if err := tail(child.stderr, 5):
        problems.append(f"sidecar wrote to stderr:\n{err}")
    seen: collections.Counter[str] = collections.Counter()
    for line in child.stdout.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            seen[f"non-JSON log line {line[:80]!r}"] += 1
            continue
        level, event = record.get("level"), record.get("event")
        if level in {"error", "critical", "exception"} or (
                level == "warning" and event not in EXPECTED_WARNINGS):
            seen[f"logged {level} {event!r}"] += 1
    return [f"{n} x {what}" for what, n in seen.most_common()] + problems


async def start(o: Options, children: Children, log_dir: Path) -> Bench:
    raise_nofile(4 * o.streams + 1024)
    idp_port, upstream_port, port, stats_port = (free_port() for _ in range(4))
    lifetime = o.warmup + o.duration + 2 * o.settle + 2 * OPEN_TIMEOUT + 600
    idp = f"http://127.0.0.1:{idp_port}"
    tokens = Tokens(idp, o.users, lifetime)
    (log_dir / "jwks.json").write_text(json.dumps(tokens.jwks()))
    fakes = await children.start("fake_services", [
        sys.executable, str(BENCH / "fake_services.py"), "--idp-port", str(idp_port),
        "--upstream-port", str(upstream_port), "--jwks-file", str(log_dir / "jwks.json"),
        "--event-interval", str(o.event_interval), "--event-bytes", str(o.event_bytes),
        "--max-lifetime", str(lifetime)], {})
    env = {  # nothing inherited: no stray variable reaches the sidecar's config
        "OIDC_ISSUER_URL": idp, "OIDC_AUDIENCE": AUDIENCE, "RESOURCE_URL": RESOURCE_URL,
        "MCP_UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}", "HOST": "127.0.0.1",
        "PORT": str(port), "ALLOW_SUBS": ",".join(tokens.subjects),
        "RATE_LIMIT_RPM": str(o.rate_limit_rpm),
        "RATE_LIMIT_UNAUTHENTICATED_RPM": str(o.rate_limit_rpm),
        "SHUTDOWN_TIMEOUT_SECONDS": str(SHUTDOWN_TIMEOUT), "LOG_LEVEL": "info",
        "LOG_FORMAT": "json",
    }
    sidecar = await children.start("sidecar", [
        sys.executable, str(BENCH / "soak_server.py"), "--stats-port", str(stats_port),
        "--max-lifetime", str(lifetime)], env)
    print(f"soak: logs in {log_dir}; sidecar stats http://127.0.0.1:{stats_port}/stats; env: "
          f"{shlex.join(f'{k}={v}' for k, v in env.items() if k != 'ALLOW_SUBS')}", flush=True)
    async with aiohttp.ClientSession() as http:
        await wait_http(http, f"{idp}/.well-known/openid-configuration", fakes)
        await wait_http(http, f"http://127.0.0.1:{upstream_port}/stats", fakes)
        await wait_http(http, f"http://127.0.0.1:{port}/readyz", sidecar)
        await wait_http(http, f"http://127.0.0.1:{stats_port}/stats", sidecar)
    stats = StatsClient(f"http://127.0.0.1:{stats_port}/stats",
                        f"http://127.0.0.1:{upstream_port}/stats", idp)
    return Bench(o, children, sidecar, f"http://127.0.0.1:{port}", tokens, stats,
                 Monitor(stats, o.sample_interval))


async def soak(b: Bench) -> int:
    o = b.o
    print(Monitor.HEADER, flush=True)
    cold = await b.monitor.sample("cold", 0.0, None, collect=True)
    problems: list[str] = []
    baseline = cold
    if o.warmup > 0:
        problems += load_problems("warm-up", await cycle(b, "warmup", o.warmup))
        baseline = await settle(b, "baseline")
    load = await cycle(b, "soak", o.duration)
    problems += load_problems("soak", load)
    final = await settle(b, "final")
    await b.children.stop(b.sidecar)  # SIGTERM
    problems += check_final(b, baseline, final)
    soak_rows = [s for s in b.monitor.samples if s.phase == "soak"] or [final]
    summary(b, load, cold=cold, baseline=baseline, soak_rows=soak_rows, final=final)
    if problems:
        print("\nFAIL:\n  - " + "\n  - ".join(problems))
        return 1
    print("\nPASS: every check passed")
    return 0


def check_final(b: Bench, baseline: Sample, final: Sample) -> list[str]:
    o, base, end, up = b.o, baseline.sidecar, final.sidecar, final.upstream
    problems = []
    for key, tolerance in (("fds", o.fd_tolerance), ("tasks", o.task_tolerance),
                           ("threads", o.task_tolerance)):
        if end[key] - base[key] > tolerance:
            problems.append(f"{key} grew from {base[key]} to {end[key]} (tolerance {tolerance})")
    grown = (end["rss_kb"] - base["rss_kb"]) / 1024
    if grown > o.rss_tolerance_mb:
        problems.append(f"RSS grew {grown:.1f} MiB (tolerance {o.rss_tolerance_mb})")
    for key, want in (("streams_open", 0), ("credential_leaks", 0), ("bad_posts", 0),
                      ("missing_forwarded_for", 0)):
        if up[key] != want:
            problems.append(f"upstream {key} = {up[key]} (want {want})")
    if b.sidecar.exit_code != 0:
        problems.append(f"sidecar exited {b.sidecar.exit_code} on SIGTERM")
    elif (b.sidecar.stop_seconds or 0) > SHUTDOWN_TIMEOUT + 2:
        problems.append(f"sidecar took {b.sidecar.stop_seconds:.1f} s to stop")
    return problems + log_problems(b.sidecar)


def summary(b: Bench, load: Load, *, cold: Sample, baseline: Sample, soak_rows: list[Sample],
            final: Sample) -> None:
    o, up = b.o, final.upstream
    posts = [x for values in load.latency.values() for x in values]
    opened = [r for r in load.streams if r.opened]
    held = statistics.median([r.ended_at - r.opened_at for r in opened]) if opened else 0.0
    harness = max(s.harness_cpu_pct for s in soak_rows)
    rows = [
        ("streams opened / asked", f"{len(opened)} / {o.streams}  (open p99 "
         f"{ms(percentile([r.open_seconds for r in opened], 99))} ms, held {held:.0f} s median)"),
        ("duration", f"{o.duration:.0f} s at {o.post_rate:g} POST/s (generator late max "
         f"{ms(load.generator_late_max)} ms)"),
        ("events received", f"{load.events} (upstream sent {up['events_sent']} in all cycles); "
         f"gaps {sum(r.gaps for r in load.streams)}"),
        ("posts sent", f"{load.posts_sent}: " + ", ".join(
            f"{k} {v}" for k, v in sorted(load.kinds.items()))),
        ("posts by outcome", ", ".join(f"{k} {v}" for k, v in sorted(load.outcomes.items()))
         + f", errors {load.error_count}"),
        ("event latency p50/p99", f"{ms(percentile(load.event_latency, 50))} / "
         f"{ms(percentile(load.event_latency, 99))} ms"),
        ("POST latency p50/p99", f"{ms(percentile(posts, 50))} / {ms(percentile(posts, 99))} ms"),
        ("IdP fetches", f"JWKS {up['idp_jwks']}, discovery {up['idp_discovery']}"),
        ("upstream", f"streams peak {up['streams_open_peak']}, open at final "
         f"{up['streams_open']}, credential leaks {up['credential_leaks']}"),
        ("sidecar exit", f"{b.sidecar.exit_code} after {b.sidecar.stop_seconds or 0:.1f} s"),
        ("harness CPU max", f"{harness:.0f} %" + ("  (saturated: a bottleneck itself)"
                                                   if harness > 90 else "")),
    ]
    print("\nSUMMARY")
    for name, value in rows:
        print(f"  {name:<24}{value}")
    print(f"\n  {'sidecar':<10}{'cold':>10}{'baseline':>10}{'peak':>10}{'final':>10}")
    for key, label, scale in (("fds", "fds", 1), ("tasks", "tasks", 1),
                              ("threads", "threads", 1), ("rss_kb", "RSS MiB", 1024)):
        peak = max(s.sidecar[key] for s in soak_rows)
        cells = [x / scale for x in (cold.sidecar[key], baseline.sidecar[key], peak,
                                     final.sidecar[key])]
        print(f"  {label:<10}" + "".join(f"{c:>10.1f}" if scale > 1 else f"{c:>10.0f}"
                                         for c in cells))


async def run(o: Options) -> int:
    log_dir = Path(o.log_dir) if o.log_dir else Path(tempfile.mkdtemp(prefix="soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    children = Children(log_dir)
    try:
        try:
            b = await start(o, children, log_dir)
        except (SetupError, OSError) as exc:
            print(f"soak: set-up failed: {exc}", file=sys.stderr)
            return 2
        try:
            return await soak(b)
        except (aiohttp.ClientError, TimeoutError) as exc:  # the stats endpoints stopped answering
            print(f"soak: lost the stats endpoints: {exc!r}\n{tail(b.sidecar.stderr)}",
                  file=sys.stderr)
            return 1
        finally:
            await b.stats.session.close()
    finally:
        await children.stop_all()


def main(argv: list[str] | None = None) -> int:
    o = parse_args(argv)
    try:
        return asyncio.run(run(o))
    except KeyboardInterrupt:
        print("\nsoak: interrupted", file=sys.stderr)
        return 2
    finally:
        Children.kill_leftovers()


if __name__ == "__main__":
    sys.exit(main())
