"""create_app(config): builds the components, routes, middleware and lifecycles; nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from aiohttp import web

from oauth_sidecar import __version__
from oauth_sidecar.auth.access_tokens import token_check
from oauth_sidecar.auth.allow_files import AllowListFiles
from oauth_sidecar.auth.challenge import Challenges
from oauth_sidecar.auth.gate import Gate
from oauth_sidecar.auth.idp import IdentityProvider
from oauth_sidecar.auth.introspection import CACHE_RESULTS, CALL_OUTCOMES, Introspector
from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.auth.ratelimit import RateLimiter
from oauth_sidecar.auth.resource_metadata import (
    ProtectedResourceMetadata,
    authorization_server_metadata_paths,
    protected_resource_paths,
)
from oauth_sidecar.auth.sessions import SessionBindings
from oauth_sidecar.auth.tokens import TokenVerifier
from oauth_sidecar.client_ip import ClientAddress
from oauth_sidecar.config import Config
from oauth_sidecar.cors import Cors
from oauth_sidecar.front_door import FrontDoor
from oauth_sidecar.health import Health
from oauth_sidecar.http_errors import method_not_allowed
from oauth_sidecar.mcp.audit import Audit
from oauth_sidecar.mcp.calls import CallRules
from oauth_sidecar.mcp.rule_files import ToolRuleFile
from oauth_sidecar.mcp.tool_policy import ToolPolicy
from oauth_sidecar.metrics import METRICS, Metrics, PrometheusMetrics
from oauth_sidecar.outcome import Handler
from oauth_sidecar.request_keys import AUTH_FAILURE
from oauth_sidecar.signin.authserver import CALLBACK_PATH, AuthorizationServer
from oauth_sidecar.signin.client_documents import ClientDocuments
from oauth_sidecar.signin.consent import CONSENT_PATH
from oauth_sidecar.signin.metadata import REGISTRATION_PATH, FacadeMetadata
from oauth_sidecar.signin.redemptions import RedemptionStore, redemption_store
from oauth_sidecar.signin.registration import RedirectAllowList, StaticRegistration
from oauth_sidecar.upstream.child import ChildProcess
from oauth_sidecar.upstream.credential import UpstreamCredential
from oauth_sidecar.upstream.proxy import UpstreamProxy
from oauth_sidecar.upstream.stdio_bridge import StdioBridge
from oauth_sidecar.upstream.stdio_pool import CAPS, CHILD_STATES, EXIT_REASONS, StdioPool

IDP = web.AppKey("idp", IdentityProvider)
VERIFIER = web.AppKey("verifier", TokenVerifier)
INTROSPECTOR = web.AppKey("introspector", Introspector)
PROXY = web.AppKey("proxy", UpstreamProxy)
SESSIONS = web.AppKey("sessions", SessionBindings)
CHILD = web.AppKey("child", ChildProcess)
STDIO_POOL = web.AppKey("stdio_pool", StdioPool)
ALLOW_FILES = web.AppKey("allow_files", AllowListFiles)
TOOL_RULE_FILE = web.AppKey("tool_rule_file", ToolRuleFile)


def _lifetime(
    running: Callable[[], AbstractAsyncContextManager[object]],
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        async with running():
            yield

    return context


def _watch(
    metrics: Metrics, idp: IdentityProvider, proxy: UpstreamProxy | None,
    child: ChildProcess | None, pool: StdioPool | None,
) -> None:
    """What the components already keep, read at each scrape (nothing per request)."""
    if proxy is not None:
        metrics.watch("open_streams", "Event streams (SSE) being relayed now", proxy.open_streams)
        metrics.watch("proxied_in_flight", "Requests being forwarded upstream now",
                      proxy.in_flight)
    metrics.watch("jwks_keys", "Usable signing keys held", idp.key_count)
    if pool is not None:
        _watch_stdio(metrics, pool)
    if child is not None:
        metrics.watch("child_up", "1 while the spawned MCP server is ready, else 0",
                      lambda: float(child.ready))
        metrics.watch("child_restarts", "Restarts of the spawned MCP server",
                      lambda: child.restarts, counter=True)


def _add_introspection(
    app: web.Application, metrics: Metrics, introspector: Introspector | None,
    lifetimes: list[Callable[[], AbstractAsyncContextManager[object]]],
) -> None:
    """TOKEN_VALIDATION=introspection or auto: the introspector's session lives after the IdP's
    (whose metadata names the endpoint). Its metrics: calls to the IdP by outcome and cache
    look-ups by result, counted as plain integers (nothing per request beyond an addition)."""
    if introspector is None:
        return
    app[INTROSPECTOR] = introspector
    lifetimes.append(introspector.running)
    counts = introspector.counts
    metrics.watch_by("introspection_calls", "Calls to the IdP's introspection endpoint, by "
                     "outcome (active, inactive, rejected: active but refused by our checks, "
                     "error, timeout, refused: our client refused, unavailable)", "outcome",
                     CALL_OUTCOMES, lambda: counts.calls, counter=True)
    metrics.watch_by("introspection_cache", "Introspected-token cache look-ups, by result "
                     "(hit, negative_hit: a refusal replayed, miss)", "result", CACHE_RESULTS,
                     lambda: counts.lookups, counter=True)
    metrics.watch("introspection_in_flight", "Tokens being introspected now",
                  lambda: introspector.in_flight)


def _watch_stdio(metrics: Metrics, pool: StdioPool) -> None:
    """The stdio children. By subject only as aggregates, never a subject label (every caller
    would add series): how many subjects hold children, and the most one holds, which with the
    caps beside it alerts on a user about to be refused (`children_per_subject_max >=
    ignoring(cap) children_limit{cap="subject"}`), as the sum of the states but stopping does on
    the pool filling up; refusals and exits by reason say what already went wrong."""
    metrics.watch_by("stdio_children", "Stdio MCP server processes now, by state (starting: "
                     "nothing heard from it yet; busy: a request in flight or a stream open; "
                     "idle; stopping: its process group is being stopped, no longer counted "
                     "against the caps)", "state", CHILD_STATES, pool.by_state)
    metrics.watch_by("stdio_children_limit", "The caps on stdio children: MCP_SPAWN_MAX_PROCESSES "
                     "(process) and MCP_SPAWN_MAX_PER_SUBJECT (subject)", "cap", CAPS,
                     pool.limits)
    metrics.watch("stdio_subjects", "Subjects (users) holding at least one stdio child",
                  pool.subjects)
    metrics.watch("stdio_children_per_subject_max", "The most stdio children one subject holds "
                  "(at MCP_SPAWN_MAX_PER_SUBJECT that user is refused 429)",
                  pool.most_per_subject)
    metrics.watch("stdio_sessions", "MCP sessions served by stdio children now", pool.sessions)
    metrics.watch_by("stdio_child_exits", "Stdio children ended, by reason (idle, deleted, "
                     "replaced, exited: by itself, start_failed, shutdown, other)", "reason",
                     EXIT_REASONS, lambda: pool.exits, counter=True)
    metrics.watch_by("stdio_refused", "Stdio sessions refused over a cap (process: 503 at "
                     "MCP_SPAWN_MAX_PROCESSES; subject: 429 at MCP_SPAWN_MAX_PER_SUBJECT)", "cap",
                     CAPS, lambda: pool.refused, counter=True)
    metrics.watch("stdio_lines_dropped", "Stdout lines of stdio children dropped (too long "
                  "or not JSON)", lambda: pool.counters.dropped, counter=True)


def _mcp_handler(config: Config, app: web.Application, pool: StdioPool | None,
                 proxy: UpstreamProxy | None, calls: CallRules | None) -> Handler:
    """The protected routes' handler: the stdio bridge (RESOURCE_URL's path only) or the
    proxy; each ends its streams at shutdown."""
    if pool is not None:
        app[STDIO_POOL] = pool
        app.on_shutdown.append(pool.stop)
        return StdioBridge(config, pool, calls).handle
    if proxy is None:
        raise ValueError("neither a stdio pool nor a proxy")
    app[PROXY] = proxy
    app.on_shutdown.append(proxy.stop)
    return proxy.handle


class PublicRoutes:
    """The routes served without a token, each terminal for every method, so a public path never
    falls through to the proxy; the gate and CORS ask these sets what a request matched instead
    of judging its path. Navigations (sign-in pages a browser opens) are public and get no CORS."""

    def __init__(self, router: web.UrlDispatcher,
                 route_classes: dict[web.AbstractResource, str]) -> None:
        self._router = router
        self._route_classes = route_classes
        self._public: set[web.AbstractResource] = set()
        self._navigations: set[web.AbstractResource] = set()

    def add(self, path: str, handler: Handler, kind: str,
            methods: tuple[str, ...] = ("GET", "HEAD"), navigation: bool = False) -> None:
        resource = self._router.add_resource(path)
        for method in methods:
            resource.add_route(method, handler)
        resource.add_route("*", method_not_allowed(", ".join(methods)))
        self._public.add(resource)
        if navigation:
            self._navigations.add(resource)
        self._route_classes[resource] = kind

    def is_public(self, request: web.Request) -> bool:
        return request.match_info.route.resource in self._public

    def is_navigation(self, request: web.Request) -> bool:
        return request.match_info.route.resource in self._navigations


def _add_sign_in(
    routes: PublicRoutes, config: Config, idp: IdentityProvider, limiter: RateLimiter,
) -> tuple[AuthorizationServer, RedemptionStore]:
    """The sign-in routes (relay or facade, registration), each behind the client IP's budget."""
    redirects = RedirectAllowList(config.auth_server)
    redemptions = redemption_store(config.rate_limits.storage_uri)  # beside the rate limits
    auth = config.auth_server
    documents = (ClientDocuments(auth.client_documents)
                 if auth.facade and auth.client_documents.enabled else None)
    authserver = AuthorizationServer(config, idp, redirects, redemptions=redemptions,
                                     documents=documents)
    registration = StaticRegistration(config.auth_server, redirects,
                                      config.upstream.body_timeout)
    # Claude.ai calls these on the MCP origin whatever the metadata says: serve them in both modes.
    # Unauthenticated work: each call spends the client IP's budget first (limiter.guard).
    routes.add("/authorize", limiter.guard(authserver.authorize), "oauth", navigation=True)
    routes.add("/token", limiter.guard(authserver.token), "oauth", ("POST",))
    register = limiter.guard(registration.handle)
    for path in (REGISTRATION_PATH, "/register"):
        routes.add(path, register, "oauth", ("POST",))
    if authserver.facade:
        routes.add(CALLBACK_PATH, authserver.callback, "oauth", navigation=True)
        routes.add(CONSENT_PATH, limiter.guard(authserver.consent), "oauth", ("POST",),
                   navigation=True)
        facade_document = FacadeMetadata(config, idp)
        for path in authorization_server_metadata_paths(config):
            routes.add(path, facade_document.handle, "metadata")
    return authserver, redemptions


