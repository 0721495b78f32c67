"""Memory of idle stdio children behind the bridge, and what each session costs the sidecar.

Why: with MCP_SPAWN_TRANSPORT=stdio every MCP session owns a process, so a deployment's memory
limit is about MCP_SPAWN_MAX_PROCESSES times what one idle child holds, plus what the sidecar
keeps per session. This measures both with the real thing: `python -m oauth_sidecar` (this
checkout) bridging to a stdio server, MCP_SPAWN_SCOPE=session, in front of a fake OpenID provider
(discovery and JWKS, in this process; RS256 tokens from bench/jwt_micro.BenchKey). Each round:

1. a fresh sidecar; one warm-up session opened and deleted (keys fetched, code paths loaded);
2. the sidecar's RSS and open fds ("before");
3. --sessions MCP sessions, one subject each (a real token each), --concurrency at a time: an
   `initialize` (2025-11-25) answered with the sidecar's `Mcp-Session-Id`, then
   `notifications/initialized`; then nothing (idle);
4. after --settle seconds, each child's RSS, PSS and USS (Private_Clean + Private_Dirty) from
   /proc/<pid>/smaps_rollup, summed over its process group (a wrapper's descendants count), and
   the sidecar's RSS and fds again ("after"): its growth per session;
5. SIGTERM to the sidecar: its exit status and stop time, and whether any process of any child's
   group is left (there must be none).

Servers (--server): `echo` (bench/echo_over_stdio.py, no SDK), `python-sdk` (tests/
mcp_stdio_server.py, the official `mcp` package's server, as the tests use it), `everything`
(npm's @modelcontextprotocol/server-everything from tests/stdio/node_modules, `stdio` mode; needs
`node`). Everything listens on 127.0.0.1; every wait is bounded; the sidecar and every child group
are killed on any failure or Ctrl-C. Never run as a test (it measures, it asserts nothing).

    .venv/bin/python bench/stdio_memory.py --server echo --sessions 50 --rounds 3
    .venv/bin/python bench/stdio_memory.py --server python-sdk --rounds 3 --json sdk.json

Exit status: 0 when every round opened every session and the sidecar exited 0 on SIGTERM with no
child left; 1 otherwise (the failures are listed); 2 when something could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from jwt_micro import AUDIENCE, BenchKey
from loopback import free_port

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
EVERYTHING = REPO / "tests" / "stdio" / "node_modules" / "@modelcontextprotocol" / (
    "server-everything")
SERVERS = ("echo", "python-sdk", "everything")
PROTOCOL = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
READY_TIMEOUT = 30.0  # seconds the sidecar gets to load its keys and listen
OPEN_TIMEOUT = 60.0  # seconds one session's initialize may take (a child starting on a busy host)
STOP_WAIT = 40.0  # seconds the sidecar gets after SIGTERM: drain, then its children's grace (10 s)
KILL_WAIT = 5.0  # seconds to wait for a SIGKILLed process to be reaped
GONE_WAIT = 5.0  # seconds a stopped child group gets to disappear from /proc


class SetupError(Exception):
    """Something the run needs could not be started; the message says what."""


def command(server: str) -> list[str]:
    """The stdio server's argv, as MCP_SPAWN_CMD gets it (a JSON array)."""
    if server == "echo":
        return [sys.executable, str(BENCH / "echo_over_stdio.py")]
    if server == "python-sdk":
        return [sys.executable, str(REPO / "tests" / "mcp_stdio_server.py")]
    node = shutil.which("node")
    if node is None or not (EVERYTHING / "dist" / "index.js").is_file():
        raise SetupError("--server everything needs `node` on PATH and tests/stdio/node_modules "
                         "(npm ci --prefix tests/stdio)")
    return [node, str(EVERYTHING / "dist" / "index.js"), "stdio"]


# -- /proc ---------------------------------------------------------------------------------------


def status_kib(pid: int, name: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM); -1 when absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return -1


