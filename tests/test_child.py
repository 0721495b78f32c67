"""Spawn mode with real child processes: configuration, environment, readiness, supervision, logs
and shutdown of the MCP server the sidecar runs itself (oauth_sidecar.upstream.child).

Children are tests/children/fake_mcp_server.py (a scriptable stand-in) and the official-SDK
tests/mcp_echo_server.py (the `mcp` package from PyPI). In-process sidecars run the production
create_app(load(env)); `python -m oauth_sidecar` subprocesses cover exit codes and signals. Every
wait is bounded, and after every test each child (and grandchild) pid must be gone: a zombie
whose parent is this test process counts as alive, since reaping it is the sidecar's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import AUDIENCE, RESOURCE_URL, FakeIdp, SidecarServer, bearer
from mcp_client_probe import call_echo
from processes import PROCESS_TIMEOUT, REPO, free_port, run_cli
from redis_server import RedisServer
from structlog.testing import capture_logs

from oauth_sidecar.app import CHILD, IDP, create_app
from oauth_sidecar.config import CHILD_ENV_FORBIDDEN, ConfigError, load
from oauth_sidecar.secret_mask import MARK
from oauth_sidecar.upstream import child as child_module
from oauth_sidecar.upstream.child import (
    LINE_BURST,
    LINES_PER_SECOND,
    MAX_LINE,
    ChildProcess,
    ChildStartError,
    ChildState,
    port_accepts,
)

FAKE = Path(__file__).resolve().parent / "children" / "fake_mcp_server.py"
ECHO_SERVER = Path(__file__).resolve().parent / "mcp_echo_server.py"
ISSUER = "https://idp.example.test"  # for load()-only tests: nothing is fetched
GONE_WITHIN = 5.0  # seconds a stopped process gets to disappear (reaped) after a test
STARTUP = 20.0  # seconds a child gets to become ready (the SDK server imports a lot)
FAST_BACKOFF = 0.05  # seconds: child.BACKOFF_FIRST for tests that are not about the backoff
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=2)

Events = Sequence[Mapping[str, Any]]
Client = TestClient[web.Request, web.Application]


def fake(mode: str, *args: str) -> str:
    """MCP_SPAWN_CMD (a JSON array) running the fake server in `mode`."""
    return json.dumps([sys.executable, str(FAKE), mode, *args])


def base_env(issuer: str, **extra: str) -> dict[str, str]:
    env = {
        "OIDC_ISSUER_URL": issuer,
        "OIDC_AUDIENCE": AUDIENCE,
        "RESOURCE_URL": RESOURCE_URL,
        "JWKS_COOLDOWN_SECONDS": "1",
        "ALLOW_ALL_AUTHENTICATED": "true",
        "RATE_LIMIT_RPM": "0",
    }
    env.update(extra)
    return env


def spawn_env(issuer: str, command: str, port: int, **extra: str) -> dict[str, str]:
    """A spawn-mode environment: MCP_SPAWN_CMD/PORT instead of MCP_UPSTREAM_URL."""
    return base_env(issuer, MCP_SPAWN_CMD=command, MCP_SPAWN_PORT=str(port), **extra)


def named(events: Events, name: str, **match: object) -> list[Mapping[str, Any]]:
    return [e for e in events if e.get("event") == name
            and all(e.get(k) == v for k, v in match.items())]


async def until(predicate: Callable[[], bool], within: float, what: str) -> float:
    """Bounded wait; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def event(
    events: Events, name: str, within: float = 5.0, **match: object
) -> Mapping[str, Any]:
    await until(lambda: bool(named(events, name, **match)), within, f"event {name} {match}")
    return named(events, name, **match)[0]


# -- no process left behind -----------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) from /proc, or None when the pid does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process got the pid: ours is long gone
        return True
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, parent = stat
    # A zombie still exists until its parent reaps it. One of ours (an in-process sidecar's
    # child) is a bug and counts as alive; one reparented to init after its sidecar process
    # exited is init's to reap.
    return state == "Z" and parent != os.getpid()


@dataclass
class Leftovers:
    """Pids a test must not leave behind: every child_started pid, plus those tracked."""

    logs: Events
    extra: set[int] = field(default_factory=set)

    def track(self, pid: int) -> None:
        self.extra.add(pid)

    def pids(self) -> set[int]:
        return self.extra | {int(e["pid"]) for e in named(self.logs, "child_started")}


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as events:
        yield events


@pytest.fixture(autouse=True)
def leftovers(logs: list[MutableMapping[str, Any]]) -> Iterator[Leftovers]:
    tracker = Leftovers(logs)
    yield tracker
    deadline = time.monotonic() + GONE_WITHIN
    alive = {pid for pid in tracker.pids() if not is_gone(pid)}
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = {pid for pid in alive if not is_gone(pid)}
    described = {pid: _proc_stat(pid) for pid in alive}
    for pid in alive:  # clean up after the sidecar (only our own python children), then fail
        with contextlib.suppress(OSError):
            if b"python" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
    assert not alive, f"processes left behind (pid: (state, parent)): {described}"


# -- an in-process sidecar in spawn mode ----------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    body: Any
    seconds: float


