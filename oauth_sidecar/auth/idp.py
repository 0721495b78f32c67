"""The identity provider's discovery document and signing keys, cached and kept fresh.

Why: every token check needs the IdP's keys, but the IdP must never see load driven by our
callers. Keys are parsed once per fetch, fetched by one task at a time (single-flight), refreshed
in the background, and a failed fetch never wipes the last good set. An unknown `kid` triggers at
most one fetch per cooldown however many requests carry it (the peer let anyone force one fetch
per request). If the IdP is down at start-up we keep retrying with backoff and recover by itself.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import structlog
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

from oauth_sidecar.config import IdpConfig
from oauth_sidecar.metrics import Metrics
from oauth_sidecar.response_body import ResponseTooLarge, read_capped

log = structlog.get_logger("oauth_sidecar.idp")

RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
# RFC 7518 §3.4: each ES algorithm is bound to exactly one curve.
EC_CURVE_ALGORITHM = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
MIN_RSA_BITS = 2048  # NIST SP 800-131A: shorter RSA keys are not acceptable for signatures
MAX_KEYS = 100  # a key set larger than this is not a real IdP's; refuse to parse it
MAX_REDIRECTS = 3
RETRY_BACKOFF_MAX = 60.0
MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*(\d+)", re.IGNORECASE)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | (
    ed448.Ed448PublicKey
)


class IdpError(Exception):
    """A discovery or key-set fetch failed; `reason` is safe to log and show in /readyz."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A usable public key and the algorithms it may verify (from its kty, crv and alg)."""

    kid: str | None
    key: PublicKey
    algorithms: frozenset[str]


@dataclass(slots=True)
class KeySet:
    by_kid: dict[str | None, VerificationKey] = field(default_factory=dict)
    skipped: int = 0