def fd_count(pid: int) -> int:
    """Open fds; -1 when /proc refuses (the sidecar is non-dumpable: only root may look)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except PermissionError:
        return -1


def rollup_kib(pid: int) -> dict[str, int]:
    """Rss, Pss and Uss (private clean + dirty) of a process, in KiB, from smaps_rollup."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0])
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, ppid, pgrp, ... (starttime is [19])."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def processes() -> dict[int, list[str]]:
    """Every live process's stat fields, by pid."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found[int(entry.name)] = stat_fields(int(entry.name))
    return found


def children_of(pid: int) -> list[int]:
    return sorted(p for p, f in processes().items() if int(f[1]) == pid)


def descendants(pid: int) -> set[tuple[int, str]]:
    """Every live descendant of a process, as (pid, start time): a pid reused later is another
    process, so "still alive" compares both."""
    table = processes()
    seen: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, f in table.items()
                    if int(f[1]) in frontier and f[0] != "Z"} - seen
        seen |= frontier
    return {(p, table[p][19]) for p in seen}


def alive(known: set[tuple[int, str]]) -> list[int]:
    """Which of these (pid, start time) are still running (zombies count as gone)."""
    table = processes()
    return sorted(p for p, start in known if p in table and table[p][19] == start
                  and table[p][0] != "Z")


def group_members(pgids: set[int]) -> dict[int, list[int]]:
    """Live processes (not zombies) in each of these process groups."""
    members: dict[int, list[int]] = {g: [] for g in pgids}
    for pid, f in processes().items():
        if int(f[2]) in pgids and f[0] != "Z":
            members[int(f[2])].append(pid)
    return members


# -- the fake IdP and the sidecar ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_idp(key: BenchKey) -> AsyncIterator[str]:
    """OIDC discovery naming itself as the issuer, and the key's JWKS, on 127.0.0.1."""
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"

    async def discovery(request: web.Request) -> web.Response:
        return web.json_response({"issuer": issuer, "jwks_uri": issuer + "/jwks"})

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(key.jwks())

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield issuer
    finally:
        await runner.cleanup()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if this script dies without cleaning up."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def sidecar_env(issuer: str, port: int, argv: list[str], sessions: int) -> dict[str, str]:
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG")  # noqa: TID251
           if name in os.environ}  # noqa: TID251 - the script builds its child's environment
    env.update({
        "HOST": "127.0.0.1", "PORT": str(port), "OIDC_ISSUER_URL": issuer,
        "OIDC_AUDIENCE": AUDIENCE, "RESOURCE_URL": f"http://127.0.0.1:{port}/mcp",
        "ALLOW_ALL_AUTHENTICATED": "true", "RATE_LIMIT_RPM": "0", "LOG_LEVEL": "info",
        "LOG_FORMAT": "json", "EVENT_LOOP": "asyncio",
        "MCP_SPAWN_CMD": json.dumps(argv), "MCP_SPAWN_TRANSPORT": "stdio",
        "MCP_SPAWN_SCOPE": "session",
        "MCP_SPAWN_MAX_PROCESSES": str(sessions + 1),  # the warm-up's child may still be stopping
        "MCP_SPAWN_MAX_PER_SUBJECT": "1",  # one session per subject: one user, one process
        "MCP_SPAWN_IDLE_SECONDS": "3600",  # idle children must stay for the measurement
    })
    return env


@dataclass
class Sidecar:
    process: asyncio.subprocess.Process
    origin: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


async def start_sidecar(issuer: str, argv: list[str], sessions: int, log: Path) -> Sidecar:
    port = free_port()
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "oauth_sidecar", env=sidecar_env(issuer, port, argv, sessions),
            cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=out,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent)
    return Sidecar(process, f"http://127.0.0.1:{port}", log)


