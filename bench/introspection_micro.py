"""Microbenchmark: the product's Introspector, in process, µs per token (cache hit and miss),
beside the TokenVerifier's.

    .venv/bin/python bench/introspection_micro.py [--tokens 1000] [--repeats 5] [--json]

bench/run.py runs it pinned to the system-under-test CPU (measure `introspection`). The
introspector is built as the app builds it (`Introspector(TokenConfig, provider,
policy.kept_claims)`, every signed-in user admitted, the product's defaults: 30 s cache, 16
calls in flight), beside jwt_micro's TokenVerifier (RS256 2048) for the same comparison. Each
figure is the best of --repeats passes (timeit's rule), in this process's CPU time
(time.process_time), not wall time: on a shared machine a pass of 100 ms is often descheduled,
and the time others' work takes is not ours:

- hit: `cached(token)`, what the gate calls first (sha256 + dict lookup + expiry check), for
  an opaque token and for a JWT, and a full `verify()` that hits each cache;
- miss, no network: `verify()` of opaque tokens never seen, each pass with a fresh
  introspector whose HTTP exchange is replaced by the answer's bytes (everything the sidecar
  does for a miss except the aiohttp client: the task, the timeout and the slot, the form,
  parsing the answer, the claim checks, the Principal and the cache entry), against a JWT
  miss (`verify()`, one RSA check);
- parts of that miss: the form body (urlencode), parsing the answer (json.loads), the claim
  checks, the Principal and its cache entry;
- miss over HTTP: `verify()` of new tokens against bench/perf_services.py's RFC 7662
  endpoint in a child process on loopback, one at a time and 64 at a time (INTROSPECTION_MAX_
  CONCURRENCY=16 of them in flight): this process's CPU time per miss (time.process_time: the
  aiohttp client included, the wait and the IdP's own work not), and the wall time per miss.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jwt_micro import ALGORITHMS, AUDIENCE, BenchKey, StaticKeys, run_sync
from loopback import free_port
from perf_services import (
    INTROSPECTION_CLIENT_ID,
    INTROSPECTION_CLIENT_SECRET,
    introspection_answer,
    opaque_token,
)

from oauth_sidecar.auth.claims import principal_of
from oauth_sidecar.auth.idp import parse_jwk
from oauth_sidecar.auth.introspection import NO_HEADER, Introspector
from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.auth.token_cache import ENTRY_OVERHEAD, footprint
from oauth_sidecar.auth.tokens import TokenVerifier
from oauth_sidecar.config import IntrospectionConfig, PolicyConfig, TokenConfig

BENCH = Path(__file__).resolve().parent
ISSUER = "http://127.0.0.1:1"  # the offline passes: no IdP; the HTTP ones use the child's
CONCURRENT = 64  # in flight at once in the concurrent HTTP pass, as wrk -c64 in run.py
START_TIMEOUT = 30.0  # seconds for the child IdP to answer


class Provider(StaticKeys):
    """The identity provider as the introspector sees it: keys, and a discovery document."""

    def __init__(self, keys: StaticKeys, metadata: dict[str, Any]) -> None:
        super().__init__(keys.all_keys())
        self._metadata = metadata

    @property
    def metadata(self) -> dict[str, Any] | None:
        return self._metadata


class Offline(Introspector):
    """An introspector whose HTTP exchange is the answer's bytes, made beforehand: what it does
    with them is the product's code (the form built as _ask builds it, _json_answer)."""

    answers: dict[str, bytes]

    async def _ask(self, token: str) -> tuple[dict[str, Any], bool]:
        target = self.target()
        urlencode((("token", token), ("token_type_hint", "access_token"), *target.form)).encode(
            "ascii")
        return self._json_answer(self.answers[token]), False


def configs(issuer: str) -> TokenConfig:
    return TokenConfig(
        issuer=issuer, audiences=(AUDIENCE,), algorithms=ALGORITHMS, leeway=30,
        max_token_bytes=16384, cache_size=10_000, validation="introspection",
        introspection=IntrospectionConfig(
            endpoint="", client_id=INTROSPECTION_CLIENT_ID,
            client_secret=INTROSPECTION_CLIENT_SECRET, auth_method="", cache_seconds=30.0,
            negative_cache_seconds=5.0, require_exp=True, max_concurrency=16, timeout=5.0))


