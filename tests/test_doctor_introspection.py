"""`oauth-sidecar check` with TOKEN_VALIDATION=introspection or auto, against real servers on
loopback: the fake IdP, the fake RFC 7662 endpoint (introspection_endpoint.py) and, as the
oracle for every verdict, the real sidecar answering the same token over HTTP.

Every explanation line is checked for its verdict (ok, FAIL or information), not only for its
presence, and each check appears once."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import AUDIENCE, FakeIdp, FakeUpstream, SidecarFactory, bearer
from introspection_endpoint import CLIENT_ID, CLIENT_SECRET, FakeIntrospection
from opaque_tokens import opaque_client_credentials_token, opaque_refresh_token
from processes import PROCESS_TIMEOUT, REPO, free_port, run_cli
from real_idp import ConfidentialClient, run_oidc_provider
from structlog.testing import capture_logs
from test_doctor import assert_the_sidecar_agrees, check, clean_env, finding
from test_log import FORGERY, RAW_CONTROL

from oauth_sidecar.config import load
from oauth_sidecar.config_summary import SET, summary
from oauth_sidecar.doctor import ERROR, NOTE, WARNING, Report, render
from oauth_sidecar.doctor.explainer import ROUTE_AUTO_JWT, ROUTE_AUTO_OPAQUE, ROUTE_INTROSPECTION
from oauth_sidecar.doctor.opaque import TOKEN_SHOWN

LOGIN = {"TOKEN_VALIDATION": "introspection", "INTROSPECTION_CLIENT_ID": CLIENT_ID,
         "INTROSPECTION_CLIENT_SECRET": CLIENT_SECRET}
HOUR = 3600
REAL_RS = ConfidentialClient("resource-server", "rs-secret")  # the sidecar's client there
REAL_RESOURCE = "http://127.0.0.1:8931/mcp"  # the provider never calls it
# The lines of an active, admitted answer, in the introspector's order; the policy's last.
ADMITTED = [("verifier", None), ("format", True), ("introspection", True), ("active", True),
            ("token_type", True), ("id_token", True), ("cnf", True), ("exp", True),
            ("nbf", True), ("iat", True), ("sub", True), ("aud", True), ("iss", True),
            ("jti", True), ("scope", None), ("allow-list", True)]


@asynccontextmanager
async def introspection_at(idp: FakeIdp) -> AsyncIterator[FakeIntrospection]:
    """The fake RFC 7662 endpoint on loopback, named by the fake IdP's discovery document."""
    fake = FakeIntrospection(issuer=idp.issuer)
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.server = server
    idp.document_changes["introspection_endpoint"] = fake.url
    try:
        yield fake
    finally:
        await server.close()


@pytest.fixture
async def endpoint(idp: FakeIdp) -> AsyncIterator[FakeIntrospection]:
    async with introspection_at(idp) as fake:
        yield fake


def env_of(idp: FakeIdp, upstream: FakeUpstream, **extra: str) -> dict[str, str]:
    return clean_env(idp, upstream, **{**LOGIN, **extra})


def lines(report: Report) -> list[tuple[str, bool | None]]:
    assert report.token is not None
    return [(c.name, c.ok) for c in report.token.checks]


def detail(report: Report, name: str) -> str:
    assert report.token is not None
    [found] = [c for c in report.token.checks if c.name == name]
    return found.detail


def verdict(report: Report) -> tuple[bool, int, str]:
    assert report.token is not None
    return report.token.accepted, report.token.status, report.token.reason


def shown(report: Report) -> str:
    return render(report) + json.dumps(dataclasses.asdict(report), default=str)


# -- the token, claim by claim --------------------------------------------------------------------


