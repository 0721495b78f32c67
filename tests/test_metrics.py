"""Prometheus metrics (oauth_sidecar.metrics): real sidecars in front of the fake IdP and upstream
with METRICS_PORT set, real requests, and real scrapes of http://127.0.0.1:<METRICS_PORT>/metrics
parsed with prometheus_client's own parser; exact values and labels are asserted. Also: the page is
never on the public port, metrics are off by default (no listener at all), a taken METRICS_PORT
stops start-up, label values stay bounded, and a spawned child's restarts are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from conftest import (
    FakeIdp,
    FakeUpstream,
    SidecarFactory,
    SidecarServer,
    bearer,
    new_rsa,
    sidecar_env,
)
from processes import PROCESS_TIMEOUT, free_port, run_cli, sidecar_process, wait_ready
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from oauth_sidecar import __version__
from oauth_sidecar.app import CHILD, IDP, create_app
from oauth_sidecar.config import ConfigError, load
from oauth_sidecar.metrics import METRICS, Metrics, PrometheusMetrics
from oauth_sidecar.upstream import child as child_module

Client = TestClient[web.Request, web.Application]
FAKE_CHILD = Path(__file__).resolve().parent / "children" / "fake_mcp_server.py"
TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=2)
P = "oauth_sidecar_"


# -- scraping -------------------------------------------------------------------------------------


@dataclass
class Scrape:
    samples: list[Sample]
    content_type: str
    text: str

    def value(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels, or None when there is no such series."""
        found = [s.value for s in self.samples if s.name == P + name and s.labels == labels]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(s.labels.items())): s.value
                for s in self.samples if s.name == P + name}


async def scrape(port: int, accept: str | None = None) -> Scrape:
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.get(
        f"http://127.0.0.1:{port}/metrics", headers=headers
    ) as response:
        assert response.status == 200
        assert response.headers.getall("Server") == ["oauth-sidecar"]  # no aiohttp version
        text = await response.text()
        content_type = response.headers["Content-Type"]
    if content_type.startswith("application/openmetrics-text"):
        return Scrape([], content_type, text)
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return Scrape(samples, content_type, text)


async def scrape_until(
    port: int, done: Callable[[Scrape], bool], within: float = 5.0
) -> Scrape:
    """Bounded: scrape until `done` holds (for what the sidecar finishes after the client)."""
    deadline = time.monotonic() + within
    while True:
        result = await scrape(port)
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never reached the expected state:\n{result.text}")
        await asyncio.sleep(0.05)


@dataclass
class Metered:
    client: Client
    port: int
    """The metrics listener's."""


MeteredFactory = Callable[..., Awaitable[Metered]]


@pytest.fixture
def metered(make_sidecar: SidecarFactory) -> MeteredFactory:
    async def start(**extra: str) -> Metered:
        port = free_port()
        client = await make_sidecar(METRICS_PORT=str(port), **extra)
        return Metered(client, port)

    return start


async def status_of(client: Client, method: str, path: str, **kwargs: object) -> int:
    async with client.request(method, path, **kwargs) as response:  # type: ignore[arg-type]
        await response.read()
        return response.status


# -- what is counted ------------------------------------------------------------------------------


