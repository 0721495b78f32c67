"""create_app(config): builds the components, routes, middleware and lifecycles; nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from aiohttp import web

from oauth_sidecar import __version__
from oauth_sidecar.auth.allow_files import AllowListFiles
from oauth_sidecar.auth.gate import Gate
from oauth_sidecar.auth.idp import IdentityProvider
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
from oauth_sidecar.health import Health
from oauth_sidecar.http_errors import json_errors, method_not_allowed
from oauth_sidecar.log import access_log, add_request_id
from oauth_sidecar.metrics import METRICS, Metrics, PrometheusMetrics
from oauth_sidecar.outcome import Handler
from oauth_sidecar.request_keys import AUTH_FAILURE
from oauth_sidecar.server_header import name_server
from oauth_sidecar.signin.authserver import CALLBACK_PATH, AuthorizationServer
from oauth_sidecar.signin.metadata import REGISTRATION_PATH, FacadeMetadata
from oauth_sidecar.signin.redemptions import redemption_store
from oauth_sidecar.signin.registration import RedirectAllowList, StaticRegistration
from oauth_sidecar.upstream.child import ChildProcess
from oauth_sidecar.upstream.credential import UpstreamCredential
from oauth_sidecar.upstream.proxy import UpstreamProxy

IDP = web.AppKey("idp", IdentityProvider)
VERIFIER = web.AppKey("verifier", TokenVerifier)
PROXY = web.AppKey("proxy", UpstreamProxy)
SESSIONS = web.AppKey("sessions", SessionBindings)
CHILD = web.AppKey("child", ChildProcess)
ALLOW_FILES = web.AppKey("allow_files", AllowListFiles)


def _lifetime(
    running: Callable[[], AbstractAsyncContextManager[object]],
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        async with running():
            yield

    return context


def _watch(
    metrics: Metrics, idp: IdentityProvider, proxy: UpstreamProxy, child: ChildProcess | None
) -> None:
    """What the components already keep, read at each scrape (nothing per request)."""
    metrics.watch("open_streams", "Event streams (SSE) being relayed now", proxy.open_streams)
    metrics.watch("proxied_in_flight", "Requests being forwarded upstream now", proxy.in_flight)
    metrics.watch("jwks_keys", "Usable signing keys held", idp.key_count)
    if child is not None:
        metrics.watch("child_up", "1 while the spawned MCP server is ready, else 0",
                      lambda: float(child.ready))
        metrics.watch("child_restarts", "Restarts of the spawned MCP server",
                      lambda: child.restarts, counter=True)


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
    policy = AccessPolicy(config.policy, forwarded=config.forward_identity)
    verifier = TokenVerifier(config.tokens, idp, policy.kept_claims)
    addresses = ClientAddress(config.trusted_proxies)
    limiter = RateLimiter(config.rate_limits, metrics, addresses)
    sessions = SessionBindings(config.session_ttl)
    credential = (
        UpstreamCredential(config.upstream_bearer_file, on_token=on_upstream_token)
        if config.upstream_bearer_file else None
    )
    child = ChildProcess(config.spawn, on_child_give_up) if config.spawn else None
    proxy = UpstreamProxy(config, policy=policy, addresses=addresses, sessions=sessions,
                          credential=credential, child=child, metrics=metrics)
    public: set[web.AbstractResource] = set()
    navigations: set[web.AbstractResource] = set()  # public, but no CORS: browsers navigate
    # Middlewares are added once the routes exist: the gate and CORS get the finished sets.
    # client_max_size: only public handlers read bodies; the proxy streams.
    app = web.Application(client_max_size=64 * 1024)
    app[IDP], app[VERIFIER], app[PROXY], app[SESSIONS] = idp, verifier, proxy, sessions
    app[METRICS] = metrics

    def add_public(path: str, handler: Handler, kind: str,
                   methods: tuple[str, ...] = ("GET", "HEAD"), navigation: bool = False) -> None:
        resource = app.router.add_resource(path)
        if navigation:
            navigations.add(resource)
        for method in methods:
            resource.add_route(method, handler)
        # Terminal for every other method: a public path never falls through to the proxy.
        resource.add_route("*", method_not_allowed(", ".join(methods)))
        public.add(resource)
        route_classes[resource] = kind

    health = Health(idp, proxy, child)
    add_public("/healthz", health.live, "health")
    add_public("/readyz", health.ready, "health")
    metadata = ProtectedResourceMetadata(config)
    for path in protected_resource_paths(config):
        add_public(path, metadata.handle, "metadata")
    redirects = RedirectAllowList(config.auth_server)
    redemptions = redemption_store(config.rate_limits.storage_uri)  # beside the rate limits
    authserver = AuthorizationServer(config, idp, redirects, redemptions=redemptions)
    registration = StaticRegistration(config.auth_server, redirects,
                                      config.upstream.body_timeout)
    # Claude.ai calls these on the MCP origin whatever the metadata says: serve them in both modes.
    # Unauthenticated work: each call spends the client IP's budget first (limiter.guard).
    add_public("/authorize", limiter.guard(authserver.authorize), "oauth", navigation=True)
    add_public("/token", limiter.guard(authserver.token), "oauth", ("POST",))
    register = limiter.guard(registration.handle)
    for path in (REGISTRATION_PATH, "/register"):
        add_public(path, register, "oauth", ("POST",))
    if authserver.facade:
        add_public(CALLBACK_PATH, authserver.callback, "oauth", navigation=True)
        facade_document = FacadeMetadata(config, idp)
        for path in authorization_server_metadata_paths(config):
            add_public(path, facade_document.handle, "metadata")
    mcp = app.router.add_resource("/{path:.*}")
    mcp.add_route("*", proxy.handle)  # everything else: authenticated
    route_classes[mcp] = "mcp"
    public_routes, navigation_routes = frozenset(public), frozenset(navigations)

    def is_public(request: web.Request) -> bool:
        return request.match_info.route.resource in public_routes

    def is_navigation(request: web.Request) -> bool:
        return request.match_info.route.resource in navigation_routes

    gate = Gate(config, verifier=verifier, policy=policy, limiter=limiter, addresses=addresses,
                is_public=is_public, sessions=sessions)
    cors = Cors(config, is_public, is_navigation)
    app.middlewares.extend([access_log, *metrics.middlewares(), json_errors, cors.middleware,
                            gate.middleware])
    _watch(metrics, idp, proxy, child)

    # First in, last out: a taken METRICS_PORT fails start-up before the child is spawned, and
    # the numbers stay scrapable until everything else has stopped.
    app.cleanup_ctx.append(_lifetime(metrics.running))
    if child is not None:  # the child outlives every request
        app[CHILD] = child
        app.cleanup_ctx.append(_lifetime(child.running))
    app.cleanup_ctx.append(_lifetime(idp.running))
    app.cleanup_ctx.append(_lifetime(proxy.running))
    app.cleanup_ctx.append(_lifetime(limiter.running))
    app.cleanup_ctx.append(_lifetime(redemptions.running))
    app.cleanup_ctx.append(_lifetime(authserver.running))
    if credential is not None:
        app.cleanup_ctx.append(_lifetime(credential.running))
    if config.policy.files:
        app[ALLOW_FILES] = AllowListFiles(config.policy.files, policy)
        app.cleanup_ctx.append(_lifetime(app[ALLOW_FILES].running))
    app.on_shutdown.append(proxy.stop)
    app.on_response_prepare.append(cors.decorate)
    app.on_response_prepare.append(add_request_id)
    app.on_response_prepare.append(name_server)
    return app