@dataclass
class Spawned:
    client: Client
    app: web.Application
    token: str

    @property
    def child(self) -> ChildProcess:
        return self.app[CHILD]

    def url(self, path: str) -> str:
        return str(self.client.make_url(path))

    async def call(self, path: str, method: str = "GET", *, auth: bool = True) -> Answer:
        started = time.monotonic()
        headers = bearer(self.token) if auth else {}
        async with asyncio.timeout(10):
            response = await self.client.request(method, path, headers=headers)
            text = await response.text()
        seconds = time.monotonic() - started
        body = json.loads(text) if text else None
        return Answer(response.status, dict(response.headers), body, seconds)

    async def ready_child(self, within: float = STARTUP) -> None:
        await until(lambda: self.child.ready, within, f"child ready ({self.child.state})")


SpawnFactory = Callable[..., Awaitable[Spawned]]


@pytest.fixture
async def spawn_sidecar(idp: FakeIdp, leftovers: Leftovers) -> AsyncIterator[SpawnFactory]:
    """Start the production app in spawn mode (no MCP_UPSTREAM_URL) with its keys loaded."""
    clients: list[Client] = []

    async def start(
        command: str, port: int, *, on_give_up: Callable[[], None] | None = None, **extra: str
    ) -> Spawned:
        config = load(spawn_env(idp.issuer, command, port, **extra))
        app = create_app(config, on_child_give_up=on_give_up)
        server = SidecarServer(app, config)
        await server.start_server()
        client: Client = TestClient(server)
        await client.start_server()
        clients.append(client)
        await until(lambda: app[IDP].ready, 5.0, "signing keys loaded")
        return Spawned(client, app, idp.mint())

    yield start
    for client in clients:
        await client.close()


# -- a `python -m oauth_sidecar` process in spawn mode --------------------------------------------


