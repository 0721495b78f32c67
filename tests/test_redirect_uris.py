"""The one redirect-URI rule (config/redirect_uris.py): the start-up check of
ALLOWED_REDIRECT_URIS and the run-time allow-list of registration and sign-in accept and refuse
the same URIs, and what start-up refuses it says clearly, naming the variable."""

from __future__ import annotations

import pytest
from test_registration import BASE_ENV  # the same deployment the registration tests use

from oauth_sidecar.config import AuthServerConfig, ConfigError, load
from oauth_sidecar.config.redirect_uris import MAX_REDIRECT_URI
from oauth_sidecar.signin.registration import RedirectAllowList

LONGEST = "https://app.example/" + "a" * (MAX_REDIRECT_URI - len("https://app.example/"))
TOO_LONG = LONGEST + "a"

# (URI, whether it can be a redirect URI). None holds a space or a comma: ALLOWED_REDIRECT_URIS
# is a list, so those could not be one entry.
REDIRECT_URIS = [
    ("https://app.example/cb", True),
    ("https://app.example:8443/cb?client=1", True),
    ("https://APP.example/cb", True),
    ("http://127.0.0.1:8765/callback", True),
    ("http://127.0.0.1/cb", True),
    ("http://localhost:33418/callback", True),
    ("http://[::1]:8080/cb", True),
    ("cursor://anysphere.cursor-mcp/oauth/callback", True),
    ("com.example.app:/oauth2redirect", True),
    (LONGEST, True),
    (TOO_LONG, False),
    ("https://app.example:99999/cb", False),
    ("https://app.example:port/cb", False),
    ("http://127.0.0.1:-1/cb", False),
    ("http://[::1/cb", False),
    ("https://[::1/cb", False),
    ("cursor://anysphere.cursor-mcp:port/cb", False),
    ("http://app.example/cb", False),
    ("http://127.0.0.1.evil.example/cb", False),
    ("https://app.example/cb#fragment", False),
    ("https://user:pw@app.example/cb", False),
    ("http://user@127.0.0.1/cb", False),
    ("cursor://anysphere.cursor-mcp/cb#fragment", False),
    ("javascript:alert(1)", False),
    ("JavaScript:alert(1)", False),
    ("file:///etc/passwd", False),
    ("ws://app.example/cb", False),
    ("1cursor://x/cb", False),
    ("https:///cb", False),
    ("//app.example/cb", False),
    ("/cb", False),
]


def accepted_at_start_up(uri: str) -> bool:
    """True if load() takes uri as the one entry; refusals must name the variable."""
    try:
        config = load({**BASE_ENV, "ALLOWED_REDIRECT_URIS": uri})
    except ConfigError as error:
        if not all("ALLOWED_REDIRECT_URIS" in problem for problem in error.problems):
            pytest.fail(f"refused for another reason: {error.problems}")
        return False
    return config.auth_server.redirect_uris == frozenset({uri})


def allow_list(exact: frozenset[str], *, loopback: bool) -> RedirectAllowList:
    """The run-time allow-list over an entry the start-up check never saw."""
    return RedirectAllowList(AuthServerConfig(
        facade=True, client_id="c", client_secret="", publish_secret=False,
        redirect_uris=exact, allow_loopback_redirects=loopback, state_secret="",
    ))


def test_start_up_and_registration_accept_and_refuse_the_same_redirect_uris() -> None:
    disagreements = []
    for uri, expected in REDIRECT_URIS:
        verdicts = {
            "start-up": accepted_at_start_up(uri),
            "registration, listed": allow_list(frozenset({uri}), loopback=False).allows(uri),
        }
        if set(verdicts.values()) != {expected}:
            disagreements.append((uri[:60], verdicts))
    assert disagreements == []


def test_a_loopback_redirect_is_allowed_without_listing_it_exactly_when_start_up_takes_it() -> None:
    open_loopback = allow_list(frozenset(), loopback=True)
    wrong = []
    for uri, expected in REDIRECT_URIS:
        loopback_http = uri.startswith(("http://127.", "http://localhost", "http://[::1]"))
        if open_loopback.allows(uri) != (expected and loopback_http):
            wrong.append(uri[:60])
    assert wrong == []


@pytest.mark.parametrize(("entry", "reason"), [
    (TOO_LONG, f"is longer than {MAX_REDIRECT_URI} characters"),
    ("https://app.example:99999/cb", "is not a valid URL (no port number after a colon, "
                                     "or an unmatched bracket)"),
    ("https://app.example:8o8o/cb", "is not a valid URL"),
    ("http://[::1/cb", "is not a valid URL"),
    ("cursor://anysphere.cursor-mcp:port/cb", "is not a valid URL"),
], ids=["over-long", "port-out-of-range", "port-not-a-number", "unmatched-bracket",
        "private-scheme-bad-port"])
def test_a_redirect_entry_registration_could_never_use_refuses_to_start(
    entry: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load({**BASE_ENV, "ALLOWED_REDIRECT_URIS": f"https://good.example/cb,{entry}",
              "PORT": "nope"})
    redirect_problems = [p for p in caught.value.problems if "ALLOWED_REDIRECT_URIS" in p]
    assert len(redirect_problems) == 1, caught.value.problems
    problem = redirect_problems[0]
    assert problem.startswith("ALLOWED_REDIRECT_URIS entry '"), problem
    assert reason in problem
    assert "good.example" not in problem
    assert len(problem) < 300  # an over-long entry is quoted cut short
    assert any(p.startswith("PORT=") for p in caught.value.problems)  # reported together


def test_a_refused_redirect_entry_never_shows_its_password() -> None:
    with pytest.raises(ConfigError) as caught:
        load({**BASE_ENV, "ALLOWED_REDIRECT_URIS": "https://u:hunter2pass@app.example:99x/cb"})
    assert caught.value.problems[0].startswith("ALLOWED_REDIRECT_URIS entry 'https://***@")
    assert "hunter2pass" not in "\n".join(caught.value.problems)
