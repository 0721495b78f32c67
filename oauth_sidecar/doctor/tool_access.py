"""`check --token` with tool rules: what the admitted token may call, name by name.

Why this cannot contradict the sidecar: every verdict is ToolPolicy's (for_caller, then
CallerRules.verdict and its `because`, then missing_scopes over AccessPolicy.scopes), built from
the same configuration and the claims the verifier keeps, exactly as mcp/calls.py judges a call;
nothing here matches a glob. The names are the upstream's own (mcp_lists.py); when it cannot say
them, the rules that apply to the caller are listed instead.
"""

from __future__ import annotations

from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.config import Config
from oauth_sidecar.config.model import KINDS
from oauth_sidecar.doctor.mcp_lists import UpstreamLists
from oauth_sidecar.doctor.report import CallerTools, ToolAccess
from oauth_sidecar.mcp.tool_policy import ToolPolicy
from oauth_sidecar.request_keys import Principal


def caller_tools(config: Config, caller: Principal, lists: UpstreamLists | None,
                 source: str, unlisted: str) -> CallerTools:
    """ToolPolicy's verdict on each listed name for this caller, and the rules that apply."""
    policy = AccessPolicy.serving(config)
    tools = ToolPolicy(config.tool_rules, policy)
    rules = tools.for_caller(caller.subject, caller.claims)
    held = policy.scopes(caller.claims)
    report = CallerTools(source=source if lists is not None else "",
                         unlisted="" if lists is not None else unlisted)
    if lists is not None:
        report.notes += lists.notes
        for kind, names in lists.names.items():
            for name in names:
                verdict = rules.verdict(kind, name)
                missing = tools.missing_scopes(name, held) if kind == "tools" else ()
                report.items.append(ToolAccess(kind, name, verdict.allowed, verdict.because,
                                               missing))
    rule_config = config.tool_rules
    if rule_config.allow:
        report.rules.append(f"TOOLS_ALLOW (every caller): {', '.join(rule_config.allow)}")
    if rule_config.deny:
        report.rules.append(f"TOOLS_DENY (every caller): {', '.join(rule_config.deny)}")
    for rule in rules.rules():
        grants = [f"{verb}_{kind} {', '.join(globs)}" for verb, table in
                  (("allow", rule.allow), ("deny", rule.deny)) for kind, globs in table.items()]
        report.rules.append(f"{rule.label}{' (everyone)' if rule.everyone else ''}: "
                            + "; ".join(grants))
    if rule_config.file and not rules.rules():
        report.rules.append(f"no rule of {rule_config.file} applies to this caller")
    for glob, scopes in rule_config.scopes:
        report.rules.append(f"TOOL_SCOPES {glob}: {' '.join(scopes)}")
    if rule_config.scopes:
        report.rules.append(f"the token's scopes: {' '.join(sorted(held)) or '(none)'}")
    for glob, per_minute in rule_config.rate_limits:
        report.rules.append(f"TOOL_RATE_LIMITS {glob}: {per_minute} calls a minute")
    restricted = [kind for kind in KINDS if kind in tools.restricted]
    open_kinds = [kind for kind in KINDS if kind not in tools.restricted]
    report.rules.append(
        f"restricted to what is allowed: {', '.join(restricted) or 'nothing'}; "
        f"open (no rule allows any, so all but the denied): {', '.join(open_kinds) or 'nothing'}")
    return report
