"""`oauth-sidecar check`: says before any user tries whether sign-in and token validation will
work, and if not, which of the three parties (IdP, MCP client, sidecar) disagrees and how to fix it.

Why: a misconfigured deployment shows up as a bare 401 or as an MCP client refusing to proceed,
with no hint where the mismatch is. The doctor runs the production pieces (config.load, the
IdentityProvider, the metadata documents, TokenVerifier, AccessPolicy, the gate's Challenges,
ChildProcess, the proxy's path mapping) against the real IdP and upstream, prints what an MCP
client will see, and reports each known pitfall with its fix. For a token, every verdict and every
pass or fail is the real verifier's and policy's; the doctor only puts them into words and adds
hints, so it cannot contradict the sidecar. The token itself and its signature are never printed.

The parts: report.py (the model), lint.py (the configuration alone), idp_metadata.py and
probes.py (live checks), explainer.py and words.py (the token), diagnosis.py (the order),
render.py (text). This module holds the entry points `__main__` calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from typing import TextIO

from oauth_sidecar.config import Config
from oauth_sidecar.doctor.diagnosis import diagnose
from oauth_sidecar.doctor.lint import (
    audience_findings,
    entra_findings,
    resource_findings,
    state_secret_findings,
)
from oauth_sidecar.doctor.render import render
from oauth_sidecar.doctor.report import ERROR, NOTE, WARNING, Report
from oauth_sidecar.log import escaped

__all__ = [
    "ERROR", "NOTE", "WARNING", "Report", "audience_findings", "diagnose", "entra_findings",
    "read_token",
    "render", "resource_findings", "run", "state_secret_findings",
]
EXIT_PASS, EXIT_FAIL = 0, 1


def read_token(value: str | None, path: str | None, stdin: TextIO) -> str | None:
    """--token TOKEN, --token - (stdin) or --token-file PATH; ValueError when unreadable."""
    if value is not None and path is not None:
        raise ValueError("give --token or --token-file, not both")
    if value == "-":
        raw = stdin.read()
    elif path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                raw = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --token-file: {exc}") from None
    elif value is not None:
        raw = value
    else:
        return None
    token = raw.strip()
    scheme, _, rest = token.partition(" ")
    if scheme.lower() == "bearer" and rest:  # pasted from an Authorization header
        token = rest.strip()
    if not token:
        raise ValueError("the token is empty")
    return token


def run(config: Config, token: str | None = None, *, strict: bool = False,
        as_json: bool = False, out: TextIO | None = None) -> int:
    """Diagnose, print the report, return the exit code (0 pass, 1 fail)."""
    report = asyncio.run(diagnose(config, token))
    out = out or sys.stdout
    # What the IdP, the upstream, the child and the token's claims said is theirs to choose:
    # escaped like a log line, so none can rewrite the operator's terminal.
    if as_json:
        document = {**dataclasses.asdict(report), "passed": report.passed(strict)}
        out.write(json.dumps(escaped(document), indent=2, default=str) + "\n")
    else:
        out.write(render(report, strict=strict))
    return EXIT_PASS if report.passed(strict) else EXIT_FAIL