async def test_answers_and_refusals_are_counted_by_route_class_status_and_reason(
    metered: MeteredFactory, idp: FakeIdp
) -> None:
    sidecar = await metered(ALLOW_ALL_AUTHENTICATED="false", ALLOW_SUBS="user-1",
                            RATE_LIMIT_RPM="2")
    client = sidecar.client
    token = idp.mint()
    forged = idp.mint(new_rsa("rsa-1"))  # the published kid, signed by another key
    stranger = idp.mint(claims={"sub": "user-2"})

    assert await status_of(client, "POST", "/mcp", data=b"{}", headers=bearer(token)) == 200
    assert await status_of(client, "GET", "/mcp/tools", headers=bearer(token)) == 200
    assert await status_of(client, "POST", "/mcp", headers=bearer(token)) == 429  # 3rd of 2/min
    assert await status_of(client, "POST", "/mcp") == 401
    assert await status_of(client, "POST", "/mcp", headers=bearer(forged)) == 401
    assert await status_of(client, "POST", "/mcp", headers=bearer(stranger)) == 403
    assert await status_of(client, "GET", "/healthz") == 200
    assert await status_of(client, "GET", "/.well-known/oauth-protected-resource/mcp") == 200
    registered = await status_of(client, "POST", "/register", json={})

    result = await scrape(sidecar.port)
    assert result.series("requests_total") == {
        (("route", "mcp"), ("status", "200")): 2,
        (("route", "mcp"), ("status", "429")): 1,
        (("route", "mcp"), ("status", "401")): 2,
        (("route", "mcp"), ("status", "403")): 1,
        (("route", "health"), ("status", "200")): 1,
        (("route", "metadata"), ("status", "200")): 1,
        (("route", "oauth"), ("status", str(registered))): 1,
    }
    assert result.series("auth_failures_total") == {
        (("reason", "missing"),): 1,
        (("reason", "bad_signature"),): 1,
        (("reason", "not_allowed"),): 1,
        (("reason", "rate_limited_subject"),): 1,
    }
    assert result.series("rate_limited_total") == {(("scope", "subject"),): 1}
    # Two answers from the upstream: the histogram saw exactly those, each well under 5 minutes.
    assert result.value("upstream_response_seconds_count") == 2
    assert result.value("upstream_response_seconds_bucket", le="+Inf") == 2
    assert result.value("upstream_response_seconds_bucket", le="300.0") == 2
    assert 0 < (result.value("upstream_response_seconds_sum") or 0) < 60
    assert result.series("upstream_errors_total") == {}
    # Start-up fetched the keys once; nothing since.
    assert result.series("jwks_refreshes_total") == {
        (("reason", "scheduled"), ("result", "success")): 1,
    }
    assert result.value("jwks_keys") == 1
    assert result.value("open_streams") == 0
    assert result.value("proxied_in_flight") == 0
    assert result.value("build_info", version=__version__) == 1
    assert result.value("child_up") is None  # no child in this mode
    assert result.content_type.startswith("text/plain; version=0.0.4")
    # The standard process metrics come along (fds, memory: what the soak harness watches).
    assert any(s.name == "process_open_fds" for s in result.samples)


async def test_a_refused_subjects_refusals_and_then_its_429s_are_counted(
    metered: MeteredFactory, idp: FakeIdp
) -> None:
    sidecar = await metered(ALLOW_ALL_AUTHENTICATED="false", ALLOW_SUBS="user-1",
                            RATE_LIMIT_RPM="2")
    stranger = idp.mint(claims={"sub": "user-2"})
    statuses = [await status_of(sidecar.client, "POST", "/mcp", headers=bearer(stranger))
                for _ in range(4)]
    assert statuses == [403, 403, 429, 429]
    result = await scrape(sidecar.port)
    assert result.series("auth_failures_total") == {
        (("reason", "not_allowed"),): 2,
        (("reason", "rate_limited_subject"),): 2,
    }
    assert result.series("rate_limited_total") == {(("scope", "subject"),): 2}


async def test_429s_of_the_public_oauth_endpoints_count_against_the_client_ip(
    metered: MeteredFactory,
) -> None:
    sidecar = await metered(RATE_LIMIT_UNAUTHENTICATED_RPM="1")
    first = await status_of(sidecar.client, "POST", "/register", json={})
    assert await status_of(sidecar.client, "POST", "/register", json={}) == 429
    result = await scrape(sidecar.port)
    assert result.series("rate_limited_total") == {(("scope", "client_ip"),): 1}
    assert result.series("requests_total") == {
        (("route", "oauth"), ("status", str(first))): 1,
        (("route", "oauth"), ("status", "429")): 1,
    }
    assert result.series("auth_failures_total") == {}  # public endpoints: no gate involved