def create_app(
    config: Config, *, on_child_give_up: Callable[[], None] | None = None,
    on_upstream_token: Callable[[str], None] | None = None,
) -> web.Application:
    """on_child_give_up: what to do when a spawned child is given up (__main__: shut down).
    on_upstream_token: told each upstream credential read (__main__: the log's secret mask)."""
    route_classes: dict[web.AbstractResource, str] = {}  # metrics' `route` label
    metrics = PrometheusMetrics(
        config.metrics, __version__, route_classes=route_classes, auth_failure=AUTH_FAILURE
    ) if config.metrics else Metrics()
    idp = IdentityProvider(config.idp, config.tokens.algorithms, metrics)
    policy = AccessPolicy.serving(config)
    verifier = TokenVerifier(config.tokens, idp, policy.kept_claims)
    introspector = Introspector(config.tokens, idp, policy.kept_claims, metrics) if (
        config.tokens.introspection is not None) else None
    addresses = ClientAddress(config.trusted_proxies)
    limiter = RateLimiter(config.rate_limits, metrics, addresses)
    sessions = SessionBindings(config.session_ttl)
    credential = (
        UpstreamCredential(config.upstream_bearer_file, on_token=on_upstream_token)
        if config.upstream_bearer_file else None
    )
    spawn = config.spawn
    pool = StdioPool(spawn, policy=policy, forward_identity=config.forward_identity,
                     sessions=sessions) if spawn is not None and spawn.stdio else None
    child = ChildProcess(spawn, on_child_give_up) if spawn and pool is None else None
    tools = ToolPolicy(config.tool_rules, policy) if config.tool_rules.configured else None
    calls = CallRules(tools, policy, Challenges(config), limiter, Audit(
        metrics, config.tool_rules.audit_arguments)) if tools is not None else None
    proxy = UpstreamProxy(config, policy=policy, addresses=addresses, sessions=sessions,
                          credential=credential, child=child, metrics=metrics,
                          calls=calls) if pool is None else None
    # client_max_size: only public handlers read bodies; the proxy streams.
    app = web.Application(client_max_size=64 * 1024)
    app[IDP], app[VERIFIER], app[SESSIONS] = idp, verifier, sessions
    app[METRICS] = metrics
    routes = PublicRoutes(app.router, route_classes)
    health = Health(idp, proxy, child)
    routes.add("/healthz", health.live, "health")
    routes.add("/readyz", health.ready, "health")
    metadata = ProtectedResourceMetadata(config)
    for path in protected_resource_paths(config):
        routes.add(path, metadata.handle, "metadata")
    authserver, redemptions = _add_sign_in(routes, config, idp, limiter)
    mcp = app.router.add_resource("/{path:.*}")
    # everything else: authenticated
    mcp.add_route("*", _mcp_handler(config, app, pool, proxy, calls))
    route_classes[mcp] = "mcp"
    gate = Gate(config, verifier=token_check(config.tokens.validation, verifier, introspector),
                policy=policy, limiter=limiter, is_public=routes.is_public, sessions=sessions)
    front_door = FrontDoor(cors=Cors(config, routes.is_public, routes.is_navigation), gate=gate,
                           metrics=metrics)
    app.middlewares.append(front_door.middleware)
    _watch(metrics, idp, proxy, child, pool)

    # First in, last out: a taken METRICS_PORT fails start-up before the child is spawned, and
    # the numbers stay scrapable until everything else has stopped; the child outlives every
    # request.
    lifetimes: list[Callable[[], AbstractAsyncContextManager[object]]] = [metrics.running]
    if child is not None:
        app[CHILD] = child
        lifetimes.append(child.running)
    lifetimes += [idp.running, app[STDIO_POOL].running if pool is not None else app[PROXY].running,
                  limiter.running, redemptions.running, authserver.running]
    _add_introspection(app, metrics, introspector, lifetimes)
    if credential is not None:
        lifetimes.append(credential.running)
    if config.policy.files:
        app[ALLOW_FILES] = AllowListFiles(config.policy.files, policy)
        lifetimes.append(app[ALLOW_FILES].running)
    if tools is not None and config.tool_rules.file:
        app[TOOL_RULE_FILE] = ToolRuleFile(config.tool_rules.file, tools)
        lifetimes.append(app[TOOL_RULE_FILE].running)
    app.cleanup_ctx.extend(_lifetime(running) for running in lifetimes)
    app.on_response_prepare.append(front_door.before_headers)
    return app
