"""Prometheus metrics, served on a listener of their own.

Why: operators need refusals, IdP trouble, upstream latency and child restarts as numbers to
alert on, not as log lines to grep. The page names the sidecar's internals, so it is never on
PORT (there every non-public path is the protected MCP route) but on METRICS_HOST:METRICS_PORT,
loopback unless the operator opts in. Each app gets its own CollectorRegistry, never the
library's global one, so tests and several apps in one process stay apart. Label values come
from fixed sets (route classes, reason codes, scopes, error kinds), never from a path, a subject
or an email, so callers cannot grow the number of series. State the components already keep
(open streams, in-flight requests, keys held, child state and restarts) is read at scrape time:
it cannot drift and costs nothing per request. With metrics off, `Metrics` is a null object whose
hooks do nothing, and the counting middleware is not installed at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from oauth_sidecar.config import MetricsConfig
from oauth_sidecar.outcome import Record
from oauth_sidecar.server_header import name_server

PREFIX = "oauth_sidecar_"
# The `route` label: what kind of endpoint answered, decided by the matched resource (app.py).
ROUTE_CLASSES = ("mcp", "metadata", "oauth", "health", "other")
# Seconds to the upstream's response headers: a JSON-RPC answer takes milliseconds, a tool call
# may take minutes (UPSTREAM_RESPONSE_TIMEOUT_SECONDS defaults to 300).
# Seconds of an introspection call: a nearby IdP answers in milliseconds; the timeout defaults
# to 5 s (INTROSPECTION_TIMEOUT_SECONDS).
INTROSPECTION_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
LISTENER_SHUTDOWN = 1.0  # seconds a scrape in progress gets when the sidecar stops


class MetricsListenError(Exception):
    """The metrics listener could not bind METRICS_HOST:METRICS_PORT."""

    def __init__(self, host: str, port: int, error: str) -> None:
        super().__init__(f"{host}:{port}: {error}")
        self.host, self.port, self.error = host, port, error


class Metrics:
    """Metrics off (METRICS_PORT unset): every hook is a no-op, nothing is served."""

    counting = False
    """Whether the hooks count anything (work done only to feed them can be skipped)."""

    def recorder(self, request: web.Request) -> Record | None:
        """What counts this request's status when it ends (None: requests are not counted)."""
        return None

    def rate_limited(self, scope: str) -> None:
        """A request was refused with 429; scope is "subject", "client_ip" or "streams"."""

    def jwks_fetched(self, reason: str, ok: bool) -> None:
        """A key-set fetch ended; reason is "scheduled" or "unknown_kid"."""

    def upstream_answered(self, seconds: float) -> None:
        """The upstream's response headers arrived this long after the request was sent."""

    def introspection_answered(self, seconds: float) -> None:
        """A call to the IdP's introspection endpoint ended (answered, failed or timed out)
        this long after it was queued."""

    def upstream_failed(self, kind: str) -> None:
        """A proxied request failed at the upstream: unavailable, timeout, broken (mid-body),
        refused (it answered 401 to the sidecar's own credential) or invalid_session_id (it
        issued an Mcp-Session-Id the sidecar cannot bind)."""

    def connection_refused(self) -> None:
        """A new connection was answered 503 and closed: the cap was reached, or descriptors ran
        short."""

    def head_refused(self, reason: str) -> None:
        """A request head was refused: too_large (431) or timeout (408)."""

    def mcp_call(self, method: str, name: str, outcome: str) -> None:
        """A tools/call, prompts/get or resources/read was judged or answered; `name` is a
        bounded label (mcp/audit.py folds unknown names into one), outcome one of a few words."""

    def watch(self, name: str, documentation: str, read: Callable[[], float], *,
              counter: bool = False) -> None:
        """Expose `read()` as a gauge (or a counter) evaluated at each scrape."""

    def watch_by(self, name: str, documentation: str, label: str, values: tuple[str, ...],
                 read: Callable[[], Mapping[str, float]], *, counter: bool = False) -> None:
        """Expose `read()` as one gauge (or counter) per value of `label`, evaluated at each
        scrape: every value in `values` is always there (0 when read() lacks it), and a key
        read() returns outside `values` is never a series, so the label set cannot grow."""

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        yield


METRICS = web.AppKey("metrics", Metrics)  # the app's hooks, read by the listener too


@dataclass(frozen=True)
class _Family:
    """One watched family: a single value, or one per value of a label from a fixed set."""

    name: str
    documentation: str
    counter: bool
    read: Callable[[], float] | None = None
    label: str = ""
    values: tuple[str, ...] = ()
    read_by: Callable[[], Mapping[str, float]] | None = None

    def metric(self) -> Metric:
        kind = CounterMetricFamily if self.counter else GaugeMetricFamily
        if self.read is not None:
            return kind(self.name, self.documentation, value=self.read())
        family = kind(self.name, self.documentation, labels=[self.label])
        read = self.read_by() if self.read_by is not None else {}
        for value in self.values:
            family.add_metric([value], read.get(value, 0))
        return family


class _Watched(Collector):
    """Values the components already keep, read when Prometheus scrapes."""

    def __init__(self) -> None:
        self._families: list[_Family] = []

    def add(self, family: _Family) -> None:
        self._families.append(family)

    def collect(self) -> Iterable[Metric]:
        for family in self._families:
            yield family.metric()