async def wait_ready(http: aiohttp.ClientSession, sidecar: Sidecar) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if sidecar.process.returncode is not None:
            raise SetupError(f"the sidecar exited with {sidecar.process.returncode}: "
                             f"{tail(sidecar.log)}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.get(sidecar.origin + "/readyz",
                                timeout=aiohttp.ClientTimeout(total=2)) as ready:
                if ready.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise SetupError(f"the sidecar was not ready within {READY_TIMEOUT:.0f} s: {tail(sidecar.log)}")


def tail(log: Path, lines: int = 10) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


# -- sessions ------------------------------------------------------------------------------------


def last_message(text: str, content_type: str) -> Any:
    """The JSON-RPC message of a JSON answer, or the last `data:` of an event stream."""
    if content_type == "text/event-stream":
        data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        text = data[-1] if data else ""
    try:
        return json.loads(text)
    except ValueError:
        return None


async def open_session(http: aiohttp.ClientSession, origin: str, token: str) -> tuple[str, float]:
    """initialize, then notifications/initialized: the session id, and the initialize's time."""
    url = origin + "/mcp"
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT,
               "Content-Type": "application/json"}
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL, "capabilities": {},
        "clientInfo": {"name": "bench-stdio-memory", "version": "1.0.0"}}}
    started = time.monotonic()
    async with http.post(url, json=initialize, headers=headers) as answer:
        text = await answer.text()
        session_id = answer.headers.get("Mcp-Session-Id", "")
        message = last_message(text, answer.content_type)
    took = time.monotonic() - started
    result = message.get("result") if isinstance(message, dict) else None
    if answer.status != 200 or not session_id or not isinstance(result, dict) or (
            "serverInfo" not in result):
        raise SetupError(f"initialize answered {answer.status} {answer.content_type}: "
                         f"{text[:300]}")
    headers.update({"Mcp-Session-Id": session_id, "MCP-Protocol-Version": PROTOCOL})
    async with http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                         headers=headers) as done:
        await done.read()
        if done.status != 202:
            raise SetupError(f"notifications/initialized answered {done.status}")
    return session_id, took


async def delete_session(http: aiohttp.ClientSession, origin: str, token: str,
                         session_id: str) -> None:
    async with http.delete(origin + "/mcp", headers={
            "Authorization": f"Bearer {token}", "Mcp-Session-Id": session_id,
            "MCP-Protocol-Version": PROTOCOL}) as answer:
        await answer.read()
        if answer.status >= 300:
            raise SetupError(f"DELETE of the warm-up session answered {answer.status}")


async def wait_children(pid: int, count: int, within: float) -> list[int]:
    """Until the sidecar has exactly `count` child processes; bounded."""
    deadline = time.monotonic() + within
    while True:
        found = children_of(pid)
        if len(found) == count:
            return found
        if time.monotonic() > deadline:
            raise SetupError(f"the sidecar has {len(found)} children, expected {count}")
        await asyncio.sleep(0.1)


# -- one round -----------------------------------------------------------------------------------


@dataclass
class Round:
    sessions: int = 0
    open_seconds: float = 0.0
    initialize_ms: list[float] = field(default_factory=list)
    children: list[dict[str, int]] = field(default_factory=list)  # per child group, KiB
    sidecar_before: dict[str, int] = field(default_factory=dict)
    sidecar_after: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None
    stop_seconds: float = 0.0
    left: list[int] = field(default_factory=list)  # children's processes left after SIGTERM
    log_errors: int = 0
    child_started: int = 0
    child_exited_shutdown: int = 0
    failures: list[str] = field(default_factory=list)


def sidecar_figures(pid: int) -> dict[str, int]:
    return {"rss_kib": status_kib(pid, "VmRSS"), "fds": fd_count(pid)}


def child_memory(leader: int) -> dict[str, int]:
    """Rss/Pss/Uss summed over the child's process group (it leads its own group)."""
    total = {"rss": 0, "pss": 0, "uss": 0, "processes": 0, "pid": leader}
    for pid in group_members({leader})[leader]:
        with contextlib.suppress(OSError, KeyError):
            for name, value in rollup_kib(pid).items():
                total[name] += value
            total["processes"] += 1
    return total


