"""Liveness and readiness, for Kubernetes probes and load balancers.

Why: `/healthz` says the process serves requests; `/readyz` says it can do its job (keys loaded,
upstream reachable), so traffic is held back while the IdP is down at start-up instead of every
caller getting a confusing 401. Neither reveals internal addresses.
"""

from __future__ import annotations

from aiohttp import web

from oauth_sidecar.child import ChildProcess
from oauth_sidecar.idp import IdentityProvider
from oauth_sidecar.proxy import UpstreamProxy


class Health:
    def __init__(
        self, idp: IdentityProvider, proxy: UpstreamProxy, child: ChildProcess | None = None
    ) -> None:
        self._idp = idp
        self._proxy = proxy
        self._child = child

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})

    async def ready(self, request: web.Request) -> web.Response:
        keys_ok = self._idp.ready
        upstream_ok = await self._proxy.reachable()
        checks: dict[str, dict[str, object]] = {
            "keys": {"ok": keys_ok, "count": self._idp.key_count(), "error": self._idp.last_error},
            "upstream": {"ok": upstream_ok},
        }
        ok = keys_ok and upstream_ok
        if self._child is not None:
            child = self._child
            checks["child"] = {"ok": child.ready, "state": str(child.state),
                               "restarts": child.restarts, "last_exit": child.last_exit}
            ok = ok and child.ready
        return web.json_response(
            {"status": "ready" if ok else "not_ready", "checks": checks},
            status=200 if ok else 503, headers={"Cache-Control": "no-store"},
        )
