"""Bearer JWT -> Principal, or TokenError.

Why: this is the one place that decides whether a caller is who the token says. The invariants are
fixed at construction: algorithms come from configuration, never from the token; `iss`, `aud`,
`exp` and `sub` are always required; the key is chosen only from the IdP's published set (never
`jku`, `x5u`, `x5c` or an embedded `jwk`), and its type must fit the header's `alg`. The token
is parsed strictly first (bearer.py), because pyjwt tolerates duplicate JSON keys and padding;
times must be numbers; pyjwt's algorithms check the signature; the claims are checked with
pyjwt's semantics (tests/test_properties.py uses jwt.decode as the oracle). Verified tokens are
cached by hash until they expire, keeping only the claims a later request reads (token_cache.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Protocol

from jwt.algorithms import get_default_algorithms

from oauth_sidecar.auth.bearer import TokenError, invalid, parse_strict
from oauth_sidecar.auth.claims import (
    CLIENT_CLAIMS,
    ID_TOKEN_HASHES,
    TIME_CLAIMS,
    Check,
    ClaimChecks,
    KeptClaims,
    expired,
    explain_checks,
    keep_all,
    principal_of,
)
from oauth_sidecar.auth.idp import VerificationKey
from oauth_sidecar.auth.token_cache import ENTRY_OVERHEAD, TokenCache, footprint
from oauth_sidecar.config import TokenConfig
from oauth_sidecar.request_keys import Principal

__all__ = [  # the claim rules' names, also read here by the doctor's words and the tests
    "CLIENT_CLAIMS", "ID_TOKEN_HASHES", "Explanation", "KeySource", "TokenVerifier", "expired",
    "media_type",
]

MAX_KID_LENGTH = 256  # real kids are short ids or thumbprints; longer ones are probes
# Header `typ` values that mark a JWT as something other than an access token (a DPoP proof,
# RFC 9449; a logout token, OpenID Back-Channel Logout; a security event, RFC 8417; an ID token).
NON_ACCESS_TYPES = frozenset({"dpop+jwt", "logout+jwt", "secevent+jwt", "id_token+jwt", "jwe"})
MEDIA_TYPE_PREFIX = "application/"
RFC9068_MEDIA_TYPE = "application/at+jwt"  # a JWT access token that says so (RFC 9068 §2.1)
NON_ACCESS_MEDIA_TYPES = frozenset(MEDIA_TYPE_PREFIX + name for name in NON_ACCESS_TYPES)


class KeySource(Protocol):
    """What the verifier needs from the identity provider (see idp.IdentityProvider)."""

    @property
    def ready(self) -> bool: ...

    def get_key(self, kid: str | None) -> VerificationKey | None: ...

    def all_keys(self) -> list[VerificationKey]: ...

    async def refresh_for_unknown_kid(self) -> None: ...


def media_type(typ: str) -> str:
    """A `typ` as the media type it names (RFC 7515 §4.1.9): compared case-insensitively, and a
    value without "/" stands for `application/` + value; parameters (`; x=y`) do not count."""
    name = typ.partition(";")[0].strip().lower()
    return name if "/" in name else MEDIA_TYPE_PREFIX + name


async def select_key(keys: KeySource, kid: str | None, alg: str) -> VerificationKey:
    """The published key a JWS names by `kid` (an unknown kid may refresh the set once per
    cooldown; no kid: the one key that fits alg), fit for `alg`; 503 while no keys are loaded.
    The one rule for access tokens and signed introspection answers (RFC 9701)."""
    key = keys.get_key(kid)
    if key is None and kid is None:
        candidates = [k for k in keys.all_keys() if alg in k.algorithms]
        key = candidates[0] if len(candidates) == 1 else None
    if key is None and kid is not None:
        await keys.refresh_for_unknown_kid()
        key = keys.get_key(kid)
    if key is None:
        if not keys.ready:
            raise TokenError(
                "keys_unavailable", "The identity provider's keys are not available yet",
                error="temporarily_unavailable", status=503,
            )
        raise invalid("unknown_kid", "The token was not signed by a known key")
    if alg not in key.algorithms:
        raise invalid("alg_key_mismatch", "The token's algorithm does not fit its key")
    return key


@dataclass(frozen=True, slots=True)
class Explanation:
    """Every check's outcome for one token, as `oauth-sidecar check --token` shows it."""

    outcomes: dict[str, TokenError | None]
    """By check name, in the verifier's order: None when it passed, else its first failure. A
    name is absent when a check it needs failed first (no key, no signature check)."""
    error: TokenError | None
    """What verify() raises for this token (the first failure in order); None: it verifies."""
    header: dict[str, Any] | None = None
    payload: dict[str, Any] | None = None
    """Both None when the token does not parse ("format" failed)."""
    key: VerificationKey | None = None


