"""The claim checks an access token's claims must pass, and the Principal they make.

Why a module of its own: a token's claims come either from a verified JWT's payload (tokens.py)
or from the identity provider's introspection answer (introspection.py, RFC 7662 §2.2), and both
must be judged by the same rules (issuer compared by same_issuer, the audience claim, exp/nbf/iat
with the leeway and pyjwt's semantics, ID tokens and sender-constrained tokens refused) and turned
into the same Principal, so that policy, rate limits, identity headers, tool rules and the audit
log cannot tell which path admitted a caller. Each check is named; each verifier composes its
own ordered table of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from oauth_sidecar.auth.bearer import TokenError, invalid
from oauth_sidecar.auth.idp import same_issuer
from oauth_sidecar.config import TokenConfig
from oauth_sidecar.request_keys import Principal

TIME_CLAIMS = ("exp", "nbf", "iat")
# Claims only ID tokens carry (OpenID Connect Core §3.1.3.6 and §3.3.2.11, FAPI's s_hash): the
# hash of the access token, code or state issued beside them. `nonce` is no sign: authentik copies
# it into its access tokens, as older Keycloak versions did (current ones with a mapper).
ID_TOKEN_HASHES = ("at_hash", "c_hash", "s_hash")
# Where an access token names its client: client_id (RFC 9068 §2.2; Cognito, node oidc-provider),
# azp (Keycloak, Auth0, authentik, Entra v2), cid (Okta), appid (Entra v1).
CLIENT_CLAIMS = ("client_id", "azp", "cid", "appid")

Check = Callable[[dict[str, Any], dict[str, Any], float], None]
"""One named check of a parsed token, given (header, payload, now): returns or raises TokenError.
An introspection answer has no header: its checks get an empty one."""

KeptClaims = Callable[[str, Mapping[str, Any]], tuple[Mapping[str, Any], bool]]
"""Given a verified token's subject and claims: the claims a request with it needs (what the
policy and the forwarded identity read), and whether the policy admits it now."""


def keep_all(subject: str, claims: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    return claims, True


def expired(exp: float, now: float, leeway: float) -> bool:
    """Whether a token with this `exp` is expired at `now`: the one rule for a fresh
    verification and a cache hit, so a cached token never outlives what verify() would accept.
    pyjwt's semantics: exp truncated to whole seconds, expired from that instant on, less the
    leeway (RFC 7519 §4.1.4 "on or after")."""
    return int(exp) <= now - leeway


def is_number(value: object) -> bool:
    # A tuple, not `int | float`: isinstance with a union type is slower on this hot path.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float, e.g. 10**400
        return False


def says_id(value: object) -> bool:
    return isinstance(value, str) and value.lower() == "id"


def principal_of(payload: Mapping[str, Any], kept_claims: KeptClaims, *, issuer: str,
                 expires_at: float, kid: str | None) -> tuple[Principal, bool]:
    """The Principal of checked claims, and whether the policy admits it now. A hit and a miss
    give the same Principal: only what is kept, never the whole payload."""
    subject = payload["sub"]
    claims, admitted = kept_claims(subject, payload)
    return Principal(issuer=issuer, subject=subject, claims=claims, expires_at=expires_at,
                     kid=kid), admitted


def explain_checks(checks: Iterable[tuple[str, Check]], header: dict[str, Any],
                   payload: dict[str, Any], now: float, *,
                   outcomes: dict[str, TokenError | None], failures: list[TokenError]) -> None:
    """Run every named check, recording each outcome (both verifiers' explain()): None when it
    passed, else its failure, also appended to `failures`; a claim that failed an earlier step
    is not checked again."""
    for name, check in checks:
        if outcomes.get(name) is not None:
            continue
        try:
            check(header, payload, now)
        except TokenError as exc:
            failures.append(exc)
            outcomes[name] = exc
        else:
            outcomes.setdefault(name, None)


class ClaimChecks:
    """The claim checks for one issuer, audience set and leeway, each a `Check`."""

    def __init__(self, config: TokenConfig) -> None:
        self._config = config
        self._trusted_issuer = config.issuer
        self._audiences = frozenset(config.audiences)
        self.audience_claim = config.audience_claim

    def id_tokens(self) -> tuple[tuple[str, Check], ...]:
        """The ID-token checks JWT_ID_TOKEN_CHECK asks for."""
        return {
            "marked": (("id_token", self.not_marked_id_token),),
            "client": (("id_token", self.not_marked_id_token), ("id_token", self.names_client)),
            "off": (),
        }[self._config.id_token_check]

    # -- types --------------------------------------------------------------------------------

    @staticmethod
    def number(name: str) -> Check:
        """pyjwt casts times with int(), so "99999999999" would pass: insist on numbers."""

        def check(header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
            value = payload.get(name)
            if value is not None and not is_number(value):
                raise invalid("claim_invalid", f"The {name} claim is not a number")

        return check

    def sub_type(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        sub = payload.get("sub")
        if "sub" in payload and (not isinstance(sub, str) or not sub.strip()):
            raise invalid("claim_invalid", "The sub claim is not a non-empty string")

    # -- values: RFC 7519 §4.1 with pyjwt's semantics ---------------------------------------------

    def not_marked_id_token(
        self, header: dict[str, Any], payload: dict[str, Any], now: float
    ) -> None:
        """An ID token is for the client that signed in, not for this resource: refused when it
        says what it is (AWS Cognito's token_use, Keycloak's typ claim) or carries a hash of
        the tokens issued beside it, which only ID tokens do."""
        if says_id(payload.get("token_use")) or says_id(payload.get("typ")) or (
            not payload.keys().isdisjoint(ID_TOKEN_HASHES)
        ):
            raise invalid("id_token", "An ID token is not an access token")

    def names_client(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        """JWT_ID_TOKEN_CHECK=client: an access token names the client it was issued to; an ID
        token whose aud is that client (authentik) names none."""
        if not any(isinstance(payload.get(name), str) and payload[name] for name in CLIENT_CLAIMS):
            raise invalid("id_token_no_client", "An ID token is not an access token")

    def not_sender_constrained(
        self, header: dict[str, Any], payload: dict[str, Any], now: float
    ) -> None:
        """A token with a confirmation claim is bound to a key its client must prove it holds
        (DPoP, RFC 9449 §6; mutual TLS, RFC 8705 §3). Accepted as a bearer token, the binding
        would silently fall away and a stolen copy would work: refused (RFC 9449 §7.2)."""
        if "cnf" in payload:
            raise invalid("sender_constrained", "The token is bound to a key (DPoP or mutual "
                           "TLS); this server accepts bearer tokens only")

    @staticmethod
    def present(name: str) -> Check:
        def check(header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
            if payload.get(name) is None:
                raise invalid("claim_missing", f"The token has no {name} claim")

        return check

    def not_in_future(self, name: str) -> Check:
        """iat and nbf: times truncated to integers, with the leeway (pyjwt's semantics)."""

        def check(header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
            if name not in payload:
                return
            if payload[name] is None:  # present but null: pyjwt's int(None) refuses it
                raise invalid("invalid", "The token is invalid")
            if int(payload[name]) > now + self._config.leeway:
                raise invalid("not_yet_valid", "The token is not valid yet")

        return check

    def not_expired(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        if "exp" not in payload:  # only where an answer may lack it (INTROSPECTION_REQUIRE_EXP)
            return
        if payload["exp"] is None:  # present but null: pyjwt's int(None) refuses it
            raise invalid("invalid", "The token is invalid")
        if expired(payload["exp"], now, self._config.leeway):
            raise invalid("expired", "The token has expired")

    def issuer(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        iss = payload["iss"]
        if not isinstance(iss, str) or not same_issuer(iss, self._trusted_issuer):
            raise invalid("wrong_issuer", "The token is not from the trusted issuer")

    def audience(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
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

    def jti(self, header: dict[str, Any], payload: dict[str, Any], now: float) -> None:
        if "jti" in payload and not isinstance(payload["jti"], str):
            raise invalid("invalid", "The token is invalid")
