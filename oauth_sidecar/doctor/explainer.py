"""`check --token`: what the sidecar would do with one token, check by check.

Why this cannot contradict the sidecar: every verdict and every pass or fail is the real pieces'
own outcome (bearer_token, TokenVerifier.explain, AccessPolicy.explain), and the refusal's
status, description and challenge come from the same fields and the same Challenges the gate
answers with. Nothing here re-checks a claim; words.py only says each outcome in words. The
token and its signature are never part of the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oauth_sidecar.auth.access_tokens import looks_like_jws, verifier_for
from oauth_sidecar.auth.bearer import TokenError, bearer_token
from oauth_sidecar.auth.challenge import (
    ACCESS_DENIED_DESCRIPTION,
    INSUFFICIENT_SCOPE_DESCRIPTION,
    Challenges,
)
from oauth_sidecar.auth.claims import principal_of
from oauth_sidecar.auth.idp import IdentityProvider
from oauth_sidecar.auth.introspection import Introspector
from oauth_sidecar.auth.policy import AccessPolicy, Admission
from oauth_sidecar.auth.tokens import Explanation, TokenVerifier
from oauth_sidecar.config import Config
from oauth_sidecar.doctor.opaque import AnswerWords, call_line, method_source, shown_answer
from oauth_sidecar.doctor.report import ClaimCheck, TokenReport
from oauth_sidecar.doctor.words import ClaimWords, claim_line, describe_key
from oauth_sidecar.request_keys import Principal

FORWARDED = "forwarded to the upstream"


async def explain_token(config: Config, idp: IdentityProvider, token: str,
                        introspector: Introspector | None = None) -> TokenReport:
    """What the gate would answer for this token, with one line per check."""
    report, _ = await explain_caller(config, idp, token, introspector)
    return report


async def explain_caller(config: Config, idp: IdentityProvider, token: str,
                         introspector: Introspector | None = None
                         ) -> tuple[TokenReport, Principal | None]:
    """explain_token's report, and the Principal the gate would admit (None: it refuses):
    the claims the verifier keeps, which the tool rules read (tool_access.py). A token
    TOKEN_VALIDATION sends to the introspector is asked about at the IdP (with `introspector`,
    running, or one started here)."""
    mode = config.tokens.validation
    if verifier_for(mode, token) == "jwt":
        report, caller = await _explain_jwt(config, idp, token)
        if mode == "auto":
            report.checks.insert(0, ClaimCheck("verifier", None, ROUTE_AUTO_JWT))
        return report, caller
    if introspector is not None:
        return await _explain_introspected(config, idp, token, introspector)
    introspector = Introspector(config.tokens, idp, AccessPolicy.serving(config).kept_claims)
    async with introspector.running():
        return await _explain_introspected(config, idp, token, introspector)


ROUTE_AUTO_JWT = ("TOKEN_VALIDATION=auto, shaped like a JWS (three base64url segments, a JSON "
                  "header naming alg): verified here with the IdP's keys, never introspected, "
                  "even when it fails")
ROUTE_AUTO_OPAQUE = ("TOKEN_VALIDATION=auto, not shaped like a JWS (three base64url segments, a "
                     "JSON header naming alg): an opaque token, introspected at the IdP "
                     "(RFC 7662)")
ROUTE_INTROSPECTION = ("TOKEN_VALIDATION=introspection: every token is introspected at the IdP "
                       "(RFC 7662)")
OPAQUE_HINT = ("not a JWT: if the IdP issues opaque tokens, set TOKEN_VALIDATION=introspection "
               "(or auto, for an IdP that issues both)")


async def _explain_jwt(config: Config, idp: IdentityProvider, token: str
                       ) -> tuple[TokenReport, Principal | None]:
    verifier, policy = TokenVerifier(config.tokens, idp), AccessPolicy(config.policy)
    try:
        bearer_token([f"Bearer {token}"], [], config.tokens.max_token_bytes)
    except TokenError as exc:
        explanation = Explanation({"format": exc}, exc)
    else:
        explanation = await verifier.explain(token)
    words = _TokenWords(config, idp, verifier)
    checks = words.token_lines(explanation, len(token), looks_like_jws(token))
    payload, admission = explanation.payload, None
    subject = payload.get("sub") if payload is not None else None
    if payload is not None and isinstance(subject, str) and subject.strip():
        admission = policy.explain(subject, payload)
        checks += words.policy_lines(admission, payload, policy)
    report = _verdict(config, checks, explanation.error, admission)
    if not report.accepted or payload is None or not isinstance(subject, str):
        return report, None
    kid = explanation.key.kid if explanation.key is not None else None
    caller, _ = principal_of(payload, AccessPolicy.serving(config).kept_claims,
                             issuer=payload["iss"], expires_at=float(payload["exp"]), kid=kid)
    return report, caller


async def _explain_introspected(config: Config, idp: IdentityProvider, token: str,
                                introspector: Introspector
                                ) -> tuple[TokenReport, Principal | None]:
    """The gate's path for a token it introspects: bearer_token, then the IdP's answer and the
    introspector's checks, then the policy on the answer, as on a JWT's payload."""
    shaped = looks_like_jws(token)
    route = ROUTE_AUTO_OPAQUE if config.tokens.validation == "auto" else ROUTE_INTROSPECTION + (
        ", JWTs too (this one is shaped like a JWS)" if shaped else "")
    checks = [ClaimCheck("verifier", None, route)]
    try:
        bearer_token([f"Bearer {token}"], [], config.tokens.max_token_bytes)
    except TokenError as exc:
        checks.append(claim_line("format", exc, "", f"{len(token)} characters"))
        return _verdict(config, checks, exc, None), None
    checks.append(ClaimCheck("format", True, f"{'a JWS-shaped' if shaped else 'an opaque'} "
                                             f"token of {len(token)} characters"))
    explanation = await introspector.explain(token)
    settings = config.tokens.introspection
    source = method_source(settings.auth_method if settings else "", idp.metadata)
    checks.append(call_line(explanation, source))
    words = AnswerWords(config, TokenVerifier(config.tokens, idp))
    checks += words.answer_lines(explanation)
    answer, admission, policy = explanation.answer, None, AccessPolicy(config.policy)
    subject = answer.get("sub") if answer is not None else None
    active = answer is not None and explanation.outcomes.get("active", True) is None
    if answer is not None and active and isinstance(subject, str) and subject.strip():
        admission = policy.explain(subject, answer)
        checks += words.policy_lines(admission, answer, policy)
    report = _verdict(config, checks, explanation.error, admission)
    if answer is not None:
        report.answer = shown_answer(answer, token)
        report.answer_signed = explanation.signed
    if not report.accepted or answer is None:
        return report, None
    caller, _ = introspector.principal(answer)
    return report, caller


def _verdict(config: Config, checks: list[ClaimCheck], error: TokenError | None,
             admission: Admission | None) -> TokenReport:
    """The gate's answer: the verifier's refusal, else the policy's, else forwarded."""
    challenges = Challenges(config)
    if error is not None:
        return TokenReport(checks=checks, accepted=False, status=error.status,
                           reason=error.reason, description=error.description,
                           challenge=challenges.for_error(error))
    if admission is not None and admission.denied is not None:
        denied = admission.denied
        return TokenReport(checks=checks, accepted=False, status=403, reason=denied.reason,
                           description=INSUFFICIENT_SCOPE_DESCRIPTION if denied.scope_missing
                           else ACCESS_DENIED_DESCRIPTION,
                           challenge=challenges.for_denial(denied))
    return TokenReport(checks=checks, accepted=True, status=200, reason="",
                       description=FORWARDED)