class PrometheusMetrics(Metrics):
    counting = True
    """Metrics on: counted in one registry of this app's, served at /metrics on its listener."""

    def __init__(
        self, config: MetricsConfig, version: str, *,
        route_classes: Mapping[web.AbstractResource, str], auth_failure: web.RequestKey[str],
    ) -> None:
        self._config = config
        self._route_classes = route_classes
        self._auth_failure = auth_failure
        self.registry = registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=registry)
        self._watched = _Watched()
        registry.register(self._watched)
        Gauge(PREFIX + "build_info", "The running version (always 1)", ["version"],
              registry=registry).labels(version).set(1)
        self._requests = Counter(
            PREFIX + "requests", "Requests answered, by route class and HTTP status "
            "(counted when the response is complete: an event stream when it ends)",
            ["route", "status"], registry=registry)
        self._auth_failures = Counter(
            PREFIX + "auth_failures", "Requests refused by the gate or the proxy, by reason "
            "(the access log's auth_error)", ["reason"], registry=registry)
        self._rate_limited = Counter(
            PREFIX + "rate_limited", "Requests refused with 429, by the budget spent",
            ["scope"], registry=registry)
        self._jwks = Counter(
            PREFIX + "jwks_refreshes", "Key-set fetches from the IdP, by trigger and result",
            ["reason", "result"], registry=registry)
        self._upstream_seconds = Histogram(
            PREFIX + "upstream_response_seconds", "Time from sending a request upstream to its "
            "response headers", buckets=UPSTREAM_BUCKETS, registry=registry)
        self._introspection_seconds = Histogram(
            PREFIX + "introspection_seconds", "Time of a call to the IdP's introspection "
            "endpoint, waiting for a free slot included (answered, failed or timed out)",
            buckets=INTROSPECTION_BUCKETS, registry=registry)
        self._upstream_errors = Counter(
            PREFIX + "upstream_errors", "Proxied requests the upstream failed, by kind "
            "(connect: no answer, 502; timeout: 504; broken: the body broke off)",
            ["kind"], registry=registry)
        self._connections_refused = Counter(
            PREFIX + "connections_refused", "New connections answered 503 and closed at once: "
            "MAX_CONNECTIONS were open, or descriptors ran short", registry=registry)
        self._mcp_calls = Counter(
            PREFIX + "mcp_calls", "tools/call, prompts/get and resources/read calls by method, "
            "name (names the upstream listed; any other is \"other\") and outcome (ok, error: "
            "a JSON-RPC error, failed: no answer, denied, scope_missing, rate_limited)",
            ["method", "name", "outcome"], registry=registry)
        self._heads_refused = Counter(
            PREFIX + "request_heads_refused", "Request heads refused, by reason (too_large: 431 "
            "over MAX_REQUEST_HEAD_BYTES; timeout: 408 after REQUEST_HEAD_TIMEOUT_SECONDS)",
            ["reason"], registry=registry)
        # labels() takes a lock and converts every value: the request counter's children are
        # looked up in a plain dict on the hot path instead (at most classes x statuses).
        self._request_children: dict[tuple[str, int], Counter] = {}

    def recorder(self, request: web.Request) -> Record | None:
        return partial(self._counted, request)

    def _counted(self, request: web.Request, status: int) -> None:
        resource = request.match_info.route.resource  # None: aiohttp's own 404/405
        route = self._route_classes.get(resource, "other") if resource else "other"
        child = self._request_children.get((route, status))
        if child is None:
            child = self._request_children[route, status] = self._requests.labels(route, status)
        child.inc()
        if status >= 400:  # every refusal is; request.get costs a raised KeyError when absent
            failure = request.get(self._auth_failure)
            if failure is not None:
                self._auth_failures.labels(failure).inc()

    def rate_limited(self, scope: str) -> None:
        self._rate_limited.labels(scope).inc()

    def mcp_call(self, method: str, name: str, outcome: str) -> None:
        self._mcp_calls.labels(method, name, outcome).inc()

    def jwks_fetched(self, reason: str, ok: bool) -> None:
        self._jwks.labels(reason, "success" if ok else "failure").inc()

    def upstream_answered(self, seconds: float) -> None:
        self._upstream_seconds.observe(seconds)

    def upstream_failed(self, kind: str) -> None:
        self._upstream_errors.labels(kind).inc()

    def introspection_answered(self, seconds: float) -> None:
        self._introspection_seconds.observe(seconds)

    def connection_refused(self) -> None:
        self._connections_refused.inc()

    def head_refused(self, reason: str) -> None:
        self._heads_refused.labels(reason).inc()

    def watch(self, name: str, documentation: str, read: Callable[[], float], *,
              counter: bool = False) -> None:
        self._watched.add(_Family(PREFIX + name, documentation, counter, read=read))

    def watch_by(self, name: str, documentation: str, label: str, values: tuple[str, ...],
                 read: Callable[[], Mapping[str, float]], *, counter: bool = False) -> None:
        self._watched.add(_Family(PREFIX + name, documentation, counter, label=label,
                                  values=values, read_by=read))

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """GET /metrics on METRICS_HOST:METRICS_PORT, and nothing else (404)."""
        app = web.Application()
        # prometheus_client's own handler: text format, OpenMetrics when the scraper asks for
        # it (Accept), gzip when it accepts that, ?name[]= filtering.
        app.router.add_get("/metrics", make_aiohttp_handler(self.registry))
        app.on_response_prepare.append(name_server)  # no aiohttp version here either
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=LISTENER_SHUTDOWN)
        await runner.setup()
        site = web.TCPSite(runner, self._config.host, self._config.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise MetricsListenError(self._config.host, self._config.port, str(exc)) from None
        try:
            yield
        finally:
            await runner.cleanup()