@dataclass
class SidecarRun:
    proc: asyncio.subprocess.Process
    port: int
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)
    """Every stdout line as written, before parsing."""
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def until_ready(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + PROCESS_TIMEOUT + STARTUP
        while True:
            if self.proc.returncode is not None:
                raise AssertionError(f"sidecar exited with {self.proc.returncode}: "
                                     f"{self.events[-5:]} {''.join(self.stderr)}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(self.base + "/readyz") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"sidecar never ready: {self.events[-5:]}")
            await asyncio.sleep(0.05)

    async def exited(self, within: float = PROCESS_TIMEOUT) -> int:
        """Bounded wait for the exit, then for the rest of its output."""
        code = await asyncio.wait_for(self.proc.wait(), within)
        await asyncio.wait(self.readers, timeout=5.0)
        return code

    async def stop(self) -> float:
        """SIGTERM; returns the seconds until it exited."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        await self.exited()
        return time.monotonic() - started


@asynccontextmanager
async def run_sidecar(
    env: dict[str, str], leftovers: Leftovers, prefix: Sequence[str] = ()
) -> AsyncIterator[SidecarRun]:
    """The real entry point (run through `prefix`, e.g. setpriv); its JSON log lines are
    collected; always stopped and reaped."""
    proc = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-m", "oauth_sidecar", env=env, cwd=REPO, limit=1 << 20,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    leftovers.track(proc.pid)
    run = SidecarRun(proc, int(env["PORT"]))

    async def read_stdout() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            run.stdout.append(line)
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = {"event": "<not json>", "line": line}
            run.events.append(parsed)
            if parsed.get("event") == "child_started":
                leftovers.track(int(parsed["pid"]))

    async def read_stderr() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            run.stderr.append(raw.decode("utf-8", "replace"))

    run.readers = [asyncio.create_task(read_stdout()), asyncio.create_task(read_stderr())]
    try:
        yield run
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), PROCESS_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        _, late = await asyncio.wait(run.readers, timeout=5.0)
        for task in late:
            task.cancel()


def process_env(idp: FakeIdp, command: str, spawn_port: int, **extra: str) -> dict[str, str]:
    return spawn_env(idp.issuer, command, spawn_port, HOST="127.0.0.1", PORT=str(free_port()),
                     LOG_FORMAT="json", SHUTDOWN_TIMEOUT_SECONDS="1", **extra)


# -- configuration --------------------------------------------------------------------------------


def config_problems(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(base_env(ISSUER, **env))
    return caught.value.problems


def test_spawn_cmd_is_split_like_shell_words_with_quotes_honoured() -> None:
    command = (f"{shlex.quote(sys.executable)} {FAKE} serve 8765 --label \"two words\" "
               "'single $quoted' $HOME")
    config = load(base_env(ISSUER, MCP_SPAWN_CMD=command, MCP_SPAWN_PORT="8765"))
    assert config.spawn is not None
    assert config.spawn.argv == (sys.executable, str(FAKE), "serve", "8765", "--label",
                                 "two words", "single $quoted", "$HOME")  # no shell expansion
    assert config.spawn.port == 8765
    assert config.upstream.origin == "http://127.0.0.1:8765"


def test_spawn_cmd_as_a_json_array_is_taken_word_for_word() -> None:
    argv = [sys.executable, str(FAKE), "serve", "8765", "it's \"quoted\"", "$HOME", "*"]
    config = load(base_env(ISSUER, MCP_SPAWN_CMD=json.dumps(argv), MCP_SPAWN_PORT="8765"))
    assert config.spawn is not None
    assert config.spawn.argv == tuple(argv)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"MCP_SPAWN_CMD": fake("serve", "8765"), "MCP_SPAWN_TRANSPORT": "http"},
         "MCP_SPAWN_TRANSPORT=http needs MCP_SPAWN_PORT"),
        ({"MCP_SPAWN_PORT": "8765"}, "MCP_SPAWN_PORT is set without MCP_SPAWN_CMD"),
        ({"MCP_SPAWN_CMD": fake("serve", "8765"), "MCP_SPAWN_PORT": "8765",
          "MCP_UPSTREAM_URL": "http://127.0.0.1:9000"},
         "MCP_UPSTREAM_URL and MCP_SPAWN_CMD are both set"),
        ({"MCP_SPAWN_CMD": f'["{sys.executable}", ', "MCP_SPAWN_PORT": "8765"},
         "MCP_SPAWN_CMD looks like JSON but is not an array of strings"),
        ({"MCP_SPAWN_CMD": f'["{sys.executable}", 8765]', "MCP_SPAWN_PORT": "8765"},
         "MCP_SPAWN_CMD looks like JSON but is not an array of strings"),
        ({"MCP_SPAWN_CMD": "[]", "MCP_SPAWN_PORT": "8765"},
         "MCP_SPAWN_CMD looks like JSON but is not an array of strings"),
        ({"MCP_SPAWN_CMD": f'{sys.executable} "unterminated', "MCP_SPAWN_PORT": "8765"},
         "MCP_SPAWN_CMD cannot be split into words"),
        ({"MCP_SPAWN_CMD": fake("serve", "8765"), "MCP_SPAWN_PORT": "70000"}, "MCP_SPAWN_PORT"),
        ({"MCP_SPAWN_CMD": fake("serve", "8765"), "MCP_SPAWN_PORT": "8765",
          "MCP_SPAWN_READY_PATH": "ready"}, "MCP_SPAWN_READY_PATH='ready' must start with /"),
        ({"MCP_SPAWN_CMD": fake("serve", "8765"), "MCP_SPAWN_PORT": "8765",
          "MCP_SPAWN_RESTART": "sometimes"}, "MCP_SPAWN_RESTART"),
    ],
    ids=["http-without-port", "port-without-cmd", "both-upstreams", "truncated-json",
         "json-non-string", "json-empty", "unbalanced-quote", "port-out-of-range",
         "relative-ready-path", "unknown-restart"],
)
def test_inconsistent_spawn_settings_are_configuration_errors(
    env: dict[str, str], problem: str
) -> None:
    problems = config_problems(**env)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("name", sorted(CHILD_ENV_FORBIDDEN))
def test_spawn_env_naming_a_sidecar_secret_is_refused(name: str) -> None:
    problems = config_problems(MCP_SPAWN_CMD=fake("serve", "8765"), MCP_SPAWN_PORT="8765",
                               MCP_SPAWN_ENV=f"HOME, {name}", **{name: "the-sidecars-own"})
    assert f"MCP_SPAWN_ENV lists {name}: the sidecar's secrets never go to the child" in problems


def unrunnable(kind: str, tmp_path: Path) -> tuple[str, str]:
    """A program MCP_SPAWN_CMD cannot run, and how the problem describes it."""
    if kind == "missing-on-path":
        return "no-such-mcp-server", "not found"
    if kind == "missing-path":
        return str(tmp_path / "no-such-mcp-server"), "not found"
    if kind == "not-executable":
        script = tmp_path / "server.sh"
        script.write_text("#!/bin/sh\nexit 0\n")
        script.chmod(0o644)
        return str(script), "not executable"
    return str(tmp_path), "not executable"  # a directory


def unrunnable_env(program: str) -> dict[str, str]:
    return base_env(ISSUER, MCP_SPAWN_CMD=f"{shlex.quote(program)} --port 8765",
                    MCP_SPAWN_PORT="8765", PATH="/usr/bin:/bin")


@pytest.mark.parametrize("kind", ["missing-on-path", "missing-path", "not-executable", "directory"])
def test_unrunnable_program_is_a_configuration_error(tmp_path: Path, kind: str) -> None:
    program, shown = unrunnable(kind, tmp_path)
    with pytest.raises(ConfigError) as caught:
        load(unrunnable_env(program))
    assert caught.value.problems == [
        f"MCP_SPAWN_CMD program {program!r} is {shown} (PATH of the child: /usr/bin:/bin)"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing-on-path", "not-executable"])
async def test_unrunnable_program_exits_2_with_a_clean_message(tmp_path: Path, kind: str) -> None:
    program, shown = unrunnable(kind, tmp_path)
    code, stdout, stderr = await run_cli(env=unrunnable_env(program))
    assert code == 2
    assert stdout == ""
    assert "Traceback" not in stderr
    assert stderr.splitlines() == [
        "oauth-sidecar: cannot start, the configuration has problems:",
        f"  - MCP_SPAWN_CMD program {program!r} is {shown} (PATH of the child: /usr/bin:/bin)",
    ]


# -- environment ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_child_environment_is_an_allow_list_without_the_sidecars_secrets(
    spawn_sidecar: SpawnFactory, idp: FakeIdp, tmp_path: Path
) -> None:
    # Shell words with a quoted path containing spaces, run for real.
    script = tmp_path / "my mcp server" / "server.py"
    script.parent.mkdir()
    shutil.copy(FAKE, script)
    bearer_file = tmp_path / "upstream-token"
    bearer_file.write_text("upstream-bearer-secret\n")
    port = free_port()
    sidecar = await spawn_sidecar(
        f"{shlex.quote(sys.executable)} '{script}' serve {port}", port,
        PATH="/usr/bin:/bin", HOME="/home/mcp", LANG="C.UTF-8", TZ="UTC",
        MCP_SPAWN_ENV="GITHUB_TOKEN NOT_SET_ANYWHERE", GITHUB_TOKEN="ghp_listed",
        MCP_SPAWN_ENV_FOO="bar", UNLISTED="not-for-the-child",
        STATIC_CLIENT_ID="client-1", STATIC_CLIENT_SECRET="static-client-secret",
        STATE_SECRET="s" * 40, RATE_LIMIT_STORAGE_URI="memory://",
        MCP_UPSTREAM_BEARER_FILE=str(bearer_file),
    )
    await sidecar.ready_child()
    answer = await sidecar.call("/env")
    assert answer.status == 200, answer
    seen: dict[str, str] = answer.body["env"]
    expected = {"PATH": "/usr/bin:/bin", "HOME": "/home/mcp", "LANG": "C.UTF-8", "TZ": "UTC",
                "GITHUB_TOKEN": "ghp_listed", "FOO": "bar"}
    assert seen == expected
    everything = json.dumps(seen)
    for secret in ("static-client-secret", "s" * 40, "memory://", str(bearer_file), idp.issuer):
        assert secret not in everything


# -- the sidecar's secrets out of the child's reach -----------------------------------------------

SNOOP = Path(__file__).resolve().parent / "children" / "snoop.py"
# The sidecar as the image runs it: without any capability. The kernel lets a process read
# another's environ and memory when both have the same uid, unless the target is not dumpable
# and the reader lacks CAP_SYS_PTRACE; root keeps that capability, so as root the sidecar (and
# the child it spawns: the bounding set is inherited) runs with every capability dropped.
NO_CAPABILITIES = ("setpriv", "--inh-caps=-all", "--bounding-set=-all")


def capability_free() -> tuple[str, ...]:
    """The prefix that runs the sidecar as the image does (no capability), or a skip."""
    if sys.platform != "linux":
        pytest.skip("PR_SET_DUMPABLE and /proc/<pid>/environ are Linux's")
    if os.geteuid() != 0:
        return ()  # no capabilities already
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, and setpriv (util-linux) is missing to drop the "
                    "capabilities: root reads any process's environ, so the test would prove "
                    "nothing")
    return NO_CAPABILITIES


@pytest.mark.slow
async def test_a_child_reads_no_secret_of_the_sidecar_and_the_log_masks_every_one(
    idp: FakeIdp, leftovers: Leftovers, tmp_path: Path
) -> None:
    """The child runs under the sidecar's uid. It reads /proc/<sidecar>/environ (refused: the
    sidecar is not dumpable), prints a secret it was given and the upstream credential it
    receives: child_output shows MARK, and no secret is anywhere in the sidecar's output."""
    prefix = capability_free()
    client_secret = "client-secret-" + secrets.token_hex(8)
    state_secret = secrets.token_hex(32)
    upstream_token = "upstream-token-" + secrets.token_hex(8)
    # A / ? and # in the password, percent-encoded as the URI needs them: parsed, and working.
    redis = RedisServer(free_port(), tmp_path, password="pa/ss?wd#" + secrets.token_hex(6))
    await redis.start()
    bearer_file, given = tmp_path / "upstream-token", tmp_path / "given-secret"
    bearer_file.write_text(upstream_token + "\n")
    given.write_text(client_secret + "\n")
    port = free_port()
    env = process_env(
        idp, json.dumps([sys.executable, str(SNOOP), str(port), str(given)]), port,
        PATH="/usr/bin:/bin", RATE_LIMIT_RPM="100", RATE_LIMIT_STORAGE_URI=redis.uri,
        STATIC_CLIENT_ID="mcp-client", STATIC_CLIENT_SECRET=client_secret,
        STATE_SECRET=state_secret, MCP_UPSTREAM_BEARER_FILE=str(bearer_file),
    )
    try:
        async with run_sidecar(env, leftovers, prefix) as run, \
                aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            await run.until_ready(session)
            async with session.post(run.base + "/mcp", data=b"{}",
                                    headers=bearer(idp.mint())) as response:
                assert response.status == 200
            await until(lambda: len(named(run.events, "child_output")) >= 3, 5.0,
                        "the child's three lines")
            await run.stop()
    finally:
        await redis.stop()
    lines = [e["line"] for e in named(run.events, "child_output")]
    assert lines == ["parent environ unreadable: Permission denied", f"given secret: {MARK}",
                     f"upstream credential: {MARK}"]
    output = "\n".join(run.stdout) + "".join(run.stderr)
    for secret in (client_secret, state_secret, upstream_token, redis.password,
                   quote(redis.password, safe="")):
        assert secret not in output
    assert not named(run.events, "process_inspectable")
    assert not named(run.events, "rate_limit_storage_failed")  # Redis took the password
    assert run.events[0]["rate_limit_storage"] == f"redis://***@127.0.0.1:{redis.port}/0"


# -- the happy path, end to end -------------------------------------------------------------------


@pytest.mark.slow
async def test_sdk_client_calls_echo_on_a_spawned_official_sdk_server(
    spawn_sidecar: SpawnFactory, idp: FakeIdp
) -> None:
    port = free_port()
    command = json.dumps([sys.executable, str(ECHO_SERVER), "--host", "127.0.0.1",
                          "--port", str(port)])
    sidecar = await spawn_sidecar(command, port, MCP_SPAWN_READY_TIMEOUT_SECONDS="30")
    await sidecar.ready_child()
    ready = await sidecar.call("/readyz", auth=False)
    assert ready.status == 200, ready.body
    assert ready.body["checks"]["child"] == "ready"
    async with asyncio.timeout(20):
        text = await call_echo(sidecar.url("/mcp"), idp.mint(), "hello from a spawned server")
    assert text == "hello from a spawned server"


# -- readiness ------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_child_that_never_listens_gets_fast_503s_and_is_killed_and_retried(
    spawn_sidecar: SpawnFactory, logs: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(child_module, "BACKOFF_FIRST", FAST_BACKOFF)
    port = free_port()
    sidecar = await spawn_sidecar(fake("never-listen"), port,
                                  MCP_SPAWN_READY_TIMEOUT_SECONDS="1")
    proxied = await sidecar.call("/mcp", "POST")
    assert proxied.status == 503
    assert proxied.seconds < 0.5  # at once, not after the readiness timeout
    assert proxied.headers["Retry-After"] == "2"
    assert proxied.body["error"] == "upstream_unavailable"
    assert "not ready (starting)" in proxied.body["error_description"]
    ready = await sidecar.call("/readyz", auth=False)
    assert ready.status == 503
    assert ready.body["status"] == "not_ready"
    assert ready.body["checks"]["child"] == "starting"

    failure = await event(logs, "child_start_failed", within=5)
    assert failure["reason"] == "not ready after 1 s"
    first = int(named(logs, "child_started")[0]["pid"])
    await until(lambda: is_gone(first), 5, "the unready child is killed")
    await until(lambda: len(named(logs, "child_started")) >= 2, 5, "the child is started again")
    assert int(named(logs, "child_started")[1]["pid"]) != first
    assert sidecar.child.restarts >= 1
    assert sidecar.child.last_exit == "not ready after 1 s"


@pytest.mark.slow
async def test_child_exiting_before_it_listens_reports_exit_code_7_without_waiting(
    spawn_sidecar: SpawnFactory, logs: Events
) -> None:
    port = free_port()
    sidecar = await spawn_sidecar(fake("exit-now", "7"), port, MCP_SPAWN_MAX_RESTARTS="0",
                                  MCP_SPAWN_READY_TIMEOUT_SECONDS="60")
    took = await until(lambda: sidecar.child.state is ChildState.FAILED, 10, "given up")
    assert took < 5  # the exit won the race against the 60 s readiness timeout
    ready = await sidecar.call("/readyz", auth=False)
    assert ready.status == 503
    assert ready.body["checks"]["child"] == "failed"  # how it exited: the log only
    assert "exit code" not in json.dumps(ready.body)
    assert sidecar.child.last_exit == "exited before listening (exit code 7)"
    assert named(logs, "child_start_failed")[0]["reason"] == sidecar.child.last_exit
    assert "exit code 7" in named(logs, "not_ready")[0]["child"]
    await event(logs, "child_output", stream="stdout", line="exiting with 7")


@pytest.mark.slow
async def test_ready_path_answering_500_is_not_ready_until_it_answers_200(
    spawn_sidecar: SpawnFactory, logs: Events, tmp_path: Path
) -> None:
    status_file = tmp_path / "probe-status"

    def answer_probes_with(status: int) -> None:
        staged = tmp_path / "probe-status.new"
        staged.write_text(str(status))
        staged.replace(status_file)  # atomic: the child never reads half a file

    answer_probes_with(500)
    port = free_port()
    sidecar = await spawn_sidecar(
        fake("probe-status", str(port), str(status_file)), port,
        MCP_SPAWN_READY_PATH="/ready", MCP_SPAWN_READY_TIMEOUT_SECONDS="30",
    )
    await until(lambda: len(named(logs, "child_output", line="probe answered 500")) >= 3, 10,
                "three probes answered 500")
    assert await port_accepts(port)  # it listens...
    assert sidecar.child.state is ChildState.STARTING  # ...but is not ready
    assert (await sidecar.call("/readyz", auth=False)).status == 503
    assert (await sidecar.call("/anything")).status == 503

    answer_probes_with(200)
    await sidecar.ready_child(within=5)
    # The child prints after answering: its stdout line may trail the 200 the sidecar saw.
    await until(lambda: bool(named(logs, "child_output", line="probe answered 200")), 5,
                "the child's line about the 200 it answered")
    proxied = await sidecar.call("/anything")
    assert proxied.status == 200
    assert proxied.body["pid"] == sidecar.child.pid
    assert not named(logs, "child_start_failed")


async def enter_running(child: ChildProcess) -> None:
    async with child.running():
        pytest.fail("the child was started although its port is taken")


async def test_port_taken_before_start_is_a_start_error_and_nothing_is_spawned(
    logs: Events,
) -> None:
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        config = load(spawn_env(ISSUER, fake("serve", str(port)), port))
        assert config.spawn is not None
        child = ChildProcess(config.spawn)
        with pytest.raises(ChildStartError, match=f"port {port} on 127.0.0.1 is already in use"):
            await enter_running(child)
        assert child.pid is None
        assert not named(logs, "child_started")
        assert stranger_received(stranger) == []


def stranger_received(stranger: socket.socket) -> list[bytes]:
    """Accept what connected to the stranger's socket; return what each one sent (if anything)."""
    stranger.setblocking(False)
    received: list[bytes] = []
    while True:
        try:
            conn, _ = stranger.accept()
        except BlockingIOError:
            return received
        with conn:
            conn.settimeout(2.0)
            data = conn.recv(65536)
            if data:
                received.append(data)


@pytest.mark.slow
async def test_port_taken_before_start_makes_the_process_exit_2_without_proxying(
    idp: FakeIdp, leftovers: Leftovers
) -> None:
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        env = process_env(idp, fake("serve", str(port)), port)
        async with run_sidecar(env, leftovers) as run:
            code = await run.exited()
        assert code == 2
        failed = named(run.events, "child_start_failed")
        assert len(failed) == 1, run.events
        assert failed[0]["reason"] == f"port {port} on 127.0.0.1 is already in use by another " \
                                      "process"
        assert failed[0]["level"] == "error"
        assert not named(run.events, "child_started")
        assert "Traceback" not in "".join(run.stderr)
        assert stranger_received(stranger) == []  # never a byte for the stranger
    assert not await port_accepts(run.port)  # and it never listened itself


# -- supervision ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_killed_child_gets_fast_503s_then_is_restarted_after_1_s_and_serves_again(
    spawn_sidecar: SpawnFactory, logs: Events
) -> None:
    port = free_port()
    sidecar = await spawn_sidecar(fake("serve", str(port)), port)
    await sidecar.ready_child()
    before = await sidecar.call("/pid")
    assert before.status == 200
    old = before.body["pid"]
    assert old == sidecar.child.pid

    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)
    await until(lambda: not sidecar.child.ready, 2, "the death is noticed")
    during = await sidecar.call("/pid")
    assert during.status == 503
    assert during.seconds < 0.5
    assert during.headers["Retry-After"] == "2"
    assert "not ready (backoff)" in during.body["error_description"]

    await sidecar.ready_child(within=10)
    restarted_after = time.monotonic() - killed_at
    assert 0.9 <= restarted_after < 6, restarted_after  # the first backoff is 1 s
    after = await sidecar.call("/pid")
    assert after.status == 200, after
    assert after.body["pid"] == sidecar.child.pid != old
    assert is_gone(old)
    assert named(logs, "child_exited")[0]["how"] == "killed by SIGKILL"
    assert named(logs, "child_restart_scheduled")[0]["in_seconds"] == 1.0
    ready = await sidecar.call("/readyz", auth=False)
    assert ready.body["checks"]["child"] == "ready"


