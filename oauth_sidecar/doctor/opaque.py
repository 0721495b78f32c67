"""`check --token` for a token the introspector judges (TOKEN_VALIDATION=introspection, or auto
with a token not shaped like a JWS): the IdP's answer, claim by claim, in the JWT path's words.

Why apart from explainer.py: the JWT lines follow the verifier's header, key and signature steps;
an introspected token has none of them, but an answer from the IdP, and checks of its own
(active, not a refresh token, iss optional, exp optional when so configured). Every pass or fail
is Introspector.explain's outcome; this module only says it, as words.py does for a JWT. The
token is never part of the lines, nor of the answer shown (a value equal to it is replaced).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oauth_sidecar.auth.bearer import TokenError
from oauth_sidecar.auth.introspection import (
    REFRESH_TYPES,
    SIGNED_ANSWER,
    TYPE_CLAIMS,
    IntrospectionExplanation,
    offered_auth_methods,
)
from oauth_sidecar.config.urls import shown_url
from oauth_sidecar.doctor.report import ClaimCheck
from oauth_sidecar.doctor.words import ClaimWords, claim_line

TOKEN_SHOWN = "(the token itself: not shown)"  # noqa: S105 (a placeholder, not a secret)
# What the introspector's failure reasons mean for the operator, beside its detail.
CALL_HINTS = {
    "introspection_refused": "the IdP refused the sidecar's own client: every opaque token gets "
                             "503 until INTROSPECTION_CLIENT_ID, its secret and "
                             "INTROSPECTION_AUTH_METHOD are what the IdP expects",
    "introspection_unavailable": "the endpoint could not be reached",
    "introspection_endpoint_unknown": "set INTROSPECTION_ENDPOINT",
    "introspection_timeout": "raise INTROSPECTION_TIMEOUT_SECONDS only if the IdP is slow but "
                             "healthy",
    "introspection_bad_signature": "the IdP's signed answer (RFC 9701) did not check out",
    "introspection_failed": "the IdP's answer was not a usable RFC 7662 answer",
}


def shown_answer(answer: Any, token: str) -> Any:
    """The IdP's answer for the report, with any value equal to the token replaced: an IdP has
    no reason to echo it, and the doctor never prints it."""
    if isinstance(answer, dict):
        return {name: shown_answer(value, token) for name, value in answer.items()}
    if isinstance(answer, list):
        return [shown_answer(value, token) for value in answer]
    return TOKEN_SHOWN if isinstance(answer, str) and answer == token else answer


def method_source(configured: str, metadata: Mapping[str, Any] | None = None) -> str:
    """Where the client authentication came from (Introspector.target decides it)."""
    if configured:
        return "INTROSPECTION_AUTH_METHOD"
    if metadata is None:
        return "the default: the IdP metadata is not loaded"
    offered = offered_auth_methods(metadata)
    if offered is not None:
        return f"chosen from the IdP metadata's {offered[0]} {offered[1]}"
    return "the default: the IdP metadata lists no introspection_endpoint_auth_methods_supported"


def call_line(explanation: IntrospectionExplanation, source: str) -> ClaimCheck:
    """What the call to the IdP came to: where, how, and which kind of answer."""
    error = explanation.outcomes.get("introspection")
    how = f" ({explanation.method}, {source})" if explanation.method else ""
    where = f"{shown_url(explanation.endpoint)}{how}" if explanation.endpoint else (
        "no endpoint known")
    if error is None:
        kind = (f"a signed answer ({SIGNED_ANSWER}, RFC 9701), verified with the IdP's keys"
                if explanation.signed else "a JSON answer")
        return ClaimCheck("introspection", True, f"asked {where}: {kind}")
    detail = f"; {explanation.detail}" if explanation.detail else ""
    hint = CALL_HINTS.get(error.reason, "")
    return ClaimCheck("introspection", False,
                      f"{error.description} ({error.reason}): asked {where}{detail}"
                      + (f"; {hint}" if hint and hint not in detail else ""), error.reason)


class AnswerWords(ClaimWords):
    """The words for each named check of the introspector, given the IdP's answer."""

    def answer_lines(self, explanation: IntrospectionExplanation) -> list[ClaimCheck]:
        """One line per check in the introspector's order; for an inactive token, one line
        instead of a failure per absent claim (RFC 7662 §2.2: nothing else need be said)."""
        answer = explanation.answer
        if answer is None:
            return []
        lines: list[ClaimCheck] = []
        for name, error in explanation.outcomes.items():
            if name == "introspection":
                continue
            if name == "active":
                lines.append(self._active_line(error, answer))
                if error is not None:
                    said = sorted(k for k in answer if k != "active")
                    lines.append(ClaimCheck(
                        "claims", None, "not judged: the token is not active" + (
                            f" (the answer also has {', '.join(said)})" if said else
                            " and the answer says nothing else (RFC 7662 §2.2)")))
                    return lines
                continue
            word = (self._audience if name == self.verifier.audience_claim
                    else getattr(self, f"_{name}"))
            passed, hint = word({}, answer)
            if name == "id_token" and error is not None:
                hint = self._id_token_hint(error, answer)
            lines.append(claim_line(name, error, passed, hint))
        return lines

    def _active_line(self, error: TokenError | None, answer: Mapping[str, Any]) -> ClaimCheck:
        active = answer.get("active")
        if error is None:
            return ClaimCheck("active", True, "true: the IdP says the token is valid now")
        why = ("false: expired, revoked, never issued by this IdP, or issued by another "
               "environment's IdP" if active is False else
               f"{active!r}: RFC 7662 §2.2 requires the boolean true")
        return claim_line("active", error, "", why)

    def _token_type(self, header: Mapping[str, Any], payload: Mapping[str, Any]
                    ) -> tuple[str, str]:
        said = [f"{name} {payload[name]!r}" for name in TYPE_CLAIMS if name in payload]
        shown = ", ".join(said) or "no token_type, token_use or typ"
        refresh = [name for name in TYPE_CLAIMS if isinstance(payload.get(name), str)
                   and payload[name].lower() in REFRESH_TYPES]
        return (f"{shown}: nothing says it is a refresh token",
                f"{shown}: the client sent its refresh token ({', '.join(refresh)}); it must "
                "send the access token")

    def _audience(self, header: Mapping[str, Any], payload: Mapping[str, Any]
                  ) -> tuple[str, str]:
        passed, failed = super()._audience(header, payload)
        if payload.get(self.verifier.audience_claim) is None and not any(
            name in payload for name in TYPE_CLAIMS
        ):
            failed += ("; an answer with neither an audience nor a token_type is how some IdPs "
                       "(node oidc-provider) describe a refresh token: did the client send its "
                       "refresh token?")
        return passed, failed

    def _iss(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        if "iss" not in payload:
            return ("absent (optional in an introspection answer, RFC 7662 §2.2): the IdP asked "
                    "is OIDC_ISSUER_URL's", "")
        return super()._iss(header, payload)

    def _exp(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        settings = self.config.tokens.introspection
        if "exp" in payload or settings is None:
            return super()._exp(header, payload)
        if settings.require_exp:
            return "", ("missing: the sidecar requires exp (INTROSPECTION_REQUIRE_EXP=true; "
                        "false accepts answers without one)")
        return (f"absent: allowed (INTROSPECTION_REQUIRE_EXP=false); the answer is reused for "
                f"at most INTROSPECTION_CACHE_SECONDS={settings.cache_seconds:g}", "")
