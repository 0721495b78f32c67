"""Performance harness: the sidecar against its floor and a reference proxy, in one run.

    .venv/bin/python bench/run.py [--quick] [--duration S] [--connections N] [--rate R]
                                  [--rounds N] [--idle-streams N] [--only NAME...]
                                  [--json PATH] [--profile] [--keep]

Everything runs on 127.0.0.1 free ports, from a temporary directory, and is torn down at the end,
on Ctrl-C, SIGTERM and on any error (SIGTERM to each process group, SIGKILL after 5 s); every wait
is bounded. Needs nginx, wrk and hey (Debian: `apt-get install nginx-light wrk hey`; installed
by the script when it runs as root, else it says what to install and exits 2) and taskset.

What runs (2 CPUs: the system under test on the first, everything that drives or answers it on
the second, each process pinned with `taskset -c`; with one CPU or no taskset, unpinned):

- upstream: nginx `return 200` JSON for `POST /mcp`; `GET /mcp` (SSE) goes on to
  bench/perf_services.py, which also plays the OpenID provider (discovery, JWKS, fetch counts);
- nginx-proxy: nginx `proxy_pass` with upstream keepalive, HTTP/1.1, no buffering (no auth);
- minimal-proxy: bench/minimal_proxy.py, the floor of an aiohttp streaming proxy (no auth);
- sidecar: `python -m oauth_sidecar` (the product, started as users start it) with a valid RS256
  token on every request, LOG_LEVEL=warning and RATE_LIMIT_RPM=0; variants: sidecar-distinct
  (a rotating set of distinct tokens, TOKEN_CACHE_SIZE below their number, so every request
  misses the verified-token cache), sidecar-ratelimit (the default per-subject limiter on,
  memory storage, RATE_LIMIT_RPM=1000000 so it never refuses), sidecar-accesslog (LOG_LEVEL=info:
  one JSON access line per request, to a file), sidecar-metrics (METRICS_PORT set: every request
  counted for Prometheus), issue 16's tool rules (bench/tool_workload.py: sidecar-toolcall, a
  510-byte tools/call without rules; sidecar-rules1, the same with one TOOLS_DENY glob;
  sidecar-rules50, with a TOOL_POLICY_FILE of 50 globs; sidecar-list200-norules and
  sidecar-list200, a 200-tool tools/list the upstream nginx serves from a static file, without
  and with those rules), and a sidecar for the unknown-kid flood
  (RATE_LIMIT_UNAUTHENTICATED_RPM=0 so every request reaches the key lookup,
  JWKS_COOLDOWN_SECONDS=2 so the flood spans several cooldown windows);
- issue 18's stdio bridge: echo-direct (bench/stdio_http_echo.py alone, no sidecar),
  sidecar-stdio (the sidecar bridging to bench/echo_over_stdio.py as a stdio child) and
  sidecar-httpchild (the sidecar spawning bench/stdio_http_echo.py with MCP_SPAWN_PORT): the
  same tools/call echo, so the bridge's and the proxy's added cost are the difference;
- issue 19's opaque tokens (TOKEN_VALIDATION=introspection against perf_services.py's RFC 7662
  endpoint): sidecar-introspection (one opaque token: cache hits, as sidecar has one JWT) and
  sidecar-introspection-miss (a rotating set of distinct opaque tokens, TOKEN_CACHE_SIZE below
  their number: every request one call to the IdP, as sidecar-distinct is one RSA check).

Measures (NAME for --only, with case names above; default: all):

- throughput: wrk -t1 -cN POSTs of a 107-byte JSON-RPC body (the tool-rule cases: their own),
  req/s, every case;
- latency: p50/p99 at a moderate rate R for upstream, the two proxies, the sidecar, the
  three echo cases (their own table: added over echo-direct, paired by round), sidecar-distinct
  and the two introspection cases (their own table: added over their JWT twin): wrk -c10
  with an exponential think time per connection (mean 10/R s), so requests arrive spread out
  like independent clients' (µs resolution); "added" is a case's figure minus the upstream's.
  Beside it, hey -c 10 -q R/10 ("burst"): hey's workers tick together, so that is bursts of 10
  requests every 10/R s, which a single-threaded server answers one after another (not for the
  rotating-token cases: hey sends one token);
- sse: SSE streams opened through each proxy and directly (upstream nginx), an event every 20 ms
  carrying its send time (CLOCK_MONOTONIC); receive - send per event, p50/p99, "added" as above;
- idle: RSS, fds and CPU time of the sidecar (and of the minimal proxy, for comparison) before
  and with 1,000 idle SSE streams open (a comment every 15 s), from /proc;
- jwt: bench/jwt_micro.py, the product's TokenVerifier in process, µs per token, best of N;
- introspection: bench/introspection_micro.py, the product's Introspector in process beside the
  TokenVerifier (hits, a miss without and with the network), CPU µs per token, best of N;
- jwks: 10,000 requests with random unknown kids through the flood sidecar; the JWKS fetches the
  fake IdP counted against the cooldown windows the flood spanned;
- with --profile (needs `.venv/bin/pip install py-spy`): py-spy samples the minimal proxies, the
  sidecar, sidecar-defaults and sidecar-distinct during one more throughput run each; top
  functions printed.

Cases are interleaved: each round runs every case once (in a rotated order) and the tables show
the median of the rounds, so drift on a shared machine hits every case alike. Ratios are what to
quote; absolute numbers depend on the machine. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import json
import math
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
from introspection_micro import ROWS as MICRO_ROWS
from jwt_micro import BenchKey, unknown_kid_token
from loopback import free_port
from perf_services import INTROSPECTION_CLIENT_ID, INTROSPECTION_CLIENT_SECRET, opaque_token
from tool_workload import CALL_BODY, GLOBS, GROUPS_CLAIM_VALUE, LIST_BODY, RULES, tools_list

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PYTHON = sys.executable
AUDIENCE = "https://mcp.bench.test/mcp"
BODY = ('{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        '"params":{"name":"echo","arguments":{"text":"hello, bench"}}}')  # 107 bytes
UPSTREAM_BODY = '{"jsonrpc":"2.0","id":1,"result":{}}'
ACCEPT = "application/json, text/event-stream"
TOOLS = ("nginx", "wrk", "hey")
APT_PACKAGES = ("nginx-light", "wrk", "hey")
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"  # nginx lives in /usr/sbin, often off a user's PATH
START_TIMEOUT = 30.0  # seconds for a process to become ready
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
TOOL_GRACE = 30.0  # seconds a load generator may run past its own duration
REQUEST_TIMEOUT = 10.0
OPEN_CONCURRENCY = 50  # idle streams being opened at once (the servers' backlog is 128)
FLOOD_CONCURRENCY = 32
PROFILE_RATE = 250  # py-spy samples per second
PROFILE_TOP = 15
# A thread-pool worker waiting for work (asyncio.to_thread's, e.g. a watched file's poll): py-spy
# counts its blocking queue.get as busy; a worker with work has the work's frames below it.
IDLE_POOL_FRAME = "_worker (concurrent/futures/thread.py)"
# Inclusive time is shown for the product's own code and the libraries it calls per request.
PROFILE_INCLUSIVE = tuple(f"{p}.py)" for p in (
    "oauth_sidecar/auth/gate", "oauth_sidecar/auth/tokens", "oauth_sidecar/upstream/proxy",
    "oauth_sidecar/log", "oauth_sidecar/cors", "oauth_sidecar/http_errors",
    "oauth_sidecar/auth/ratelimit", "oauth_sidecar/auth/introspection",
    "oauth_sidecar/auth/claims", "oauth_sidecar/auth/token_cache",
    "oauth_sidecar/auth/policy", "oauth_sidecar/client_ip", "oauth_sidecar/upstream/sessions",
    "oauth_sidecar/mcp/calls", "oauth_sidecar/mcp/messages", "oauth_sidecar/mcp/tool_policy",
    "oauth_sidecar/mcp/list_filter", "oauth_sidecar/mcp/audit",
    "jwt/api_jwt", "jwt/api_jws", "jwt/algorithms", "aiohttp/client", "aiohttp/web_response",
    "structlog/_native", "limits/aio/strategies"))
LATENCY_CONNECTIONS = 10  # the latency runs' connections (wrk) and workers (hey)
FLOOD_COOLDOWN = 2.0  # JWKS_COOLDOWN_SECONDS of the flood sidecar
SSE_SKIP = 3  # first events of each stream, sent while the stream was being set up
SHUTDOWN_TIMEOUT = "2"  # the sidecars' SHUTDOWN_TIMEOUT_SECONDS: idle streams end at teardown
IDLE_CPU_LIMIT = 0.05  # "no spin": CPU time over the idle window, as a fraction of one core
TARGETS = {"cached": 0.8, "distinct": 0.5, "added_p99_ms": 2.0, "kb_per_stream": 100.0,
           "rules50": 0.9}  # issue 16: 50 globs cost at most 10 % of tools/call throughput
LIST_PATH = "/list200"  # the upstream's POST path answering the 200-tool list (a static file)
# Issue 16's pairs: (with tool rules, the same without), compared within each round.
RULE_PAIRS = (("sidecar-rules50", "sidecar-toolcall"), ("sidecar-rules50", "sidecar-rules1"),
              ("sidecar-list200", "sidecar-list200-norules"))

MEASURES = ("throughput", "latency", "sse", "idle", "jwt", "introspection", "jwks")
CASES = ("upstream", "nginx-proxy", "minimal-proxy", "minimal-whole", "sidecar",
         "sidecar-defaults", "sidecar-distinct", "sidecar-introspection",
         "sidecar-introspection-miss", "sidecar-ratelimit", "sidecar-subjects",
         "sidecar-redis", "sidecar-accesslog", "sidecar-metrics", "sidecar-toolcall",
         "sidecar-rules1", "sidecar-rules50", "sidecar-list200-norules", "sidecar-list200",
         "minimal-proxy-uvloop", "minimal-whole-uvloop", "sidecar-uvloop", "echo-direct",
         "sidecar-stdio", "sidecar-httpchild", "baseline", "baseline-defaults",
         "baseline-distinct")
FLOOR = "minimal-whole"  # the floor the targets are quoted against: small bodies read whole
HIGH_RPM = "1000000"  # a per-subject limit the benchmark never reaches: its cost, no refusals
# Issue 18: the echo tool served directly, through the stdio bridge, and as an HTTP child.
STDIO_CASES = ("echo-direct", "sidecar-stdio", "sidecar-httpchild")
STDIO_DIRECT = "echo-direct"
SSE_CASES = ("upstream", "nginx-proxy", "minimal-proxy", "sidecar", "baseline")
# Issue 19: opaque tokens introspected, on cache hits and misses, beside their JWT twins.
INTROSPECTION_CASES = ("sidecar-introspection", "sidecar-introspection-miss")
# (case, base, what): the ratios and added latencies of issue 19's report, paired by round.
INTROSPECTION_PAIRS = (
    ("sidecar-introspection", "sidecar", "introspection hit / JWT hit"),
    ("sidecar-introspection-miss", "sidecar-distinct", "introspection miss / JWT miss"),
    ("sidecar-introspection-miss", "sidecar-introspection", "introspection miss / hit"),
    ("sidecar-distinct", "sidecar", "JWT miss / hit"))
# The echo answers POSTs only, and the cache-miss cases rotate tokens: no SSE for them.
LATENCY_CASES = (*SSE_CASES, *STDIO_CASES, "sidecar-distinct", *INTROSPECTION_CASES)
# A p99 difference is quoted only when every round's is within this of the median (or of
# P99_STABLE_MS): on a shared machine a p99 often moves more between rounds than its size.
P99_STABLE_SHARE = 0.5
P99_STABLE_MS = 0.2
IDLE_CASES = ("minimal-proxy", "sidecar")

Json = dict[str, Any]


class SetupError(Exception):
    """Something the run needs could not be started; the message says what."""


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int
    duration: float
    latency_duration: float
    burst_duration: float
    sse_duration: float
    warmup: float
    connections: int
    rate: int
    sse_streams: int
    sse_interval_ms: int
    idle_streams: int
    idle_window: float
    flood_requests: int
    distinct_tokens: int
    jwt_tokens: int
    jwt_repeats: int
    measures: tuple[str, ...]
    cases: tuple[str, ...]
    json_path: str | None
    keep: bool
    profile: bool
    baseline: str | None

    def runs(self, measure: str) -> bool:
        return measure in self.measures

    def cases_for(self, measure: str) -> tuple[str, ...]:
        if not self.runs(measure):
            return ()
        allowed = {"throughput": CASES, "latency": LATENCY_CASES, "sse": SSE_CASES,
                   "idle": IDLE_CASES}[measure]
        return tuple(c for c in self.cases if c in allowed)


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="short everything (development, about a minute)")
    p.add_argument("--duration", type=float,
                   help="seconds of each throughput, latency and burst run [5, 4 and 3; "
                   "--quick 2]")
    p.add_argument("--connections", type=int, default=64, help="wrk connections [64]")
    p.add_argument("--rate", type=int, default=500, help="total req/s of the latency runs [500]")
    p.add_argument("--rounds", type=int, help="rounds, median reported [5; --quick 1]")
    p.add_argument("--idle-streams", type=int,
                   help="idle SSE streams held open [1000; --quick 200]")
    p.add_argument("--only", nargs="+", metavar="NAME", default=[],
                   help=f"measures ({', '.join(MEASURES)}) and/or cases ({', '.join(CASES)}); "
                   "unnamed measures run only if none is named, likewise cases")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write results here")
    p.add_argument("--profile", action="store_true",
                   help="also sample with py-spy (pip install py-spy) during an extra throughput "
                   "run of minimal-proxy, sidecar and sidecar-distinct")
    p.add_argument("--baseline", metavar="DIR",
                   help="also run the sidecar from another checkout (e.g. `git worktree add "
                   "/tmp/before <commit>`) as cases baseline and baseline-distinct, for "
                   "before/after ratios measured in the same run")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (configs, logs) after a successful run")
    a = p.parse_args(argv)
    unknown = [n for n in a.only if n not in MEASURES and n not in CASES]
    if unknown:
        p.error(f"--only: unknown {', '.join(unknown)} (measures: {', '.join(MEASURES)}; "
                f"cases: {', '.join(CASES)})")
    if a.connections < 1 or a.rate < 1 or (a.duration is not None and a.duration <= 0) or any(
        v is not None and v < 1 for v in (a.rounds, a.idle_streams)
    ):
        p.error("--connections, --rate, --rounds, --idle-streams and --duration must be positive")
    measures = tuple(m for m in MEASURES if m in a.only) or MEASURES
    if a.baseline and not (Path(a.baseline) / "oauth_sidecar" / "__main__.py").is_file():
        p.error(f"--baseline {a.baseline}: no oauth_sidecar package there")
    cases = tuple(c for c in CASES if c in a.only and (a.baseline or "baseline" not in c)) or (
        tuple(c for c in CASES if a.baseline or not c.startswith("baseline")))
    q = a.quick
    return Settings(
        quick=q, rounds=a.rounds or (1 if q else 5),
        duration=a.duration or (2.0 if q else 5.0),
        latency_duration=a.duration or (2.0 if q else 4.0),
        burst_duration=a.duration or (2.0 if q else 3.0),
        sse_duration=2.0, warmup=1.0,
        connections=a.connections, rate=a.rate, sse_streams=8, sse_interval_ms=20,
        idle_streams=a.idle_streams or (200 if q else 1000), idle_window=3.0 if q else 10.0,
        flood_requests=2000 if q else 10_000, distinct_tokens=2000 if q else 10_000,
        jwt_tokens=200 if q else 1000, jwt_repeats=3 if q else 5,
        measures=measures, cases=cases, json_path=a.json_path, keep=a.keep, profile=a.profile,
        baseline=a.baseline,
    )


# -- tools and CPUs ------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def ensure_tools() -> dict[str, str]:
    """The load generators and nginx, installed with apt-get when missing and we are root."""
    missing = [t for t in TOOLS if find_tool(t) is None]
    apt = shutil.which("apt-get")
    if missing and os.geteuid() == 0 and apt:
        print(f"bench: installing {' '.join(APT_PACKAGES)} (missing: {', '.join(missing)})",
              flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}  # noqa: TID251 - apt's env
        install = [apt, "install", "-y", *APT_PACKAGES]
        # The package lists may be missing or stale (apt-get update), and some releases only
        # have `nginx`: each step runs only while a tool is still missing.
        for command in (install, [apt, "update"], install,
                        [apt, "install", "-y", "nginx", "wrk", "hey"]):
            if all(find_tool(t) for t in TOOLS):
                break
            subprocess.run(command, env=env, check=False, timeout=900,  # noqa: S603
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        missing = [t for t in TOOLS if find_tool(t) is None]
    if missing:
        print(f"bench: missing {', '.join(missing)}. Install them (Debian/Ubuntu):\n"
              f"    sudo apt-get install -y {' '.join(APT_PACKAGES)}\n"
              "(`nginx` instead of `nginx-light` works too), then run this again.",
              file=sys.stderr)
        raise SystemExit(2)
    return {t: find_tool(t) or t for t in TOOLS}


@dataclass(frozen=True)
class Pinning:
    taskset: str | None
    sut: int | None
    load: int | None
    note: str

    def prefix(self, role: str) -> list[str]:
        cpu = self.sut if role == "sut" else self.load
        if self.taskset is None or cpu is None:
            return []
        return [self.taskset, "-c", str(cpu)]


def plan_pinning() -> Pinning:
    taskset = shutil.which("taskset")
    cpus = sorted(os.sched_getaffinity(0))
    if taskset is None or len(cpus) < 2:
        why = "taskset is missing" if taskset is None else f"only {len(cpus)} CPU available"
        return Pinning(None, None, None, f"UNPINNED ({why}): every process shares the CPUs, so "
                       "the load generators compete with the system under test")
    sut, load = cpus[0], cpus[1]
    os.sched_setaffinity(0, {load})  # this process drives the Python clients: the load CPU
    return Pinning(taskset, sut, load, (
        f"system under test (nginx proxy, minimal proxy, sidecars, jwt micro) on CPU {sut}; "
        f"load generators (wrk, hey, this script's clients), upstream nginx, SSE upstream and "
        f"fake IdP on CPU {load}"))


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: 1,000 streams need ~2,000 fds in a proxy."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft



# -- processes -----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if this harness dies without cleaning up."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Proc:
    name: str
    process: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class Procs:
    """Starts children in their own process groups; always stops them (SIGTERM, then SIGKILL)."""

    live: ClassVar[set[int]] = set()  # for the synchronous last resort in main()

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Proc] = []

    async def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
                    cwd: Path = REPO) -> Proc:
        log = self.directory / f"{name}.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        Procs.live.add(process.pid)
        proc = Proc(name, process, log)
        self.started.append(proc)
        return proc

    @staticmethod
    async def stop(proc: Proc) -> None:
        process = proc.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_GRACE):
                    await process.wait()
            except TimeoutError:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # anything left in its group (nginx workers)
        async with asyncio.timeout(STOP_GRACE):
            await process.wait()
        Procs.live.discard(process.pid)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(p) for p in self.started), return_exceptions=True)

    @staticmethod
    def kill_leftovers() -> None:
        for pid in list(Procs.live):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)
            Procs.live.discard(pid)


async def run_tool(argv: list[str], limit: float, env: dict[str, str] | None = None) -> str:
    """A load generator's stdout+stderr; killed (its whole group) on timeout or cancellation."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
        env=env,
    )
    Procs.live.add(process.pid)
    try:
        async with asyncio.timeout(limit):
            out, _ = await process.communicate()
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_GRACE):
                    await process.wait()
        Procs.live.discard(process.pid)
    text = out.decode(errors="replace")
    if process.returncode != 0:
        raise SetupError(f"{Path(argv[0]).name} exited with {process.returncode}:\n{text[-2000:]}")
    return text