def count_log(log: Path, result: Round) -> None:
    with contextlib.suppress(OSError), log.open(errors="replace") as lines:
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if event.get("level") == "error":
                result.log_errors += 1
            if event.get("event") == "child_started":
                result.child_started += 1
            if event.get("event") == "child_exited" and event.get("reason") == "shutdown":
                result.child_exited_shutdown += 1


async def stop(sidecar: Sidecar, result: Round, groups: set[int],
               known: set[tuple[int, str]]) -> None:
    """SIGTERM; its exit status and time; then any process left of the children's groups or of
    the sidecar's descendants seen while the sessions were open (one that left its group)."""
    started = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        sidecar.process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_WAIT):
            result.exit_code = await sidecar.process.wait()
    except TimeoutError:
        result.failures.append(f"the sidecar did not exit within {STOP_WAIT:.0f} s of SIGTERM")
    result.stop_seconds = time.monotonic() - started
    deadline = time.monotonic() + GONE_WAIT  # reparented stragglers may take a moment to die
    while True:
        left = sorted({p for members in group_members(groups).values() for p in members}
                      | set(alive(known)))
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    result.left = left
    if left:
        result.failures.append(f"{len(left)} of the children's process(es) left: {left}")
    if result.exit_code not in (0, None):
        result.failures.append(f"the sidecar exited with {result.exit_code} on SIGTERM")


def kill_everything(sidecar: Sidecar | None, groups: set[int],
                    known: set[tuple[int, str]]) -> None:
    """The last resort after a failure: SIGKILL the sidecar's and every child's group."""
    for pgid in [*([sidecar.pid] if sidecar else []), *groups]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    for pid in alive(known):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


async def one_round(args: argparse.Namespace, key: BenchKey, issuer: str, argv: list[str],
                    directory: Path, *, index: int) -> Round:
    result = Round(sessions=args.sessions)
    tokens = [key.mint(f"bench-user-{index}-{i}") for i in range(args.sessions)]
    warmup_token = key.mint(f"bench-warmup-{index}")
    sidecar: Sidecar | None = None
    groups: set[int] = set()
    known: set[tuple[int, str]] = set()
    timeout = aiohttp.ClientTimeout(total=OPEN_TIMEOUT)
    try:
        # No kept-alive connections: the sidecar's fds "after" are the sessions' own.
        async with aiohttp.ClientSession(timeout=timeout,
                                         connector=aiohttp.TCPConnector(force_close=True)) as http:
            sidecar = await start_sidecar(issuer, argv, args.sessions,
                                          directory / f"sidecar-{index}.log")
            await wait_ready(http, sidecar)
            warm_id, _ = await open_session(http, sidecar.origin, warmup_token)
            await delete_session(http, sidecar.origin, warmup_token, warm_id)
            await wait_children(sidecar.pid, 0, 15.0)
            await asyncio.sleep(1.0)
            result.sidecar_before = sidecar_figures(sidecar.pid)

            gate = asyncio.Semaphore(args.concurrency)

            async def one(token: str) -> None:
                async with gate:
                    _, took = await open_session(http, sidecar.origin, token)
                result.initialize_ms.append(took * 1000)

            started = time.monotonic()
            await asyncio.gather(*(one(t) for t in tokens))
            result.open_seconds = time.monotonic() - started
            leaders = await wait_children(sidecar.pid, args.sessions, 15.0)
            groups = set(leaders)
            await asyncio.sleep(args.settle)
            result.children = [child_memory(leader) for leader in leaders]
            known = descendants(sidecar.pid)
            result.sidecar_after = sidecar_figures(sidecar.pid)
            # Every session idle and every child alive through the settle.
            if len(children_of(sidecar.pid)) != args.sessions:
                result.failures.append("a child exited while idle")
        await stop(sidecar, result, groups, known)
        if result.failures:  # recorded: now nothing of this round may outlive it
            kill_everything(sidecar, groups, known)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_WAIT):
                    await sidecar.process.wait()
    except BaseException:
        kill_everything(sidecar, groups, known)
        if sidecar is not None:
            with contextlib.suppress(TimeoutError, ProcessLookupError):
                async with asyncio.timeout(KILL_WAIT):
                    await sidecar.process.wait()
        raise
    count_log(sidecar.log, result)
    if result.log_errors:
        result.failures.append(f"the sidecar logged {result.log_errors} error line(s) "
                               f"({sidecar.log})")
    if result.child_started != args.sessions + 1:
        result.failures.append(f"child_started logged {result.child_started} times, expected "
                               f"{args.sessions + 1} (the warm-up's included)")
    return result


