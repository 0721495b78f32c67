"""The secret mask: every secret the sidecar knows is replaced in every finished log line,
whatever logged it (our events, aiohttp's stdlib records, exception texts, object reprs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from processes import PROCESS_TIMEOUT, REPO

from oauth_sidecar.secret_mask import MARK, ROTATED_KEPT, SecretMask

SECRET = "client-secret-7f3a9c1b"
# A secret the JSON renderer escapes (" and \) and a URL would percent-encode (/ ? space).
AWKWARD = 'pa"ss\\wo/rd? x'


def test_every_spelling_of_a_secret_is_masked() -> None:
    mask = SecretMask([SECRET, AWKWARD])
    for text in (f"as is {SECRET}.", f"json {json.dumps(AWKWARD)}", f"repr {AWKWARD!r}",
                 "url pa%22ss%5Cwo%2Frd%3F%20x", "form pa%22ss%5Cwo%2Frd%3F+x"):
        masked = mask(text)
        assert MARK in masked, text
        assert "client-secret" not in masked
        assert "wo" not in masked.partition(" ")[2], text


def test_a_secret_containing_another_is_masked_whole() -> None:
    mask = SecretMask(["abc123", "abc123-longer"])
    assert mask("x abc123-longer y abc123 z") == f"x {MARK} y {MARK} z"


def test_text_without_a_secret_is_unchanged_and_an_empty_mask_is_falsy() -> None:
    line = '{"event": "request", "path": "/mcp"}'
    assert SecretMask([SECRET])(line) == line
    assert not SecretMask(["", ""])
    assert SecretMask([SECRET])


def test_a_rotated_credential_is_masked_and_the_fixed_ones_stay() -> None:
    mask = SecretMask([SECRET])
    tokens = [f"upstream-token-{n}" for n in range(ROTATED_KEPT + 1)]
    for token in tokens:
        assert token in mask(token)  # not known yet
        mask.add(token)
        assert mask(token) == MARK
    assert mask(tokens[0]) == tokens[0]  # the oldest rotated out
    assert mask(SECRET) == MARK


# Every way a line can reach the log: an event's values (nested, an exception object), an
# exception's rendered traceback, a stdlib record (aiohttp's), its %-arguments.
LOGGING_SCRIPT = """
import logging, sys
import structlog
from oauth_sidecar.log import configure_logging
from oauth_sidecar.secret_mask import SecretMask
secret, awkward, rotated, fmt = sys.argv[1:5]
mask = SecretMask([secret, awkward])
configure_logging("info", fmt, mask=mask)
log = structlog.get_logger("t")
log.info("child_output", line=f"my secret is {secret}")
log.info("nested", detail={"deep": [f"x{awkward}y"]}, error=ValueError(secret))
try:
    raise RuntimeError(f"failed with {awkward}")
except RuntimeError:
    log.exception("boom")
logging.getLogger("aiohttp.server").warning("bad request %s", secret)
mask.add(rotated)
log.info("upstream_said", body=f"token {rotated}")
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["json", "console"])
def test_configured_logging_masks_every_secret_whatever_logged_it(fmt: str) -> None:
    rotated = "upstream-token-0d9e8f"
    result = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", LOGGING_SCRIPT, SECRET, AWKWARD, rotated, fmt],
        capture_output=True, text=True, check=False, timeout=PROCESS_TIMEOUT, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for needle in ("client-secret", "wo/rd", "wo\\\\/rd", "upstream-token"):
        assert needle not in output, needle
    assert output.count(MARK) >= 6  # one per secret logged
    events = ["child_output", "nested", "boom", "bad request", "upstream_said"]
    assert all(name in output for name in events)
    if fmt == "json":
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert lines[0]["line"] == f"my secret is {MARK}"
        assert lines[1]["detail"] == {"deep": [f"x{MARK}y"]}
        assert lines[3]["event"] == f"bad request {MARK}"
        assert lines[4]["body"] == f"token {MARK}"