async def test_open_streams_is_1_while_an_event_stream_is_relayed_and_0_after_it_closed(
    metered: MeteredFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar = await metered()
    async with sidecar.client.get("/sse", headers=bearer(idp.mint())) as stream:
        assert stream.status == 200
        received = b""
        async with asyncio.timeout(10):
            while b"event-2" not in received:
                received += await stream.content.readany()
        during = await scrape(sidecar.port)
    assert during.value("open_streams") == 1
    assert during.value("proxied_in_flight") == 1
    assert during.value("upstream_response_seconds_count") == 1  # its headers came back
    assert during.series("requests_total") == {}  # counted when the response is complete

    async with asyncio.timeout(10):
        await upstream.stream_closed.wait()
    after = await scrape_until(
        sidecar.port, lambda r: r.value("open_streams") == 0 and bool(r.series("requests_total"))
    )
    assert after.value("proxied_in_flight") == 0
    statuses = after.series("requests_total")
    assert sum(statuses.values()) == 1
    # The client left mid-stream: the write failed (200) or the handler was cancelled (499).
    assert next(iter(statuses)) in {(("route", "mcp"), ("status", "200")),
                                    (("route", "mcp"), ("status", "499"))}


async def test_an_upstream_that_is_down_is_a_502_counted_as_unavailable(
    metered: MeteredFactory, idp: FakeIdp
) -> None:
    sidecar = await metered(MCP_UPSTREAM_URL=f"http://127.0.0.1:{free_port()}")
    assert await status_of(sidecar.client, "POST", "/mcp", headers=bearer(idp.mint())) == 502
    result = await scrape(sidecar.port)
    assert result.series("upstream_errors_total") == {(("kind", "unavailable"),): 1}
    assert result.series("requests_total") == {(("route", "mcp"), ("status", "502")): 1}
    assert result.value("upstream_response_seconds_count") == 0


async def test_unknown_kid_refreshes_and_failed_refreshes_are_counted(
    metered: MeteredFactory, idp: FakeIdp
) -> None:
    sidecar = await metered(JWKS_COOLDOWN_SECONDS="0.1")
    rotated = new_rsa("rsa-2")
    idp.keys.append(rotated)  # published after start-up: the sidecar learns it on first use
    await asyncio.sleep(0.2)  # past the start-up fetch's cooldown
    assert await status_of(sidecar.client, "GET", "/mcp", headers=bearer(idp.mint(rotated))) == 200

    async def broken(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500)

    idp.jwks_override = broken
    await asyncio.sleep(0.2)  # past the cooldown, so the next unknown kid may fetch again
    unknown = idp.mint(new_rsa("rsa-3"))
    assert await status_of(sidecar.client, "GET", "/mcp", headers=bearer(unknown)) == 401

    result = await scrape(sidecar.port)
    assert result.series("jwks_refreshes_total") == {
        (("reason", "scheduled"), ("result", "success")): 1,
        (("reason", "unknown_kid"), ("result", "success")): 1,
        (("reason", "unknown_kid"), ("result", "failure")): 1,
    }
    assert result.value("jwks_keys") == 2  # the failed fetch kept the last good set
    assert result.series("auth_failures_total") == {(("reason", "unknown_kid"),): 1}


async def test_label_values_stay_bounded_whatever_paths_and_subjects_callers_send(
    metered: MeteredFactory, idp: FakeIdp
) -> None:
    sidecar = await metered()
    subjects = [f"user-{i}@example.test" for i in range(15)]
    paths = [f"/mcp/tool-{i}?q={i}" for i in range(15)]
    for subject, path in zip(subjects, paths, strict=True):
        token = idp.mint(claims={"sub": subject})
        assert await status_of(sidecar.client, "POST", path, headers=bearer(token)) == 200
        assert await status_of(sidecar.client, "POST", path + "x") == 401
        assert await status_of(sidecar.client, "GET", f"/{subject}/metrics") == 401

    result = await scrape(sidecar.port)
    assert result.series("requests_total") == {
        (("route", "mcp"), ("status", "200")): 15,
        (("route", "mcp"), ("status", "401")): 30,
    }
    assert result.series("auth_failures_total") == {(("reason", "missing"),): 30}
    for sample in result.samples:
        for value in sample.labels.values():
            assert "user-" not in value, sample
            assert "tool-" not in value, sample


def test_a_watched_family_has_exactly_its_declared_label_values(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    metrics = create_app(load(sidecar_env(idp, upstream, METRICS_PORT="9464")))[METRICS]
    assert isinstance(metrics, PrometheusMetrics)
    read = {"a": 2.0, "surprise": 5.0}
    metrics.watch_by("probe", "A probe", "kind", ("a", "b"), lambda: read)
    metrics.watch_by("probe_events", "A probe", "kind", ("a", "b"), lambda: read, counter=True)

    def series(name: str) -> dict[str, float]:
        text = generate_latest(metrics.registry).decode()
        return {s.labels["kind"]: s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == P + name}

    assert series("probe") == series("probe_events_total") == {"a": 2.0, "b": 0.0}
    read["b"] = 1.0  # read at each scrape
    assert series("probe") == {"a": 2.0, "b": 1.0}


# -- where the page is, and is not ----------------------------------------------------------------


async def test_metrics_on_the_public_port_is_the_protected_mcp_route_never_our_page(
    metered: MeteredFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar = await metered()
    async with sidecar.client.get("/metrics") as refused:
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer ")
        assert P not in await refused.text()
    async with sidecar.client.get("/metrics", headers=bearer(idp.mint())) as forwarded:
        assert forwarded.status == 200
        body = await forwarded.json()
    assert body["path_qs"] == "/metrics"  # the upstream's echo: forwarded, not answered by us
    assert [r.path_qs for r in upstream.requests] == ["/metrics"]
    result = await scrape(sidecar.port)
    assert result.series("requests_total") == {
        (("route", "mcp"), ("status", "401")): 1,
        (("route", "mcp"), ("status", "200")): 1,
    }


async def test_the_metrics_listener_serves_get_metrics_and_nothing_else(
    metered: MeteredFactory,
) -> None:
    sidecar = await metered()
    base = f"http://127.0.0.1:{sidecar.port}"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for path in ("/", "/mcp", "/healthz", "/metrics/x", "/.well-known/openid-configuration"):
            async with session.get(base + path) as response:
                assert response.status == 404, path
        async with session.post(base + "/metrics") as response:
            assert response.status == 405
        async with session.head(base + "/metrics") as response:
            assert response.status == 200
    negotiated = await scrape(sidecar.port, accept="application/openmetrics-text; version=1.0.0")
    assert negotiated.content_type.startswith("application/openmetrics-text")
    assert negotiated.text.rstrip().endswith("# EOF")
    assert f'{P}build_info{{version="{__version__}"}} 1.0' in negotiated.text


# -- configuration and the process ----------------------------------------------------------------


def test_metrics_are_off_unless_metrics_port_is_set(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    config = load(sidecar_env(idp, upstream, METRICS_HOST="0.0.0.0"))  # noqa: S104
    assert config.metrics is None
    app = create_app(config)
    assert type(app[METRICS]) is Metrics  # the null object: hooks do nothing
    request = make_mocked_request("POST", "/mcp")
    assert app[METRICS].recorder(request) is None  # nothing counted on the hot path
    on = create_app(load(sidecar_env(idp, upstream, METRICS_PORT="9464")))
    assert isinstance(on[METRICS], PrometheusMetrics)
    assert on[METRICS].recorder(request) is not None


def test_metrics_listener_defaults_to_loopback(idp: FakeIdp, upstream: FakeUpstream) -> None:
    config = load(sidecar_env(idp, upstream, METRICS_PORT="9464"))
    assert config.metrics is not None
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9464)
    exposed = load(sidecar_env(idp, upstream, METRICS_PORT="9464", METRICS_HOST="0.0.0.0"))  # noqa: S104
    assert exposed.metrics is not None
    assert exposed.metrics.host == "0.0.0.0"  # noqa: S104


def problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(env)
    return caught.value.problems


def test_metrics_port_equal_to_port_is_a_configuration_error(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    found = problems(sidecar_env(idp, upstream, PORT="9000", METRICS_PORT="9000"))
    assert found == ["METRICS_PORT=9000 is PORT: metrics are served on a listener of their own, "
                     "never on the public port"]


def test_metrics_port_equal_to_the_childs_port_is_a_configuration_error(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    env = {**sidecar_env(idp, upstream, METRICS_PORT="9100"),
           "MCP_SPAWN_CMD": json.dumps([sys.executable, str(FAKE_CHILD), "serve", "9100"]),
           "MCP_SPAWN_PORT": "9100"}
    del env["MCP_UPSTREAM_URL"]
    assert problems(env) == ["METRICS_PORT=9100 is MCP_SPAWN_PORT, the child's port"]


@pytest.mark.parametrize("value", ["abc", "0", "65536"])
def test_a_bad_metrics_port_is_reported_with_every_other_problem(
    idp: FakeIdp, upstream: FakeUpstream, value: str
) -> None:
    found = problems(sidecar_env(idp, upstream, METRICS_PORT=value, LOG_LEVEL="loud"))
    assert len(found) == 2, found
    assert [p for p in found if p.startswith("METRICS_PORT=")]
    assert [p for p in found if p.startswith("LOG_LEVEL=")]


def test_a_port_without_a_default_that_is_not_a_number_is_a_problem_not_a_crash(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    env = {**sidecar_env(idp, upstream), "MCP_SPAWN_CMD": sys.executable,
           "MCP_SPAWN_PORT": "abc"}
    del env["MCP_UPSTREAM_URL"]
    assert problems(env) == ["MCP_SPAWN_PORT='abc' is not a number"]


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process `pid` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address_hex, port_hex = local.split(":")
            raw = bytes.fromhex(address_hex)
            # The kernel prints the address as 32-bit words in host (little-endian) order.
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((str(ipaddress.ip_address(words)), int(port_hex, 16)))
    return found


@pytest.mark.slow
async def test_the_process_listens_on_port_alone_without_metrics_port(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    port = free_port()
    env = sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(port))
    async with sidecar_process(env) as proc, aiohttp.ClientSession(timeout=TIMEOUT) as session:
        await wait_ready(session, f"http://127.0.0.1:{port}", proc)
        assert listening(proc.pid) == {("127.0.0.1", port)}


@pytest.mark.slow
async def test_the_process_serves_metrics_on_loopback_and_stops_cleanly(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    port, metrics_port = free_port(), free_port()
    env = sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(port),
                      METRICS_PORT=str(metrics_port), LOG_FORMAT="json")
    base = f"http://127.0.0.1:{port}"
    async with sidecar_process(env) as proc, aiohttp.ClientSession(timeout=TIMEOUT) as session:
        await wait_ready(session, base, proc)
        assert listening(proc.pid) == {("127.0.0.1", port), ("127.0.0.1", metrics_port)}
        async with session.post(base + "/mcp", headers=bearer(idp.mint())) as response:
            assert response.status == 200
        result = await scrape(metrics_port)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = await asyncio.wait_for(proc.communicate(), PROCESS_TIMEOUT)
    assert proc.returncode == 0
    assert result.value("requests_total", route="mcp", status="200") == 1
    assert result.value("requests_total", route="health", status="200") == 1  # wait_ready's
    starting = json.loads(stdout.splitlines()[0])
    assert starting["event"] == "starting"
    assert starting["metrics"] == f"127.0.0.1:{metrics_port}"


@contextlib.contextmanager
def occupied() -> Iterator[int]:
    """A loopback port some other program listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.slow
async def test_a_taken_metrics_port_stops_start_up_with_exit_2(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    port = free_port()
    with occupied() as taken:
        env = sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(port),
                          METRICS_PORT=str(taken), LOG_FORMAT="json")
        code, stdout, stderr = await run_cli(env=env)
    assert code == 2, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    failed = [e for e in events if e["event"] == "listen_failed"]
    assert len(failed) == 1
    assert failed[0]["listener"] == "metrics"
    assert (failed[0]["host"], failed[0]["port"]) == ("127.0.0.1", taken)
    assert "address already in use" in failed[0]["error"].lower()
    assert stderr == ""  # a clean message, no traceback


# -- a spawned child ------------------------------------------------------------------------------


@pytest.fixture
async def spawned(
    idp: FakeIdp, upstream: FakeUpstream
) -> AsyncIterator[tuple[web.Application, int]]:
    """The production app in spawn mode with metrics on; the child is stopped with the app."""
    child_port, metrics_port = free_port(), free_port()
    env = {**sidecar_env(idp, upstream, METRICS_PORT=str(metrics_port)),
           "MCP_SPAWN_CMD": json.dumps([sys.executable, str(FAKE_CHILD), "serve",
                                        str(child_port)]),
           "MCP_SPAWN_PORT": str(child_port)}
    del env["MCP_UPSTREAM_URL"]
    config = load(env)
    app = create_app(config)
    server = SidecarServer(app, config)
    await server.start_server()
    try:
        yield app, metrics_port
    finally:
        await server.close()  # stops the child and the metrics listener


async def until(predicate: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_a_killed_child_shows_as_down_then_as_one_restart(
    spawned: tuple[web.Application, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A first backoff of 2 s leaves time to see the child down.
    monkeypatch.setattr(child_module, "BACKOFF_FIRST", 2.0)
    app, metrics_port = spawned
    await until(lambda: app[IDP].ready and app[CHILD].ready, 20)
    before = await scrape(metrics_port)
    assert before.value("child_up") == 1
    assert before.value("child_restarts_total") == 0

    pid = app[CHILD].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await until(lambda: not app[CHILD].ready, 5)
    down = await scrape(metrics_port)
    assert down.value("child_up") == 0
    assert down.value("child_restarts_total") == 0

    await until(lambda: app[CHILD].ready, 20)
    after = await scrape(metrics_port)
    assert after.value("child_up") == 1
    assert after.value("child_restarts_total") == 1
    assert app[CHILD].pid != pid
