"""The doctor's report: findings with a severity, section lines, the documents clients see and the
token's explanation; and the base every part of the diagnosis writes through.

Why a model apart from the checks: the text renderer, the JSON output and the tests read the same
report, so what the checks found is decided once and only said in two ways.

Severities: an error means sign-in or validation will fail (exit 1); a warning means likely
trouble (exit 0 unless --strict); a note records what was checked and found fine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

    from oauth_sidecar.config import Config

ERROR, WARNING, NOTE = "error", "warning", "note"
SECTIONS = ("identity provider", "keys", "upstream")
INTROSPECTION = "introspection"
"""The section of TOKEN_VALIDATION=introspection or auto, after the keys."""


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str
    code: str
    """Stable identifier, e.g. `issuer_trailing_slash`."""
    message: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class ClaimCheck:
    name: str
    ok: bool | None
    """None: information only, or not checked (a check it needs failed)."""
    detail: str
    reason: str = ""
    """The verifier's or the policy's reason code when the check failed."""


@dataclass(frozen=True, slots=True)
class ToolAccess:
    """One tool, prompt or resource the upstream listed, and ToolPolicy's verdict for the caller."""

    kind: str
    """tools, prompts or resources (a resource template is judged by its URI template)."""
    name: str
    allowed: bool
    because: str
    """The rule that decided (Verdict.because)."""
    missing_scopes: tuple[str, ...] = ()
    """TOOL_SCOPES the token lacks: an allowed call still gets 403 insufficient_scope."""


@dataclass(slots=True)
class CallerTools:
    """What an admitted token may call under the tool rules."""

    source: str
    """Where the names came from (the upstream's lists, at which URL); "" when unlisted."""
    unlisted: str
    """Why the upstream's lists could not be read ("" when they were)."""
    items: list[ToolAccess] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    """The rules that apply to this caller, one line each."""
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class TokenReport:
    checks: list[ClaimCheck]
    accepted: bool
    status: int
    """What the sidecar answers: 200 (forwarded), 400, 401, 403 or 503."""
    reason: str
    """The verifier's or the policy's reason code; "" when accepted."""
    description: str
    challenge: str = ""
    """The WWW-Authenticate header the client would get, if any."""
    tools: CallerTools | None = None
    """With tool rules configured and the token admitted: what it may call."""
    answer: dict[str, object] | None = None
    """An introspected token: the IdP's answer (RFC 7662) as it came, the token never in it."""
    answer_signed: bool = False
    """The answer was a signed JWT (RFC 9701), verified; `answer` is its token_introspection."""

    def failed_checks(self) -> list[str]:
        return [check.name for check in self.checks if check.ok is False]


@dataclass(slots=True)
class Report:
    summary: dict[str, object]
    sections: dict[str, list[str]] = field(default_factory=dict)
    documents: dict[str, object] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    token: TokenReport | None = None
    child_pid: int | None = None

    def codes(self, *severities: str) -> set[str]:
        return {f.code for f in self.findings if not severities or f.severity in severities}

    def passed(self, strict: bool = False) -> bool:
        failing = {ERROR, WARNING} if strict else {ERROR}
        token_ok = self.token is None or self.token.accepted
        return token_ok and not any(f.severity in failing for f in self.findings)


class Checker:
    """One part of the diagnosis: reads the configuration, may use the doctor's HTTP session, and
    writes findings and section lines into the shared report."""

    def __init__(self, config: Config, report: Report,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        self.report = report
        self.session = session

    def add(self, severity: str, code: str, message: str, fix: str = "") -> None:
        self.report.findings.append(Finding(severity, code, message, fix))

    def line(self, section: str, text: str) -> None:
        self.report.sections[section].append(text)