# -- report --------------------------------------------------------------------------------------


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def round_summary(r: Round) -> dict[str, float]:
    n = max(1, r.sessions)
    kib = 1024.0
    return {
        "rss_mean_mib": mean([c["rss"] for c in r.children]) / kib,
        "rss_max_mib": max((c["rss"] for c in r.children), default=0) / kib,
        "pss_mean_mib": mean([c["pss"] for c in r.children]) / kib,
        "pss_max_mib": max((c["pss"] for c in r.children), default=0) / kib,
        "uss_mean_mib": mean([c["uss"] for c in r.children]) / kib,
        "uss_max_mib": max((c["uss"] for c in r.children), default=0) / kib,
        "pss_total_mib": sum(c["pss"] for c in r.children) / kib,
        "processes_per_child": mean([c["processes"] for c in r.children]),
        "sidecar_rss_before_mib": r.sidecar_before.get("rss_kib", 0) / kib,
        "sidecar_rss_after_mib": r.sidecar_after.get("rss_kib", 0) / kib,
        "sidecar_kib_per_session": (r.sidecar_after.get("rss_kib", 0)
                                    - r.sidecar_before.get("rss_kib", 0)) / n,
        "sidecar_fds_before": r.sidecar_before.get("fds", -1),
        "sidecar_fds_after": r.sidecar_after.get("fds", -1),
        "sidecar_fds_per_session": (r.sidecar_after.get("fds", 0)
                                    - r.sidecar_before.get("fds", 0)) / n,
        "open_seconds": r.open_seconds,
        "initialize_p50_ms": statistics.median(r.initialize_ms) if r.initialize_ms else 0.0,
        "initialize_max_ms": max(r.initialize_ms, default=0.0),
        "stop_seconds": r.stop_seconds,
    }


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) if i in (0, len(row) - 1) else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in [header, ["-" * w for w in widths], *rows]]


