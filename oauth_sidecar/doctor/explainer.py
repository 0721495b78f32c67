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

from oauth_sidecar.auth.bearer import TokenError, bearer_token
from oauth_sidecar.auth.challenge import (
    ACCESS_DENIED_DESCRIPTION,
    INSUFFICIENT_SCOPE_DESCRIPTION,
    Challenges,
)
from oauth_sidecar.auth.idp import IdentityProvider
from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.auth.tokens import Explanation, TokenVerifier
from oauth_sidecar.config import Config
from oauth_sidecar.doctor.report import ClaimCheck, TokenReport
from oauth_sidecar.doctor.words import ClaimWords, describe_key
from oauth_sidecar.request_keys import Principal

FORWARDED = "forwarded to the upstream"


async def explain_token(config: Config, idp: IdentityProvider, token: str) -> TokenReport:
    """What the gate would answer for this token, with one line per check."""
    report, _ = await explain_caller(config, idp, token)
    return report


async def explain_caller(config: Config, idp: IdentityProvider, token: str
                         ) -> tuple[TokenReport, Principal | None]:
    """explain_token's report, and the Principal the gate would admit (None: it refuses):
    the claims the verifier keeps, which the tool rules read (tool_access.py)."""
    verifier, policy = TokenVerifier(config.tokens, idp), AccessPolicy(config.policy)
    try:
        bearer_token([f"Bearer {token}"], [], config.tokens.max_token_bytes)
    except TokenError as exc:
        explanation = Explanation({"format": exc}, exc)
    else:
        explanation = await verifier.explain(token)
    words = _TokenWords(config, idp, verifier)
    checks = words.token_lines(explanation, len(token))
    payload, admission = explanation.payload, None
    subject = payload.get("sub") if payload is not None else None
    if payload is not None and isinstance(subject, str) and subject.strip():
        admission = policy.explain(subject, payload)
        checks += words.policy_lines(admission, payload, policy)
    challenges = Challenges(config)
    error = explanation.error
    if error is not None:
        return TokenReport(checks=checks, accepted=False, status=error.status,
                           reason=error.reason, description=error.description,
                           challenge=challenges.for_error(error)), None
    if admission is not None and admission.denied is not None:
        denied = admission.denied
        return TokenReport(checks=checks, accepted=False, status=403, reason=denied.reason,
                           description=INSUFFICIENT_SCOPE_DESCRIPTION if denied.scope_missing
                           else ACCESS_DENIED_DESCRIPTION,
                           challenge=challenges.for_denial(denied)), None
    caller = None
    if payload is not None and isinstance(subject, str):  # always: it verified
        claims, _ = AccessPolicy.serving(config).kept_claims(subject, payload)
        kid = explanation.key.kid if explanation.key is not None else None
        caller = Principal(issuer=payload["iss"], subject=subject, claims=claims,
                           expires_at=float(payload["exp"]), kid=kid)
    return TokenReport(checks=checks, accepted=True, status=200, reason="",
                       description=FORWARDED), caller


def _line(name: str, error: TokenError | None, ok_detail: str, fail_detail: str = "") -> ClaimCheck:
    """A check's outcome in words: the detail for a pass, or the failure's own sentence and
    reason code with a hint."""
    if error is None:
        return ClaimCheck(name, True, ok_detail)
    hint = f": {fail_detail}" if fail_detail else ""
    return ClaimCheck(name, False, f"{error.description} ({error.reason}){hint}", error.reason)


class _TokenWords(ClaimWords):
    """The verifier's outcomes in its order, a line per check; the key's words need the IdP."""

    def __init__(self, config: Config, idp: IdentityProvider, verifier: TokenVerifier) -> None:
        super().__init__(config, verifier)
        self.idp = idp

    def token_lines(self, explanation: Explanation, length: int) -> list[ClaimCheck]:
        outcomes, header, payload = explanation.outcomes, explanation.header, explanation.payload
        lines = [_line("format", outcomes["format"], f"a signed JWT of {length} characters",
                       f"{length} characters")]
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
                lines.append(_line(name, error, passed, hint))
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
        return _line("key", error, "", hint)

    def _signature(self, error: TokenError | None, explanation: Explanation) -> ClaimCheck:
        kid = explanation.key.kid if explanation.key is not None else None
        return _line("signature", error, f"verifies with key {kid!r}",
                     f"does not verify with key {kid!r}: the token was altered, or signed by "
                     "another key with the same kid")