@pytest.mark.slow
async def test_crash_loop_gives_up_and_readyz_reports_the_child_failed(
    spawn_sidecar: SpawnFactory, logs: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(child_module, "BACKOFF_FIRST", FAST_BACKOFF)
    port = free_port()
    sidecar = await spawn_sidecar(fake("crash-after", str(port), "2"), port,
                                  MCP_SPAWN_MAX_RESTARTS="1")
    for attempt in range(2):  # the first crash is restarted, the second one is one too many
        await sidecar.ready_child()
        pid = sidecar.child.pid
        for _ in range(2):
            answer = await sidecar.call("/pid")
            assert answer.status == 200, (attempt, answer)
            assert answer.body["pid"] == pid
        await until(lambda: not sidecar.child.ready, 5, "the crash is noticed")
    await until(lambda: sidecar.child.state is ChildState.FAILED, 5, "given up")

    given_up = await event(logs, "child_given_up")
    assert given_up["why"] == "2 failures within 300 s"
    assert given_up["last_exit"] == "exit code 3"
    assert given_up["log_level"] == "error"
    ready = await sidecar.call("/readyz", auth=False)
    assert ready.status == 503
    assert ready.body["checks"]["child"] == "failed"
    proxied = await sidecar.call("/pid")
    assert proxied.status == 503
    assert "not ready (failed)" in proxied.body["error_description"]
    await asyncio.sleep(0.3)  # many backoffs: nothing starts it again
    assert len(named(logs, "child_started")) == 2
    assert sidecar.child.gave_up


@pytest.mark.slow
@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_restart_never_makes_the_sidecar_exit_1_when_the_child_dies(
    idp: FakeIdp, leftovers: Leftovers, event_loop: str
) -> None:
    port = free_port()
    env = process_env(idp, fake("serve", str(port)), port, MCP_SPAWN_RESTART="never",
                      EVENT_LOOP=event_loop)
    async with run_sidecar(env, leftovers) as run, \
            aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        await run.until_ready(session)
        pid = int(named(run.events, "child_ready")[0]["pid"])
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        code = await run.exited(within=10)
        took = time.monotonic() - killed_at
    assert code == 1, run.stderr
    assert took < 5
    assert named(run.events, "child_given_up")[0]["why"] == "MCP_SPAWN_RESTART=never"
    assert run.events[-1]["event"] == "stopped"
    assert run.events[-1]["reason"] == "the MCP child process was given up"
    assert len(named(run.events, "child_started")) == 1  # never restarted
    assert is_gone(pid)


@pytest.mark.slow
async def test_crash_loop_with_restart_always_keeps_the_sidecar_up_reporting_failed(
    idp: FakeIdp, leftovers: Leftovers
) -> None:
    port = free_port()
    env = process_env(idp, fake("serve", str(port)), port, MCP_SPAWN_MAX_RESTARTS="0")
    async with run_sidecar(env, leftovers) as run, \
            aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        await run.until_ready(session)
        os.kill(int(named(run.events, "child_ready")[0]["pid"]), signal.SIGKILL)
        await until(lambda: bool(named(run.events, "child_given_up")), 5, "given up")
        for _ in range(5):  # it stays up and says why, for a while
            await asyncio.sleep(0.3)
            assert run.proc.returncode is None, (
                f"the sidecar exited with {run.proc.returncode} after giving up the child")
            try:
                async with session.get(run.base + "/readyz") as response:
                    body = await response.json()
            except aiohttp.ClientError as exc:
                raise AssertionError(f"/readyz unreachable after the give-up: {exc!r}") from None
            assert response.status == 503
            assert body["checks"]["child"] == "failed"


# -- child output ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_child_stdout_and_stderr_lines_become_child_output_events(
    spawn_sidecar: SpawnFactory, logs: Events
) -> None:
    port = free_port()
    await spawn_sidecar(fake("serve", str(port)), port)
    for stream, line in (("stdout", f"serving on 127.0.0.1:{port}"),
                         ("stderr", "a line on stderr"),
                         ("stdout", "a line ending in CRLF")):
        found = await event(logs, "child_output", stream=stream, line=line)
        assert found["log_level"] == "info"


