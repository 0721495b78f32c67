"""Microbenchmark: the product's TokenVerifier, in process, µs per token (cache hit and miss).

    .venv/bin/python bench/jwt_micro.py [--tokens 1000] [--repeats 5] [--json]

bench/run.py runs it pinned to the system-under-test CPU. The verifier is built exactly as the
app builds it (`TokenVerifier(TokenConfig, key source, policy.kept_claims)`, every signed-in
user admitted) over a fixed key set parsed by the product's `parse_jwk`, with RS256 2048-bit
tokens shaped like an IdP's access tokens. Its
coroutine never suspends for a known kid, so it is driven synchronously (no event loop in the
measurement). Each figure is the best of --repeats passes (timeit's rule: the minimum is the
cost, the rest is noise):

- hit: `cached(token)`, what the gate calls first (sha256 + dict lookup + expiry/key checks),
  and a full `verify()` call that hits the cache;
- miss: `verify()` of tokens never seen, each pass with a fresh verifier;
- parts of a miss: sha256, the strict parse, pyjwt's `decode` (parse + claims + signature) and
  the bare RSA signature check from `cryptography`;
- an unknown kid: the refusal of a token whose kid is not published (no fetch: the stub key
  source's refresh does nothing, as it does within the JWKS cooldown).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jwt.algorithms import RSAAlgorithm

from oauth_sidecar.auth.bearer import TokenError, parse_strict
from oauth_sidecar.auth.idp import VerificationKey, parse_jwk
from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.auth.tokens import TokenVerifier
from oauth_sidecar.config import PolicyConfig, TokenConfig

T = TypeVar("T")
AUDIENCE = "https://mcp.bench.test/mcp"
ISSUER = "http://127.0.0.1:1"  # the micro has no IdP: any issuer the tokens carry
KEY_ID = "bench-key-1"
ALGORITHMS = frozenset({"RS256"})


class BenchKey:
    """An RSA key the harness holds: its JWKS and RS256 tokens like an IdP's access tokens."""

    def __init__(self, issuer: str) -> None:
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.issuer = issuer

    def jwk(self) -> dict[str, Any]:
        data: dict[str, Any] = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        data.update({"kid": KEY_ID, "use": "sig", "alg": "RS256"})
        return data

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk()]}

    def mint(self, sub: str, lifetime: float = 7200.0, **extra: Any) -> str:
        now = int(time.time())
        payload = {"iss": self.issuer, "aud": AUDIENCE, "sub": sub, "iat": now, "nbf": now,
                   "exp": now + int(lifetime), "jti": uuid.uuid4().hex, "scope": "mcp",
                   "email": f"{sub}@bench.test", "email_verified": True, **extra}
        return jwt.encode(payload, self.private, algorithm="RS256", headers={"kid": KEY_ID})


def unknown_kid_token(template: str) -> str:
    """`template` with a random kid in its header; the signature no longer matters."""
    _, payload, signature = template.split(".")
    fields = {"alg": "RS256", "typ": "JWT", "kid": uuid.uuid4().hex}
    encoded = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    return f"{encoded}.{payload}.{signature}"


class StaticKeys:
    """The KeySource the verifier needs, over a fixed set (what the IdP cache holds)."""

    def __init__(self, keys: Sequence[VerificationKey]) -> None:
        self._by_kid = {k.kid: k for k in keys}

    @property
    def ready(self) -> bool:
        return True

    def get_key(self, kid: str | None) -> VerificationKey | None:
        return self._by_kid.get(kid)

    def all_keys(self) -> list[VerificationKey]:
        return list(self._by_kid.values())

    async def refresh_for_unknown_kid(self) -> None:
        return None


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends (no event loop in the measurement)."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("the coroutine suspended")


def best_us(repeats: int, count: int, run: Callable[[], object]) -> float:
    """Best of `repeats` passes of run(), which handles `count` tokens; µs per token."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - started) / count)
    return best * 1e6


def measure(tokens: int, repeats: int) -> dict[str, float]:
    key = BenchKey(ISSUER)
    verification = parse_jwk(key.jwk(), ALGORITHMS)
    keys = StaticKeys([verification])
    config = TokenConfig(issuer=ISSUER, audiences=(AUDIENCE,), algorithms=ALGORITHMS, leeway=30,
                         max_token_bytes=16384, cache_size=10_000)
    distinct = [key.mint(f"bench-user-{i}") for i in range(tokens)]
    same = distinct[0]
    hits = 20_000

    policy = AccessPolicy(PolicyConfig(
        subs=frozenset(), emails=frozenset(), email_domains=frozenset(), groups=frozenset(),
        groups_claim=("groups",), allow_all_authenticated=True, allow_unverified_email=False,
        required_scopes=()), forwarded=False)

    def new_verifier() -> TokenVerifier:
        return TokenVerifier(config, keys, policy.kept_claims)

    warm = new_verifier()
    run_sync(warm.verify(same))
    if warm.cached(same) is None:
        raise RuntimeError("the token did not verify")

    def cached_hits() -> None:
        for _ in range(hits):
            warm.cached(same)

    def verify_hits() -> None:
        for _ in range(hits):
            run_sync(warm.verify(same))

    def misses() -> None:
        verifier = new_verifier()
        for token in distinct:
            run_sync(verifier.verify(token))

    def digests() -> None:
        for token in distinct:
            hashlib.sha256(token.encode()).digest()

    def parses() -> None:
        for token in distinct:
            parse_strict(token)

    def decodes() -> None:
        for token in distinct:
            jwt.decode(token, verification.key, algorithms=["RS256"], audience=[AUDIENCE],
                       issuer=ISSUER, leeway=30, options={"require": ["exp", "iss", "aud", "sub"]})

    public = key.private.public_key()
    signed = []
    for token in distinct:
        head, body, signature = token.split(".")
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        signed.append((raw, f"{head}.{body}".encode()))

    def rsa_verifies() -> None:
        for raw, message in signed:
            public.verify(raw, message, padding.PKCS1v15(), hashes.SHA256())

    strangers = [unknown_kid_token(token) for token in distinct]

    def unknown_kids() -> None:
        verifier = new_verifier()
        for token in strangers:
            try:
                run_sync(verifier.verify(token))
            except TokenError:
                pass
            else:
                raise RuntimeError("a token with an unknown kid verified")

    return {
        "hit_cached_us": best_us(repeats, hits, cached_hits),
        "hit_verify_us": best_us(repeats, hits, verify_hits),
        "miss_verify_us": best_us(repeats, tokens, misses),
        "miss_sha256_us": best_us(repeats, tokens, digests),
        "miss_parse_strict_us": best_us(repeats, tokens, parses),
        "miss_pyjwt_decode_us": best_us(repeats, tokens, decodes),
        "miss_rsa_verify_us": best_us(repeats, tokens, rsa_verifies),
        "unknown_kid_reject_us": best_us(repeats, tokens, unknown_kids),
        "tokens": tokens,
        "repeats": repeats,
        "token_bytes": len(same),
    }


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
    else:
        for name, value in result.items():
            print(f"{name:<24} {value:10.2f}" if isinstance(value, float) else f"{name:<24} "
                  f"{value:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