def metadata_of(issuer: str) -> dict[str, Any]:
    return {"issuer": issuer, "introspection_endpoint": issuer + "/introspect",
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic"]}


def best_us(repeats: int, count: int, run: Callable[[], object]) -> float:
    """Best of `repeats` passes of run(), which handles `count` tokens; CPU µs per token."""
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        run()
        best = min(best, (time.process_time() - started) / count)
    return best * 1e6


def best_async_us(repeats: int, count: int, run: Callable[[], Coroutine[Any, Any, None]]) -> float:
    """best_us for a pass that needs the event loop (one loop for every pass)."""
    async def passes() -> float:
        best = float("inf")
        for _ in range(repeats):
            started = time.process_time()
            await run()
            best = min(best, (time.process_time() - started) / count)
        return best * 1e6

    return asyncio.run(passes())


def measure(tokens: int, repeats: int) -> dict[str, Any]:
    key = BenchKey(ISSUER)
    keys = StaticKeys([parse_jwk(key.jwk(), ALGORITHMS)])
    provider = Provider(keys, metadata_of(ISSUER))
    config = configs(ISSUER)
    policy = AccessPolicy(PolicyConfig(
        subs=frozenset(), emails=frozenset(), email_domains=frozenset(), groups=frozenset(),
        groups_claim=("groups",), allow_all_authenticated=True, allow_unverified_email=False,
        required_scopes=()), forwarded=False)
    opaque = [opaque_token(f"bench-user-{i}") for i in range(tokens)]
    jwts = [key.mint(f"bench-user-{i}") for i in range(tokens)]
    hits = 20_000
    now = time.time()
    raws = {t: json.dumps(introspection_answer(t, ISSUER, now)).encode() for t in opaque}

    def new_introspector() -> Offline:
        introspector = Offline(config, provider, policy.kept_claims)
        introspector.answers = raws
        return introspector

    def new_verifier() -> TokenVerifier:
        return TokenVerifier(config, keys, policy.kept_claims)

    async def warm_both() -> tuple[Offline, TokenVerifier]:
        introspector, verifier = new_introspector(), new_verifier()
        await introspector.verify(opaque[0])
        await verifier.verify(jwts[0])
        return introspector, verifier

    warm, verifier = asyncio.run(warm_both())
    if warm.cached(opaque[0]) is None or verifier.cached(jwts[0]) is None:
        raise RuntimeError("the tokens did not verify")
    same_opaque, same_jwt = opaque[0], jwts[0]

    def opaque_hits() -> None:
        for _ in range(hits):
            warm.cached(same_opaque)

    def jwt_hits() -> None:
        for _ in range(hits):
            verifier.cached(same_jwt)

    def opaque_verify_hits() -> None:  # a hit never suspends: driven without a loop
        for _ in range(hits):
            run_sync(warm.verify(same_opaque))

    def jwt_verify_hits() -> None:
        for _ in range(hits):
            run_sync(verifier.verify(same_jwt))

    async def opaque_misses() -> None:
        introspector = new_introspector()
        for token in opaque:
            await introspector.verify(token)

    def jwt_misses() -> None:
        fresh = new_verifier()
        for token in jwts:
            run_sync(fresh.verify(token))

    figures: dict[str, Any] = {
        "hit_cached_opaque_us": best_us(repeats, hits, opaque_hits),
        "hit_cached_jwt_us": best_us(repeats, hits, jwt_hits),
        "hit_verify_opaque_us": best_us(repeats, hits, opaque_verify_hits),
        "hit_verify_jwt_us": best_us(repeats, hits, jwt_verify_hits),
        "miss_offline_opaque_us": best_async_us(repeats, tokens, opaque_misses),
        "miss_jwt_us": best_us(repeats, tokens, jwt_misses),
        **miss_parts(warm, policy, raws, repeats),
        "tokens": tokens, "repeats": repeats, "opaque_token_bytes": len(same_opaque),
        "answer_bytes": len(raws[same_opaque]), "jwt_token_bytes": len(same_jwt),
    }
    figures["miss_rest_us"] = figures["miss_offline_opaque_us"] - sum(
        figures[k] for k in PARTS)
    figures.update(over_http(provider, policy, tokens, repeats))
    return figures


def miss_parts(introspector: Introspector, policy: AccessPolicy, raws: dict[str, bytes],
               repeats: int) -> dict[str, float]:
    """The parts of a miss, each alone over the same tokens and answers."""
    opaque, tokens, now = list(raws), len(raws), time.time()

    def digests() -> None:
        for token in opaque:
            hashlib.sha256(token.encode()).digest()

    form = introspector.target().form

    def forms() -> None:
        for token in opaque:
            urlencode((("token", token), ("token_type_hint", "access_token"), *form)).encode(
                "ascii")

    def parses() -> None:
        for raw in raws.values():
            Introspector._json_answer(raw)

    answers = [Introspector._json_answer(raw) for raw in raws.values()]
    checks = introspector._checks

    def claim_checks() -> None:
        for answer in answers:
            for check in checks:
                check(NO_HEADER, answer, now)

    def principals() -> None:
        for answer in answers:
            principal, _ = principal_of(answer, policy.kept_claims, issuer=ISSUER,
                                        expires_at=float(answer["exp"]), kid=None)
            _ = ENTRY_OVERHEAD + sum(map(footprint, (
                principal.issuer, principal.subject, principal.claims)))

    return {"miss_sha256_us": best_us(repeats, tokens, digests),
            "miss_form_us": best_us(repeats, tokens, forms),
            "miss_parse_answer_us": best_us(repeats, tokens, parses),
            "miss_claim_checks_us": best_us(repeats, tokens, claim_checks),
            "miss_principal_entry_us": best_us(repeats, tokens, principals)}


def over_http(keys: StaticKeys, policy: AccessPolicy, tokens: int,
              repeats: int) -> dict[str, float]:
    """Misses against perf_services.py's endpoint in a child process: this process's CPU per
    miss (the aiohttp client included) and the wall time, one at a time and 64 at a time."""
    idp_port = free_port()
    issuer = f"http://127.0.0.1:{idp_port}"
    with tempfile.TemporaryDirectory(prefix="introspection-micro-") as directory:
        jwks = Path(directory) / "jwks.json"
        jwks.write_text('{"keys": []}')
        child = subprocess.Popen(  # noqa: S603 - our own fixture, by absolute path
            [sys.executable, str(BENCH / "perf_services.py"), "--sse-port", str(free_port()),
             "--idp-port", str(idp_port), "--jwks-file", str(jwks)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            # Pinned (run.py: to the system under test's CPU), the IdP gets the other CPUs.
            others = set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0)
            if others:
                os.sched_setaffinity(child.pid, others)
            wait_until_up(issuer + "/.well-known/openid-configuration", child)
            return asyncio.run(http_passes(Provider(keys, metadata_of(issuer)), policy,
                                           configs(issuer), tokens, repeats))
        finally:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(5)


def wait_until_up(url: str, child: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if child.poll() is not None:
            raise RuntimeError(f"perf_services.py exited with {child.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - loopback
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"perf_services.py did not answer within {START_TIMEOUT:.0f} s")
        time.sleep(0.1)


async def http_passes(provider: Provider, policy: AccessPolicy, config: TokenConfig,
                      tokens: int, repeats: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(repeats):
        for mode in ("sequential", "concurrent"):
            batch = [opaque_token(f"bench-user-{i}") for i in range(tokens)]
            introspector = Introspector(config, provider, policy.kept_claims)
            async with introspector.running():
                await introspector.verify(opaque_token("warm-up"))  # the connection is open
                cpu, wall = time.process_time(), time.perf_counter()
                if mode == "sequential":
                    for token in batch:
                        await introspector.verify(token)
                else:
                    gate = asyncio.Semaphore(CONCURRENT)

                    async def one(token: str, introspector: Introspector = introspector,
                                  gate: asyncio.Semaphore = gate) -> None:
                        async with gate:
                            await introspector.verify(token)

                    await asyncio.gather(*(one(token) for token in batch))
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if introspector.counts.calls["active"] != tokens + 1:
                raise RuntimeError(f"expected {tokens + 1} active answers, got "
                                   f"{introspector.counts.calls}")
            for name, value in ((f"miss_http_{mode}_cpu_us", cpu), (f"miss_http_{mode}_wall_us",
                                                                    wall)):
                best[name] = min(best.get(name, float("inf")), value / tokens * 1e6)
    return best


PARTS = ("miss_sha256_us", "miss_form_us", "miss_parse_answer_us", "miss_claim_checks_us",
         "miss_principal_entry_us")
ROWS = (
    ("hit_cached_opaque_us", "cache hit: Introspector.cached(opaque token) (what the gate calls)"),
    ("hit_cached_jwt_us", "cache hit: TokenVerifier.cached(JWT)"),
    ("hit_verify_opaque_us", "cache hit: Introspector.verify(opaque token)"),
    ("hit_verify_jwt_us", "cache hit: TokenVerifier.verify(JWT)"),
    ("miss_offline_opaque_us", "miss, no network: Introspector.verify() of a new token"),
    ("miss_sha256_us", "  of which sha256 of the token"),
    ("miss_form_us", "  of which the form body (urlencode)"),
    ("miss_parse_answer_us", "  of which parsing the answer (json.loads)"),
    ("miss_claim_checks_us", "  of which the claim checks"),
    ("miss_principal_entry_us", "  of which the Principal and its cache entry's size"),
    ("miss_rest_us", "  the rest: the call's task, timeout and slot, the cache, the counts"),
    ("miss_jwt_us", "miss: TokenVerifier.verify() of a new JWT (one RSA check)"),
    ("miss_http_sequential_cpu_us", "miss over HTTP, one at a time: this process's CPU"),
    ("miss_http_sequential_wall_us", "  wall time (the IdP's work and the loopback included)"),
    ("miss_http_concurrent_cpu_us", f"miss over HTTP, {CONCURRENT} at a time: this process's CPU"),
    ("miss_http_concurrent_wall_us", "  wall time per miss"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1000, help="distinct tokens [1000]")
    parser.add_argument("--repeats", type=int, default=5, help="passes, best taken [5]")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.tokens < 1 or args.repeats < 1:
        parser.error("--tokens and --repeats must be >= 1")
    result = measure(args.tokens, args.repeats)
    if args.json:
        print(json.dumps(result))
        return 0
    for name, label in ROWS:
        print(f"{label:<72} {result[name]:9.2f} µs")
    for name in ("tokens", "repeats", "opaque_token_bytes", "answer_bytes", "jwt_token_bytes"):
        print(f"{name:<72} {result[name]:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