async def test_an_active_token_is_explained_claim_by_claim_and_admitted(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    token = endpoint.issue(jti="t-1")
    report = await check(env_of(idp, upstream), token)
    assert lines(report) == ADMITTED
    assert verdict(report) == (True, 200, "")
    assert detail(report, "verifier") == ROUTE_INTROSPECTION
    assert detail(report, "format") == f"an opaque token of {len(token)} characters"
    assert detail(report, "introspection") == (
        f"asked {endpoint.url} (client_secret_basic, the default: the IdP metadata lists no "
        "introspection_endpoint_auth_methods_supported): a JSON answer")
    assert detail(report, "active") == "true: the IdP says the token is valid now"
    assert detail(report, "token_type") == ("token_type 'Bearer': nothing says it is a refresh "
                                            "token")
    assert re.search(r": expires in (4 m [0-5]?\d|5 m 0) s$", detail(report, "exp"))
    assert detail(report, "aud") == f"aud ['{AUDIENCE}'] includes '{AUDIENCE}' (OIDC_AUDIENCE)"
    assert detail(report, "iss") == f"'{idp.issuer}' = OIDC_ISSUER_URL"
    assert detail(report, "sub") == "'user-1'"
    assert detail(report, "scope") == "token scopes: mcp openid; REQUIRED_SCOPES is not set"
    assert detail(report, "allow-list") == "admitted: ALLOW_SUBS has sub 'user-1'"
    assert report.token is not None
    assert report.token.answer == endpoint.answers[token]  # the IdP's answer, as it came
    assert report.token.answer_signed is False
    text = render(report)
    assert "the IdP's introspection answer (JSON), as it came:" in text
    assert '"client_id": "mcp-client"' in text
    assert "verdict: ACCEPTED" in text
    assert token not in shown(report)
    assert CLIENT_SECRET not in shown(report)
    assert report.passed()


async def test_an_unknown_token_is_inactive_and_nothing_else_is_judged(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    report = await check(env_of(idp, upstream), "2YotnFZFEjr1zCsicMWpAA")
    assert lines(report) == [("verifier", None), ("format", True), ("introspection", True),
                             ("active", False), ("claims", None)]
    assert verdict(report) == (False, 401, "inactive")
    assert detail(report, "active").startswith("The token is not active (inactive): false: ")
    assert detail(report, "claims") == ("not judged: the token is not active and the answer "
                                        "says nothing else (RFC 7662 §2.2)")
    assert report.token is not None
    assert report.token.answer == {"active": False}
    assert report.token.challenge.startswith('Bearer error="invalid_token"')
    assert not report.passed()


async def test_an_expired_token_fails_exp_with_its_time(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    now = int(time.time())
    report = await check(env_of(idp, upstream), endpoint.issue(exp=now - HOUR, iat=now - 2 * HOUR,
                                                              nbf=now - 2 * HOUR))
    assert [name for name, ok in lines(report) if ok is False] == ["exp"]
    assert verdict(report) == (False, 401, "expired")
    assert "expired 1 h 0 m" in detail(report, "exp")
    assert "(leeway 30 s)" in detail(report, "exp")
    assert "2 h 0 m" in detail(report, "iat")


@pytest.mark.parametrize(("extra", "claims", "name"), [
    ({}, {"aud": "https://other.example.test/mcp"}, "aud"),
    ({"JWT_AUDIENCE_CLAIM": "client_id", "OIDC_AUDIENCE": "mcp-client"},
     {"client_id": "another-client"}, "client_id"),
], ids=["aud", "client_id"])
async def test_a_wrong_audience_fails_the_configured_claim(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection, *,
    extra: dict[str, str], claims: dict[str, Any], name: str,
) -> None:
    report = await check(env_of(idp, upstream, **extra), endpoint.issue(**claims))
    failed = [n for n, ok in lines(report) if ok is False]
    assert failed == [name]
    assert verdict(report) == (False, 401, "wrong_audience")
    assert "none is in OIDC_AUDIENCE" in detail(report, name)
    if name == "client_id":
        assert "(JWT_AUDIENCE_CLAIM=client_id)" in detail(report, name)
        assert ("aud", True) not in lines(report)  # aud is not the audience claim here


async def test_a_client_id_audience_is_admitted(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    env = env_of(idp, upstream, JWT_AUDIENCE_CLAIM="client_id", OIDC_AUDIENCE="mcp-client")
    report = await check(env, endpoint.issue(aud=None))
    assert ("client_id", True) in lines(report)
    assert verdict(report) == (True, 200, "")
    assert detail(report, "client_id") == ("client_id ['mcp-client'] includes 'mcp-client' "
                                           "(OIDC_AUDIENCE) (JWT_AUDIENCE_CLAIM=client_id)")


@pytest.mark.parametrize("claims", [{"token_type": "refresh_token"},
                                    {"token_type": "Bearer", "token_use": "refresh_token"}],
                         ids=["token_type", "hydra-token_use"])
async def test_a_refresh_token_is_refused_and_said_so(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection, claims: dict[str, str],
) -> None:
    report = await check(env_of(idp, upstream), endpoint.issue(**claims))
    assert [n for n, ok in lines(report) if ok is False] == ["token_type"]
    assert verdict(report) == (False, 401, "refresh_token")
    said = detail(report, "token_type")
    assert said.startswith("A refresh token is not an access token (refresh_token): ")
    assert "it must send the access token" in said


async def test_a_wrong_issuer_fails_and_an_absent_one_passes(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    env = env_of(idp, upstream)
    wrong = await check(env, endpoint.issue(iss="https://evil.example.test"))
    assert [n for n, ok in lines(wrong) if ok is False] == ["iss"]
    assert verdict(wrong) == (False, 401, "wrong_issuer")
    assert f"is not OIDC_ISSUER_URL '{idp.issuer}'" in detail(wrong, "iss")
    absent = await check(env, endpoint.issue(iss=None))
    assert ("iss", True) in lines(absent)
    assert detail(absent, "iss").startswith("absent (optional in an introspection answer")
    assert verdict(absent) == (True, 200, "")


@pytest.mark.parametrize("required", [True, False])
async def test_an_answer_without_exp_follows_introspection_require_exp(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection, required: bool,
) -> None:
    env = env_of(idp, upstream, INTROSPECTION_REQUIRE_EXP=str(required).lower())
    report = await check(env, endpoint.issue(exp=None))
    assert ("exp", not required) in lines(report)
    assert [n for n, _ in lines(report)].count("exp") == 1
    if required:
        assert verdict(report) == (False, 401, "claim_missing")
        assert "INTROSPECTION_REQUIRE_EXP=true" in detail(report, "exp")
    else:
        assert verdict(report) == (True, 200, "")
        assert detail(report, "exp").startswith("absent: allowed (INTROSPECTION_REQUIRE_EXP=false)")


async def test_a_signed_answer_is_verified_and_said_so(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    idp.document_changes["introspection_signing_alg_values_supported"] = ["RS256"]
    endpoint.signing_key = idp.keys[0]
    token = endpoint.issue()
    report = await check(env_of(idp, upstream), token)
    assert lines(report) == ADMITTED
    assert detail(report, "introspection").endswith(
        "a signed answer (application/token-introspection+jwt, RFC 9701), verified with the "
        "IdP's keys")
    assert report.token is not None
    assert report.token.answer_signed is True
    assert report.token.answer == endpoint.answers[token]
    section = report.sections["introspection"]
    assert ("signed answers (RFC 9701): the IdP offers ['RS256']: asked for and verified with "
            "its published keys (JSON answers accepted too)") in section
    assert "probe with a made-up token: answered active=False (signed, verified)" in section
    assert "the IdP's introspection answer (a signed answer (RFC 9701), its token_introspection)" \
        in render(report)


async def test_a_signing_algorithm_outside_jwt_algorithms_is_a_warning(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    idp.document_changes["introspection_signing_alg_values_supported"] = ["ES256"]
    report = await check(env_of(idp, upstream, JWT_ALGORITHMS="RS256"))
    severity, message, fix = finding(report, "introspection_signing_algs")
    assert severity == WARNING
    assert "['ES256'], none of them in JWT_ALGORITHMS (RS256)" in message
    assert fix == "add the IdP's signing algorithm to JWT_ALGORITHMS"


async def test_the_idps_words_are_escaped_and_a_token_it_echoes_is_not_shown(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    """The answer is the IdP's to choose, and a user chooses their claims: neither may drive
    the operator's terminal, and an IdP that echoes the token does not get it printed."""
    token = endpoint.issue(sub=FORGERY, email="\x1b]0;pwned\x07@example.com")
    endpoint.answers[token]["echo"] = token
    report = await check(env_of(idp, upstream), token)
    assert report.token is not None
    assert report.token.answer is not None
    assert report.token.answer["echo"] == TOKEN_SHOWN
    text = render(report)
    assert not RAW_CONTROL.search(text.replace("\n", "")), RAW_CONTROL.findall(text)
    assert "pwned" in text  # shown, escaped
    assert detail(report, "sub") == repr(FORGERY)  # the words, before the renderer's escaping
    assert token not in shown(report)


# -- the probes -----------------------------------------------------------------------------------


async def test_a_working_endpoint_is_probed_and_reported(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    report = await check(env_of(idp, upstream))
    assert report.codes(ERROR, WARNING) == set(), report.findings
    assert finding(report, "introspection_ok") == (
        NOTE, "the IdP answered a made-up token with active: false: the endpoint works and "
        f"accepts the sidecar's client '{CLIENT_ID}' (client_secret_basic)", "")
    assert report.sections["introspection"] == [
        "TOKEN_VALIDATION=introspection: every token, JWTs too, is introspected",
        f"endpoint: {endpoint.url} (the IdP metadata's introspection_endpoint)",
        f"client authentication: client_secret_basic as '{CLIENT_ID}' (the default: the IdP "
        "metadata lists no introspection_endpoint_auth_methods_supported)",
        "signed answers (RFC 9701): not offered by the IdP (no "
        "introspection_signing_alg_values_supported): JSON answers",
        "probe with a made-up token: answered active=False (JSON)",
    ]
    [call] = endpoint.calls
    assert call.form["token"].startswith("oauth-sidecar-check-")
    assert CLIENT_SECRET not in shown(report)


async def test_a_method_chosen_from_the_metadata_says_so(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    endpoint.method = "client_secret_post"
    idp.document_changes["introspection_endpoint_auth_methods_supported"] = [
        "client_secret_post", "private_key_jwt"]
    report = await check(env_of(idp, upstream), endpoint.issue())
    assert (f"client authentication: client_secret_post as '{CLIENT_ID}' (chosen from the IdP "
            "metadata's introspection_endpoint_auth_methods_supported ['client_secret_post', "
            "'private_key_jwt'])") in report.sections["introspection"]
    assert detail(report, "introspection").startswith(
        f"asked {endpoint.url} (client_secret_post, chosen from the IdP metadata's ")
    assert verdict(report) == (True, 200, "")
    assert "introspection_auth_method_unsupported" not in report.codes()


async def test_a_method_chosen_from_the_token_endpoints_list_says_so(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    """No introspection list (oidc-provider): the token endpoint's decided, and the doctor names
    that list rather than calling the method a default."""
    endpoint.method = "client_secret_post"
    idp.document_changes["token_endpoint_auth_methods_supported"] = [
        "private_key_jwt", "client_secret_post"]
    report = await check(env_of(idp, upstream), endpoint.issue())
    assert (f"client authentication: client_secret_post as '{CLIENT_ID}' (chosen from the IdP "
            "metadata's token_endpoint_auth_methods_supported ['private_key_jwt', "
            "'client_secret_post'])") in report.sections["introspection"]
    assert verdict(report) == (True, 200, "")


async def test_a_configured_method_and_endpoint_say_where_they_came_from(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    endpoint.method = "client_secret_post"
    idp.document_changes["introspection_endpoint_auth_methods_supported"] = [
        "client_secret_basic"]
    env = env_of(idp, upstream, INTROSPECTION_ENDPOINT=endpoint.url,
                 INTROSPECTION_AUTH_METHOD="client_secret_post")
    report = await check(env)
    section = report.sections["introspection"]
    assert f"endpoint: {endpoint.url} (INTROSPECTION_ENDPOINT)" in section
    assert (f"client authentication: client_secret_post as '{CLIENT_ID}' "
            "(INTROSPECTION_AUTH_METHOD)") in section
    assert finding(report, "introspection_auth_method_unsupported")[0] == WARNING
    assert finding(report, "introspection_ok")[0] == NOTE  # the IdP took it anyway


async def test_refused_credentials_are_an_error_with_a_fix_and_logged_once(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    endpoint.client_secret = "the-secret-the-idp-has"
    token = endpoint.issue()
    with capture_logs() as events:
        report = await check(env_of(idp, upstream), token)
    severity, message, fix = finding(report, "introspection_client_refused")
    assert severity == ERROR
    assert message == (f"the IdP refused the sidecar's introspection client '{CLIENT_ID}' at "
                       f"{endpoint.url} (HTTP 401 invalid_client): every opaque token would get "
                       "503")
    assert fix.startswith("check INTROSPECTION_CLIENT_ID and INTROSPECTION_CLIENT_SECRET")
    assert "client_secret_basic" in fix
    assert lines(report) == [("verifier", None), ("format", True), ("introspection", False)]
    assert verdict(report) == (False, 503, "introspection_refused")
    assert report.token is not None
    assert report.token.challenge == ""  # not the caller's credential's fault
    assert report.token.answer is None
    refused = [e for e in events if e["event"] == "introspection_client_refused"]
    assert len(refused) == 1, events  # the probe and the token: one log line
    assert len(endpoint.calls) == 2
    assert CLIENT_SECRET not in shown(report) + repr(events)
    assert token not in shown(report) + repr(events)


@pytest.mark.slow
async def test_check_command_prints_the_refusal_once_and_never_the_token_or_secret(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    endpoint.client_secret = "the-secret-the-idp-has"
    token = endpoint.issue()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "oauth_sidecar", "check", "--token", "-",
        env=env_of(idp, upstream), cwd=REPO, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(token.encode()), PROCESS_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stdout, stderr = out.decode(), err.decode()
    assert proc.returncode == 1, stdout + stderr
    assert stderr.count("introspection_client_refused") == 1, stderr
    assert "ERROR   introspection_client_refused:" in stdout
    assert "FAIL  introspection" in stdout
    assert "verdict: REFUSED: HTTP 503 (introspection_refused)" in stdout
    for secret in (token, CLIENT_SECRET):
        assert secret not in stdout + stderr


@pytest.mark.slow
async def test_check_json_carries_the_answer_and_the_verdict_not_the_token(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    token = endpoint.issue()
    code, stdout, stderr = await run_cli("check", "--json", "--token", token,
                                         env=env_of(idp, upstream, TOKEN_VALIDATION="auto"))
    assert code == 0, stdout + stderr
    document = json.loads(stdout)
    assert document["passed"] is True
    assert document["token"]["accepted"] is True
    assert document["token"]["answer"]["sub"] == "user-1"
    assert [c["name"] for c in document["token"]["checks"]][:3] == [
        "verifier", "format", "introspection"]
    assert document["sections"]["introspection"][-1] == (
        "probe with a made-up token: answered active=False (JSON)")
    assert document["summary"]["introspection"]["client_secret"] == SET
    for secret in (token, CLIENT_SECRET):
        assert secret not in stdout + stderr


async def test_an_endpoint_that_is_down_is_an_error(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    down = f"http://127.0.0.1:{free_port()}/introspect"
    idp.document_changes["introspection_endpoint"] = down
    report = await check(env_of(idp, upstream), "2YotnFZFEjr1zCsicMWpAA")
    severity, message, fix = finding(report, "introspection_unreachable")
    assert severity == ERROR
    assert message.startswith(f"introspection at {down} failed (introspection_unavailable: "
                              "ClientConnectorError)")
    assert "INTROSPECTION_ENDPOINT" in fix
    assert verdict(report) == (False, 503, "introspection_unavailable")
    assert [n for n, ok in lines(report) if ok is False] == ["introspection"]


async def test_no_endpoint_known_is_an_error_naming_the_variable(
    idp: FakeIdp, upstream: FakeUpstream,
) -> None:
    report = await check(env_of(idp, upstream), "2YotnFZFEjr1zCsicMWpAA")
    severity, message, fix = finding(report, "introspection_endpoint_unknown")
    assert severity == ERROR
    assert "INTROSPECTION_ENDPOINT is unset and the IdP's discovery document names none" in message
    assert fix.startswith("set INTROSPECTION_ENDPOINT")
    assert report.sections["introspection"][-1] == "endpoint: unknown: the IdP metadata names none"
    assert verdict(report) == (False, 503, "introspection_endpoint_unknown")
    assert detail(report, "introspection").startswith(
        "The identity provider could not check the token; try again later "
        "(introspection_endpoint_unknown): asked no endpoint known; the IdP's metadata")


@pytest.mark.parametrize("named", ["http://user:pw@127.0.0.1:{port}/introspect",
                                   "https://idp.example.test@127.0.0.1:{port}/introspect"],
                         ids=["password", "user"])
async def test_an_endpoint_with_user_info_in_the_metadata_is_unusable_not_a_crash(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
    make_sidecar: SidecarFactory, named: str,
) -> None:
    """aiohttp would send user-info as Basic credentials, or raise ValueError beside ours."""
    assert endpoint.server is not None
    idp.document_changes["introspection_endpoint"] = named.format(port=endpoint.server.port)
    report = await check(env_of(idp, upstream), "2YotnFZFEjr1zCsicMWpAA")
    assert finding(report, "introspection_endpoint_unknown")[0] == ERROR
    assert verdict(report) == (False, 503, "introspection_endpoint_unknown")
    assert report.token is not None
    said = " ".join(report.sections["introspection"]) + repr(report.token.checks) + repr(
        [f.message for f in report.findings])
    assert "pw@" not in said
    sidecar = await make_sidecar(**LOGIN)
    async with sidecar.post("/mcp", data=b"{}", headers=bearer("2YotnFZFEjr1zCsicMWpAA")
                            ) as response:
        assert response.status == 503
    assert endpoint.calls == []


async def test_an_idp_that_says_a_made_up_token_is_active_is_an_error(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    endpoint.body = json.dumps({"active": True}).encode()
    report = await check(env_of(idp, upstream))
    assert finding(report, "introspection_answers_active")[0] == ERROR


# -- the tests' real OpenID provider (node oidc-provider) and the tokens it really issues -------


@pytest.mark.slow
async def test_real_opaque_tokens_of_the_real_provider_are_explained(
    upstream: FakeUpstream,
) -> None:
    """An opaque access token, a refresh token and a wrong secret, at panva's oidc-provider."""
    async with run_oidc_provider(access_token_format="opaque", introspection_clients=[REAL_RS],
                                 auto_login="user-1") as real:
        env = {"OIDC_ISSUER_URL": real.issuer, "OIDC_AUDIENCE": REAL_RESOURCE,
               "RESOURCE_URL": REAL_RESOURCE, "MCP_UPSTREAM_URL": upstream.url,
               "ALLOW_SUBS": f"{real.client_id},user-1", "TOKEN_VALIDATION": "auto",
               "INTROSPECTION_CLIENT_ID": REAL_RS.client_id,
               "INTROSPECTION_CLIENT_SECRET": REAL_RS.client_secret}
        token = await opaque_client_credentials_token(real, REAL_RESOURCE, "mcp:read")
        report = await check(env, token)
        assert verdict(report) == (True, 200, "")
        assert detail(report, "verifier") == ROUTE_AUTO_OPAQUE
        assert [name for name, ok in lines(report) if ok is False] == []
        assert finding(report, "introspection_ok")[0] == NOTE
        assert detail(report, "scope") == "token scopes: mcp:read; REQUIRED_SCOPES is not set"

        refresh_token = await opaque_refresh_token(real, REAL_RESOURCE)
        refused = await check(env, refresh_token)
        assert verdict(refused) == (False, 401, "claim_missing")
        assert [name for name, ok in lines(refused) if ok is False] == ["aud"]
        assert "did the client send its refresh token?" in detail(refused, "aud")

        wrong = await check({**env, "INTROSPECTION_CLIENT_SECRET": "not-the-secret"}, token)
        assert finding(wrong, "introspection_client_refused")[0] == ERROR
        assert verdict(wrong) == (False, 503, "introspection_refused")
        for said in (report, refused, wrong):
            assert token not in shown(said)
            assert refresh_token not in shown(said)
            assert REAL_RS.client_secret not in shown(said)


# -- auto mode: which verifier, and why -----------------------------------------------------------


async def test_auto_mode_names_the_verifier_each_token_goes_to(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    env = env_of(idp, upstream, TOKEN_VALIDATION="auto")
    jwt_token = idp.mint(claims={"exp": int(time.time()) - HOUR})
    as_jwt = await check(env, jwt_token)
    assert detail(as_jwt, "verifier") == ROUTE_AUTO_JWT
    assert verdict(as_jwt) == (False, 401, "expired")  # stays with the JWT verifier
    assert ("signature", True) in lines(as_jwt)
    assert "introspection" not in [n for n, _ in lines(as_jwt)]
    assert all(call.form["token"] != jwt_token for call in endpoint.calls)  # only the probe

    opaque = await check(env, endpoint.issue())
    assert detail(opaque, "verifier") == ROUTE_AUTO_OPAQUE
    assert lines(opaque) == ADMITTED
    assert "TOKEN_VALIDATION=auto: a token shaped like a JWS is verified here; any other is " \
           "introspected" in opaque.sections["introspection"]


async def test_introspection_mode_introspects_a_jwt_too(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
) -> None:
    jwt_token = idp.mint()
    report = await check(env_of(idp, upstream), jwt_token)
    assert detail(report, "verifier") == (ROUTE_INTROSPECTION + ", JWTs too (this one is shaped "
                                          "like a JWS)")
    assert verdict(report) == (False, 401, "inactive")  # the IdP does not know it
    assert [call.form["token"] for call in endpoint.calls][-1] == jwt_token


async def test_jwt_mode_hints_at_introspection_for_an_opaque_token(
    idp: FakeIdp, upstream: FakeUpstream,
) -> None:
    report = await check(clean_env(idp, upstream), "2YotnFZFEjr1zCsicMWpAA")
    assert lines(report) == [("format", False)]
    assert "set TOKEN_VALIDATION=introspection" in detail(report, "format")
    assert "introspection" not in report.sections
    jwt_report = await check(clean_env(idp, upstream), "eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
    assert "TOKEN_VALIDATION" not in detail(jwt_report, "format")


# -- the doctor and the gate agree ----------------------------------------------------------------

NOW = int(time.time())
# (extra env, the answer's claims (None drops one), the doctor's FAIL lines in order)
ANSWER_MATRIX = [
    pytest.param({}, {}, [], id="active"),
    pytest.param({}, {"active": False}, ["active"], id="inactive"),
    pytest.param({}, {"active": "true"}, ["active"], id="active-a-string"),
    pytest.param({}, {"exp": NOW - HOUR}, ["exp"], id="expired"),
    pytest.param({}, {"exp": None}, ["exp"], id="exp-missing"),
    pytest.param({"INTROSPECTION_REQUIRE_EXP": "false"}, {"exp": None}, [],
                 id="exp-missing-allowed"),
    pytest.param({}, {"nbf": NOW + HOUR}, ["nbf"], id="nbf-future"),
    pytest.param({}, {"iat": NOW + HOUR}, ["iat"], id="iat-future"),
    pytest.param({}, {"exp": "99999999999"}, ["exp"], id="exp-a-string"),
    pytest.param({}, {"aud": "https://other.example.test/mcp"}, ["aud"], id="aud-wrong"),
    pytest.param({}, {"aud": None}, ["aud"], id="aud-missing"),
    pytest.param({"JWT_AUDIENCE_CLAIM": "client_id", "OIDC_AUDIENCE": "mcp-client"},
                 {"aud": None}, [], id="client_id-audience"),
    pytest.param({"JWT_AUDIENCE_CLAIM": "client_id", "OIDC_AUDIENCE": "mcp-client"},
                 {"client_id": "other"}, ["client_id"], id="client_id-other"),
    pytest.param({}, {"iss": "https://evil.example.test"}, ["iss"], id="iss-wrong"),
    pytest.param({}, {"iss": None}, [], id="iss-absent"),
    pytest.param({}, {"token_type": "refresh_token"}, ["token_type"], id="refresh-token_type"),
    pytest.param({}, {"token_use": "refresh_token"}, ["token_type"], id="refresh-token_use"),
    pytest.param({}, {"token_use": "id"}, ["id_token"], id="id-token"),
    pytest.param({}, {"cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}}, ["cnf"],
                 id="sender-constrained"),
    pytest.param({}, {"sub": None}, ["sub"], id="sub-missing"),
    pytest.param({}, {"sub": ""}, ["sub"], id="sub-empty"),
    pytest.param({}, {"jti": 7}, ["jti"], id="jti-a-number"),
    pytest.param({}, {"sub": "mallory"}, ["allow-list"], id="not-allowed"),
    pytest.param({"REQUIRED_SCOPES": "mcp:write"}, {}, ["scope"], id="missing-scope"),
    pytest.param({"REQUIRED_SCOPES": "mcp:write"}, {"scope": "mcp:write openid"}, [],
                 id="has-scope"),
    pytest.param({}, {"exp": NOW - HOUR, "aud": "other"}, ["exp", "aud"],
                 id="expired-and-wrong-aud"),
]


@pytest.mark.parametrize(("extra", "claims", "failed"), ANSWER_MATRIX)
async def test_check_token_agrees_with_the_introspecting_sidecar_over_http(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
    make_sidecar: SidecarFactory, *, extra: dict[str, str], claims: dict[str, Any],
    failed: list[str],
) -> None:
    """The doctor's verdict (status, reason, description, challenge) is what the real sidecar
    answers over HTTP for the same answer and configuration; its FAIL lines are exactly the
    checks that fail, one of them carrying the sidecar's logged reason; no line is doubled."""
    extra = {"ALLOW_ALL_AUTHENTICATED": "false", "ALLOW_SUBS": "user-1", **LOGIN, **extra}
    token = endpoint.issue(**claims)
    report = await check(clean_env(idp, upstream, **extra), token)
    await assert_the_sidecar_agrees(report, await make_sidecar(**extra), token, failed)
    names = [name for name, _ in lines(report)]
    assert len(names) == len(set(names)), names
    assert token not in shown(report)


@pytest.mark.parametrize(("extra", "token", "reason"), [
    ({}, "not-a-token!", "malformed"),
    ({"JWT_MAX_TOKEN_BYTES": "1024"}, "x" * 1100, "token_too_large"),
], ids=["malformed", "too-large"])
async def test_a_token_the_gate_refuses_before_asking_is_never_sent_to_the_idp(
    idp: FakeIdp, upstream: FakeUpstream, endpoint: FakeIntrospection,
    make_sidecar: SidecarFactory, *, extra: dict[str, str], token: str, reason: str,
) -> None:
    report = await check(env_of(idp, upstream, **extra), token)
    assert lines(report) == [("verifier", None), ("format", False)]
    assert verdict(report) == (False, 401, reason)
    assert all(call.form["token"] != token for call in endpoint.calls)
    sidecar = await make_sidecar(**LOGIN, **extra)
    async with sidecar.post("/mcp", data=b"{}", headers=bearer(token)) as response:
        assert response.status == 401
        assert report.token is not None
        assert response.headers["WWW-Authenticate"] == report.token.challenge
    assert all(call.form["token"] != token for call in endpoint.calls)


# -- the configuration summary --------------------------------------------------------------------


def test_the_summary_shows_the_introspection_client_without_its_secret(
    idp: FakeIdp, upstream: FakeUpstream,
) -> None:
    config = load(env_of(idp, upstream, TOKEN_VALIDATION="auto",
                         INTROSPECTION_AUTH_METHOD="client_secret_post"))
    shown_summary = summary(config)
    assert shown_summary["token_validation"] == "auto"
    assert shown_summary["introspection"] == {
        "endpoint": "(from the IdP metadata)", "client_id": CLIENT_ID, "client_secret": SET,
        "auth_method": "client_secret_post", "cache_seconds": 30.0,
        "negative_cache_seconds": 5.0, "require_exp": True, "max_concurrency": 16,
        "timeout_seconds": 5.0,
    }
    assert CLIENT_SECRET not in json.dumps(shown_summary)
    assert "introspection" not in summary(load(clean_env(idp, upstream)))
