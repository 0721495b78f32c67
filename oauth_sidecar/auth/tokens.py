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
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from jwt.algorithms import get_default_algorithms

from oauth_sidecar.auth.bearer import TokenError, invalid, parse_strict
from oauth_sidecar.auth.idp import VerificationKey, same_issuer
from oauth_sidecar.auth.token_cache import ENTRY_OVERHEAD, TokenCache, footprint
from oauth_sidecar.config import TokenConfig
from oauth_sidecar.request_keys import Principal

MAX_KID_LENGTH = 256  # real kids are short ids or thumbprints; longer ones are probes
# Header `typ` values that mark a JWT as something other than an access token (a DPoP proof,
# RFC 9449; a logout token, OpenID Back-Channel Logout; a security event, RFC 8417; an ID token).
NON_ACCESS_TYPES = frozenset({"dpop+jwt", "logout+jwt", "secevent+jwt", "id_token+jwt", "jwe"})
MEDIA_TYPE_PREFIX = "application/"
RFC9068_MEDIA_TYPE = "application/at+jwt"  # a JWT access token that says so (RFC 9068 §2.1)
NON_ACCESS_MEDIA_TYPES = frozenset(MEDIA_TYPE_PREFIX + name for name in NON_ACCESS_TYPES)
TIME_CLAIMS = ("exp", "nbf", "iat")
# Claims only ID tokens carry (OpenID Connect Core §3.1.3.6 and §3.3.2.11, FAPI's s_hash): the
# hash of the access token, code or state issued beside them. `nonce` is no sign: authentik copies
# it into its access tokens, as older Keycloak versions did (current ones with a mapper).
ID_TOKEN_HASHES = ("at_hash", "c_hash", "s_hash")
# Where an access token names its client: client_id (RFC 9068 §2.2; Cognito, node oidc-provider),
# azp (Keycloak, Auth0, authentik, Entra v2), cid (Okta), appid (Entra v1).
CLIENT_CLAIMS = ("client_id", "azp", "cid", "appid")


KeptClaims = Callable[[str, Mapping[str, Any]], tuple[Mapping[str, Any], bool]]
"""Given a verified token's subject and claims: the claims a request with it needs (what the
policy and the forwarded identity read), and whether the policy admits it now."""


def expired(exp: float, now: float, leeway: float) -> bool:
    """Whether a token with this `exp` is expired at `now`: the one rule for a fresh
    verification and a cache hit, so a cached token never outlives what verify() would accept.
    pyjwt's semantics: exp truncated to whole seconds, expired from that instant on, less the
    leeway (RFC 7519 §4.1.4 "on or after")."""
    return int(exp) <= now - leeway