@pytest.mark.slow
async def test_a_long_line_is_cut_at_4096_bytes(
    spawn_sidecar: SpawnFactory, logs: Events
) -> None:
    port = free_port()
    await spawn_sidecar(fake("long-line", str(port), "10000"), port)
    await event(logs, "child_output", line="after-long-line")
    lines = [e["line"] for e in named(logs, "child_output", stream="stdout")]
    assert lines[:2] == ["x" * MAX_LINE, "after-long-line"]


@pytest.mark.slow
async def test_a_line_longer_than_one_read_is_cut_once_not_split_into_fragments(
    spawn_sidecar: SpawnFactory, logs: Events
) -> None:
    port = free_port()
    await spawn_sidecar(fake("long-line", str(port), str(1 << 20)), port)
    await event(logs, "child_output", line="after-long-line")
    lines = [e["line"] for e in named(logs, "child_output", stream="stdout")]
    assert lines[:2] == ["x" * MAX_LINE, "after-long-line"], [len(line) for line in lines]


@pytest.mark.slow
async def test_chatty_child_is_read_continuously_but_its_log_lines_are_budgeted(
    spawn_sidecar: SpawnFactory, logs: Events
) -> None:
    port = free_port()
    started = time.monotonic()
    sidecar = await spawn_sidecar(fake("chatty", str(port)), port)
    await sidecar.ready_child()
    await asyncio.sleep(1.5)
    counted = await sidecar.call("/count")
    assert counted.status == 200
    written = counted.body["lines_written"]
    # About 128 bytes a line on average: a 64 KiB pipe holds ~500 of them, so the child could
    # only write this many because its output was read all along.
    assert written > 3_000, written
    elapsed = time.monotonic() - started
    outputs = named(logs, "child_output")
    # ...yet only the budget became log events (memory stays bounded)...
    assert len(outputs) <= LINE_BURST + LINES_PER_SECOND * elapsed + 10, len(outputs)
    assert len(outputs) < written / 2

    def accounted() -> int:  # ...and every other line was counted as dropped
        drops = named(logs, "child_output_dropped")
        return len(named(logs, "child_output")) + sum(int(e["lines"]) for e in drops)

    await until(lambda: accounted() >= written, 5, f"{written} lines logged or counted")
    drops = named(logs, "child_output_dropped")
    assert all(int(e["lines"]) > 0 for e in drops)
    assert drops[0]["log_level"] == "warning"
    outputs = named(logs, "child_output")
    assert {e["stream"] for e in outputs} == {"stdout", "stderr"}
    assert max(len(e["line"].encode()) for e in outputs) == MAX_LINE
    assert "L" * MAX_LINE in {e["line"] for e in outputs}  # the 10,000-byte lines, cut


