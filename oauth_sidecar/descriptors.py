"""File descriptors: the process's limit raised at start-up, and the connection caps fitted to it.

Why: every client connection costs a descriptor, a proxied one a second (its upstream connection)
and, with Redis, the pools' connections for its calls. 300 event streams of one user ran a
sidecar with a 512-descriptor limit out of them: `accept()` failed ("out of system resource") and
another user's upstream connection failed (502). So the soft RLIMIT_NOFILE is raised to the hard
one (containers often start with a soft limit of 1024 under a far higher hard one), and
MAX_CONNECTIONS is lowered to what the limit carries after a reserve for everything else: a
connection beyond the cap is then answered 503 by the listener instead of `accept()` failing, and
the sidecar can still answer, log and reach its IdP. One subject's event streams are held to half
the connections, so one user cannot take them all.
"""

from __future__ import annotations

import dataclasses
import resource
from dataclasses import dataclass

from oauth_sidecar.config import Config

# Descriptors kept for everything but client connections and their upstream ones: stdio, the
# event loop, the listeners (HOST:PORT, metrics), the IdP and token-relay sessions, a spawned
# child's pipes, the log; 16 measured at rest. Half of it is the listener's last margin
# (listener.py refuses a connection whose descriptor number reaches into it).
RESERVED = 64
# A proxied connection: the client's and the upstream's.
PER_CONNECTION = 2
# With Redis, add one connection in each of its pools (rate limits, sign-in redemptions): a pool
# grows to the calls in flight, and each connection has at most one.
PER_CONNECTION_WITH_REDIS = 4
# What an unlimited hard limit is raised to: Linux's default fs.nr_open, the most it allows.
UNLIMITED = 1 << 20


@dataclass(frozen=True, slots=True)
class Limit:
    """RLIMIT_NOFILE after start-up: soft, hard (None: unlimited), and the soft one found."""

    soft: int
    hard: int | None
    raised_from: int


def _finite(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY else value


def raise_limit() -> Limit:
    """Raise the soft limit to the hard one (capped at UNLIMITED); keep it if the kernel refuses."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    found = UNLIMITED if soft == resource.RLIM_INFINITY else soft
    target = min(_finite(hard) or UNLIMITED, UNLIMITED)
    if found < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # e.g. fs.nr_open below the target: run with what we have
            target = found
    return Limit(soft=max(found, target), hard=_finite(hard), raised_from=found)


def soft_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return UNLIMITED if soft == resource.RLIM_INFINITY else soft


def per_connection(config: Config) -> int:
    uses_redis = not config.rate_limits.storage_uri.startswith("async+memory")
    return PER_CONNECTION_WITH_REDIS if uses_redis else PER_CONNECTION


def fit(config: Config, soft: int) -> Config:
    """The configuration with MAX_CONNECTIONS lowered to what `soft` descriptors carry, and a
    positive MAX_STREAMS_PER_SUBJECT to half of that (0 stays the operator's "no limit")."""
    connections = max(1, min(config.listener.max_connections,
                             (soft - RESERVED) // per_connection(config)))
    streams = config.upstream.max_streams_per_subject
    if streams:
        streams = max(1, min(streams, connections // 2))
    return dataclasses.replace(
        config,
        listener=dataclasses.replace(config.listener, max_connections=connections),
        upstream=dataclasses.replace(config.upstream, max_streams_per_subject=streams),
    )