class _TokenWords(ClaimWords):
    """The verifier's outcomes in its order, a line per check; the key's words need the IdP."""

    def __init__(self, config: Config, idp: IdentityProvider, verifier: TokenVerifier) -> None:
        super().__init__(config, verifier)
        self.idp = idp

    def token_lines(self, explanation: Explanation, length: int, shaped: bool = True
                    ) -> list[ClaimCheck]:
        outcomes, header, payload = explanation.outcomes, explanation.header, explanation.payload
        lines = [claim_line("format", outcomes["format"], f"a signed JWT of {length} characters",
                       f"{length} characters" + ("" if shaped else f"; {OPAQUE_HINT}"))]
        if header is None or payload is None:
            return lines
        before_key = {name for name, _ in self.verifier.before_key}
        key_shown = False
        for name, error in outcomes.items():
            if name == "format":
                continue
            if name not in before_key and not key_shown:
                key_shown = True
                if name != "key":
                    lines.append(ClaimCheck("key", None, "not checked: alg or kid is refused"))
            if name == "key":
                lines.append(self._key(error, header, explanation))
                if "signature" not in outcomes:
                    lines.append(ClaimCheck("signature", None, "not checked: no usable key"))
            elif name == "signature":
                lines.append(self._signature(error, explanation))
            else:
                word = (self._audience if name == self.verifier.audience_claim
                        else getattr(self, f"_{name}"))
                passed, hint = word(header, payload)
                if name == "id_token" and error is not None:
                    hint = self._id_token_hint(error, payload)
                lines.append(claim_line(name, error, passed, hint))
        if "key" not in outcomes:
            index = next(i for i, line in enumerate(lines) if line.name == "key")
            lines.insert(index + 1, ClaimCheck("signature", None, "not checked: no usable key"))
        ignored = sorted(name for name in ("jku", "x5u", "x5c", "jwk") if name in header)
        if ignored:
            lines.append(ClaimCheck("header", None, f"{', '.join(ignored)} ignored: keys come "
                                                    "only from the IdP's JWKS"))
        return lines

    def _key(self, error: TokenError | None, header: Mapping[str, Any],
             explanation: Explanation) -> ClaimCheck:
        key, kid = explanation.key, header.get("kid")
        if error is None:
            described = describe_key(key) if key is not None else "?"
            return ClaimCheck("key", True, f"{kid!r}: {described}")
        published = ", ".join(sorted(str(k.kid) for k in self.idp.all_keys())) or "none"
        hint = {
            "keys_unavailable": f"the IdP's keys are not loaded ({self.idp.last_error})",
            "unknown_kid": f"kid {kid!r} is not in the IdP's key set (published: {published}): "
                           "signed by another issuer or environment, or with a key the IdP no "
                           "longer publishes" if kid is not None else
                           f"no kid, and not exactly one published key fits {header.get('alg')}",
            "alg_key_mismatch": f"the key for kid {kid!r} does not verify {header.get('alg')}",
        }.get(error.reason, "")
        return claim_line("key", error, "", hint)

    def _signature(self, error: TokenError | None, explanation: Explanation) -> ClaimCheck:
        kid = explanation.key.kid if explanation.key is not None else None
        return claim_line("signature", error, f"verifies with key {kid!r}",
                     f"does not verify with key {kid!r}: the token was altered, or signed by "
                     "another key with the same kid")