async def wait_ready(session: aiohttp.ClientSession, proc: Proc, method: str, url: str,
                     **kwargs: Any) -> None:
    """Until `url` answers 200; fails if the process exits or START_TIMEOUT passes."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.process.returncode is not None:
            raise SetupError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.tail()}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.request(method, url, timeout=aiohttp.ClientTimeout(total=2),
                                       **kwargs) as response:
                await response.read()
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise SetupError(f"{proc.name} not ready at {url} within {START_TIMEOUT:.0f} s:\n"
                             f"{proc.tail()}")
        await asyncio.sleep(0.1)


def cpu_accounting() -> dict[str, float]:
    """Busy and steal CPU seconds of the whole machine, and this process tree's own CPU
    seconds (reaped children included, recursively: nginx workers, wrk, hey, sidecars)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    ticks = os.sysconf("SC_CLK_TCK")
    mine = os.times()
    return {"busy_s": (user + nice + system + irq + softirq) / ticks, "steal_s": steal / ticks,
            "ours_s": mine.user + mine.system + mine.children_user + mine.children_system,
            "wall_s": time.monotonic()}


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) of every live process in a process group (nginx: master and
    worker), from /proc."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:  # state, ppid, pgrp, ...
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_stats(pid: int) -> dict[str, float]:
    """RSS (KiB), open fds and CPU seconds (user + system, all threads) of a process."""
    rss = -1
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
    return {"rss_kb": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "cpu_s": cpu}


# -- the system ----------------------------------------------------------------------------------


def nginx_conf(directory: Path, body: str) -> str:
    tmp = directory / "tmp"
    # Run as root, nginx's worker would be `nobody`, which cannot enter this run's private
    # directory (the upstream serves a file from it): the worker stays the invoking user, as
    # it does in a run that is not root.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    return f"""\
daemon off;
{user}worker_processes 1;
worker_rlimit_nofile 16384;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;  # the default 1000 would make wrk reconnect, aiohttp never does
{body}
}}
"""


def upstream_body(port: int, sse_port: int, static: Path) -> str:
    return f"""\
    upstream events {{ server 127.0.0.1:{sse_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location = {LIST_PATH} {{
            # A POST of tools/list: the static module refuses POST (405), so that is turned
            # into a GET of the same file (tool_workload.py's 200 tools, written at start).
            root {static};
            default_type application/json;
            error_page 405 =200 $uri;
            etag off;
        }}
        location /mcp {{
            error_page 418 = @events;  # GET (an SSE stream): on to bench/perf_services.py
            if ($request_method = GET) {{ return 418; }}
            default_type application/json;
            return 200 '{UPSTREAM_BODY}';
        }}
        location @events {{
            proxy_pass http://events;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
    }}"""


def proxy_body(port: int, upstream_port: int) -> str:
    return f"""\
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
    }}"""


@dataclass
class Target:
    """One thing a load goes to: its port, the process to watch, the token(s) it needs."""

    name: str
    port: int
    proc: Proc | None = None
    token: str | None = None
    rotating: bool = False
    """Each request a token from token_file in turn (cache misses)."""
    token_file: Path | None = None
    body: str = BODY
    introspects: bool = False
    """Opaque tokens: the fake IdP's CPU and calls are measured with each run."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


@dataclass
class System:
    settings: Settings
    tools: dict[str, str]
    pinning: Pinning
    directory: Path
    procs: Procs
    key: BenchKey
    idp_port: int = 0
    sse_port: int = 0
    services: Proc | None = None
    targets: dict[str, Target] = field(default_factory=dict)
    token: str = ""
    token_file: Path | None = None
    flood_target: Target | None = None

    def sidecar_env(self, port: int, **extra: str) -> dict[str, str]:
        env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG")  # noqa: TID251
               if name in os.environ}  # noqa: TID251 - the harness builds its children's env
        env.update({
            "HOST": "127.0.0.1", "PORT": str(port),
            "OIDC_ISSUER_URL": f"http://127.0.0.1:{self.idp_port}",
            "OIDC_AUDIENCE": AUDIENCE,
            "RESOURCE_URL": f"http://127.0.0.1:{port}/mcp",
            "MCP_UPSTREAM_URL": f"http://127.0.0.1:{self.targets['upstream'].port}",
            "ALLOW_ALL_AUTHENTICATED": "true",
            "RATE_LIMIT_RPM": "0",
            "LOG_LEVEL": "warning",
            "LOG_FORMAT": "json",
            "SHUTDOWN_TIMEOUT_SECONDS": SHUTDOWN_TIMEOUT,
            "EVENT_LOOP": "asyncio",  # like the minimal proxy; the -uvloop pair compares uvloop
            # Far above --idle-streams: the cap has its own bench (slow_heads.py).
            "MAX_CONNECTIONS": "100000",
            # One token drives 64 connections and 1,000 idle streams: far above the default,
            # yet the limit's bookkeeping still runs on every request.
            "MAX_STREAMS_PER_SUBJECT": "1000000",
        })
        env.update(extra)
        return env


