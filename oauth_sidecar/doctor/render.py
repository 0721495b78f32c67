"""The report as text for a terminal.

Why apart: the JSON output and the tests read the report itself; this only lays it out. Every
line passes through log.shown, because what the IdP, the upstream, the child and a token's claims
said is theirs to choose: escaped like a log line, none can rewrite the operator's terminal.
"""

from __future__ import annotations

import json

from oauth_sidecar import __version__
from oauth_sidecar.doctor.report import ERROR, NOTE, WARNING, CallerTools, Report, TokenReport
from oauth_sidecar.log import shown

CHECK_WIDTH = 10  # "allow-list"; a longer check name (introspection) widens the column
NAME_WIDTH = 32  # a longer tool name or URI shifts its own line only
TITLES = {"identity provider": "Identity provider", "keys": "Keys (JWKS)",
          "introspection": "Token introspection (RFC 7662)", "upstream": "Upstream"}


def _value(value: object) -> str:
    """A summary value on one line: lists joined by commas, a nested mapping as name=value."""
    if isinstance(value, dict):
        return ", ".join(f"{name}={_value(item) or '-'}" for name, item in value.items())
    if isinstance(value, list):
        return ", ".join(map(_value, value))
    return "" if value is None else str(value)


def _token_lines(token: TokenReport) -> list[str]:
    lines = ["Token (claim by claim; the token itself is never printed)"]
    width = max([CHECK_WIDTH, *(len(check.name) for check in token.checks)])
    for check in token.checks:
        mark = {True: "ok", False: "FAIL", None: "--"}[check.ok]
        lines.append(f"  {mark:<5} {check.name:<{width}} {check.detail}")
    if token.accepted:
        lines.append("  verdict: ACCEPTED: the sidecar forwards requests with this token")
    else:
        lines.append(f"  verdict: REFUSED: HTTP {token.status} ({token.reason}): "
                     f"{token.description}")
        if token.challenge:
            lines.append(f"  WWW-Authenticate: {token.challenge}")
    if token.answer is not None:
        kind = "a signed answer (RFC 9701), its token_introspection" if token.answer_signed \
            else "JSON"
        lines.append(f"  the IdP's introspection answer ({kind}), as it came:")
        lines += [f"    {row}" for row in json.dumps(token.answer, indent=2).splitlines()]
    if token.tools is not None:
        lines += ["", *_tool_lines(token.tools)]
    return lines


def _tool_lines(tools: CallerTools) -> list[str]:
    """Each listed name with ToolPolicy's verdict; the rules that apply to the caller."""
    if tools.unlisted:
        lines = ["What this token may call (tool rules)",
                 f"  the upstream's lists could not be read: {tools.unlisted}",
                 "  the rules that apply to this caller instead:"]
        return lines + [f"    {rule}" for rule in tools.rules]
    lines = [f"What this token may call (tool rules, judged on {tools.source})"]
    width = min(max((len(item.name) for item in tools.items), default=0), NAME_WIDTH)
    kind = ""
    for item in tools.items:
        if item.kind != kind:
            kind = item.kind
            lines.append(f"  {kind}")
        if not item.allowed:
            mark, detail = "refused", f"{item.because}: a JSON-RPC error, never sent upstream"
        elif item.missing_scopes:
            mark, detail = "403", (f"{item.because}, but TOOL_SCOPES needs "
                                   f"{' '.join(item.missing_scopes)}, which the token lacks: "
                                   "403 insufficient_scope (the client may step up)")
        else:
            mark, detail = "allowed", item.because
        lines.append(f"    {mark:<8} {item.name:<{width}}  {detail}")
    if not tools.items:
        lines.append("  the upstream lists nothing")
    lines += [f"  note: {note}" for note in tools.notes]
    lines += ["  the rules that apply to this caller:", *(f"    {rule}" for rule in tools.rules)]
    return lines


def render(report: Report, *, strict: bool = False) -> str:
    lines = [f"oauth-sidecar check ({__version__})", "", "Configuration"]
    width = max(map(len, report.summary))
    for name, value in report.summary.items():
        lines.append(f"  {name:<{width}}  {_value(value) or '-'}")
    for name, entries in report.sections.items():
        lines += ["", TITLES.get(name, name), *(f"  {entry}" for entry in entries or ["-"])]
    lines += ["", "What an MCP client sees"]
    for title, document in report.documents.items():
        lines.append(f"  {title}:")
        text = document if isinstance(document, str) else json.dumps(document, indent=2)
        lines += [f"    {row}" for row in text.splitlines()]
    token = report.token
    if token is not None:
        lines += ["", *_token_lines(token)]
    order = {ERROR: 0, WARNING: 1, NOTE: 2}
    lines += ["", "Findings"]
    for finding in sorted(report.findings, key=lambda f: order[f.severity]):
        lines.append(f"  {finding.severity.upper():<7} {finding.code}: {finding.message}")
        if finding.fix:
            lines.append(f"          fix: {finding.fix}")
    if not report.findings:
        lines.append("  none")
    counts = {s: sum(f.severity == s for f in report.findings) for s in (ERROR, WARNING)}
    summary = f"{counts[ERROR]} error(s), {counts[WARNING]} warning(s)"
    if token is not None:
        summary += f", token {'accepted' if token.accepted else 'refused'}"
    verdict = "PASS" if report.passed(strict) else "FAIL"
    lines += ["", f"Result: {verdict} ({summary}{', --strict' if strict else ''})", ""]
    return "\n".join(map(shown, lines))  # claims and the IdP's words, escaped
