"""The report as text for a terminal.

Why apart: the JSON output and the tests read the report itself; this only lays it out. Every
line passes through log.shown, because what the IdP, the upstream, the child and a token's claims
said is theirs to choose: escaped like a log line, none can rewrite the operator's terminal.
"""

from __future__ import annotations

import json

from oauth_sidecar import __version__
from oauth_sidecar.doctor.report import ERROR, NOTE, WARNING, Report
from oauth_sidecar.log import shown

TITLES = {"identity provider": "Identity provider", "keys": "Keys (JWKS)", "upstream": "Upstream"}


def _value(value: object) -> str:
    """A summary value on one line: lists joined by commas, a nested mapping as name=value."""
    if isinstance(value, dict):
        return ", ".join(f"{name}={_value(item) or '-'}" for name, item in value.items())
    if isinstance(value, list):
        return ", ".join(map(_value, value))
    return "" if value is None else str(value)


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
        lines += ["", "Token (claim by claim; the token itself is never printed)"]
        for check in token.checks:
            mark = {True: "ok", False: "FAIL", None: "--"}[check.ok]
            lines.append(f"  {mark:<5} {check.name:<10} {check.detail}")
        if token.accepted:
            lines.append("  verdict: ACCEPTED: the sidecar forwards requests with this token")
        else:
            lines.append(f"  verdict: REFUSED: HTTP {token.status} ({token.reason}): "
                         f"{token.description}")
            if token.challenge:
                lines.append(f"  WWW-Authenticate: {token.challenge}")
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
