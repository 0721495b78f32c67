"""AccessPolicy: which verified callers may use the MCP server, and with which scopes.

Why: a valid token only says who the caller is; anyone who can sign in to the IdP has one. The
allow-lists decide (any configured list matching admits: OR, the meaning the same variables have in
`mcp-oauth-proxy`), and they are pure functions of the claims so they are easy to test
exhaustively. Emails count only when the IdP says they are verified (on an IdP with self-service
sign-up an unverified `email` is attacker-chosen) and domains match exactly after the single `@`,
never as a suffix. Emails and domains compare case-insensitively in ASCII alone: no Unicode case
folding or normalisation, which would let `\u212aim@example.com` (KELVIN SIGN) or a fullwidth
`\uff4bim@example.com` pass as `kim@example.com` on an IdP that lets users register such addresses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from oauth_sidecar.config import ALLOW_LISTS, Config, PolicyConfig, ascii_lower


class Denied(Exception):
    """The caller is authenticated but not admitted.

    `reason` is a stable code for logs; `scope_missing` marks an RFC 6750 insufficient_scope
    refusal (the client may step up), as opposed to an allow-list refusal (it may not).
    """

    def __init__(self, reason: str, *, scope_missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.scope_missing = scope_missing


@dataclass(frozen=True, slots=True)
class Admission:
    """How the policy judges one caller, list by list (for `oauth-sidecar check --token`)."""

    lists: dict[str, bool]
    """Each configured allow-list, by variable (ALLOW_SUBS ...): does it admit this caller."""
    denied: Denied | None
    """What check() raises; None: admitted with every required scope."""
    missing_scopes: tuple[str, ...]
    """REQUIRED_SCOPES the token lacks (checked only once the caller is admitted)."""


def _is_true(value: Any) -> bool:
    """email_verified is a boolean, but Cognito and some older IdPs send the string "true"."""
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _words(value: Any) -> list[str]:
    """A scope claim: an RFC 8693 space-separated string (Entra `scp` too), or a list (Okta)."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


# The claims check(), verified_email() and scopes() read; the groups claim is added when read.
READ_CLAIMS = frozenset({"email", "email_verified", "scope", "scp"})


class AccessPolicy:
    def __init__(self, config: PolicyConfig, *, forwarded: bool = True,
                 groups_read_elsewhere: bool = False) -> None:
        """forwarded: the caller's email and groups are also sent upstream (FORWARD_IDENTITY);
        groups_read_elsewhere: something else reads the groups (TOOL_POLICY_FILE's rules)."""
        self._config = config
        self._required = frozenset(config.required_scopes)
        reads_groups = forwarded or groups_read_elsewhere or bool(config.groups) or any(
            allow_file.kind == "groups" for allow_file in config.files)
        self._read_claims = READ_CLAIMS | (
            {config.groups_claim[0]} if reads_groups else frozenset())

    @classmethod
    def serving(cls, config: Config) -> AccessPolicy:
        """The policy as the sidecar serves with it (create_app, and `check --token`, which
        must judge the same claims the verifier keeps)."""
        return cls(config.policy, forwarded=config.forward_identity,
                   groups_read_elsewhere=bool(config.tool_rules.file))

    def allow_list(self, kind: str) -> frozenset[str]:
        """One allow-list: subs, emails, email_domains or groups (config.ALLOW_LISTS)."""
        entries: frozenset[str] = getattr(self._config, kind)
        return entries

    def replace_allow_list(self, kind: str, entries: frozenset[str]) -> None:
        """Swap one list at once (allow_files.py): a request sees the old list or the new."""
        if kind not in ALLOW_LISTS:
            raise ValueError(f"{kind!r} is not an allow-list")
        change: dict[str, Any] = {kind: entries}
        self._config = replace(self._config, **change)

    def verified_email(self, claims: Mapping[str, Any]) -> str | None:
        """The caller's email, A-Z lowercased, if well-formed and verified (or verification
        waived)."""
        email = claims.get("email")
        if not isinstance(email, str) or email.count("@") != 1:
            return None
        local, _, domain = email.partition("@")
        if not local or not domain:
            return None
        if not (self._config.allow_unverified_email or _is_true(claims.get("email_verified"))):
            return None
        return ascii_lower(email)

    def groups(self, claims: Mapping[str, Any]) -> list[str]:
        """Groups at the configured dotted path; anything but a list of strings is no groups."""
        value: Any = claims
        for part in self._config.groups_claim:
            if not isinstance(value, Mapping):
                return []
            value = value.get(part)
        if not isinstance(value, list):
            return []
        return [item for item in value if isinstance(item, str)]

    def scopes(self, claims: Mapping[str, Any]) -> frozenset[str]:
        return frozenset(_words(claims.get("scope")) + _words(claims.get("scp")))

    def missing_scopes(self, claims: Mapping[str, Any]) -> tuple[str, ...]:
        held = self.scopes(claims)
        return tuple(scope for scope in self._config.required_scopes if scope not in held)

    def check(self, subject: str, claims: Mapping[str, Any]) -> None:
        """Raise Denied unless the caller is admitted and holds every required scope."""
        if not self._admitted(subject, claims):
            raise Denied("not_allowed")
        if self._required and self.missing_scopes(claims):
            raise Denied("insufficient_scope", scope_missing=True)

    def kept_claims(
        self, subject: str, claims: Mapping[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """The claims a later request with the same token needs, and whether they are admitted
        now. The verified-token cache keeps only these (an Entra token's groups are most of its
        size, and kept only when a list or the forwarded identity reads them); the verdict only
        chooses the cache's shelf, as it is taken again on every request."""
        kept = {name: claims[name] for name in self._read_claims if name in claims}
        try:
            self.check(subject, kept)
        except Denied:
            return kept, False
        return kept, True

    def explain(self, subject: str, claims: Mapping[str, Any]) -> Admission:
        """check()'s verdict, and what each configured allow-list says about this caller (the
        same predicates _admitted() tries in turn)."""
        config, email = self._config, self.verified_email(claims)
        said = {
            "subs": lambda: self._listed_sub(subject),
            "emails": lambda: self._listed_email(email),
            "email_domains": lambda: self._listed_domain(email),
            "groups": lambda: self._listed_group(claims),
        }
        lists = {ALLOW_LISTS[kind]: said[kind]() for kind in ALLOW_LISTS if getattr(config, kind)}
        try:
            self.check(subject, claims)
        except Denied as exc:
            denied: Denied | None = exc
        else:
            denied = None
        return Admission(lists, denied, self.missing_scopes(claims))

    def _admitted(self, subject: str, claims: Mapping[str, Any]) -> bool:
        config = self._config
        if not (config.subs or config.emails or config.email_domains or config.groups):
            # A list file that is empty for now admits nobody, never everybody.
            return config.allow_all_authenticated and not config.files
        if self._listed_sub(subject):
            return True
        if config.emails or config.email_domains:
            email = self.verified_email(claims)
            if self._listed_email(email) or self._listed_domain(email):
                return True
        return self._listed_group(claims)

    def _listed_sub(self, subject: str) -> bool:
        return subject in self._config.subs

    def _listed_email(self, email: str | None) -> bool:
        return email is not None and email in self._config.emails

    def _listed_domain(self, email: str | None) -> bool:
        return email is not None and email.partition("@")[2] in self._config.email_domains

    def _listed_group(self, claims: Mapping[str, Any]) -> bool:
        groups = self._config.groups
        return bool(groups) and not groups.isdisjoint(self.groups(claims))