def report(args: argparse.Namespace, argv: list[str], rounds: list[Round],
           load: tuple[float, float]) -> str:
    summaries = [round_summary(r) for r in rounds]
    labelled = [(str(i), s) for i, s in enumerate(summaries, 1)]
    if len(rounds) > 1:
        labelled.append(("median", {k: statistics.median(s[k] for s in summaries)
                                    for k in summaries[0]}))
    out = [f"stdio children behind the bridge: --server {args.server} ({' '.join(argv)}), "
           f"{args.sessions} idle sessions (one subject each, MCP_SPAWN_SCOPE=session), "
           f"{args.rounds} round(s) of a fresh sidecar; load average {load[0]:.2f} at start, "
           f"{load[1]:.2f} at end ({os.cpu_count()} CPUs)", "",
           f"each idle child (its process group, /proc/<pid>/smaps_rollup after {args.settle:g} s "
           "idle; USS = private clean + dirty, what stopping it frees; PSS: shared pages split "
           "among their users), MiB"]
    out += table(["round", "RSS mean", "RSS max", "PSS mean", "PSS max", "USS mean", "USS max",
                  "all children PSS", "processes"],
                 [[name, *(f"{s[k]:.1f}" for k in (
                     "rss_mean_mib", "rss_max_mib", "pss_mean_mib", "pss_max_mib",
                     "uss_mean_mib", "uss_max_mib", "pss_total_mib")),
                   f"{s['processes_per_child']:.0f}"] for name, s in labelled])
    out += ["", "the sidecar (VmRSS and open fds after a warm-up session, then with every session "
            "open and no client connection); open: every session's initialize + "
            f"notifications/initialized, {args.concurrency} at a time; then SIGTERM"]
    stops = [f"exit {r.exit_code} in {r.stop_seconds:.1f} s, {len(r.left)} process(es) left, "
             f"child_exited reason=shutdown x{r.child_exited_shutdown}" for r in rounds]
    out += table(["round", "RSS MiB before", "after", "KiB/session", "fds before", "after",
                  "fds/session", "open s", "initialize p50 ms", "max ms", "SIGTERM"],
                 [[name, f"{s['sidecar_rss_before_mib']:.1f}", f"{s['sidecar_rss_after_mib']:.1f}",
                   f"{s['sidecar_kib_per_session']:.0f}", f"{s['sidecar_fds_before']:.0f}",
                   f"{s['sidecar_fds_after']:.0f}", f"{s['sidecar_fds_per_session']:.2f}",
                   f"{s['open_seconds']:.1f}", f"{s['initialize_p50_ms']:.0f}",
                   f"{s['initialize_max_ms']:.0f}", stops[i] if i < len(stops) else ""]
                  for i, (name, s) in enumerate(labelled)])
    failures = [f"round {i}: {f}" for i, r in enumerate(rounds, 1) for f in r.failures]
    out.append("")
    out.append("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures))
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", choices=SERVERS, default="echo", help="the stdio server [echo]")
    p.add_argument("--sessions", type=int, default=50, help="idle sessions to open [50]")
    p.add_argument("--rounds", type=int, default=3, help="fresh sidecars, one after another [3]")
    p.add_argument("--concurrency", type=int, default=4, help="sessions opened at once [4]")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds idle before the children are measured [5]")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write every figure")
    p.add_argument("--keep", action="store_true", help="keep the sidecars' logs")
    a = p.parse_args(argv)
    if min(a.sessions, a.rounds, a.concurrency) < 1 or a.settle < 0:
        p.error("--sessions, --rounds and --concurrency must be positive, --settle >= 0")
    return a


async def run(args: argparse.Namespace, argv: list[str], directory: Path) -> list[Round]:
    key = BenchKey(issuer="")
    rounds = []
    async with fake_idp(key) as issuer:
        key.issuer = issuer
        for index in range(args.rounds):
            print(f"stdio_memory: round {index + 1}/{args.rounds}: {args.sessions} sessions of "
                  f"{args.server}", flush=True)
            rounds.append(await one_round(args, key, issuer, argv, directory, index=index))
    return rounds


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="stdio-memory-"))
    load_start = os.getloadavg()[0]
    try:
        server = command(args.server)
        rounds = asyncio.run(run(args, server, directory))
    except (SetupError, TimeoutError, aiohttp.ClientError, OSError) as exc:
        print(f"stdio_memory: failed: {exc or type(exc).__name__}; logs in {directory}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nstdio_memory: interrupted; everything stopped. Logs in {directory}",
              file=sys.stderr)
        return 130
    print()
    print(report(args, server, rounds, (load_start, os.getloadavg()[0])))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({
            "server": args.server, "command": server, "sessions": args.sessions,
            "concurrency": args.concurrency, "settle_s": args.settle,
            "rounds": [{**asdict(r), "summary": round_summary(r)} for r in rounds]},
            indent=2) + "\n")
        print(f"stdio_memory: results written to {args.json_path}")
    failed = any(r.failures for r in rounds)
    if args.keep or failed:
        print(f"stdio_memory: logs kept in {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