def _public_key(jwk: Mapping[str, Any]) -> tuple[PublicKey, frozenset[str]]:
    """The JWK's public key and the algorithms its type can verify, or ValueError."""
    kty = jwk.get("kty")
    raw = json.dumps({k: v for k, v in jwk.items() if k != "d"})  # never load private parts
    try:
        if kty == "RSA":
            loaded = RSAAlgorithm.from_jwk(raw)
            if not isinstance(loaded, rsa.RSAPublicKey):
                raise ValueError("not an RSA public key")
            if loaded.key_size < MIN_RSA_BITS:
                raise ValueError(f"RSA key of {loaded.key_size} bits is too short")
            return loaded, frozenset(RSA_ALGORITHMS)
        if kty == "EC":
            loaded_ec = ECAlgorithm.from_jwk(raw)
            if not isinstance(loaded_ec, ec.EllipticCurvePublicKey):
                raise ValueError("not an EC public key")
            curve_alg = EC_CURVE_ALGORITHM.get(str(jwk.get("crv")))
            if curve_alg is None:
                raise ValueError("unsupported curve")
            return loaded_ec, frozenset({curve_alg})
        if kty == "OKP":
            loaded_okp = OKPAlgorithm.from_jwk(raw)
            if not isinstance(loaded_okp, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
                raise ValueError("OKP key is not an Ed25519/Ed448 signing key")
            return loaded_okp, frozenset({"EdDSA"})
    except (InvalidKeyError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed {kty} key: {exc}") from None
    raise ValueError(f"unsupported kty {kty!r}")


def parse_jwk(jwk: Mapping[str, Any], allowed: frozenset[str]) -> VerificationKey:
    """One JWK -> VerificationKey, or ValueError saying why it is unusable for us."""
    kty, alg, kid = jwk.get("kty"), jwk.get("alg"), jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    if jwk.get("use", "sig") != "sig":
        raise ValueError("not a signing key")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError("key_ops excludes verify")
    if alg is not None and not isinstance(alg, str):
        raise ValueError("alg is not a string")
    key, family = _public_key(jwk)
    # A JWK's `alg` narrows what it verifies; without one, pyjwt would assume RS256 and reject
    # PS256 tokens, so we derive the family from kty/crv instead.
    algorithms = family & allowed if alg is None else family & allowed & {alg}
    if not algorithms:
        raise ValueError(f"no allowed algorithm fits this key (alg={alg!r}, kty={kty!r})")
    return VerificationKey(kid=kid, key=key, algorithms=algorithms)


def parse_jwks(document: Any, allowed: frozenset[str]) -> KeySet:
    """Keep every usable key; skip (and count) the rest rather than failing the set."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise IdpError("JWKS is not a JSON object with a keys array")
    entries = document["keys"]
    if len(entries) > MAX_KEYS:
        raise IdpError(f"JWKS has {len(entries)} keys, more than {MAX_KEYS}")
    key_set = KeySet()
    for entry in entries:
        try:
            if not isinstance(entry, dict):
                raise ValueError("not an object")
            parsed = parse_jwk(entry, allowed)
        except ValueError as exc:
            key_set.skipped += 1
            log.warning("jwk_skipped", kid=str(entry.get("kid"))[:64] if isinstance(
                entry, dict) else None, reason=str(exc))
            continue
        if parsed.kid in key_set.by_kid:
            key_set.skipped += 1
            log.warning("jwk_skipped", kid=parsed.kid, reason="duplicate kid")
            continue
        key_set.by_kid[parsed.kid] = parsed
    if not key_set.by_kid:
        raise IdpError("JWKS has no usable signing key")
    return key_set


def same_issuer(a: str, b: str) -> bool:
    """Issuers are compared exactly except for one trailing slash (Authentik, Auth0 add one).
    The one rule for discovery documents, token `iss` claims and the doctor's words."""
    return a.removesuffix("/") == b.removesuffix("/")


def acceptable_url(url: str, issuer: str) -> bool:
    """Whether a URL the IdP's metadata names may be fetched or posted to: https, or plain http
    only when the issuer itself is (loopback or OIDC_ALLOW_HTTP). The one rule for jwks_uri,
    redirects and the introspection endpoint."""
    parts = urlsplit(url)
    issuer_is_http = urlsplit(issuer).scheme == "http"
    return bool(parts.hostname) and (
        parts.scheme == "https" or (parts.scheme == "http" and issuer_is_http)
    )


def discovery_urls(issuer: str) -> list[str]:
    """Where OIDC Discovery §4 and RFC 8414 §3.1 put the metadata for this issuer."""
    parts = urlsplit(issuer.removesuffix("/"))
    origin, path = f"{parts.scheme}://{parts.netloc}", parts.path
    urls = [f"{origin}{path}/.well-known/openid-configuration"]
    urls.append(f"{origin}/.well-known/oauth-authorization-server{path}")
    if path:
        urls.append(f"{origin}/.well-known/openid-configuration{path}")
    return urls


class IdentityProvider:
    """Discovery document + key set for one issuer, safe to share across all requests."""

    def __init__(
        self, config: IdpConfig, algorithms: frozenset[str], metrics: Metrics | None = None
    ) -> None:
        self._config = config
        self._metrics = metrics or Metrics()
        self._algorithms = algorithms
        self._session: aiohttp.ClientSession | None = None
        self._keys = KeySet()
        self._metadata: dict[str, Any] | None = None
        self._jwks_uri: str | None = None
        self._jwks_flight: asyncio.Task[None] | None = None
        self._last_jwks_attempt = -float("inf")
        self._next_refresh = 0.0
        self.last_error: str | None = "not fetched yet"
        self.last_success: float | None = None
        self.fetches = 0
        """Outbound HTTP requests made, for tests and metrics."""

    @property
    def ready(self) -> bool:
        return bool(self._keys.by_kid)

    @property
    def issuer(self) -> str:
        return self._config.issuer

    @property
    def metadata(self) -> dict[str, Any] | None:
        """The last good discovery document."""
        return self._metadata

    def key_count(self) -> int:
        return len(self._keys.by_kid)

    def get_key(self, kid: str | None) -> VerificationKey | None:
        return self._keys.by_kid.get(kid)

    def all_keys(self) -> list[VerificationKey]:
        return list(self._keys.by_kid.values())

    @asynccontextmanager
    async def running(self) -> AsyncIterator[IdentityProvider]:
        """Own an HTTP session and the background refresher for the app's lifetime."""
        timeout = aiohttp.ClientTimeout(total=self._config.timeout)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            self._session = session
            task = asyncio.create_task(self._refresh_forever(), name="idp-refresher")
            try:
                yield self
            finally:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
                if self._jwks_flight is not None:
                    self._jwks_flight.cancel()
                    with suppress(asyncio.CancelledError, IdpError):  # a failed last fetch
                        await self._jwks_flight
                self._session = None

    async def refresh_for_unknown_kid(self) -> None:
        """Fetch the key set again unless one was fetched within the cooldown."""
        if self._jwks_uri is None:
            return
        if time.monotonic() - self._last_jwks_attempt < self._config.jwks_cooldown:
            if self._jwks_flight is not None:  # join the fetch already under way
                with suppress(IdpError):
                    await asyncio.shield(self._jwks_flight)
            return
        with suppress(IdpError):
            await self._fetch_jwks_once("unknown_kid")

    async def _refresh_forever(self) -> None:
        failures = 0
        while True:
            try:
                await self._load_metadata()
                await self._fetch_jwks_once("scheduled")
            except Exception as exc:  # a bug must not end refreshing for the process's lifetime
                failures += 1
                self.last_error = exc.reason if isinstance(exc, IdpError) else repr(exc)
                delay = min(RETRY_BACKOFF_MAX, 0.5 * 2**failures) * random.uniform(0.8, 1.2)  # noqa: S311
                log.error("idp_refresh_failed", error=self.last_error, retry_in=round(delay, 1),
                          have_keys=self.ready)
                await asyncio.sleep(delay)
                continue
            failures = 0
            await asyncio.sleep(max(self._next_refresh - time.monotonic(), 1.0))

    async def _fetch_jwks_once(self, reason: str) -> None:
        """Single-flight: concurrent callers share one fetch."""
        if self._jwks_flight is None or self._jwks_flight.done():
            self._last_jwks_attempt = time.monotonic()
            self._jwks_flight = asyncio.create_task(self._load_jwks(reason))
            # Retrieve the outcome even if every waiter was cancelled (no "never retrieved").
            self._jwks_flight.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(self._jwks_flight)

    async def _load_metadata(self) -> None:
        errors = []
        for url in discovery_urls(self._config.issuer):
            try:
                document, _ = await self._get_json(url)
            except IdpError as exc:
                errors.append(f"{url}: {exc.reason}")
                continue
            issuer = document.get("issuer")
            if not isinstance(issuer, str) or not same_issuer(issuer, self._config.issuer):
                raise IdpError(
                    f"discovery document at {url} names issuer {issuer!r}, "
                    f"not OIDC_ISSUER_URL {self._config.issuer!r}"
                )
            if issuer != self._config.issuer and self._metadata is None:  # once, at start-up
                # Tolerated for tokens, but MCP clients compare the metadata's issuer exactly.
                log.warning("issuer_trailing_slash", configured=self._config.issuer,
                            published=issuer, fix=f"set OIDC_ISSUER_URL={issuer}")
            jwks_uri = document.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not self._acceptable_url(jwks_uri):
                raise IdpError(f"discovery document at {url} has no usable jwks_uri")
            self._metadata, self._jwks_uri = document, jwks_uri
            return
        raise IdpError("no discovery document: " + "; ".join(errors))

    async def _load_jwks(self, reason: str) -> None:
        if self._jwks_uri is None:
            raise IdpError("no jwks_uri yet")
        try:
            document, max_age = await self._get_json(self._jwks_uri)
            key_set = parse_jwks(document, self._algorithms)
        except IdpError as exc:
            self.last_error = f"jwks: {exc.reason}"
            log.warning("jwks_fetch_failed", reason=reason, error=exc.reason, kept=self.key_count())
            self._metrics.jwks_fetched(reason, ok=False)
            raise IdpError(self.last_error) from None
        refresh = self._config.jwks_refresh if max_age is None else max_age
        refresh = min(max(refresh, self._config.jwks_cooldown), 86400.0)
        self._next_refresh = time.monotonic() + refresh
        old = set(self._keys.by_kid)
        for kid, key in key_set.by_kid.items():  # keep identity of unchanged keys (token cache)
            previous = self._keys.by_kid.get(kid)
            if previous == key:
                key_set.by_kid[kid] = previous
        self._keys = key_set
        self.last_error, self.last_success = None, time.time()
        self._metrics.jwks_fetched(reason, ok=True)
        new = set(key_set.by_kid)
        if new != old or reason != "scheduled":
            log.info("jwks_refreshed", reason=reason, keys=len(new), skipped=key_set.skipped,
                     added=len(new - old), removed=len(old - new))

    def _acceptable_url(self, url: str) -> bool:
        return acceptable_url(url, self._config.issuer)

    async def _get_json(self, url: str) -> tuple[dict[str, Any], float | None]:
        """GET a JSON object: bounded size, same-host redirects only, no cookies."""
        session = self._session
        if session is None:
            raise IdpError("not running")
        for _ in range(MAX_REDIRECTS + 1):
            self.fetches += 1
            try:
                async with session.get(
                    url, allow_redirects=False, headers={"Accept": "application/json"}
                ) as response:
                    if response.status in (301, 302, 303, 307, 308):
                        target = urljoin(url, response.headers.get("Location", ""))
                        if urlsplit(target).netloc != urlsplit(url).netloc or not (
                            self._acceptable_url(target)
                        ):
                            raise IdpError(f"redirect to another host not followed ({target})")
                        url = target
                        continue
                    if response.status != 200:
                        raise IdpError(f"HTTP {response.status}")
                    body = await read_capped(response, self._config.max_document_bytes)
                    max_age = MAX_AGE.search(response.headers.get("Cache-Control", ""))
            except ResponseTooLarge as exc:
                raise IdpError(f"document larger than {exc.limit} bytes") from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise IdpError(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
            try:
                document = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise IdpError("response is not JSON") from None
            if not isinstance(document, dict):
                raise IdpError("response is not a JSON object")
            return document, float(max_age.group(1)) if max_age else None
        raise IdpError("too many redirects")
