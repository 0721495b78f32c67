"""What the gate leaves on a request for the modules after it (the proxy, the access log, CORS).

Why a module of its own: those modules read these keys without needing the gate itself, so they
import this small neutral module instead of the gate and its rate limiter, policy and verifier.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Principal:
    """The verified caller."""

    issuer: str
    subject: str
    claims: Mapping[str, Any]
    expires_at: float
    kid: str | None


@dataclass(frozen=True, slots=True)
class PresentedSession:
    """The Mcp-Session-Id a request presented, which the gate let it use."""

    id: str
    bound: bool  # already bound to this caller; False: bound to nobody yet


PRINCIPAL = web.RequestKey("principal", Principal)  # the verified caller, set once admitted
SESSION = web.RequestKey("session", PresentedSession)  # set by the gate when one was presented
AUTH_FAILURE = web.RequestKey("auth_failure", str)  # why a request was refused, for logs/metrics

IsPublic = Callable[[web.Request], bool]  # is this request for a route that needs no token?