class TokenVerifier:
    """Verifies access tokens for one issuer and audience set.

    The checks form one ordered table of named checks: verify() stops at the first failure (the
    hot path of a cache miss), explain() runs them all and reports each, so the doctor's verdict
    and its claim lines are this class's and cannot drift from it. A name appears twice where a
    claim is checked in two steps: its type before the signature, its value after.
    """

    def __init__(
        self, config: TokenConfig, keys: KeySource, kept_claims: KeptClaims = keep_all
    ) -> None:
        self._config = config
        self._keys = keys
        self._kept_claims = kept_claims
        claims = ClaimChecks(config)
        self.audience_claim = config.audience_claim
        algorithms = get_default_algorithms()
        self._signers = {name: algorithms[name] for name in config.algorithms}
        self._cache: TokenCache[tuple[Principal, VerificationKey]] = TokenCache(
            config.cache_size)
        audience = config.audience_claim
        # Before the key is chosen: the header, then the types pyjwt would coerce.
        self.before_key: tuple[tuple[str, Check], ...] = (
            ("alg", self._alg), ("crit", self._crit), ("cty", self._cty), ("typ", self._typ),
            ("kid", self._kid), *((name, claims.number(name)) for name in TIME_CLAIMS),
            ("sub", claims.sub_type),
        )
        # After the signature, in pyjwt's order (RFC 7519 §4.1; the audience claim takes aud's
        # place): required claims, iat, nbf, exp, iss, aud, jti; ID tokens are told apart first.
        self.after_signature: tuple[tuple[str, Check], ...] = (
            *claims.id_tokens(), ("cnf", claims.not_sender_constrained),
            *((name, claims.present(name)) for name in ("exp", "iss", audience, "sub")),
            ("iat", claims.not_in_future("iat")), ("nbf", claims.not_in_future("nbf")),
            ("exp", claims.not_expired), ("iss", claims.issuer), (audience, claims.audience),
            ("jti", claims.jti),
        )
        self._before_key = tuple(check for _, check in self.before_key)
        self._after_signature = tuple(check for _, check in self.after_signature)

    def _cached(self, digest: bytes, now: float) -> Principal | None:
        entry = self._cache.get(digest)
        if entry is None:
            return None
        principal, key = entry
        # Re-check on every hit: still unexpired, and the very key that verified it still
        # published (the IdP keeps unchanged keys' identity across refreshes; see idp.py).
        if expired(principal.expires_at, now, self._config.leeway) or (
            self._keys.get_key(principal.kid) is not key
        ):
            self._cache.drop(digest)
            return None
        return principal

    def _remember(
        self, digest: bytes, principal: Principal, key: VerificationKey, admitted: bool
    ) -> None:
        cost = ENTRY_OVERHEAD + sum(map(footprint, (
            principal.issuer, principal.subject, principal.kid, principal.claims)))
        self._cache.put(digest, (principal, key), cost, admitted=admitted)

    @property
    def cache_use(self) -> tuple[int, int]:
        """(entries, bytes) the verified-token cache holds, as it counts them."""
        return len(self._cache), self._cache.bytes

    def cached(self, token: str) -> Principal | None:
        """The Principal of a token verified before and still valid, without any parsing."""
        return self._cached(hashlib.sha256(token.encode()).digest(), time.time())

    def vouched(self, token: str) -> bool:
        """Never: an entry lasts until the token's exp, so a miss is a token not verified here
        (or evicted), and its verification is paid for like any stranger's."""
        return False

    async def verify(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode()).digest()
        now = time.time()
        principal = self._cached(digest, now)
        if principal is not None:
            return principal
        header, payload = parse_strict(token)
        for check in self._before_key:
            check(header, payload, now)
        alg = header["alg"]
        key = await self._select_key(header.get("kid"), alg)
        self._check_signature(token, key.key, alg)
        now = time.time()  # a key refresh may have taken a while
        for check in self._after_signature:
            check(header, payload, now)
        principal, admitted = principal_of(payload, self._kept_claims, issuer=payload["iss"],
                                           expires_at=float(payload["exp"]), kid=key.kid)
        self._remember(digest, principal, key, admitted)
        return principal

    async def explain(self, token: str) -> Explanation:
        """Run every check of verify() in its order and report each (no cache); the first failure
        is what verify() raises. A check is skipped when one it needs failed: the key needs `alg`
        and `kid`, the signature the key, and a claim's value check its type check."""
        outcomes: dict[str, TokenError | None] = {}
        failures: list[TokenError] = []

        def record(name: str, error: TokenError | None) -> None:
            if error is not None:
                failures.append(error)
                outcomes[name] = error
            else:
                outcomes.setdefault(name, None)

        try:
            header, payload = parse_strict(token)
        except TokenError as exc:
            return Explanation({"format": exc}, exc)
        outcomes["format"] = None
        explain_checks(self.before_key, header, payload, time.time(),
                       outcomes=outcomes, failures=failures)
        key = None
        if outcomes["alg"] is None and outcomes["kid"] is None:
            try:
                key = await self._select_key(header.get("kid"), header["alg"])
            except TokenError as exc:
                record("key", exc)
            else:
                record("key", None)
        if key is not None:
            try:
                self._check_signature(token, key.key, header["alg"])
            except TokenError as exc:
                record("signature", exc)
            else:
                record("signature", None)
        explain_checks(self.after_signature, header, payload, time.time(),
                       outcomes=outcomes, failures=failures)
        return Explanation(outcomes, failures[0] if failures else None, header, payload, key)

    # -- the header, and the claims' types (before the key is chosen) ----------------------------

    def _alg(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._config.algorithms:
            raise invalid("alg_not_allowed", "The token's signing algorithm is not accepted")

    def _crit(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        if "crit" in header:  # RFC 7515 §4.1.11: we understand no extensions
            raise invalid("crit_not_supported", "The token has critical header extensions")

    def _cty(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        cty = header.get("cty")
        if isinstance(cty, str) and cty.upper() == "JWT":
            raise invalid("nested_jwt", "Nested tokens are not accepted")

    def _typ(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        typ = header.get("typ")
        if typ is not None and (
            not isinstance(typ, str) or media_type(typ) in NON_ACCESS_MEDIA_TYPES
        ):
            raise invalid("wrong_type", "The token is not an access token")

    def _kid(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH):
            raise invalid("kid_invalid", "The token's key id is invalid")

    # -- the key and the signature ---------------------------------------------------------------

    async def _select_key(self, kid: str | None, alg: str) -> VerificationKey:
        return await select_key(self._keys, kid, alg)

    def _check_signature(self, token: str, key: Any, alg: str) -> None:
        """pyjwt's algorithm checks the signature; jwt.decode would parse the token again,
        checking every base64 character in a Python loop (two thirds of a miss's cost)."""
        signing_input, _, signature = token.rpartition(".")
        try:
            raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
            valid = self._signers[alg].verify(signing_input.encode("ascii"), key, raw)
        except (binascii.Error, ValueError, TypeError):
            raise invalid("invalid", "The token is invalid") from None
        if not valid:
            raise invalid("bad_signature", "The token signature is invalid")