# -- shutdown -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_sigterm_stops_the_child_and_the_sidecar_exits_0(
    idp: FakeIdp, leftovers: Leftovers, event_loop: str
) -> None:
    port = free_port()
    env = process_env(idp, fake("serve", str(port)), port, EVENT_LOOP=event_loop)
    async with run_sidecar(env, leftovers) as run:
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            await run.until_ready(session)
            pid = int(named(run.events, "child_ready")[0]["pid"])
            async with session.get(run.base + "/pid", headers=bearer(idp.mint())) as response:
                assert (await response.json())["pid"] == pid
        took = await run.stop()
    assert run.proc.returncode == 0, run.stderr
    assert took < 3
    assert is_gone(pid)  # at once: the sidecar reaped it before exiting
    assert run.events[-1]["event"] == "stopped"
    assert run.events[0]["event_loop"] == event_loop
    assert not named(run.events, "child_exited")
    assert not named(run.events, "child_given_up")


@pytest.mark.slow
async def test_child_ignoring_sigterm_is_killed_after_the_stop_timeout(
    idp: FakeIdp, leftovers: Leftovers
) -> None:
    port = free_port()
    env = process_env(idp, fake("ignore-sigterm", str(port)), port,
                      MCP_SPAWN_STOP_TIMEOUT_SECONDS="1")
    async with run_sidecar(env, leftovers) as run:
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            await run.until_ready(session)
        pid = int(named(run.events, "child_ready")[0]["pid"])
        took = await run.stop()
    assert run.proc.returncode == 0, run.stderr
    assert 1.0 <= took < 4, took  # the grace, then SIGKILL
    assert is_gone(pid)
    assert named(run.events, "child_output", line="ignoring SIGTERM")  # it did get SIGTERM
    assert run.events[-1]["event"] == "stopped"


