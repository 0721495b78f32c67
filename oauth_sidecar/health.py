"""Liveness and readiness, for Kubernetes probes and load balancers.

Why: `/healthz` says the process serves requests; `/readyz` says it can do its job (keys loaded,
upstream reachable, the spawned child running), so traffic is held back while the IdP is down at
start-up instead of every caller getting a confusing 401. Both are public: `/readyz` names the
part that is not ready in fixed words, and the details (addresses, ports, error texts, how the
child exited) go to the log once per change and to `oauth-sidecar check`, never to the caller.
"""

from __future__ import annotations

import structlog
from aiohttp import web

from oauth_sidecar.auth.idp import IdentityProvider
from oauth_sidecar.upstream.child import ChildProcess
from oauth_sidecar.upstream.proxy import UpstreamProxy

log = structlog.get_logger("oauth_sidecar.health")

READY = "ready"
NO_KEYS = "no_keys"  # the IdP's signing keys are not loaded (yet)
UNREACHABLE = "unreachable"  # the upstream refuses or does not answer connections
# The child's words are its states: starting, backoff, failed, stopped (child.ChildState).


class Health:
    def __init__(
        self, idp: IdentityProvider, proxy: UpstreamProxy | None,
        child: ChildProcess | None = None
    ) -> None:
        self._idp = idp
        self._proxy = proxy
        self._child = child
        self._not_ready: tuple[str, ...] = ()
        """The parts not ready at the last probe: a change is logged, a repeat is not."""

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})

    async def ready(self, request: web.Request) -> web.Response:
        checks = {"idp": READY if self._idp.ready else NO_KEYS}
        if self._proxy is not None:  # stdio children are started per session: nothing to reach
            checks["upstream"] = READY if await self._proxy.reachable() else UNREACHABLE
        if self._child is not None:
            checks["child"] = READY if self._child.ready else str(self._child.state)
        not_ready = tuple(part for part, word in checks.items() if word != READY)
        if not_ready != self._not_ready:
            self._not_ready = not_ready
            self._log_change(not_ready)
        return web.json_response(
            {"status": "not_ready" if not_ready else READY, "checks": checks},
            status=503 if not_ready else 200, headers={"Cache-Control": "no-store"},
        )

    def _log_change(self, not_ready: tuple[str, ...]) -> None:
        if not not_ready:
            log.info("ready")
            return
        details: dict[str, str | None] = {}
        if "idp" in not_ready:
            details["idp"] = self._idp.last_error
        if "upstream" in not_ready and self._proxy is not None:
            details["upstream"] = self._proxy.unreachable
        if "child" in not_ready and self._child is not None:
            details["child"] = f"{self._child.state}, last exit: {self._child.last_exit}"
        log.warning("not_ready", parts=list(not_ready), **details)
