"""TOKEN_VALIDATION=introspection or auto: whether the sidecar can ask the IdP about opaque
tokens at all, before a caller finds out by a 503.

Why a real call: the endpoint, the client authentication and the signed-answer choice are
Introspector.target's own decisions, but whether the IdP accepts the sidecar's client shows only
when asked. The probe introspects a made-up token, for which a working endpoint answers
`{"active": false}` (RFC 7662 §2.2); a 400/401/403 means the IdP refused the sidecar's client.
The call goes through the introspector the token explanation then uses, so its one-per-kind log
line (`introspection_client_refused`) appears at most once in a check.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from oauth_sidecar.auth.introspection import IntrospectionFailed, Introspector
from oauth_sidecar.config.urls import shown_url
from oauth_sidecar.doctor.opaque import method_source
from oauth_sidecar.doctor.report import ERROR, INTROSPECTION, NOTE, WARNING, Checker

# plus randomness: no IdP has issued it
PROBE_TOKEN_PREFIX = "oauth-sidecar-check-"  # noqa: S105 (a made-up token, not a secret)
MODE_WORDS = {
    "introspection": "every token, JWTs too, is introspected",
    "auto": "a token shaped like a JWS is verified here; any other is introspected",
}


class IntrospectionChecks(Checker):
    """The introspection endpoint, its client authentication, signed answers, and a probe."""

    async def run(self, introspector: Introspector, metadata: Mapping[str, Any] | None) -> None:
        settings, section = self.config.tokens.introspection, INTROSPECTION
        if settings is None:
            return
        self.line(section, f"TOKEN_VALIDATION={self.config.tokens.validation}: "
                           f"{MODE_WORDS.get(self.config.tokens.validation, '')}")
        try:
            target = introspector.target()
        except IntrospectionFailed as failed:
            self._no_target(failed, metadata)
            return
        named = metadata.get("introspection_endpoint") if metadata is not None else None
        url = shown_url(target.url)  # a URL the metadata names may carry user-info
        if settings.endpoint:
            also = "" if named in (None, settings.endpoint) else (
                f"; the IdP metadata names another, {shown_url(str(named))}")
            self.line(section, f"endpoint: {url} (INTROSPECTION_ENDPOINT{also})")
        else:
            self.line(section, f"endpoint: {url} (the IdP metadata's introspection_endpoint)")
        source = method_source(settings.auth_method, metadata)
        self.line(section, f"client authentication: {target.method} as "
                           f"{settings.client_id!r} ({source})")
        self._method_offered(target.method, metadata)
        self._signing(target.signed, metadata)
        await self._probe(introspector, url, target.method)

    def _no_target(self, failed: IntrospectionFailed, metadata: Mapping[str, Any] | None) -> None:
        if metadata is None:  # discovery failed: already an error of its own
            self.line(INTROSPECTION, "endpoint: unknown until the IdP's discovery document "
                                     "loads (INTROSPECTION_ENDPOINT is unset)")
            return
        named = metadata.get("introspection_endpoint")
        said = "names none" if named is None else (
            f"names {shown_url(str(named))!r}, which is not usable")
        self.line(INTROSPECTION, f"endpoint: unknown: the IdP metadata {said}")
        self.add(ERROR, "introspection_endpoint_unknown",
                 f"no introspection endpoint: INTROSPECTION_ENDPOINT is unset and the IdP's "
                 f"discovery document {said} (https, or http when the issuer is); every opaque "
                 "token would get 503",
                 "set INTROSPECTION_ENDPOINT to the IdP's RFC 7662 endpoint (Keycloak: "
                 "<issuer>/protocol/openid-connect/token/introspect; ORY Hydra: "
                 "<admin API>/admin/oauth2/introspect)")

    def _method_offered(self, method: str, metadata: Mapping[str, Any] | None) -> None:
        offered = metadata.get("introspection_endpoint_auth_methods_supported") if (
            metadata is not None) else None
        if isinstance(offered, list) and method not in offered:
            self.add(WARNING, "introspection_auth_method_unsupported",
                     f"INTROSPECTION_AUTH_METHOD={method}, but the IdP's metadata lists "
                     f"introspection_endpoint_auth_methods_supported {offered}",
                     "choose one it lists, or unset INTROSPECTION_AUTH_METHOD to let the "
                     "metadata decide")

    def _signing(self, signed: bool, metadata: Mapping[str, Any] | None) -> None:
        algs = metadata.get("introspection_signing_alg_values_supported") if (
            metadata is not None) else None
        if not signed:
            self.line(INTROSPECTION, "signed answers (RFC 9701): not offered by the IdP (no "
                                     "introspection_signing_alg_values_supported): JSON answers")
            return
        self.line(INTROSPECTION, f"signed answers (RFC 9701): the IdP offers {algs}: asked for "
                                 "and verified with its published keys (JSON answers accepted too)")
        allowed = self.config.tokens.algorithms
        if isinstance(algs, list) and not any(alg in allowed for alg in algs):
            self.add(WARNING, "introspection_signing_algs",
                     f"the IdP signs introspection answers with {algs}, none of them in "
                     f"JWT_ALGORITHMS ({','.join(sorted(allowed))}): a signed answer would be "
                     "refused and the caller get 503",
                     "add the IdP's signing algorithm to JWT_ALGORITHMS")

    async def _probe(self, introspector: Introspector, url: str, method: str) -> None:
        """Introspect a made-up token: `{"active": false}` proves the endpoint and the client."""
        explained = await introspector.explain(PROBE_TOKEN_PREFIX + secrets.token_urlsafe(16))
        answer, error = explained.answer, explained.error
        client = self.config.tokens.introspection
        client_id = client.client_id if client is not None else ""
        if answer is None:
            reason = error.reason if error is not None else "introspection_failed"
            self.line(INTROSPECTION, f"probe with a made-up token: no answer ({reason}: "
                                     f"{explained.detail})")
            if reason == "introspection_refused":
                self.add(ERROR, "introspection_client_refused",
                         f"the IdP refused the sidecar's introspection client {client_id!r} at "
                         f"{url} ({explained.detail.partition(':')[0]}): every opaque token "
                         "would get 503",
                         f"check INTROSPECTION_CLIENT_ID and INTROSPECTION_CLIENT_SECRET against "
                         f"the client at the IdP, that this client may introspect, and the "
                         f"client authentication ({method}; INTROSPECTION_AUTH_METHOD)")
            elif reason == "introspection_bad_signature":
                self.add(ERROR, "introspection_bad_signature",
                         f"the IdP's signed introspection answer does not check out: "
                         f"{explained.detail}; every opaque token would get 503",
                         "check JWT_ALGORITHMS and that the IdP signs with a key its JWKS "
                         "publishes, for the client INTROSPECTION_CLIENT_ID")
            else:
                self.add(ERROR, "introspection_unreachable",
                         f"introspection at {url} failed ({reason}: {explained.detail}): every "
                         "opaque token would get 503",
                         "check that this host reaches the endpoint (INTROSPECTION_ENDPOINT, "
                         "network policy, DNS) and INTROSPECTION_TIMEOUT_SECONDS")
            return
        kind = "signed, verified" if explained.signed else "JSON"
        self.line(INTROSPECTION, f"probe with a made-up token: answered active="
                                 f"{answer.get('active')!r} ({kind})")
        if answer.get("active") is False:
            self.add(NOTE, "introspection_ok",
                     f"the IdP answered a made-up token with active: false: the endpoint works "
                     f"and accepts the sidecar's client {client_id!r} ({method})")
            return
        self.add(ERROR, "introspection_answers_active",
                 f"the endpoint at {url} did not answer active: false for a made-up token "
                 f"(active={answer.get('active')!r}): it is no RFC 7662 endpoint, or it "
                 "accepts anything",
                 "check INTROSPECTION_ENDPOINT names the IdP's introspection endpoint")
