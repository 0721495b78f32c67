"""ToolPolicy: which tools, prompts and resources an admitted caller may use.

The evaluation order (README "Tool rules"), for one caller and one thing of one kind:
1. deny wins: a name matching TOOLS_DENY (tools), or a `deny_*` glob of a rule that applies to the
   caller, is refused, whatever allows it;
2. a kind is restricted once anything allows that kind (TOOLS_ALLOW for tools, or an `allow_*`
   glob of that kind in any rule, whether or not it applies to this caller): then a name must match
   TOOLS_ALLOW or an `allow_*` glob of a rule that applies to the caller;
3. an unrestricted kind is open: rules about tools never lock prompts or resources by accident.
A rule applies to a caller when `everyone = true`, or one of its subs, emails (verified), email
domains or groups matches, exactly as the allow-lists match (auth/policy.py).

Why globs compiled to one expression per list: the rules run on every call and every listed item.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.config import ToolRule, ToolRulesConfig
from oauth_sidecar.config.model import KINDS


def matcher(globs: Iterable[str]) -> re.Pattern[str] | None:
    """One expression matching any of the globs (fnmatch, case-sensitive); None for none."""
    parts = [fnmatch.translate(glob) for glob in globs]
    return re.compile("|".join(f"(?:{part})" for part in parts)) if parts else None


def _matches(pattern: re.Pattern[str] | None, name: str) -> bool:
    return pattern is not None and pattern.match(name) is not None


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    because: str
    """Which rule decided, for the audit line and `check` (never shown to the caller)."""


class CompiledRule:
    __slots__ = ("allow", "deny", "rule")

    def __init__(self, rule: ToolRule) -> None:
        self.rule = rule
        self.allow = {kind: matcher(rule.allow.get(kind, ())) for kind in KINDS}
        self.deny = {kind: matcher(rule.deny.get(kind, ())) for kind in KINDS}


class CallerRules:
    """The rules that apply to one caller (built once per request)."""

    __slots__ = ("_policy", "_rules")

    def __init__(self, policy: ToolPolicy, rules: tuple[CompiledRule, ...]) -> None:
        self._policy = policy
        self._rules = rules

    def verdict(self, kind: str, name: str) -> Verdict:
        policy = self._policy
        if kind == "tools" and _matches(policy.denied_tools, name):
            return Verdict(False, "TOOLS_DENY")
        for compiled in self._rules:
            if _matches(compiled.deny[kind], name):
                return Verdict(False, f"deny_{kind} of {compiled.rule.label}")
        if kind not in policy.restricted:
            return Verdict(True, f"no rule restricts {kind}")
        if kind == "tools" and _matches(policy.allowed_tools, name):
            return Verdict(True, "TOOLS_ALLOW")
        for compiled in self._rules:
            if _matches(compiled.allow[kind], name):
                return Verdict(True, f"allow_{kind} of {compiled.rule.label}")
        return Verdict(False, f"no rule allows this caller these {kind}")

    def allows(self, kind: str, name: str) -> bool:
        return self.verdict(kind, name).allowed

    def rules(self) -> tuple[ToolRule, ...]:
        return tuple(compiled.rule for compiled in self._rules)


class ToolPolicy:
    def __init__(self, config: ToolRulesConfig, policy: AccessPolicy) -> None:
        self._policy = policy
        self.config = config
        self.allowed_tools = matcher(config.allow)
        self.denied_tools = matcher(config.deny)
        self._scopes = tuple((matcher([glob]), scopes) for glob, scopes in config.scopes)
        self._rules: tuple[CompiledRule, ...] = ()
        self.restricted: frozenset[str] = frozenset()
        self.replace_file_rules(config.file_rules)

    def replace_file_rules(self, rules: tuple[ToolRule, ...]) -> None:
        """Swap the file's rules at once (mcp/rule_files.py): a request sees old or new."""
        compiled = tuple(CompiledRule(rule) for rule in rules)
        restricted = {kind for kind in KINDS if any(rule.allow.get(kind) for rule in rules)}
        if self.config.allow:
            restricted.add("tools")
        self._rules, self.restricted = compiled, frozenset(restricted)

    @property
    def file_rules(self) -> tuple[ToolRule, ...]:
        return tuple(compiled.rule for compiled in self._rules)

    def for_caller(self, subject: str, claims: Mapping[str, Any]) -> CallerRules:
        email = self._policy.verified_email(claims)
        domain = email.partition("@")[2] if email else None
        groups: frozenset[str] | None = None
        applying = []
        for compiled in self._rules:
            rule = compiled.rule
            if rule.everyone or subject in rule.subs or (
                    email is not None and (email in rule.emails or domain in rule.email_domains)):
                applying.append(compiled)
                continue
            if rule.groups:
                if groups is None:
                    groups = frozenset(self._policy.groups(claims))
                if not rule.groups.isdisjoint(groups):
                    applying.append(compiled)
        return CallerRules(self, tuple(applying))

    def needed_scopes(self, tool: str) -> tuple[str, ...]:
        """TOOL_SCOPES of every glob matching the tool, in order, once each."""
        needed: dict[str, None] = {}
        for pattern, scopes in self._scopes:
            if _matches(pattern, tool):
                needed.update(dict.fromkeys(scopes))
        return tuple(needed)

    def missing_scopes(self, tool: str, held: frozenset[str]) -> tuple[str, ...]:
        """The tool's TOOL_SCOPES not among `held` (AccessPolicy.scopes of the caller's claims):
        a call of it is refused with 403 insufficient_scope unless this is empty."""
        return tuple(scope for scope in self.needed_scopes(tool) if scope not in held)