def needed(settings: Settings) -> set[str]:
    """The processes the selected measures and cases need."""
    wanted: set[str] = set()
    for measure in ("throughput", "latency", "sse", "idle"):
        wanted.update(settings.cases_for(measure))
    if settings.runs("jwks"):
        wanted.add("sidecar-flood")
    if wanted:
        wanted.add("upstream")
    return wanted


async def start_system(system: System, session: aiohttp.ClientSession) -> None:  # noqa: PLR0912, PLR0915 (one branch per system kind, in start order)
    s, pin, procs, d = system.settings, system.pinning, system.procs, system.directory
    want = needed(s)
    if not want:
        return
    system.idp_port, system.sse_port = free_port(), free_port()
    jwks_file = d / "jwks.json"
    jwks_file.write_text(json.dumps(system.key.jwks()))
    system.key.issuer = f"http://127.0.0.1:{system.idp_port}"
    system.token = system.key.mint("bench-user-0")
    system.services = await procs.start("perf-services", [
        *pin.prefix("load"), PYTHON, str(BENCH / "perf_services.py"),
        "--sse-port", str(system.sse_port), "--idp-port", str(system.idp_port),
        "--jwks-file", str(jwks_file)])

    async def nginx(name: str, role: str, body: Callable[[int], str]) -> Target:
        port = free_port()
        prefix = d / name
        (prefix / "tmp").mkdir(parents=True)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(prefix, body(port)))
        proc = await procs.start(name, [*pin.prefix(role), system.tools["nginx"],
                                        "-p", f"{prefix}/", "-c", str(conf),
                                        "-e", str(prefix / "error.log")])
        return Target(name, port, proc)

    static = d / "static"
    static.mkdir()
    (static / LIST_PATH.lstrip("/")).write_text(tools_list())
    upstream = await nginx("upstream", "load",
                           lambda p: upstream_body(p, system.sse_port, static))
    system.targets["upstream"] = upstream
    starters: list[Awaitable[Target]] = []
    if "nginx-proxy" in want:
        starters.append(nginx("nginx-proxy", "sut", lambda p: proxy_body(p, upstream.port)))

    async def minimal(name: str, *options: str) -> Target:
        port = free_port()
        proc = await procs.start(name, [
            *pin.prefix("sut"), PYTHON, str(BENCH / "minimal_proxy.py"), "--port", str(port),
            "--upstream", f"http://127.0.0.1:{upstream.port}", *options])
        return Target(name, port, proc)

    if "minimal-proxy" in want:
        starters.append(minimal("minimal-proxy"))
    if "minimal-proxy-uvloop" in want:
        starters.append(minimal("minimal-proxy-uvloop", "--uvloop"))
    if "minimal-whole" in want:
        starters.append(minimal("minimal-whole", "--whole-body"))
    if "minimal-whole-uvloop" in want:
        starters.append(minimal("minimal-whole-uvloop", "--whole-body", "--uvloop"))
    redis_uri = await redis_server(system) if "sidecar-redis" in want else ""

    async def sidecar(name: str, cwd: Path = REPO, body: str = BODY, token: str = "",
                      **extra: str) -> Target:
        port = free_port()  # `-m` finds the package in cwd first: another checkout's, if asked
        proc = await procs.start(name, [*pin.prefix("sut"), PYTHON, "-m", "oauth_sidecar"],
                                 system.sidecar_env(port, **extra), cwd=cwd)
        return Target(name, port, proc, token=token or system.token, body=body)

    async def echo_direct() -> Target:
        port = free_port()
        proc = await procs.start(STDIO_DIRECT, [
            *pin.prefix("sut"), PYTHON, str(BENCH / "stdio_http_echo.py"), "--port", str(port)])
        return Target(STDIO_DIRECT, port, proc)

    if "sidecar" in want:
        starters.append(sidecar("sidecar"))
    if "sidecar-distinct" in want:
        # Every request a verification: the IP's budget is spent (its cost measured) at a
        # limit never reached, or the runs would measure 429s.
        starters.append(sidecar("sidecar-distinct", RATE_LIMIT_UNAUTHENTICATED_RPM=HIGH_RPM,
                                TOKEN_CACHE_SIZE=str(max(1, s.distinct_tokens // 2))))
    # Issue 19: the product's introspection defaults (cache 30 s, 16 calls in flight), its
    # client authenticating with client_secret_basic as the IdP's metadata offers.
    introspecting = {"TOKEN_VALIDATION": "introspection",
                     "INTROSPECTION_CLIENT_ID": INTROSPECTION_CLIENT_ID,
                     "INTROSPECTION_CLIENT_SECRET": INTROSPECTION_CLIENT_SECRET}
    opaque = opaque_token("bench-user-0")
    if "sidecar-introspection" in want:
        starters.append(sidecar("sidecar-introspection", REPO, token=opaque, **introspecting))
    if "sidecar-introspection-miss" in want:
        # As sidecar-distinct: every request a call to the IdP, paid from the IP's budget.
        starters.append(sidecar("sidecar-introspection-miss", REPO, token=opaque,
                                RATE_LIMIT_UNAUTHENTICATED_RPM=HIGH_RPM,
                                TOKEN_CACHE_SIZE=str(max(1, s.distinct_tokens // 2)),
                                **introspecting))
    if "sidecar-ratelimit" in want:
        starters.append(sidecar("sidecar-ratelimit", RATE_LIMIT_RPM=HIGH_RPM,
                                RATE_LIMIT_STORAGE_URI="memory://"))
    if "sidecar-defaults" in want:
        starters.append(sidecar("sidecar-defaults", REPO, **DEFAULTS))
    if "sidecar-subjects" in want:
        starters.append(sidecar("sidecar-subjects", RATE_LIMIT_RPM=HIGH_RPM,
                                RATE_LIMIT_UNAUTHENTICATED_RPM="0",  # the warm-up verifies all
                                TOKEN_CACHE_SIZE=str(2 * s.distinct_tokens)))
    if "sidecar-redis" in want:
        starters.append(sidecar("sidecar-redis", RATE_LIMIT_RPM=HIGH_RPM,
                                RATE_LIMIT_STORAGE_URI=redis_uri))
    if "sidecar-accesslog" in want:
        starters.append(sidecar("sidecar-accesslog", LOG_LEVEL="info"))
    if "sidecar-metrics" in want:
        starters.append(sidecar("sidecar-metrics", METRICS_PORT=str(free_port())))
    if "sidecar-uvloop" in want:
        starters.append(sidecar("sidecar-uvloop", EVENT_LOOP="uvloop"))
    if want & {"sidecar-rules50", "sidecar-list200"}:  # issue 16: one rule file, 50 globs
        rules = d / "tools.toml"
        rules.write_text(RULES)
        member = system.key.mint("bench-user-0", groups=GROUPS_CLAIM_VALUE)
        if "sidecar-rules50" in want:
            starters.append(sidecar("sidecar-rules50", body=CALL_BODY, token=member,
                                    TOOL_POLICY_FILE=str(rules)))
        if "sidecar-list200" in want:
            starters.append(sidecar("sidecar-list200", body=LIST_BODY, token=member,
                                    TOOL_POLICY_FILE=str(rules), MCP_UPSTREAM_PATH=LIST_PATH))
    if "sidecar-toolcall" in want:
        starters.append(sidecar("sidecar-toolcall", body=CALL_BODY))
    # Issue 18: the same echo tool as a stdio child (the bridge; sessionless requests, so one
    # child per subject) and as an HTTP child (the proxy), both spawned by the sidecar.
    if "sidecar-stdio" in want:
        starters.append(sidecar("sidecar-stdio", MCP_UPSTREAM_URL="", MCP_SPAWN_CMD=json.dumps(
            [PYTHON, str(BENCH / "echo_over_stdio.py")])))
    if "sidecar-httpchild" in want:
        child_port = free_port()
        starters.append(sidecar("sidecar-httpchild", MCP_UPSTREAM_URL="", MCP_SPAWN_CMD=json.dumps(
            [PYTHON, str(BENCH / "stdio_http_echo.py"), "--port", str(child_port)]),
            MCP_SPAWN_PORT=str(child_port)))
    if STDIO_DIRECT in want:  # the HTTP echo alone, on the same CPU: what the sidecars add to
        starters.append(echo_direct())
    if "sidecar-rules1" in want:  # any rule at all: the body read as JSON-RPC and judged
        starters.append(sidecar("sidecar-rules1", body=CALL_BODY, TOOLS_DENY="*_purge*"))
    if "sidecar-list200-norules" in want:
        starters.append(sidecar("sidecar-list200-norules", body=LIST_BODY,
                                MCP_UPSTREAM_PATH=LIST_PATH))
    if s.baseline and "baseline" in want:
        starters.append(sidecar("baseline", Path(s.baseline)))
    if s.baseline and "baseline-defaults" in want:
        starters.append(sidecar("baseline-defaults", Path(s.baseline), **DEFAULTS))
    if s.baseline and "baseline-distinct" in want:
        starters.append(sidecar("baseline-distinct", Path(s.baseline),
                                RATE_LIMIT_UNAUTHENTICATED_RPM=HIGH_RPM,
                                TOKEN_CACHE_SIZE=str(max(1, s.distinct_tokens // 2))))
    if "sidecar-flood" in want:
        starters.append(sidecar("sidecar-flood", RATE_LIMIT_UNAUTHENTICATED_RPM="0",
                                JWKS_COOLDOWN_SECONDS=str(FLOOD_COOLDOWN)))
    for target in await asyncio.gather(*starters):
        if target.name == "sidecar-flood":
            system.flood_target = target
        else:
            system.targets[target.name] = target
    rotating = [system.targets[c] for c in ("sidecar-distinct", "baseline-distinct",
                                            "sidecar-subjects") if c in system.targets]
    if rotating:
        print(f"bench: minting {s.distinct_tokens} distinct RS256 tokens", flush=True)
        tokens = [system.key.mint(f"bench-user-{i}") for i in range(s.distinct_tokens)]
        system.token_file = d / "tokens.txt"
        system.token_file.write_text("\n".join(tokens) + "\n")
    for target in rotating:
        target.rotating, target.token_file = True, system.token_file
    for name in INTROSPECTION_CASES:
        if name in system.targets:
            system.targets[name].introspects = True
    if "sidecar-introspection-miss" in system.targets:
        target = system.targets["sidecar-introspection-miss"]
        target.rotating, target.token_file = True, d / "opaque-tokens.txt"
        target.token_file.write_text("\n".join(
            opaque_token(f"bench-user-{i}") for i in range(s.distinct_tokens)) + "\n")

    # Readiness, bounded: every process answers what the runs will ask of it.
    stats_url = f"http://127.0.0.1:{system.sse_port}/stats"
    await wait_ready(session, system.services, "GET", stats_url)
    post = {"data": BODY, "headers": {"Content-Type": "application/json", "Accept": ACCEPT}}
    if upstream.proc is not None:
        await wait_ready(session, upstream.proc, "POST", upstream.url, **post)
    checks = []
    for started in [*system.targets.values(), system.flood_target]:
        if started is None or started.proc is None or started is upstream:
            continue
        if started.name.startswith(("sidecar", "baseline")):
            checks.append(wait_ready(session, started.proc, "GET",
                                     f"http://127.0.0.1:{started.port}/readyz"))
        else:
            checks.append(wait_ready(session, started.proc, "POST", started.url, **post))
    await asyncio.gather(*checks)
    await check_tool_rules(system, session)
    await check_echo(system, session)
    await check_introspection(system, session)
    if "sidecar-subjects" in system.targets and system.token_file is not None:
        # Its cache holds every token: the measured runs see hits only, for every subject.
        tokens = system.token_file.read_text().split()
        await warm(session, system.targets["sidecar-subjects"], tokens)


DEFAULTS = {"LOG_LEVEL": "info", "RATE_LIMIT_RPM": HIGH_RPM}  # as shipped, at a limit never hit
EXPECTED_TOOLS = {"sidecar-list200": 100, "sidecar-list200-norules": 200}


async def rpc_result(session: aiohttp.ClientSession, target: Target) -> tuple[int, str, str, Any]:
    """POST a case's body with its token: (status, content type, the JSON-RPC text, its result
    or None); of an event stream, the last event's data."""
    async with session.post(target.url, data=target.body, headers={
            "Content-Type": "application/json", **auth_headers(target.token)}) as answer:
        status, kind, text = answer.status, answer.content_type, await answer.text()
    if kind == "text/event-stream":
        data = [line[5:] for line in text.splitlines() if line.startswith("data:")]
        text = data[-1] if data else ""
    try:
        message = json.loads(text)
    except ValueError:
        message = None
    result = message.get("result") if isinstance(message, dict) else None
    return status, kind, text, result


async def check_tool_rules(system: System, session: aiohttp.ClientSession) -> None:
    """The issue-16 cases measure what they claim: the call is allowed (a refusal is a JSON-RPC
    error with HTTP 200, which wrk would count as a success) and each list has its tools."""
    for name in ("sidecar-toolcall", "sidecar-rules1", "sidecar-rules50", *EXPECTED_TOOLS):
        target = system.targets.get(name)
        if target is None:
            continue
        status, _, text, result = await rpc_result(session, target)
        tools = result.get("tools") if isinstance(result, dict) else None
        expected = EXPECTED_TOOLS.get(name)
        if status != 200 or not isinstance(result, dict) or (
                expected is not None and (not isinstance(tools, list) or len(tools) != expected)):
            raise SetupError(f"{name}: unexpected answer {status}: {text[:300]}")


ECHO_TEXT = json.loads(BODY)["params"]["arguments"]["text"]


async def check_echo(system: System, session: aiohttp.ClientSession) -> None:
    """The issue-18 cases answer what they claim: the echo's text back (as JSON or as the one
    event of a stream, whichever the runs' Accept gets), not an error wrk would count as a 200."""
    for name in STDIO_CASES:
        target = system.targets.get(name)
        if target is None:
            continue
        status, kind, text, result = await rpc_result(session, target)
        content = result.get("content") if isinstance(result, dict) else None
        if status != 200 or content != [{"type": "text", "text": ECHO_TEXT}]:
            raise SetupError(f"{name}: unexpected answer {status} {kind}: {text[:300]}")


async def check_introspection(system: System, session: aiohttp.ClientSession) -> None:
    """The issue-19 cases measure what they claim: an opaque token is let through (the
    upstream's answer) after exactly one introspection, and a second request with it asks the
    IdP nothing (sidecar-introspection's hits); an unknown opaque token is a 401."""
    for name in INTROSPECTION_CASES:
        target = system.targets.get(name)
        if target is None:
            continue
        token = opaque_token("bench-check")
        before = (await upstream_stats(system, session))["introspections"]
        for attempt in (token, token):
            async with session.post(target.url, data=BODY, headers={
                    "Content-Type": "application/json", **auth_headers(attempt)}) as answer:
                text = await answer.text()
            if answer.status != 200 or text != UPSTREAM_BODY:
                raise SetupError(f"{name}: an opaque token got {answer.status}: {text[:300]}")
        async with session.post(target.url, data=BODY, headers={
                "Content-Type": "application/json",
                **auth_headers(token.replace("bench-opaque", "forged"))}) as answer:
            if answer.status != 401:
                raise SetupError(f"{name}: an unknown opaque token got {answer.status}")
        after = (await upstream_stats(system, session))["introspections"]
        calls = {k: after[k] - before[k] for k in after}
        if calls != {"active": 1, "inactive": 1, "invalid_client": 0}:
            raise SetupError(f"{name}: the IdP saw {calls} for one token asked twice and one "
                             "unknown token (expected one active, one inactive)")


async def redis_server(system: System) -> str:
    """A local redis-server on the load CPU for the replica-shared limiter case."""
    binary = find_tool("redis-server")
    if binary is None:
        raise SetupError("sidecar-redis needs redis-server (apt-get install redis-server)")
    port = free_port()
    workdir = system.directory / "redis"
    workdir.mkdir()
    await system.procs.start("redis", [
        *system.pinning.prefix("load"), binary, "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(workdir)])
    for _ in range(100):  # bounded: 5 s
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            return f"redis://127.0.0.1:{port}"
        await asyncio.sleep(0.05)
    raise SetupError("redis-server did not listen within 5 s")


async def warm(session: aiohttp.ClientSession, target: Target, tokens: list[str]) -> None:
    """Send each token once, so the measured runs see cache hits for every subject."""
    gate = asyncio.Semaphore(32)

    async def one(token: str) -> None:
        async with gate, session.post(target.url, data=BODY, headers={
            "Content-Type": "application/json", "Accept": ACCEPT,
            "Authorization": f"Bearer {token}"}) as answer:
            await answer.read()

    await asyncio.gather(*(one(token) for token in tokens))


# -- load generators -----------------------------------------------------------------------------


def lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string of ASCII is a valid Lua string literal


WRK_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests": %d, "duration_us": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def request_lines(target: Target, body: str) -> list[str]:
    """The Lua that makes a case's requests: one token, or (rotating) each token in turn."""
    headers = {"Content-Type": "application/json", "Accept": ACCEPT}
    if not target.rotating:
        if target.token:
            headers["Authorization"] = f"Bearer {target.token}"
        return ['wrk.method = "POST"', f"wrk.body = {lua_string(body)}",
                *(f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items())]
    # Every token once, in order, from where the previous run of this case stopped: with
    # TOKEN_CACHE_SIZE below their number, each request misses the FIFO cache (for
    # sidecar-subjects the cache holds them all: every request a hit, 10,000 subjects).
    return [
        'wrk.method = "POST"',
        f"wrk.body = {lua_string(BODY)}",
        *(f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items()),
        "local requests, count, index = {}, 0, 0",
        "function init(args)",
        "  for token in io.lines(args[1]) do",
        '    wrk.headers["Authorization"] = "Bearer " .. token',
        "    count = count + 1",
        "    requests[count] = wrk.format()",
        "  end",
        "  index = tonumber(args[2]) % count",
        "end",
        "function request()",
        "  index = index % count + 1",
        "  return requests[index]",
        "end",
    ]


def rotation_args(target: Target, rotation: Rotation) -> list[str]:
    """wrk's script arguments of a rotating case: its token file and where to start in it."""
    if not target.rotating or target.token_file is None:
        return []
    return ["--", str(target.token_file), str(rotation.offsets.get(target.name, 0))]


def rotated_past(target: Target, rotation: Rotation, requests: int, connections: int) -> None:
    """After a run: skip what may still have been in flight, never reuse a recent token."""
    if target.rotating:
        rotation.offsets[target.name] = (rotation.offsets.get(target.name, 0)
                                         + requests + 2 * connections)


def wrk_script(system: System, target: Target) -> Path:
    path = system.directory / f"wrk-{target.name}.lua"
    path.write_text("\n".join(request_lines(target, target.body)) + "\n" + WRK_DONE)
    return path


@dataclass
class Rotation:
    """Where the next run of each rotating case starts in the token list (per case: each
    sidecar has its own cache, and must never meet a token it saw within its cache size)."""

    offsets: dict[str, int] = field(default_factory=dict)


async def wrk(system: System, target: Target, seconds: float, rotation: Rotation) -> Json:
    s = system.settings
    argv = [*system.pinning.prefix("load"), system.tools["wrk"], "-t1", f"-c{s.connections}",
            f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s",
            str(wrk_script(system, target)), target.url]
    argv += rotation_args(target, rotation)
    cpu_before = group_cpu(target.proc.pid) if target.proc else math.nan
    out = await run_tool(argv, seconds + TOOL_GRACE)
    cpu = (group_cpu(target.proc.pid) if target.proc else math.nan) - cpu_before
    found = re.search(r"^WRK_JSON (.*)$", out, re.MULTILINE)
    if found is None:
        raise SetupError(f"wrk printed no result:\n{out[-2000:]}")
    data: Json = json.loads(found.group(1))
    # The CPU the system under test spent per request, and its share of its core (below 1:
    # it waited for the upstream or the load generator, or other processes ran on its CPU).
    data["cpu_s"] = cpu
    data["cpu_us_per_request"] = cpu / max(1, data["requests"]) * 1e6
    data["cpu_share"] = cpu / (data["duration_us"] / 1e6)
    rotated_past(target, rotation, data["requests"], s.connections)
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    data["errors"] = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return data


def latency_script(system: System, target: Target) -> Path:
    """wrk with an exponential think time per connection: Poisson-like arrivals at ~rate."""
    s = system.settings
    connections = min(LATENCY_CONNECTIONS, s.rate)
    mean_ms = 1000 * connections / s.rate
    path = system.directory / f"latency-{target.name}.lua"
    lines = [*request_lines(target, BODY),
             f"function delay() return -math.log(1 - math.random()) * {mean_ms:g} end"]
    path.write_text("\n".join(lines) + "\n" + WRK_DONE)
    return path


async def latency_run(system: System, target: Target, rotation: Rotation) -> Json:
    """p50/p99 at a moderate rate: wrk -c10, each connection waiting an exponential time
    (mean 10/rate) between requests, so arrivals are spread like independent clients'."""
    s = system.settings
    connections = min(LATENCY_CONNECTIONS, s.rate)
    seconds = s.latency_duration
    argv = [*system.pinning.prefix("load"), system.tools["wrk"], "-t1", f"-c{connections}",
            f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s",
            str(latency_script(system, target)), target.url, *rotation_args(target, rotation)]
    out = await run_tool(argv, seconds + TOOL_GRACE)
    found = re.search(r"^WRK_JSON (.*)$", out, re.MULTILINE)
    if found is None:
        raise SetupError(f"wrk printed no result:\n{out[-2000:]}")
    data: Json = json.loads(found.group(1))
    rotated_past(target, rotation, data["requests"], connections)
    return {"p50_ms": data["p50_us"] / 1000, "p99_ms": data["p99_us"] / 1000,
            "requests": data["requests"], "rps": data["requests"] / (data["duration_us"] / 1e6),
            "errors": sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))}


HEY_PERCENTILE = re.compile(r"^\s*(\d+)% in ([\d.]+) secs", re.MULTILINE)


async def hey(system: System, target: Target) -> Json:
    """hey -c 10 -q rate/10: its workers' tickers start together, so this is bursts of 10
    requests every 10/rate s, which a single-threaded server answers one after another."""
    s = system.settings
    workers = min(LATENCY_CONNECTIONS, s.rate)
    argv = [*system.pinning.prefix("load"), system.tools["hey"],
            "-z", f"{s.burst_duration:g}s", "-c", str(workers), "-q", f"{s.rate / workers:g}",
            "-t", "10", "-m", "POST", "-T", "application/json", "-d", BODY, "-H",
            f"Accept: {ACCEPT}"]
    if target.token:
        argv += ["-H", f"Authorization: Bearer {target.token}"]
    out = await run_tool([*argv, target.url], s.burst_duration + TOOL_GRACE)
    percentiles = {int(p): float(v) * 1000 for p, v in HEY_PERCENTILE.findall(out)}
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    if 50 not in percentiles or 99 not in percentiles or rps is None:
        raise SetupError(f"hey printed no latency distribution:\n{out[-2000:]}")
    errors = sum(n for c, n in codes.items() if c != 200)
    errors += sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]\s+[^\d\s]", out, re.MULTILINE))
    return {"p50_ms": percentiles[50], "p99_ms": percentiles[99], "rps": float(rps.group(1)),
            "errors": errors}


def auth_headers(token: str | None, accept: str = ACCEPT) -> dict[str, str]:
    headers = {"Accept": accept}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


async def sse_latency(system: System, target: Target, session: aiohttp.ClientSession) -> Json:
    """receive - send of each event, over sse_streams streams for sse_duration seconds."""
    s = system.settings
    latencies: list[float] = []
    timeout = aiohttp.ClientTimeout(total=None, connect=REQUEST_TIMEOUT)

    async def one(index: int) -> None:
        # Phases spread evenly: no two streams send at once, so this client never has a burst
        # of events to work through (that would be its own latency, not the proxy's).
        phase = index * s.sse_interval_ms / s.sse_streams
        url = f"{target.url}?interval_ms={s.sse_interval_ms}&phase_ms={phase:g}"
        async with session.get(url, headers=auth_headers(target.token, "text/event-stream"),
                               timeout=timeout) as response:
            if response.status != 200 or response.content_type != "text/event-stream":
                raise SetupError(f"{target.name}: SSE answered {response.status} "
                                 f"{response.content_type}")
            seen = 0
            end = time.monotonic() + s.sse_duration
            while time.monotonic() < end:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    line = await response.content.readline()
                received = time.monotonic_ns()
                if not line:
                    raise SetupError(f"{target.name}: the SSE stream ended early")
                if line.startswith(b"data: "):
                    seen += 1
                    if seen > SSE_SKIP:
                        latencies.append((received - int(line[6:])) / 1e6)

    await asyncio.gather(*(one(i) for i in range(s.sse_streams)))
    return {"events": len(latencies), "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99)}


async def upstream_stats(system: System, session: aiohttp.ClientSession) -> Json:
    url = f"http://127.0.0.1:{system.sse_port}/stats"
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as r:
        data: Json = await r.json()
        return data


async def wait_streams(system: System, session: aiohttp.ClientSession, count: int,
                       within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while (await upstream_stats(system, session))["streams_open"] != count:
        if time.monotonic() > deadline:
            raise SetupError(f"the SSE upstream did not reach {count} open streams in {within} s")
        await asyncio.sleep(0.2)


async def idle_streams(system: System, target: Target, session: aiohttp.ClientSession) -> Json:
    """RSS, fds and CPU of the proxy before, with N idle streams open, and after they close."""
    s = system.settings
    if target.proc is None:
        raise SetupError(f"{target.name} has no process to measure")
    pid = target.proc.pid
    await wait_streams(system, session, 0)
    await asyncio.sleep(1.0)
    before = proc_stats(pid)
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    responses: list[aiohttp.ClientResponse] = []
    timeout = aiohttp.ClientTimeout(total=None, connect=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as holder:

        async def open_one() -> None:
            async with gate, asyncio.timeout(REQUEST_TIMEOUT):
                response = await holder.get(
                    target.url, headers=auth_headers(target.token, "text/event-stream"),
                    timeout=timeout)
                responses.append(response)
                if response.status != 200:
                    raise SetupError(f"{target.name}: an idle stream answered {response.status}")
                if not (await response.content.readline()).startswith(b": open"):
                    raise SetupError(f"{target.name}: an idle stream did not start")

        opened = time.monotonic()
        try:
            await asyncio.gather(*(open_one() for _ in range(s.idle_streams)))
            open_seconds = time.monotonic() - opened
            await wait_streams(system, session, s.idle_streams)
            await asyncio.sleep(1.0)
            holding = proc_stats(pid)
            await asyncio.sleep(s.idle_window)
            idle_end = proc_stats(pid)
        finally:
            for response in responses:
                response.close()
    await wait_streams(system, session, 0)
    await asyncio.sleep(2.0)
    after = proc_stats(pid)
    n = s.idle_streams
    return {
        "streams": n, "open_seconds": open_seconds,
        "rss_before_kb": before["rss_kb"], "rss_with_kb": holding["rss_kb"],
        "rss_after_close_kb": after["rss_kb"],
        "kb_per_stream": (holding["rss_kb"] - before["rss_kb"]) / n,
        "fds_before": before["fds"], "fds_with": holding["fds"], "fds_after_close": after["fds"],
        "fds_per_stream": (holding["fds"] - before["fds"]) / n,
        "idle_window_s": s.idle_window, "idle_cpu_s": idle_end["cpu_s"] - holding["cpu_s"],
        "idle_cpu_fraction": (idle_end["cpu_s"] - holding["cpu_s"]) / s.idle_window,
    }


async def kid_flood(system: System, target: Target, session: aiohttp.ClientSession) -> Json:
    """N requests with random unknown kids; JWKS fetches counted at the fake IdP."""
    s = system.settings
    template = system.token
    tokens = [unknown_kid_token(template) for _ in range(s.flood_requests)]
    statuses: collections.Counter[int] = collections.Counter()
    before = (await upstream_stats(system, session))["jwks_fetches"]
    next_index = 0
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=FLOOD_CONCURRENCY)
    headers = {"Content-Type": "application/json", "Accept": ACCEPT}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as flood:

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(tokens):
                token = tokens[next_index]
                next_index += 1
                async with flood.post(target.url, data=BODY, headers={
                        **headers, "Authorization": f"Bearer {token}"}) as response:
                    await response.read()
                    statuses[response.status] += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(FLOOD_CONCURRENCY)))
        elapsed = time.monotonic() - started
    after = (await upstream_stats(system, session))["jwks_fetches"]
    fetches = after - before
    windows = math.floor(elapsed / FLOOD_COOLDOWN) + 1
    return {"requests": s.flood_requests, "statuses": {str(k): v for k, v in statuses.items()},
            "seconds": elapsed, "rps": s.flood_requests / elapsed, "cooldown_s": FLOOD_COOLDOWN,
            "windows": windows, "jwks_fetches": fetches}


def py_spy() -> str | None:
    return shutil.which("py-spy", path=str(Path(PYTHON).parent)) or shutil.which("py-spy")


def collapse(raw: str, top: int = PROFILE_TOP) -> Json:
    """py-spy's collapsed stacks -> the functions with the most samples, self and inclusive."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames or frames[-1] == IDLE_POOL_FRAME:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            if frame.endswith(PROFILE_INCLUSIVE):
                inclusive[frame] += count
    def shares(counter: collections.Counter[str]) -> list[list[object]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)]
    return {"samples": total, "self": shares(own) if total else [],
            "inclusive": shares(inclusive) if total else []}


async def profile(system: System, target: Target, rotation: Rotation) -> Json:
    """py-spy samples (busy time only: a thread waiting in epoll is idle) during a wrk run.

    Blocking mode (py-spy pauses the process for each sample): its --nonblocking mode reads
    stacks while they change and truncates about half of them.
    """
    spy = py_spy()
    if spy is None or target.proc is None:
        return {}
    s = system.settings
    output = system.directory / f"profile-{target.name}.txt"
    seconds = max(1, round(s.duration))
    sampler = asyncio.create_task(run_tool([
        *system.pinning.prefix("load"), spy, "record", "--format", "raw", "--nolineno",
        "-r", str(PROFILE_RATE), "-d", str(seconds + 1), "-o", str(output),
        "-p", str(target.proc.pid)], seconds + TOOL_GRACE))
    try:
        await asyncio.sleep(0.5)
        load = await wrk(system, target, seconds, rotation)
    finally:
        await sampler
    result = collapse(output.read_text(errors="replace"))
    result["rps_while_sampled"] = load["rps"]
    result["file"] = str(output)
    return result


async def micro(system: System, script: str) -> Json:
    """A microbenchmark of this checkout's code (PYTHONPATH: a script's own directory comes
    first on sys.path, so the package would otherwise be the one the venv has installed, which
    for another worktree is not this one), pinned like the system under test."""
    s = system.settings
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # noqa: TID251 - the harness's children
    out = await run_tool([*system.pinning.prefix("sut"), PYTHON, str(BENCH / script),
                          "--json", "--tokens", str(s.jwt_tokens), "--repeats",
                          str(s.jwt_repeats)], 300.0, env)
    data: Json = json.loads(out.strip().splitlines()[-1])
    return data


# -- statistics and output -----------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def median(values: Iterable[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return statistics.median(present) if present else math.nan


def rotated(names: Sequence[str], by: int) -> list[str]:
    if not names:
        return []
    k = by % len(names)
    return [*names[k:], *names[:k]]


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(headers, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join("  " + line for line in lines)


def versions(tools: dict[str, str]) -> Json:
    def package(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    def debian(name: str) -> str:
        dpkg = shutil.which("dpkg-query")
        if dpkg is None:
            return "?"
        done = subprocess.run([dpkg, "-W", "-f", "${Version}", name], check=False,  # noqa: S603
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or "?"

    nginx = subprocess.run([tools["nginx"], "-v"], capture_output=True, text=True,  # noqa: S603
                           check=False, timeout=10).stderr.strip().rpartition("/")[2]
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    return {
        "cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "aiohttp": package("aiohttp"),
        "pyjwt": package("PyJWT"), "cryptography": package("cryptography"),
        "oauth_sidecar": package("oauth-sidecar"), "nginx": nginx,
        "wrk": debian("wrk"), "hey": debian("hey"),
    }


@dataclass
class Results:
    environment: Json = field(default_factory=dict)
    settings: Json = field(default_factory=dict)
    throughput: dict[str, list[Json]] = field(default_factory=dict)
    latency: dict[str, list[Json]] = field(default_factory=dict)
    burst: dict[str, list[Json]] = field(default_factory=dict)
    sse: dict[str, list[Json]] = field(default_factory=dict)
    idle: dict[str, Json] = field(default_factory=dict)
    jwt: Json = field(default_factory=dict)
    introspection: Json = field(default_factory=dict)
    jwks: Json = field(default_factory=dict)
    profiles: dict[str, Json] = field(default_factory=dict)
    summary: Json = field(default_factory=dict)
    targets: list[Json] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def med(runs: dict[str, list[Json]], case: str, key: str) -> float:
    return median(r[key] for r in runs.get(case, []))


def paired_ratio(runs: dict[str, list[Json]], case: str, floor: str, key: str) -> float:
    """Median over rounds of case / floor within the same round (they ran minutes apart at
    most, so slow drift of the machine cancels)."""
    pairs = zip(runs.get(case, []), runs.get(floor, []), strict=False)
    return median(a[key] / b[key] for a, b in pairs if b[key])


def paired_difference(runs: dict[str, list[Json]], case: str, base: str, key: str) -> float:
    """Median over rounds of case - base within the same round (as paired_ratio)."""
    return median(differences(runs, case, base, key))


def differences(runs: dict[str, list[Json]], case: str, base: str, key: str) -> list[float]:
    pairs = zip(runs.get(case, []), runs.get(base, []), strict=False)
    return [a[key] - b[key] for a, b in pairs]


def stdio_summary(results: Results) -> Json:
    """Issue 18's figures: req/s of the echo served directly, through the stdio bridge and as an
    HTTP child; the bridge's ratio to the HTTP child; what each path adds to the echo's latency
    at the same offered rate (paired within each round)."""
    t, lat = results.throughput, results.latency
    bridged = [c for c in STDIO_CASES if c != STDIO_DIRECT]
    out: Json = {}
    if any(c in t for c in STDIO_CASES):
        out["rps"] = {c: med(t, c, "rps") for c in STDIO_CASES if c in t}
        if "sidecar-stdio" in t and "sidecar-httpchild" in t:
            out["stdio_vs_httpchild"] = paired_ratio(t, "sidecar-stdio", "sidecar-httpchild",
                                                     "rps")
        if STDIO_DIRECT in t:
            out["ratio_to_direct"] = {c: paired_ratio(t, c, STDIO_DIRECT, "rps")
                                      for c in bridged if c in t}
    if any(c in lat for c in STDIO_CASES):
        out["rate"] = results.settings.get("rate")
        out["latency_p50_ms"] = {c: med(lat, c, "p50_ms") for c in STDIO_CASES if c in lat}
        out["latency_p99_ms"] = {c: med(lat, c, "p99_ms") for c in STDIO_CASES if c in lat}
        if STDIO_DIRECT in lat:
            for key in ("p50", "p99"):
                out[f"added_{key}_ms"] = {
                    c: paired_difference(lat, c, STDIO_DIRECT, f"{key}_ms")
                    for c in bridged if c in lat}
                out[f"added_{key}_ms_by_round"] = {
                    c: differences(lat, c, STDIO_DIRECT, f"{key}_ms") for c in bridged if c in lat}
    return out


def p99_stable(values: Sequence[float]) -> bool:
    """Every round's figure within P99_STABLE_SHARE of the median (or P99_STABLE_MS)."""
    if not values:
        return False
    middle = statistics.median(values)
    allowed = max(P99_STABLE_SHARE * abs(middle), P99_STABLE_MS)
    return all(abs(v - middle) <= allowed for v in values)


def introspection_summary(results: Results) -> Json:
    """Issue 19's figures: req/s and CPU per request of opaque tokens introspected on cache hits
    and misses beside their JWT twins, the IdP's own CPU and calls, the ratios and the added
    latency (each paired within its round)."""
    t, lat = results.throughput, results.latency
    cases = [c for c in ("sidecar", "sidecar-distinct", *INTROSPECTION_CASES) if c in t or c in lat]
    if not any(c in t or c in lat for c in INTROSPECTION_CASES):
        return {}
    out: Json = {"cases": cases}
    out["rps"] = {c: med(t, c, "rps") for c in cases if c in t}
    out["cpu_us_per_request"] = {c: med(t, c, "cpu_us_per_request") for c in cases if c in t}
    for key in ("idp_cpu_us_per_request", "idp_cpu_share", "idp_calls_per_request"):
        out[key] = {c: med(t, c, key) for c in INTROSPECTION_CASES if c in t}
        out[f"latency_{key}"] = {c: med(lat, c, key) for c in INTROSPECTION_CASES if c in lat}
    out["latency_p50_ms"] = {c: med(lat, c, "p50_ms") for c in cases if c in lat}
    out["latency_p99_ms"] = {c: med(lat, c, "p99_ms") for c in cases if c in lat}
    ratios, added50, added99, by_round, stable = {}, {}, {}, {}, {}
    for case, base, what in INTROSPECTION_PAIRS:
        if case in t and base in t:
            ratios[what] = paired_ratio(t, case, base, "rps")
        if case in lat and base in lat:
            added50[what] = paired_difference(lat, case, base, "p50_ms")
            rounds = differences(lat, case, base, "p99_ms")
            by_round[what] = rounds
            stable[what] = p99_stable(rounds)
            added99[what] = median(rounds)
    out.update({"rps_ratio": ratios, "added_p50_ms": added50, "added_p99_ms": added99,
                "added_p99_ms_by_round": by_round, "added_p99_stable": stable})
    return out


def summarise(results: Results) -> None:  # noqa: PLR0912, PLR0915 - one branch per optional figure
    """Medians, ratios and the verdicts against the performance targets."""
    t, lat, sse = results.throughput, results.latency, results.sse
    summary: Json = {"throughput_rps": {c: med(t, c, "rps") for c in t},
                     "cpu_us_per_request": {c: med(t, c, "cpu_us_per_request") for c in t},
                     "cpu_share": {c: med(t, c, "cpu_share") for c in t},
                     "latency_p50_ms": {c: med(lat, c, "p50_ms") for c in lat},
                     "latency_p99_ms": {c: med(lat, c, "p99_ms") for c in lat},
                     "burst_p50_ms": {c: med(results.burst, c, "p50_ms") for c in results.burst},
                     "burst_p99_ms": {c: med(results.burst, c, "p99_ms") for c in results.burst},
                     "sse_p50_ms": {c: med(sse, c, "p50_ms") for c in sse},
                     "sse_p99_ms": {c: med(sse, c, "p99_ms") for c in sse}}
    results.summary = summary
    targets: list[Json] = []

    def verdict(name: str, value: float, limit: float | None, at_least: bool,
                unit: str = "") -> None:
        """limit None: a figure stated in the table, with no target of its own."""
        if math.isnan(value):
            return
        meets = None if limit is None else value >= limit if at_least else value <= limit
        targets.append({"target": name, "value": value, "limit": limit,
                        "at_least": at_least, "unit": unit, "meets": meets})

    ratios = {c: paired_ratio(t, c, "minimal-proxy", "rps") for c in t}
    summary["throughput_ratio_to_minimal"] = ratios
    floor = FLOOR if FLOOR in t else "minimal-proxy"
    to_floor = {c: paired_ratio(t, c, floor, "rps") for c in t}
    summary["throughput_ratio_to_floor"] = to_floor
    summary["floor"] = floor
    for case, what, target in (
        ("sidecar-defaults", "defaults (access log, per-subject limit), one subject", "cached"),
        ("sidecar", "cached token, no access log, no limit", "cached"),
        ("sidecar-distinct", "distinct tokens (cache misses)", "distinct"),
    ):
        if case in t:
            verdict(f"{case} / {floor} req/s, {what}", to_floor[case], TARGETS[target], True, "x")
    for case in ("sidecar-subjects", "sidecar-redis", "sidecar-ratelimit"):
        if case in t:  # stated, not a target of their own
            summary[f"{case}_ratio_to_floor"] = to_floor[case]
    whole_uvloop = ("minimal-whole-uvloop" if "minimal-whole-uvloop" in t
                    else "minimal-proxy-uvloop")
    if "sidecar-uvloop" in t and whole_uvloop in t:
        on_uvloop = paired_ratio(t, "sidecar-uvloop", whole_uvloop, "rps")
        summary["uvloop_ratio"] = on_uvloop
        verdict(f"same, both on uvloop (sidecar-uvloop / {whole_uvloop})", on_uvloop,
                TARGETS["cached"], True, "x")
    if "sidecar-metrics" in t and "sidecar" in t:
        summary["metrics_ratio"] = paired_ratio(t, "sidecar-metrics", "sidecar", "rps")
    for (case, base), (what, limit) in zip(RULE_PAIRS, (
            (f"{GLOBS} tool-rule globs on tools/call: cost <= 10 %", TARGETS["rules50"]),
            (f"{GLOBS} globs in 3 rules against 1 glob in TOOLS_DENY", None),
            ("filtering a 200-tool tools/list (~110 KB) to half", None)), strict=True):
        if case in t and base in t:
            ratio = paired_ratio(t, case, base, "rps")
            summary[f"{case}_vs_{base}"] = ratio
            verdict(f"{case} / {base} req/s ({what})", ratio, limit, True, "x")
    stdio = stdio_summary(results)
    if stdio:
        summary["stdio_bridge"] = stdio
    opaque = introspection_summary(results)
    if opaque:
        summary["introspection"] = opaque
    for case, _, what in INTROSPECTION_PAIRS:  # JWT miss / hit is in section 8 for scale
        if case in INTROSPECTION_CASES and what in opaque.get("rps_ratio", {}):
            verdict(f"{what} req/s (issue 19: opaque tokens introspected, JWTs verified)",
                    opaque["rps_ratio"][what], None, True, "x")
    if "stdio_vs_httpchild" in stdio:
        verdict("sidecar-stdio / sidecar-httpchild req/s (the stdio bridge against spawn "
                "mode's HTTP child, same echo)", stdio["stdio_vs_httpchild"], None, True, "x")
    for case, base in (("sidecar", "baseline"), ("sidecar-defaults", "baseline-defaults"),
                       ("sidecar-distinct", "baseline-distinct")):
        if case in t and base in t:
            gain = paired_ratio(t, case, base, "rps")
            summary[f"{case}_vs_{base}"] = gain
            verdict(f"{case} / {base} req/s (this checkout / --baseline, same run)", gain,
                    1.0, True, "x")
    p99 = summary["latency_p99_ms"]
    if "sidecar" in p99 and "upstream" in p99:
        verdict(f"added p99 at {results.settings.get('rate')} req/s (sidecar - upstream)",
                p99["sidecar"] - p99["upstream"], TARGETS["added_p99_ms"], False, "ms")
    idle = results.idle.get("sidecar")
    if idle:
        verdict(f"RSS growth per idle SSE stream ({idle['streams']} streams)",
                idle["kb_per_stream"], TARGETS["kb_per_stream"], False, "KB")
        verdict(f"CPU with {idle['streams']} idle streams (no spin), fraction of a core",
                idle["idle_cpu_fraction"], IDLE_CPU_LIMIT, False, "")
    if results.jwks:
        verdict(f"JWKS fetches / cooldown windows under {results.jwks['requests']} unknown kids",
                results.jwks["jwks_fetches"] / results.jwks["windows"], 1.0, False, "")
    results.targets = targets


def report(results: Results) -> str:  # noqa: PLR0912, PLR0915 (one section per measured case)
    r, s, e = results, results.settings, results.environment
    out = [f"oauth_sidecar performance harness ({'quick' if s['quick'] else 'default'} run, "
           f"{s['rounds']} round(s), median shown; ratios are what to quote)",
           f"environment: {e['cpu']} ({e['cpus']} CPUs), Linux {e['kernel']}, "
           f"Python {e['python']}, aiohttp {e['aiohttp']}, PyJWT {e['pyjwt']}, "
           f"cryptography {e['cryptography']}, nginx {e['nginx']}, wrk {e['wrk']}, hey {e['hey']}",
           f"pinning: {e['pinning']}",
           f"load average (1 min): {e['loadavg_start']:.2f} at start, "
           f"{e.get('loadavg_end', math.nan):.2f} at end"]
    other = e.get("other_load")
    if other:
        out.append(f"other load during the run: {other['other_cpu_s']:.0f} CPU-seconds used by "
                   f"processes not started by this run in {other['seconds']:.0f} s (on average "
                   f"{other['other_cores_average']:.2f} of a core); steal {other['steal_s']:.1f} s")
    if r.throughput or r.latency or r.sse or r.idle:
        out.append("sidecars: LOG_LEVEL=warning and RATE_LIMIT_RPM=0 (per-subject rate limiting "
                   "OFF for throughput) unless the case says otherwise; the per-IP budget keeps "
                   "its default (spent on every cache miss), except in the -distinct and "
                   "-miss cases, where every request is one: RATE_LIMIT_UNAUTHENTICATED_RPM="
                   "1000000 there")
    sm = r.summary
    if r.throughput:
        rps = sm["throughput_rps"]
        cost = sm["cpu_us_per_request"]
        rows = []
        for case in CASES:
            if case not in r.throughput:
                continue
            runs = r.throughput[case]
            errors = sum(x["errors"] for x in runs)
            rows.append([case, fmt(rps[case], 0), fmt(sm["throughput_ratio_to_floor"][case]),
                         fmt(sm["throughput_ratio_to_minimal"][case]),
                         fmt(cost[case], 0), fmt(100 * sm["cpu_share"][case], 0),
                         fmt(med(r.throughput, case, "p99_us") / 1000, 1), str(errors),
                         " ".join(fmt(x["rps"], 0) for x in runs)])
        out += ["", f"1. throughput: POST /mcp, {len(BODY)}-byte JSON-RPC body, wrk -t1 "
                f"-c{s['connections']} -d{s['duration']:g}s (closed loop). x minimal: the "
                "median of each round's ratio; CPU: the system under test's CPU time per "
                "request, and its share of its core (below 100 %: it waited, or others ran)",
                table(["case", "req/s", f"x {sm['floor']}", "x minimal", "CPU µs/req", "CPU %",
                       "p99 ms", "errors", "req/s by round"], rows),
                "   sidecar-distinct: every request a cache miss (rotating "
                f"{s['distinct_tokens']} tokens, TOKEN_CACHE_SIZE={s['distinct_tokens'] // 2}); "
                "sidecar-introspection and sidecar-introspection-miss: opaque tokens "
                "introspected, hits and misses (section 8); "
                "sidecar-ratelimit: RATE_LIMIT_RPM=1000000, memory://, one subject; "
                "sidecar-defaults: LOG_LEVEL=info and RATE_LIMIT_RPM=1000000, one subject; "
                f"sidecar-subjects: RATE_LIMIT_RPM=1000000, {s['distinct_tokens']} subjects in "
                "turn, every token cached; sidecar-redis: RATE_LIMIT_RPM=1000000 in a local "
                "redis-server; minimal-whole: minimal_proxy.py --whole-body (small bodies "
                "read whole, as the sidecar does: the floor the targets use); "
                "sidecar-accesslog: LOG_LEVEL=info, access log to a file; "
                "sidecar-metrics: METRICS_PORT set (Prometheus counters on every request); "
                f"sidecar-toolcall: a {len(CALL_BODY)}-byte tools/call, no tool rules; "
                "sidecar-rules1: the same with one glob (TOOLS_DENY=*_purge*): what any rule "
                "set costs (the body parsed and judged); "
                f"sidecar-rules50: the same call with TOOL_POLICY_FILE of {GLOBS} globs "
                "(bench/tool_workload.py), the caller's tool matching the last one; "
                "sidecar-list200-norules and sidecar-list200: tools/list answered with "
                f"{len(tools_list()):,} bytes of 200 tools, without rules and with them (100 "
                "tools kept); "
                "-uvloop: the same on uvloop (EVENT_LOOP=uvloop, minimal_proxy.py --uvloop); "
                "the others run on asyncio's loop"]
        if "metrics_ratio" in sm:
            out.append(f"   sidecar-metrics / sidecar req/s (median of each round's ratio): "
                       f"{fmt(sm['metrics_ratio'], 3)}")
    if r.latency:
        up50 = sm["latency_p50_ms"].get("upstream", math.nan)
        up99 = sm["latency_p99_ms"].get("upstream", math.nan)
        b50, b99 = sm["burst_p50_ms"], sm["burst_p99_ms"]
        rows = []
        for case in LATENCY_CASES:
            if case not in r.latency:
                continue
            p50, p99 = sm["latency_p50_ms"][case], sm["latency_p99_ms"][case]
            errors = sum(x["errors"] for x in [*r.latency[case], *r.burst.get(case, [])])
            rows.append([case, fmt(p50, 3), fmt(p99, 3), fmt(p50 - up50, 3), fmt(p99 - up99, 3),
                         fmt(med(r.latency, case, "rps"), 0), fmt(b50.get(case), 1),
                         fmt(b99.get(case), 1), str(errors)])
        c = min(LATENCY_CONNECTIONS, s["rate"])
        out += ["", f"2. latency at ~{s['rate']} req/s: wrk -c{c}, each connection waiting an "
                f"exponential time (mean {1000 * c / s['rate']:g} ms) between requests, "
                f"{s['latency_duration']:g} s; added = case - upstream",
                f"   burst: hey -c {c} -q {s['rate'] / c:g} -z {s['burst_duration']:g}s, whose "
                f"workers tick together (bursts of {c} every {1000 * c / s['rate']:g} ms; "
                "0.1 ms steps)",
                table(["case", "p50 ms", "p99 ms", "added p50", "added p99", "req/s",
                       "burst p50", "burst p99", "errors"], rows)]
    if r.sse:
        up50 = sm["sse_p50_ms"].get("upstream", math.nan)
        up99 = sm["sse_p99_ms"].get("upstream", math.nan)
        rows = []
        for case in SSE_CASES:
            if case not in r.sse:
                continue
            p50, p99 = sm["sse_p50_ms"][case], sm["sse_p99_ms"][case]
            rows.append([case, str(sum(x["events"] for x in r.sse[case])), fmt(p50, 3),
                         fmt(p99, 3), fmt(p50 - up50, 3), fmt(p99 - up99, 3)])
        out += ["", f"3. SSE event latency, receive - send: {s['sse_streams']} streams x one "
                f"event per {s['sse_interval_ms']} ms for {s['sse_duration']:g} s "
                "(upstream = direct, through the upstream nginx to the SSE server)",
                table(["case", "events", "p50 ms", "p99 ms", "added p50", "added p99"], rows)]
    if r.idle:
        rows = []
        for case, x in r.idle.items():
            rows.append([case, fmt(x["rss_before_kb"] / 1024, 1), fmt(x["rss_with_kb"] / 1024, 1),
                         fmt(x["kb_per_stream"], 1), str(x["fds_before"]), str(x["fds_with"]),
                         fmt(x["fds_per_stream"], 2), fmt(x["idle_cpu_s"], 3),
                         fmt(x["rss_after_close_kb"] / 1024, 1), str(x["fds_after_close"]),
                         fmt(x["open_seconds"], 1)])
        n = next(iter(r.idle.values()))["streams"]
        out += ["", f"4. {n} idle SSE streams held open (a comment every 15 s), process "
                f"figures from /proc; CPU over {s['idle_window']:g} s of idleness",
                table(["process", "RSS MB", "with MB", "KB/stream", "fds", "with", "fds/stream",
                       "idle CPU s", "closed MB", "fds", "open s"], rows)]
    if r.jwt:
        j = r.jwt
        out += ["", f"5. JWT verification, TokenVerifier in process (RS256 2048, "
                f"{j['token_bytes']}-byte tokens, best of {j['repeats']}), µs per token",
                table(["path", "µs"], [
                    ["cache hit: cached(token) (what the gate calls)", fmt(j["hit_cached_us"])],
                    ["cache hit: verify(token)", fmt(j["hit_verify_us"])],
                    ["cache miss: verify(token) of a new token", fmt(j["miss_verify_us"])],
                    ["  of which sha256 of the token", fmt(j["miss_sha256_us"])],
                    ["  of which the strict parse (parse_strict)", fmt(j["miss_parse_strict_us"])],
                    ["  of which pyjwt decode (incl. signature)", fmt(j["miss_pyjwt_decode_us"])],
                    ["  of which the bare RSA verify (cryptography)", fmt(j["miss_rsa_verify_us"])],
                    ["unknown kid: refusal (within the cooldown)", fmt(j["unknown_kid_reject_us"])],
                ])]
    if r.jwks:
        j = r.jwks
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(j["statuses"].items()))
        out += ["", f"6. unknown-kid flood: {j['requests']} requests with random kids in "
                f"{j['seconds']:.1f} s ({j['rps']:,.0f} req/s; answers {statuses}); "
                f"JWKS_COOLDOWN_SECONDS={j['cooldown_s']:g}, RATE_LIMIT_UNAUTHENTICATED_RPM=0",
                f"   JWKS fetches at the IdP: {j['jwks_fetches']} over {j['windows']} cooldown "
                "window(s) spanned"]
    stdio = sm.get("stdio_bridge", {})
    if stdio:
        out += ["", *stdio_report(r, stdio)]
    opaque = sm.get("introspection", {})
    if opaque or r.introspection:
        out += ["", *introspection_report(r, opaque)]
    for case, prof in r.profiles.items():
        if not prof:
            out += ["", f"profile of {case}: py-spy not found (.venv/bin/pip install py-spy)"]
            continue
        rows = [[str(name)[:90], fmt(float(str(share)), 1)] for name, share in prof["self"]]
        incl = [[str(name)[:90], fmt(float(str(share)), 1)] for name, share in prof["inclusive"]]
        out += ["", f"profile of {case} under wrk ({prof['samples']} py-spy samples of busy "
                f"time, {prof['rps_while_sampled']:,.0f} req/s while sampled; {prof['file']})",
                table(["own time (leaf function)", "%"], rows),
                table(["inclusive time (the product's functions and the libraries' entry points "
                       "it calls)", "%"], incl)]
    if r.targets:
        rows = []
        for x in r.targets:
            sign = ">=" if x["at_least"] else "<="
            unit = x["unit"]
            if x["limit"] is None:
                rows.append([x["target"], f"{fmt(x['value'], 3)} {unit}".strip(), "-",
                             "stated"])
                continue
            rows.append([x["target"], f"{fmt(x['value'], 3)} {unit}".strip(),
                         f"{sign} {x['limit']:g} {unit}".strip(),
                         "meets" if x["meets"] else "MISSES"])
        out += ["", "targets", table(["target", "value", "target", "result"], rows)]
    if r.notes:
        out += ["", "notes:", *(f"  - {n}" for n in r.notes)]
    return "\n".join(out)


def stdio_report(r: Results, stdio: Json) -> list[str]:
    """Section 7: the echo direct, through the stdio bridge and as an HTTP child."""
    rps, to_direct = stdio.get("rps", {}), stdio.get("ratio_to_direct", {})
    p50, p99 = stdio.get("latency_p50_ms", {}), stdio.get("latency_p99_ms", {})
    add50, add99 = stdio.get("added_p50_ms", {}), stdio.get("added_p99_ms", {})
    by_round = stdio.get("added_p99_ms_by_round", {})
    rows = []
    for case in STDIO_CASES:
        if case not in rps and case not in p50:
            continue
        rows.append([case, fmt(rps.get(case), 0),
                     "1.00" if case == STDIO_DIRECT and case in rps else fmt(to_direct.get(case)),
                     fmt(p50.get(case), 3), fmt(p99.get(case), 3), fmt(add50.get(case), 3),
                     fmt(add99.get(case), 3),
                     " ".join(fmt(x, 2) for x in by_round.get(case, []))])
    lines = [f"7. stdio bridge (issue 18): the same echo tool ({len(BODY)}-byte tools/call) "
             f"served directly ({STDIO_DIRECT}: bench/stdio_http_echo.py, no sidecar), through "
             "the stdio bridge (sidecar-stdio: bench/echo_over_stdio.py, the subject's "
             "sessionless child, answers as an event stream) and as spawn mode's HTTP child "
             "(sidecar-httpchild: bench/stdio_http_echo.py, proxied, JSON); throughput as in 1, "
             f"latency as in 2 (~{stdio.get('rate', r.settings.get('rate'))} req/s, the same "
             f"for each); added = case - {STDIO_DIRECT}, the median of each round's difference; "
             "every child runs on the system under test's CPU (inherited from the sidecar), "
             "and 1.'s CPU columns count the sidecar's process group only, not its child",
             table(["case", "req/s", f"x {STDIO_DIRECT}", "p50 ms", "p99 ms", "added p50",
                    "added p99", "added p99 by round"], rows)]
    if "stdio_vs_httpchild" in stdio:
        lines.append(f"   sidecar-stdio / sidecar-httpchild req/s (median of each round's "
                     f"ratio): {fmt(stdio['stdio_vs_httpchild'], 3)}")
    return lines


def introspection_report(r: Results, opaque: Json) -> list[str]:
    """Section 8: opaque tokens introspected, on cache hits and misses, against JWTs, and the
    introspector in process."""
    lines = introspection_runs(r, opaque) if opaque else [
        "8. opaque tokens (issue 19)"]
    m = r.introspection
    if m:
        lines += [f"   in process (bench/introspection_micro.py, best of {m['repeats']} passes of "
                  f"{m['tokens']} tokens, this process's CPU time; {m['opaque_token_bytes']}-byte "
                  f"opaque tokens, {m['answer_bytes']}-byte answers, {m['jwt_token_bytes']}-byte "
                  "RS256 JWTs), µs per token",
                  table(["path", "µs"], [[label, fmt(m.get(key))] for key, label in MICRO_ROWS])]
    return lines


def introspection_runs(r: Results, opaque: Json) -> list[str]:
    """Section 8's throughput and latency tables."""
    rps, cost = opaque.get("rps", {}), opaque.get("cpu_us_per_request", {})
    idp_cost, idp_share = opaque["idp_cpu_us_per_request"], opaque["idp_cpu_share"]
    calls, lat_calls = opaque["idp_calls_per_request"], opaque["latency_idp_calls_per_request"]
    p50, p99 = opaque.get("latency_p50_ms", {}), opaque.get("latency_p99_ms", {})
    rows = []
    for case in opaque["cases"]:
        rows.append([case, fmt(rps.get(case), 0), fmt(cost.get(case), 0),
                     fmt(idp_cost.get(case), 0),
                     fmt(100 * idp_share[case], 0) if case in idp_share else "-",
                     fmt(calls.get(case), 3), fmt(p50.get(case), 3), fmt(p99.get(case), 3),
                     fmt(lat_calls.get(case), 3)])
    pairs = []
    for _, _, what in INTROSPECTION_PAIRS:
        rounds = opaque["added_p99_ms_by_round"].get(what)
        p99_text = "-"
        if rounds is not None:
            p99_text = (fmt(opaque["added_p99_ms"][what], 3) if opaque["added_p99_stable"][what]
                        else "unstable")
        pairs.append([what, fmt(opaque["rps_ratio"].get(what), 3),
                      fmt(opaque["added_p50_ms"].get(what), 3), p99_text,
                      " ".join(fmt(x, 2) for x in rounds or [])])
    s = r.settings
    return [
        "8. opaque tokens (issue 19): TOKEN_VALIDATION=introspection against the fake IdP's "
        "RFC 7662 endpoint (bench/perf_services.py, client_secret_basic, on the load CPU), the "
        "product's defaults (INTROSPECTION_CACHE_SECONDS=30, INTROSPECTION_MAX_CONCURRENCY=16); "
        "sidecar-introspection: one opaque token (cache hits, as sidecar has one JWT); "
        f"sidecar-introspection-miss: {s['distinct_tokens']} distinct opaque tokens in turn, "
        f"TOKEN_CACHE_SIZE={s['distinct_tokens'] // 2} (every request a call to the IdP, as "
        "every sidecar-distinct request is a signature check); throughput as in 1, latency as "
        "in 2. CPU: the sidecar's, as in 1; IdP: the fake IdP's CPU time per request and "
        "share of its core during the throughput runs (on the load CPU, not in the sidecar's "
        "figures), and the calls it answered per request",
        table(["case", "req/s", "CPU µs/req", "IdP µs/req", "IdP CPU %",
               "IdP calls/req", "p50 ms", "p99 ms", "calls/req (latency)"], rows),
        "   paired within each round (ratio of req/s; added = first case - second at the same "
        "offered rate); added p99 is quoted only when every round's is within "
        f"{P99_STABLE_SHARE:.0%} (or {P99_STABLE_MS} ms) of their median",
        table(["pair", "req/s ratio", "added p50 ms", "added p99 ms", "added p99 by round"],
              pairs),
    ]


# -- the run -------------------------------------------------------------------------------------


async def measure(system: System, results: Results, session: aiohttp.ClientSession) -> None:  # noqa: PLR0912 (one branch per measured case)
    s = system.settings
    targets = system.targets
    rotation = Rotation()
    throughput = [c for c in s.cases_for("throughput") if c in targets]
    latency = [c for c in s.cases_for("latency") if c in targets]
    sse = [c for c in s.cases_for("sse") if c in targets]
    if throughput:
        print(f"bench: warm-up ({s.warmup:g} s per case)", flush=True)
        for case in throughput:
            await wrk(system, targets[case], s.warmup, rotation)
    for round_index in range(s.rounds if throughput or latency or sse else 0):
        print(f"bench: round {round_index + 1}/{s.rounds}", flush=True)
        for case in rotated(throughput, round_index):
            result = await with_idp(system, session, targets[case],
                                    wrk(system, targets[case], s.duration, rotation))
            results.throughput.setdefault(case, []).append(result)
            errors = f"  ({result['errors']} errors)" if result["errors"] else ""
            print(f"  throughput {case:<26} {result['rps']:>10,.0f} req/s{errors}", flush=True)
        for case in rotated(latency, round_index):
            result = await with_idp(system, session, targets[case],
                                    latency_run(system, targets[case], rotation))
            results.latency.setdefault(case, []).append(result)
            print(f"  latency    {case:<26} p50 {result['p50_ms']:.2f} ms, "
                  f"p99 {result['p99_ms']:.2f} ms", flush=True)
        for case in rotated(latency, round_index):
            if targets[case].rotating:  # hey sends one token: it would measure cache hits
                continue
            result = await hey(system, targets[case])
            results.burst.setdefault(case, []).append(result)
            print(f"  burst      {case:<26} p50 {result['p50_ms']:.2f} ms, "
                  f"p99 {result['p99_ms']:.2f} ms", flush=True)
        for case in rotated(sse, round_index):
            result = await sse_latency(system, targets[case], session)
            results.sse.setdefault(case, []).append(result)
            print(f"  sse        {case:<26} p50 {result['p50_ms']:.3f} ms, "
                  f"p99 {result['p99_ms']:.3f} ms", flush=True)
    if s.profile:
        for case in ("minimal-proxy", "minimal-whole", "sidecar", "sidecar-defaults",
                     "sidecar-distinct", "sidecar-introspection", "sidecar-introspection-miss",
                     "minimal-proxy-uvloop", "sidecar-uvloop",
                     "sidecar-toolcall", "sidecar-rules50", "sidecar-list200"):
            if case in throughput:
                print(f"bench: profiling {case} with py-spy", flush=True)
                results.profiles[case] = await profile(system, targets[case], rotation)
    for case in s.cases_for("idle"):
        if case in targets:
            print(f"bench: {s.idle_streams} idle SSE streams through {case}", flush=True)
            results.idle[case] = await idle_streams(system, targets[case], session)
    if s.runs("jwks") and system.flood_target is not None:
        print(f"bench: unknown-kid flood ({s.flood_requests} requests)", flush=True)
        results.jwks = await kid_flood(system, system.flood_target, session)
    if s.runs("jwt"):
        print("bench: JWT verification microbenchmark", flush=True)
        results.jwt = await micro(system, "jwt_micro.py")
    if s.runs("introspection"):
        print("bench: introspection microbenchmark", flush=True)
        results.introspection = await micro(system, "introspection_micro.py")


async def with_idp(system: System, session: aiohttp.ClientSession, target: Target,
                   run: Awaitable[Json]) -> Json:
    """run's figures, and for an introspecting case what the fake IdP spent on it: its CPU
    time per request and share of its core (it runs on the load CPU, beside wrk and the upstream
    nginx), and the introspection calls it answered per request (about 1 on cache misses,
    about 0 on hits: the check that each case measures what it claims)."""
    if not target.introspects or system.services is None:
        return await run
    pid = system.services.pid
    calls_before = (await upstream_stats(system, session))["introspections"]
    cpu_before = group_cpu(pid)
    data = await run
    cpu = group_cpu(pid) - cpu_before
    calls_after = (await upstream_stats(system, session))["introspections"]
    requests = max(1, data["requests"])
    calls = {k: calls_after[k] - calls_before[k] for k in calls_after}
    data["idp_calls"] = calls
    data["idp_calls_per_request"] = sum(calls.values()) / requests
    data["idp_cpu_us_per_request"] = cpu / requests * 1e6
    data["idp_cpu_share"] = cpu / (data["requests"] / data["rps"]) if data["rps"] else math.nan
    return data


def idp_notes(results: Results) -> None:
    """An introspection case whose IdP saw anything but active tokens measured something else."""
    for name, runs in (("throughput", results.throughput), ("latency", results.latency)):
        for case in INTROSPECTION_CASES:
            odd = collections.Counter[str]()
            for run in runs.get(case, []):
                odd.update({k: v for k, v in run.get("idp_calls", {}).items() if k != "active"})
            if odd.total():
                results.notes.append(f"{name} {case}: the IdP answered {dict(odd)} besides "
                                     "active tokens (figures suspect)")


def log_notes(system: System, results: Results) -> None:
    """Warnings worth a look: errors in a sidecar's log, load generator errors."""
    for proc in system.procs.started:
        if not proc.name.startswith("sidecar"):
            continue
        kinds: collections.Counter[str] = collections.Counter()
        with contextlib.suppress(OSError), proc.log.open(errors="replace") as lines:
            for line in lines:
                if '"level": "error"' not in line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    kinds["(not JSON)"] += 1
                    continue
                last = str(event.get("exception", "")).strip().rpartition("\n")[2]
                kinds[f"{event.get('event')}{': ' + last if last else ''}"] += 1
        if kinds:
            listed = "; ".join(f"{n} x {kind}" for kind, n in kinds.most_common())
            results.notes.append(f"{proc.name} logged {kinds.total()} error line(s): {listed} "
                                 f"(log: {proc.log})")
    idp_notes(results)
    for name, runs in (("throughput", results.throughput), ("latency", results.latency),
                       ("burst", results.burst)):
        for case, values in runs.items():
            errors = sum(v["errors"] for v in values)
            if errors:
                results.notes.append(f"{name} {case}: {errors} failed requests (figures suspect)")


async def run(settings: Settings, tools: dict[str, str], pinning: Pinning,
              directory: Path) -> Results:
    results = Results(settings={k: v for k, v in asdict(settings).items()
                                if k not in ("json_path", "keep", "profile")})
    results.environment = {**versions(tools), "pinning": pinning.note,
                           "nofile": raise_nofile(), "loadavg_start": os.getloadavg()[0]}
    key = BenchKey(issuer="")
    procs = Procs(directory)
    system = System(settings, tools, pinning, directory, procs, key)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    if main_task is not None:
        loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    before = cpu_accounting()
    connector = aiohttp.TCPConnector(limit=0)
    budget = 300.0 if settings.quick else 1800.0  # the whole run, whatever happens
    try:
        async with aiohttp.ClientSession(connector=connector) as session, asyncio.timeout(budget):
            print(f"bench: starting processes in {directory}", flush=True)
            await start_system(system, session)
            await measure(system, results, session)
    finally:
        await asyncio.shield(procs.stop_all())
    results.environment["loadavg_end"] = os.getloadavg()[0]
    after = cpu_accounting()  # every child reaped: their CPU is in ours_s now
    wall = after["wall_s"] - before["wall_s"]
    others = (after["busy_s"] - before["busy_s"]) - (after["ours_s"] - before["ours_s"])
    results.environment["other_load"] = {
        "seconds": wall, "other_cpu_s": others, "steal_s": after["steal_s"] - before["steal_s"],
        "other_cores_average": others / wall if wall > 0 else math.nan}
    log_notes(system, results)
    summarise(results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    tools = ensure_tools()
    pinning = plan_pinning()
    directory = Path(tempfile.mkdtemp(prefix="oauth-sidecar-bench-"))
    try:
        results = asyncio.run(run(settings, tools, pinning, directory))
    except (SetupError, TimeoutError, aiohttp.ClientError, OSError) as exc:
        what = str(exc) or type(exc).__name__
        print(f"bench: failed: {what}\nbench: logs and configs kept in {directory}",
              file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"\nbench: interrupted; everything stopped. Logs in {directory}", file=sys.stderr)
        return 130
    finally:
        Procs.kill_leftovers()
    print()
    print(report(results))
    if settings.json_path:
        Path(settings.json_path).write_text(json.dumps(asdict(results), indent=2) + "\n")
        print(f"\nbench: results written to {settings.json_path}")
    # Kept when asked, when it holds profiles, or when a note points into it.
    if settings.keep or settings.profile or results.notes:
        print(f"bench: logs, configs and scripts kept in {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
