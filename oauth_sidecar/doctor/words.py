"""Words for the verifier's and the policy's outcomes, claim by claim: what a passing check found
and a hint for a failing one (the IdP-specific pitfalls behind a wrong aud, iss or email).

Why apart from the explainer: these sentences decide nothing. Whether a check passed is always
the verifier's or the policy's outcome (explainer.py passes it in); a wording here can only be
wrong in its words, never in its verdict.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from oauth_sidecar.auth.bearer import TokenError
from oauth_sidecar.auth.idp import VerificationKey, same_issuer
from oauth_sidecar.auth.policy import AccessPolicy, Admission
from oauth_sidecar.auth.tokens import (
    CLIENT_CLAIMS,
    ID_TOKEN_HASHES,
    MAX_KID_LENGTH,
    RFC9068_MEDIA_TYPE,
    TokenVerifier,
    media_type,
)
from oauth_sidecar.config import Config
from oauth_sidecar.doctor.report import ClaimCheck


def span(seconds: float) -> str:
    total = round(abs(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours} h"] if hours else []
    if hours or minutes:
        parts.append(f"{minutes} m")
    parts.append(f"{secs} s")
    return " ".join(parts)


def utc_text(timestamp: float) -> str:
    try:
        moment = datetime.fromtimestamp(timestamp, UTC)
    except (OverflowError, OSError, ValueError):
        return f"{timestamp!r}"
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def describe_key(key: VerificationKey) -> str:
    public = key.key
    if isinstance(public, rsa.RSAPublicKey):
        kind = f"RSA {public.key_size} bits"
    elif isinstance(public, ec.EllipticCurvePublicKey):
        kind = f"EC {public.curve.name}"
    else:
        kind = type(public).__name__.removesuffix("PublicKey").lstrip("_")
    return f"{kind}, verifies {', '.join(sorted(key.algorithms))}"


def claim_line(name: str, error: TokenError | None, ok_detail: str, fail_detail: str = ""
               ) -> ClaimCheck:
    """A check's outcome in words: the detail for a pass, or the failure's own sentence and
    reason code with a hint."""
    if error is None:
        return ClaimCheck(name, True, ok_detail)
    hint = f": {fail_detail}" if fail_detail else ""
    return ClaimCheck(name, False, f"{error.description} ({error.reason}){hint}", error.reason)


class ClaimWords:
    """The words for each named check of the verifier, and for the policy's lists."""

    def __init__(self, config: Config, verifier: TokenVerifier) -> None:
        self.config, self.verifier = config, verifier
        self.now = time.time()

    # -- the header --------------------------------------------------------------------------

    def _alg(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        allowed, alg = self.config.tokens.algorithms, header.get("alg")
        hint = " (only asymmetric algorithms are ever accepted)" if isinstance(alg, str) and (
            alg.lower() == "none" or alg.startswith("HS")) else ""
        return (f"{alg} is in JWT_ALGORITHMS",
                f"{alg!r} is not in JWT_ALGORITHMS ({','.join(sorted(allowed))}){hint}")

    def _crit(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        return "absent", "no critical extension is understood"

    def _cty(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        cty = header.get("cty")
        return ("absent" if cty is None else repr(cty)), f"cty {cty!r}"

    def _typ(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        typ = header.get("typ")
        if not isinstance(typ, str):
            return "absent", f"{typ!r} is not a string"
        kind = media_type(typ)
        rfc9068 = " (RFC 9068 access token)" if kind == RFC9068_MEDIA_TYPE else ""
        return f"{typ}{rfc9068}", f"{typ!r} is {kind}, which marks another kind of token"

    def _kid(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        kid = header.get("kid")
        if kid is None:
            return "absent: usable only when exactly one published key fits alg", ""
        return repr(kid), f"must be a string of 1 to {MAX_KID_LENGTH} characters"

    # -- the claims ----------------------------------------------------------------------------

    def _time(self, name: str, payload: Mapping[str, Any]) -> tuple[str, str]:
        leeway, value = self.config.tokens.leeway, payload.get(name)
        if name not in payload:
            return "absent (optional)", "missing: the sidecar requires exp"
        if not isinstance(value, int | float) or isinstance(value, bool):
            return repr(value), f"{value!r} is not a number"
        try:
            moment = int(value)
        except (OverflowError, ValueError):
            return repr(value), f"{value!r} is not a finite number"
        delta, when = moment - self.now, utc_text(moment)
        if name == "exp":
            if delta > 0:
                return f"{when}: expires in {span(delta)}", ""
            return (f"{when}: expired {span(delta)} ago, within the {leeway} s leeway",
                    f"{when}: expired {span(delta)} ago (leeway {leeway} s)")
        future = (f"{when}: {span(delta)} in the future, beyond the {leeway} s leeway (is a "
                  "clock wrong?)")
        if delta > 0:
            return f"{when}: {span(delta)} in the future, within the {leeway} s leeway", future
        return f"{when} ({span(delta)} ago)", future

    def _exp(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        return self._time("exp", payload)

    def _nbf(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        return self._time("nbf", payload)

    def _iat(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        return self._time("iat", payload)

    def _sub(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        sub = payload.get("sub")
        return repr(sub), "missing" if sub is None else f"{sub!r} is not a non-empty string"

    def _jti(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        jti = payload.get("jti")
        return ("absent (optional)" if "jti" not in payload else repr(jti),
                f"{jti!r} is not a string")

    def _cnf(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        bound = payload.get("cnf")
        how = ", ".join(sorted(bound)) if isinstance(bound, dict) else repr(bound)
        return "absent: a bearer token", (
            f"cnf ({how}): the client asked the IdP for a DPoP or mTLS-bound token; have it "
            "request a plain bearer token for this resource")

    def _id_token(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        named = [f"{name}={payload[name]!r}" for name in CLIENT_CLAIMS if name in payload]
        client = f"; client: {', '.join(named)}" if named else ""
        mode = self.config.tokens.id_token_check
        return f"not an ID token (JWT_ID_TOKEN_CHECK={mode}){client}", ""

    def _id_token_hint(self, error: TokenError, payload: Mapping[str, Any]) -> str:
        if error.reason == "id_token_no_client":
            return (f"it names no client in {', '.join(CLIENT_CLAIMS)}, as an ID token whose aud "
                    "is the client id does (JWT_ID_TOKEN_CHECK=client); MCP clients must send "
                    "the access token")
        shown = [f"{name}={payload[name]!r}" for name in ("token_use", "typ") if name in payload]
        shown += [name for name in ID_TOKEN_HASHES if name in payload]
        return (f"it says so ({', '.join(shown)}); MCP clients must send the access token, not "
                "the ID token")

    def _iss(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        expected, iss = self.config.tokens.issuer, payload.get("iss")
        if iss is None:
            return "", "missing"
        if not isinstance(iss, str):
            return "", f"{iss!r} is not a string"
        refused = f"{iss!r} is not OIDC_ISSUER_URL {expected!r}"
        if iss == expected:
            return f"{iss!r} = OIDC_ISSUER_URL", refused
        if same_issuer(iss, expected):  # the rule the verifier applies
            return (f"{iss!r} differs from OIDC_ISSUER_URL {expected!r} only by a trailing slash: "
                    "accepted (one trailing slash is tolerated)", refused)
        hint = ""
        if iss.rstrip("/") == expected.rstrip("/"):
            hint = " (they differ in trailing slashes; only one is tolerated)"
        elif iss.lower() == expected.lower():
            hint = " (they differ in letter case; issuers are compared exactly)"
        elif "sts.windows.net" in iss and "login.microsoftonline.com" in expected:
            hint = (" (an Entra v1.0 token: set requestedAccessTokenVersion=2 in the API app's "
                    "manifest)")
        return "", refused + hint

    def _audience(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, str]:
        claim, ours = self.verifier.audience_claim, list(self.config.tokens.audiences)
        value = payload.get(claim)
        where = "" if claim == "aud" else f" (JWT_AUDIENCE_CLAIM={claim})"
        values = [value] if isinstance(value, str) else value
        if not values or not isinstance(values, list) or not all(
            isinstance(v, str) for v in values
        ):
            hint = ""
            if claim == "client_id" and payload.get("aud"):
                hint = "; the token has aud instead: an ID token, or not a Cognito access token"
            if claim == "aud" and payload.get("client_id") in ours:
                hint = "; client_id holds an OIDC_AUDIENCE value: set JWT_AUDIENCE_CLAIM=client_id"
            return "", f"{claim} is {value!r}{where}{hint}"
        matched = [a for a in ours if a in values]
        hints = []
        for item in values:
            near = [a for a in ours if a.rstrip("/").lower() == item.rstrip("/").lower()]
            if near and item not in ours:
                hints.append(f"{item!r} differs from {near[0]!r} only by case or a trailing "
                             "slash; audiences are compared exactly")
            if item == "account":
                hints.append("`account` is Keycloak's default: add an Audience mapper")
            if item.rstrip("/").endswith("/userinfo"):
                hints.append("an Auth0 login token without an API audience")
            if claim == "aud" and item in (payload.get("azp"), payload.get("client_id")):
                hints.append(f"{item!r} is the client id: an ID token, or an IdP that puts the "
                             "client in aud")
        shown = matched[0] if matched else ""
        return (f"{claim} {values} includes {shown!r} (OIDC_AUDIENCE){where}",
                f"{claim} {values}: none is in OIDC_AUDIENCE {ours}{where}"
                + "".join(f"; {hint}" for hint in hints))

    # -- the policy ----------------------------------------------------------------------------

    def policy_lines(self, admission: Admission, payload: Mapping[str, Any],
                     policy: AccessPolicy) -> list[ClaimCheck]:
        config = self.config.policy
        lines: list[ClaimCheck] = []
        held = " ".join(sorted(policy.scopes(payload))) or "(none)"
        if not config.required_scopes:
            lines.append(ClaimCheck("scope", None, f"token scopes: {held}; REQUIRED_SCOPES is "
                                                   "not set"))
        elif admission.missing_scopes:
            lines.append(ClaimCheck(
                "scope", False, f"missing {' '.join(admission.missing_scopes)} (REQUIRED_SCOPES); "
                f"the token has {held}: the sidecar answers 403 insufficient_scope",
                "insufficient_scope"))
        else:
            lines.append(ClaimCheck("scope", True, f"has every REQUIRED_SCOPES "
                                                   f"({' '.join(config.required_scopes)})"))
        said = [self._list_words(name, admits, payload, policy)
                for name, admits in admission.lists.items()]
        admitted = admission.denied is None or admission.denied.scope_missing
        if not admission.lists:
            said = ["ALLOW_ALL_AUTHENTICATED=true and no allow-list" if admitted else
                    "no allow-list admits anyone now (ALLOW_ALL_AUTHENTICATED=false, or an "
                    "allow-list file that is empty)"]
        if admitted:
            lines.append(ClaimCheck("allow-list", True, "admitted: " + "; ".join(said)))
        else:
            lines.append(ClaimCheck("allow-list", False, "no allow-list admits it: "
                                    + "; ".join(said), "not_allowed"))
        return lines

    def _list_words(self, name: str, admits: bool, payload: Mapping[str, Any],
                    policy: AccessPolicy) -> str:
        sub, email = payload.get("sub"), payload.get("email")
        verified = policy.verified_email(payload)
        if name == "ALLOW_SUBS":
            return f"ALLOW_SUBS {'has' if admits else 'does not have'} sub {sub!r}"
        if name == "ALLOW_GROUPS":
            claim = ".".join(self.config.policy.groups_claim)
            groups = policy.groups(payload)
            if admits:
                common = sorted(policy.allow_list("groups").intersection(groups))
                return f"ALLOW_GROUPS has {', '.join(common)} (claim {claim})"
            return f"groups at claim {claim}: {groups or 'none'}, none in ALLOW_GROUPS"
        if verified is not None:
            part = verified if name == "ALLOW_EMAILS" else verified.partition("@")[2]
            if admits or part.isascii():
                return f"{name} {'has' if admits else 'does not have'} {part}"
            return (f"{name} does not have {part!a} (compared exactly apart from ASCII "
                    "case: no Unicode folding or normalisation)")
        if email is None:
            return f"{name}: no email claim (have the IdP put email in access tokens)"
        if isinstance(email, str) and email.count("@") == 1:
            return (f"{name}: email {email!r} does not count: email_verified="
                    f"{payload.get('email_verified')!r} (only verified emails match; "
                    "INSECURE_ALLOW_UNVERIFIED_EMAIL=false)")
        return f"{name}: email {email!r} is not an email address"