def read_pid(path: Path) -> int | None:
    return int(path.read_text()) if path.exists() else None


async def wait_for_pid_file(path: Path, different_from: int | None = None) -> int:
    await until(lambda: read_pid(path) not in (None, different_from), 10, f"a pid in {path}")
    pid = read_pid(path)
    assert pid is not None
    return pid


@pytest.mark.slow
async def test_shutdown_stops_the_childs_grandchildren_too(
    idp: FakeIdp, leftovers: Leftovers, tmp_path: Path
) -> None:
    port, pid_file = free_port(), tmp_path / "grandchild.pid"
    env = process_env(idp, fake("fork-grandchild", str(port), str(pid_file)), port,
                      MCP_SPAWN_STOP_TIMEOUT_SECONDS="5")
    async with run_sidecar(env, leftovers) as run:
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            await run.until_ready(session)
        grandchild = await wait_for_pid_file(pid_file)
        leftovers.track(grandchild)
        child = int(named(run.events, "child_ready")[0]["pid"])
        stat = _proc_stat(grandchild)  # a real grandchild, alive
        assert stat is not None
        assert stat[0] in "RS"
        assert stat[1] == child
        took = await run.stop()
    assert run.proc.returncode == 0, run.stderr
    assert took < 4  # the group's SIGTERM reached it: no SIGKILL grace was needed
    await until(lambda: is_gone(grandchild), 2, "the grandchild is gone")
    assert is_gone(child)