def _keep_all(subject: str, claims: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    return claims, True


def _is_number(value: object) -> bool:
    # A tuple, not `int | float`: isinstance with a union type is slower on this hot path.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float, e.g. 10**400
        return False


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


Check = Callable[[dict[str, Any], dict[str, Any], float], None]
"""One named check of a parsed token, given (header, payload, now): returns or raises TokenError."""


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


def _says_id(value: object) -> bool:
    return isinstance(value, str) and value.lower() == "id"


class TokenVerifier:
    """Verifies access tokens for one issuer and audience set.

    The checks form one ordered table of named checks: verify() stops at the first failure (the
    hot path of a cache miss), explain() runs them all and reports each, so the doctor's verdict
    and its claim lines are this class's and cannot drift from it. A name appears twice where a
    claim is checked in two steps: its type before the signature, its value after.
    """

    def __init__(
        self, config: TokenConfig, keys: KeySource, kept_claims: KeptClaims = _keep_all
    ) -> None:
        self._config = config
        self._keys = keys
        self._kept_claims = kept_claims
        self._trusted_issuer = config.issuer
        self._audiences = frozenset(config.audiences)
        self.audience_claim = config.audience_claim
        algorithms = get_default_algorithms()
        self._signers = {name: algorithms[name] for name in config.algorithms}
        self._cache: TokenCache[tuple[Principal, VerificationKey]] = TokenCache(
            config.cache_size)
        audience = config.audience_claim
        # Before the key is chosen: the header, then the types pyjwt would coerce.
        self.before_key: tuple[tuple[str, Check], ...] = (
            ("alg", self._alg), ("crit", self._crit), ("cty", self._cty), ("typ", self._typ),
            ("kid", self._kid), *((name, self._number(name)) for name in TIME_CLAIMS),
            ("sub", self._sub_type),
        )
        id_tokens: tuple[tuple[str, Check], ...] = {
            "marked": (("id_token", self._not_marked_id_token),),
            "client": (("id_token", self._not_marked_id_token), ("id_token", self._names_client)),
            "off": (),
        }[config.id_token_check]
        # After the signature, in pyjwt's order (RFC 7519 §4.1; the audience claim takes aud's
        # place): required claims, iat, nbf, exp, iss, aud, jti; ID tokens are told apart first.
        self.after_signature: tuple[tuple[str, Check], ...] = (
            *id_tokens, ("cnf", self._not_sender_constrained),
            *((name, self._present(name)) for name in ("exp", "iss", audience, "sub")),
            ("iat", self._not_in_future("iat")), ("nbf", self._not_in_future("nbf")),
            ("exp", self._not_expired), ("iss", self._issuer), (audience, self._audience),
            ("jti", self._jti),
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
        # A hit and a miss give the same Principal: only what is kept, never the whole payload.
        claims, admitted = self._kept_claims(payload["sub"], payload)
        principal = Principal(
            issuer=payload["iss"], subject=payload["sub"], claims=claims,
            expires_at=float(payload["exp"]), kid=key.kid,
        )
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

        def run(name: str, check: Check, header: dict[str, Any], payload: dict[str, Any],
                now: float) -> None:
            if outcomes.get(name) is not None:
                return  # this claim already failed an earlier step
            try:
                check(header, payload, now)
            except TokenError as exc:
                record(name, exc)
            else:
                record(name, None)

        try:
            header, payload = parse_strict(token)
        except TokenError as exc:
            return Explanation({"format": exc}, exc)
        outcomes["format"] = None
        now = time.time()
        for name, check in self.before_key:
            run(name, check, header, payload, now)
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
        now = time.time()
        for name, check in self.after_signature:
            run(name, check, header, payload, now)
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

    @staticmethod
    def _number(name: str) -> Check:
        """pyjwt casts times with int(), so "99999999999" would pass: insist on numbers."""

        def check(header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
            value = payload.get(name)
            if value is not None and not _is_number(value):
                raise invalid("claim_invalid", f"The {name} claim is not a number")

        return check

    def _sub_type(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        sub = payload.get("sub")
        if "sub" in payload and (not isinstance(sub, str) or not sub.strip()):
            raise invalid("claim_invalid", "The sub claim is not a non-empty string")

    # -- the key and the signature ---------------------------------------------------------------

    async def _select_key(self, kid: str | None, alg: str) -> VerificationKey:
        key = self._keys.get_key(kid)
        if key is None and kid is None:
            candidates = [k for k in self._keys.all_keys() if alg in k.algorithms]
            key = candidates[0] if len(candidates) == 1 else None
        if key is None and kid is not None:
            await self._keys.refresh_for_unknown_kid()
            key = self._keys.get_key(kid)
        if key is None:
            if not self._keys.ready:
                raise TokenError(
                    "keys_unavailable", "The identity provider's keys are not available yet",
                    error="temporarily_unavailable", status=503,
                )
            raise invalid("unknown_kid", "The token was not signed by a known key")
        if alg not in key.algorithms:
            raise invalid("alg_key_mismatch", "The token's algorithm does not fit its key")
        return key

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

    # -- the claims (after the signature): RFC 7519 §4.1 with pyjwt's semantics ------------------

    def _not_marked_id_token(
        self, header: dict[str, Any], payload: dict[str, Any], now: float
    ) -> None:
        """An ID token is for the client that signed in, not for this resource: refused when it
        says what it is (AWS Cognito's token_use, Keycloak's typ claim) or carries a hash of
        the tokens issued beside it, which only ID tokens do."""
        if _says_id(payload.get("token_use")) or _says_id(payload.get("typ")) or (
            not payload.keys().isdisjoint(ID_TOKEN_HASHES)
        ):
            raise invalid("id_token", "An ID token is not an access token")

    def _names_client(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        """JWT_ID_TOKEN_CHECK=client: an access token names the client it was issued to; an ID
        token whose aud is that client (authentik) names none."""
        if not any(isinstance(payload.get(name), str) and payload[name] for name in CLIENT_CLAIMS):
            raise invalid("id_token_no_client", "An ID token is not an access token")

    def _not_sender_constrained(
        self, header: dict[str, Any], payload: dict[str, Any], now: float
    ) -> None:
        """A token with a confirmation claim is bound to a key its client must prove it holds
        (DPoP, RFC 9449 §6; mutual TLS, RFC 8705 §3). Accepted as a bearer token, the binding
        would silently fall away and a stolen copy would work: refused (RFC 9449 §7.2)."""
        if "cnf" in payload:
            raise invalid("sender_constrained", "The token is bound to a key (DPoP or mutual "
                           "TLS); this server accepts bearer tokens only")

    @staticmethod
    def _present(name: str) -> Check:
        def check(header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
            if payload.get(name) is None:
                raise invalid("claim_missing", f"The token has no {name} claim")

        return check

    def _not_in_future(self, name: str) -> Check:
        """iat and nbf: times truncated to integers, with the leeway (pyjwt's semantics)."""

        def check(header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
            if name not in payload:
                return
            if payload[name] is None:  # present but null: pyjwt's int(None) refuses it
                raise invalid("invalid", "The token is invalid")
            if int(payload[name]) > now + self._config.leeway:
                raise invalid("not_yet_valid", "The token is not valid yet")

        return check

    def _not_expired(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        if expired(payload["exp"], now, self._config.leeway):
            raise invalid("expired", "The token has expired")

    def _issuer(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        iss = payload["iss"]
        if not isinstance(iss, str) or not same_issuer(iss, self._trusted_issuer):
            raise invalid("wrong_issuer", "The token is not from the trusted issuer")

    def _audience(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        audiences = payload[self.audience_claim]
        if not audiences:  # "" or []: pyjwt's MissingRequiredClaimError
            raise invalid("claim_missing", f"The token has no {self.audience_claim} claim")
        if isinstance(audiences, str):
            if audiences in self._audiences:
                return
        elif isinstance(audiences, list) and all(isinstance(a, str) for a in audiences) and (
            not self._audiences.isdisjoint(audiences)
        ):
            return
        raise invalid("wrong_audience", "The token was not issued for this resource")

    def _jti(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        if "jti" in payload and not isinstance(payload["jti"], str):
            raise invalid("invalid", "The token is invalid")
