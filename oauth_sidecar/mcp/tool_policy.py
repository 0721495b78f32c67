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
Why verdicts are remembered (per rule-file version, per set of rules that apply, per name): a
tools/list answer asks for hundreds of them on every list request, and a caller calls the same
few tools over and over; a verdict only depends on those three. The memory is bounded (entries,
and names no longer than an MCP name may be) and dropped whole with the version it belongs to.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.config import ToolRule, ToolRulesConfig
from oauth_sidecar.config.model import KINDS

VERDICT_CACHE_ENTRIES = 8192  # all callers together; cleared whole when full
# Callers whose applying rules are remembered, by their verified claims (the token cache hands
# out the same claims object on every hit); cleared whole when full. Each entry holds its claims
# (kept small by the token cache: ~1 KB, ~20 KB with 200 groups).
CALLER_CACHE_ENTRIES = 256
CACHED_NAME_CHARS = 256  # MCP names are at most 128 characters; longer ones are judged each time


def glob_pattern(glob: str) -> re.Pattern[str]:
    """One glob as an expression (fnmatch, case-sensitive)."""
    return re.compile(fnmatch.translate(glob))


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


@dataclass(frozen=True, slots=True)
class RuleSet:
    """One version of the file's rules, what they restrict and the verdicts given under them:
    swapped as one object, so a request never mixes two versions."""

    rules: tuple[CompiledRule, ...]
    restricted: frozenset[str]
    verdicts: dict[tuple[tuple[CompiledRule, ...], str, str], Verdict] = field(
        default_factory=dict)
    callers: dict[int, tuple[Mapping[str, Any], str, tuple[CompiledRule, ...]]] = field(
        default_factory=dict)
    """id(claims) -> (those claims, the subject, the rules that apply to that caller)."""


class CallerRules:
    """The rules that apply to one caller (built once per request)."""

    __slots__ = ("_policy", "_rules", "_version")

    def __init__(self, policy: ToolPolicy, rules: tuple[CompiledRule, ...],
                 version: RuleSet | None = None) -> None:
        self._policy = policy
        self._rules = rules
        self._version = version or policy.version

    def verdict(self, kind: str, name: str) -> Verdict:
        if len(name) > CACHED_NAME_CHARS:
            return self._judge(kind, name)
        verdicts = self._version.verdicts
        key = (self._rules, kind, name)
        found = verdicts.get(key)
        if found is None:
            found = self._judge(kind, name)
            if len(verdicts) >= VERDICT_CACHE_ENTRIES:
                verdicts.clear()
            verdicts[key] = found
        return found

    def _judge(self, kind: str, name: str) -> Verdict:
        policy = self._policy
        if kind == "tools" and _matches(policy.denied_tools, name):
            return Verdict(False, "TOOLS_DENY")
        for compiled in self._rules:
            if _matches(compiled.deny[kind], name):
                return Verdict(False, f"deny_{kind} of {compiled.rule.label}")
        if kind not in self._version.restricted:
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
        self.scoped = bool(self._scopes)
        """Whether any TOOL_SCOPES is configured (without, no call needs a scope)."""
        self.version = RuleSet((), frozenset())
        self.replace_file_rules(config.file_rules)

    def replace_file_rules(self, rules: tuple[ToolRule, ...]) -> None:
        """Swap the file's rules at once (mcp/rule_files.py): a request sees old or new, and
        no verdict of the old ones is kept."""
        compiled = tuple(CompiledRule(rule) for rule in rules)
        restricted = {kind for kind in KINDS if any(rule.allow.get(kind) for rule in rules)}
        if self.config.allow:
            restricted.add("tools")
        self.version = RuleSet(compiled, frozenset(restricted))

    @property
    def restricted(self) -> frozenset[str]:
        return self.version.restricted

    @property
    def file_rules(self) -> tuple[ToolRule, ...]:
        return tuple(compiled.rule for compiled in self.version.rules)

    def for_caller(self, subject: str, claims: Mapping[str, Any]) -> CallerRules:
        version = self.version
        known = version.callers.get(id(claims))
        # The entry holds its claims: while it exists, no other object can have their id.
        if known is not None and known[0] is claims and known[1] == subject:
            return CallerRules(self, known[2], version)
        applying = self._applying(version, subject, claims)
        if len(version.callers) >= CALLER_CACHE_ENTRIES:
            version.callers.clear()
        version.callers[id(claims)] = (claims, subject, applying)
        return CallerRules(self, applying, version)

    def _applying(self, version: RuleSet, subject: str, claims: Mapping[str, Any]
                  ) -> tuple[CompiledRule, ...]:
        email: str | None = None
        domain: str | None = None
        email_read = False  # the email and the groups are read once, and only if a rule asks
        groups: frozenset[str] | None = None
        applying = []
        for compiled in version.rules:
            rule = compiled.rule
            if rule.everyone or subject in rule.subs:
                applying.append(compiled)
                continue
            if rule.emails or rule.email_domains:
                if not email_read:
                    email_read = True
                    email = self._policy.verified_email(claims)
                    domain = email.partition("@")[2] if email else None
                if email is not None and (email in rule.emails or domain in rule.email_domains):
                    applying.append(compiled)
                    continue
            if rule.groups:
                if groups is None:
                    groups = frozenset(self._policy.groups(claims))
                if not rule.groups.isdisjoint(groups):
                    applying.append(compiled)
        return tuple(applying)

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