@pytest.mark.slow
async def test_a_child_that_died_is_noticed_and_its_grandchild_stopped(
    spawn_sidecar: SpawnFactory, leftovers: Leftovers, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(child_module, "BACKOFF_FIRST", FAST_BACKOFF)
    port, pid_file = free_port(), tmp_path / "grandchild.pid"
    sidecar = await spawn_sidecar(fake("fork-grandchild", str(port), str(pid_file)), port)
    await sidecar.ready_child()
    grandchild = await wait_for_pid_file(pid_file)
    leftovers.track(grandchild)
    child = sidecar.child.pid
    assert child is not None
    os.kill(child, signal.SIGKILL)
    await until(lambda: not sidecar.child.ready, 2, "the death is noticed")
    await until(lambda: is_gone(grandchild), 5, "the orphaned grandchild is stopped")
    await until(lambda: sidecar.child.ready and sidecar.child.pid != child, 10, "restarted")
    leftovers.track(await wait_for_pid_file(pid_file, different_from=grandchild))
    assert (await sidecar.call("/pid")).status == 200


@pytest.mark.slow
async def test_shutdown_after_the_child_died_does_not_wait_the_grace_period(
    idp: FakeIdp, leftovers: Leftovers
) -> None:
    grace = 10.0
    port = free_port()
    # A child that ignores SIGTERM: any stop of a live one would cost the whole grace.
    env = process_env(idp, fake("ignore-sigterm", str(port)), port,
                      MCP_SPAWN_STOP_TIMEOUT_SECONDS=str(grace))
    async with run_sidecar(env, leftovers) as run:
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            await run.until_ready(session)
        pid = int(named(run.events, "child_ready")[0]["pid"])
        os.kill(pid, signal.SIGKILL)
        await until(lambda: bool(named(run.events, "child_exited")), 5, "the death is noticed")
        took = await run.stop()  # during the 1 s backoff: nothing is running
    assert run.proc.returncode == 0, run.stderr
    assert took < 2, took  # well under the 10 s grace
    assert len(named(run.events, "child_started")) == 1
    assert is_gone(pid)
