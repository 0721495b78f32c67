"""`oauth-sidecar check` catches each known pitfall, against real servers on loopback: the fake
IdP serving modified discovery documents, the real node oidc-provider for the relay probe, the
recording upstream, a real spawned child, and the real sidecar as the oracle for token verdicts."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import (
    AUDIENCE,
    RESOURCE_URL,
    FakeIdp,
    FakeUpstream,
    SidecarFactory,
    bearer,
    new_ec,
    new_rsa,
    sidecar_env,
)
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from processes import PROCESS_TIMEOUT, REPO, free_port, run_cli
from real_idp import RealIdp, client_credentials_token, run_oidc_provider
from structlog.testing import capture_logs
from test_log import FORGERY, RAW_CONTROL, decoded_strings

from oauth_sidecar.app import create_app
from oauth_sidecar.auth.resource_metadata import (
    authorization_server_metadata_paths,
    protected_resource_document,
)
from oauth_sidecar.config import UNSHARED_SEALING_WARNING, load
from oauth_sidecar.doctor import (
    ERROR,
    NOTE,
    WARNING,
    Report,
    audience_findings,
    diagnose,
    entra_findings,
    read_token,
    render,
    resource_findings,
    state_secret_findings,
)
from oauth_sidecar.signin.authserver import CALLBACK_PATH

FAKE_CHILD = Path(__file__).resolve().parent / "children" / "fake_mcp_server.py"
STATIC_ID, STATIC_SECRET = "doctor-static", "doctor-secret"
STATE_SECRET = "s" * 32


def clean_env(idp: FakeIdp, upstream: FakeUpstream, **extra: str) -> dict[str, str]:
    """A configuration with nothing to warn about: direct mode, an IdP with DCR, an allow-list."""
    idp.document_changes.setdefault("registration_endpoint", idp.origin + "/register")
    return sidecar_env(idp, upstream, **{"ALLOW_ALL_AUTHENTICATED": "false",
                                         "ALLOW_SUBS": "user-1", **extra})


async def check(env: dict[str, str], token: str | None = None) -> Report:
    return await diagnose(load(env), token)


def finding(report: Report, code: str) -> tuple[str, str, str]:
    [found] = [f for f in report.findings if f.code == code]
    return found.severity, found.message, found.fix


def check_of(report: Report, name: str) -> tuple[bool | None, str]:
    assert report.token is not None
    [found] = [c for c in report.token.checks if c.name == name]
    return found.ok, found.detail


# -- the command -----------------------------------------------------------------------------------


async def test_clean_configuration_passes_with_no_error_or_warning(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    env = clean_env(idp, upstream)
    report = await check(env)
    assert report.codes(ERROR, WARNING) == set(), report.findings
    assert report.passed(strict=True)
    assert report.codes(NOTE) == {"registration"}
    assert "keys loaded: 1" in report.sections["identity provider"]
    assert any("RSA 2048 bits, verifies" in line for line in report.sections["keys"])
    assert f"GET {upstream.url}/mcp -> HTTP 200: reachable" in report.sections["upstream"]
    assert upstream.requests[-1].method == "GET"
    documents = list(report.documents.values())
    assert protected_resource_document(load(env)) in documents
    idp_document = documents[-1]  # direct mode: clients read the IdP's own document
    assert isinstance(idp_document, dict)
    assert idp_document["issuer"] == idp.issuer


@pytest.mark.slow
async def test_check_command_passes_and_prints_what_clients_see(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    env = clean_env(idp, upstream)
    code, stdout, stderr = await run_cli("check", env=env)
    assert code == 0, stdout + stderr
    assert stdout.rstrip().endswith("Result: PASS (0 error(s), 0 warning(s))")
    assert '"resource": "https://mcp.example.test/mcp"' in stdout
    assert 'Bearer resource_metadata="https://mcp.example.test/.well-known/oauth-protected-' \
           'resource/mcp"' in stdout
    code, stdout, _ = await run_cli("check", "--json", env=env)
    assert code == 0
    document = json.loads(stdout)
    assert document["passed"] is True
    assert document["token"] is None


@pytest.mark.slow
async def test_check_command_fails_with_exit_1_naming_the_pitfall_and_its_fix(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    idp.issuer_in_document = idp.issuer + "/"
    code, stdout, stderr = await run_cli("check", env=clean_env(idp, upstream))
    assert code == 1, stdout + stderr
    assert "ERROR   issuer_trailing_slash:" in stdout
    assert f"fix: set OIDC_ISSUER_URL={idp.issuer}/" in stdout
    assert "Result: FAIL (1 error(s)" in stdout


@pytest.mark.slow
async def test_configuration_problems_exit_2_as_serve_prints_them(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    """Pitfall: RESOURCE_URL over plain http off loopback. config.load already refuses it."""
    env = clean_env(idp, upstream, RESOURCE_URL="http://mcp.example.test/mcp")
    code, stdout, stderr = await run_cli("check", env=env)
    assert code == 2
    assert stdout == ""
    assert stderr.startswith("oauth-sidecar check: FAIL, the sidecar would not start; the "
                             "configuration has problems:")
    assert "the configuration has problems" in stderr
    assert "RESOURCE_URL='http://mcp.example.test/mcp' uses plain http off loopback" in stderr


def test_resource_url_off_port_443_is_a_warning_and_loopback_http_a_note() -> None:
    base = {"OIDC_ISSUER_URL": "https://idp.example.test", "OIDC_AUDIENCE": AUDIENCE,
            "MCP_UPSTREAM_URL": "http://127.0.0.1:9", "ALLOW_SUBS": "u"}
    odd_port = resource_findings(load({**base, "RESOURCE_URL": "https://h.example:8443/mcp"}))
    assert [(f.severity, f.code) for f in odd_port] == [(WARNING, "resource_port")]
    loopback = resource_findings(load({**base, "RESOURCE_URL": "http://127.0.0.1:8080/mcp"}))
    assert [(f.severity, f.code) for f in loopback] == [(NOTE, "resource_loopback")]
    assert resource_findings(load({**base, "RESOURCE_URL": RESOURCE_URL})) == []


@pytest.mark.parametrize(
    ("extra", "flagged"),
    [({"RATE_LIMIT_STORAGE_URI": "redis://redis:6379/0"}, True),
     ({}, False),  # memory://: one replica, as far as the configuration tells
     ({"RATE_LIMIT_STORAGE_URI": "redis://redis:6379/0", "STATE_SECRET": STATE_SECRET}, False),
     ({"RATE_LIMIT_STORAGE_URI": "redis://redis:6379/0", "AUTH_SERVER_MODE": "direct"}, False)],
    ids=["facade-redis", "facade-memory", "state-secret-set", "direct-mode"],
)
def test_an_unset_state_secret_is_flagged_when_replicas_share_redis(
    extra: dict[str, str], flagged: bool
) -> None:
    env = {"OIDC_ISSUER_URL": "https://idp.example.test", "OIDC_AUDIENCE": AUDIENCE,
           "RESOURCE_URL": RESOURCE_URL, "MCP_UPSTREAM_URL": "http://127.0.0.1:9",
           "ALLOW_SUBS": "u", "STATIC_CLIENT_ID": STATIC_ID, **extra}
    findings = state_secret_findings(load(env))
    assert [(f.severity, f.code) for f in findings] == (
        [(WARNING, "state_secret_replicas")] if flagged else [])


async def test_check_words_the_replica_warning_once_and_masks_the_redis_password(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    env = clean_env(idp, upstream, STATIC_CLIENT_ID=STATIC_ID, AUTH_SERVER_MODE="facade",
                    RATE_LIMIT_STORAGE_URI="redis://:hunter2-redis@127.0.0.1:1/0")
    report = await check(env)
    severity, message, fix = finding(report, "state_secret_replicas")
    assert severity == WARNING
    assert "RATE_LIMIT_STORAGE_URI is a Redis that replicas share" in message
    assert "STATE_SECRET_FILE" in fix
    assert UNSHARED_SEALING_WARNING not in [f.message for f in report.findings]  # not twice
    assert report.summary["rate_limit_storage"] == (
        "redis://***@127.0.0.1:1/0")
    assert "hunter2" not in render(report) + json.dumps(dataclasses.asdict(report), default=str)


async def test_strict_turns_warnings_into_failure(idp: FakeIdp, upstream: FakeUpstream) -> None:
    env = clean_env(idp, upstream, ALLOW_ALL_AUTHENTICATED="true", ALLOW_SUBS="")
    report = await check(env)
    assert report.codes(ERROR, WARNING) == {"config_warning"}
    assert report.passed()
    assert not report.passed(strict=True)
    assert render(report, strict=True).rstrip().endswith(
        "Result: FAIL (0 error(s), 1 warning(s), --strict)")


# -- pitfall 1: issuer trailing slash --------------------------------------------------------------


@pytest.mark.parametrize(("mode", "severity"), [("direct", ERROR), ("facade", WARNING)])
async def test_issuer_trailing_slash_mismatch(
    idp: FakeIdp, upstream: FakeUpstream, mode: str, severity: str
) -> None:
    """idp.same_issuer tolerates it (so does the verifier); direct-mode clients compare exactly."""
    idp.issuer_in_document = idp.issuer + "/"
    facade = {"STATIC_CLIENT_ID": STATIC_ID, "STATE_SECRET": STATE_SECRET} if (
        mode == "facade") else {}
    report = await check(clean_env(idp, upstream, **facade))
    found, message, fix = finding(report, "issuer_trailing_slash")
    assert found == severity
    assert f"{idp.issuer!r}" in message
    assert f"{idp.issuer + '/'!r}" in message
    assert fix == f"set OIDC_ISSUER_URL={idp.issuer}/"
    assert "keys loaded: 1" in report.sections["identity provider"]  # the sidecar copes


async def test_issuer_that_differs_otherwise_fails_discovery(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    idp.issuer_in_document = idp.issuer + "/other"
    report = await check(clean_env(idp, upstream))
    severity, message, fix = finding(report, "discovery_failed")
    assert severity == ERROR
    assert f"names issuer '{idp.issuer}/other'" in message
    assert fix.startswith("set OIDC_ISSUER_URL to the issuer exactly")


# -- pitfall 2: S256 -------------------------------------------------------------------------------


@pytest.mark.parametrize("methods", [None, ["plain"]], ids=["absent", "plain-only"])
@pytest.mark.parametrize(("mode", "severity"), [("direct", ERROR), ("facade", WARNING)])
async def test_idp_metadata_without_s256(
    idp: FakeIdp, upstream: FakeUpstream, methods: list[str] | None, mode: str, severity: str
) -> None:
    idp.document_changes["code_challenge_methods_supported"] = methods
    facade = {"STATIC_CLIENT_ID": STATIC_ID, "STATE_SECRET": STATE_SECRET} if (
        mode == "facade") else {}
    report = await check(clean_env(idp, upstream, **facade))
    found, message, _ = finding(report, "pkce_s256_missing")
    assert found == severity
    assert ("absent" if methods is None else '["plain"]') in message
    if mode == "facade":  # the facade advertises S256 on the IdP's behalf
        [served] = [d for t, d in report.documents.items() if "served by the sidecar" in t]
        assert isinstance(served, dict)
        assert served["code_challenge_methods_supported"] == ["S256"]


# -- pitfall 3: RFC 9207 and the relay, against the real node oidc-provider -----------------------


@pytest.fixture
async def public_port() -> int:
    return free_port()


@pytest.fixture
async def oidc(public_port: int) -> AsyncIterator[RealIdp]:
    callback = f"http://127.0.0.1:{public_port}{CALLBACK_PATH}"
    spec = f"{STATIC_ID}:{STATIC_SECRET}:{callback}"
    async with run_oidc_provider(static_clients=[spec]) as real:
        yield real


def facade_env(real: RealIdp, upstream: FakeUpstream, port: int) -> dict[str, str]:
    return {
        "OIDC_ISSUER_URL": real.issuer, "OIDC_AUDIENCE": AUDIENCE,
        "RESOURCE_URL": f"http://127.0.0.1:{port}/mcp", "MCP_UPSTREAM_URL": upstream.url,
        "ALLOW_SUBS": "user-1", "STATIC_CLIENT_ID": STATIC_ID,
        "STATIC_CLIENT_SECRET": STATIC_SECRET, "STATE_SECRET": STATE_SECRET,
        "REQUIRED_SCOPES": "mcp:read",
    }


@pytest.mark.slow
async def test_facade_in_front_of_an_rfc9207_idp_relays_and_the_callback_is_accepted(
    oidc: RealIdp, upstream: FakeUpstream, public_port: int
) -> None:
    report = await check(facade_env(oidc, upstream, public_port))
    assert report.codes(ERROR, WARNING) == set(), report.findings
    severity, message, _ = finding(report, "rfc9207_iss")
    assert severity == NOTE
    assert "always relays the authorization response" in message
    assert finding(report, "relay_ok")[0] == NOTE
    probe = [s for s in report.sections["identity provider"] if "relay sign-in probe" in s]
    assert probe == [f"relay sign-in probe (client_id={STATIC_ID}, redirect_uri=http://127.0.0.1:"
                     f"{public_port}{CALLBACK_PATH}): HTTP 303 -> /interaction/"
                     + probe[0].rpartition("/interaction/")[2]]


@pytest.mark.slow
async def test_facade_whose_callback_the_idp_refuses_is_an_error(
    oidc: RealIdp, upstream: FakeUpstream
) -> None:
    other_port = free_port()  # RESOURCE_URL's origin is not the one registered at the IdP
    report = await check(facade_env(oidc, upstream, other_port))
    severity, message, fix = finding(report, "relay_refused")
    assert severity == ERROR
    assert "invalid_redirect_uri" in message
    assert fix == (f"register http://127.0.0.1:{other_port}{CALLBACK_PATH} as a redirect URI "
                   f"of client {STATIC_ID} at the IdP")
    assert not report.passed()


@pytest.mark.slow
async def test_facade_with_an_unknown_client_is_an_error(
    oidc: RealIdp, upstream: FakeUpstream, public_port: int
) -> None:
    env = {**facade_env(oidc, upstream, public_port), "STATIC_CLIENT_ID": "nobody"}
    report = await check(env)
    severity, message, _ = finding(report, "relay_refused")
    assert severity == ERROR
    assert "invalid_client" in message


@pytest.mark.slow
async def test_direct_mode_in_front_of_an_rfc9207_idp_is_fine(
    oidc: RealIdp, upstream: FakeUpstream, public_port: int
) -> None:
    env = facade_env(oidc, upstream, public_port)
    for name in ("STATIC_CLIENT_ID", "STATIC_CLIENT_SECRET", "STATE_SECRET"):
        del env[name]
    report = await check(env)
    assert report.codes(ERROR, WARNING) == set(), report.findings
    assert finding(report, "rfc9207_iss")[0] == NOTE
    message = finding(report, "rfc9207_iss")[1]
    assert "direct mode clients discovered the IdP's own issuer" in message
    assert "relay sign-in probe" not in " ".join(report.sections["identity provider"])


@pytest.mark.parametrize("mode", ["direct", "facade"])
def test_no_configuration_rewrites_the_issuer_without_relaying(mode: str) -> None:
    """Pins what check's report claims: only facade mode serves metadata with the sidecar's own
    issuer, and facade mode always routes the relay's callback."""
    env = {"OIDC_ISSUER_URL": "https://idp.example.test", "OIDC_AUDIENCE": AUDIENCE,
           "RESOURCE_URL": RESOURCE_URL, "MCP_UPSTREAM_URL": "http://127.0.0.1:9",
           "ALLOW_SUBS": "u", "AUTH_SERVER_MODE": mode, "STATIC_CLIENT_ID": STATIC_ID,
           "STATE_SECRET": STATE_SECRET}
    config = load(env)
    app = create_app(config)
    paths = {r.canonical for r in app.router.resources()}
    serves_metadata = set(authorization_server_metadata_paths(config)) <= paths
    assert serves_metadata == (mode == "facade")
    assert (CALLBACK_PATH in paths) == serves_metadata


# -- pitfall 4: no way to register -----------------------------------------------------------------


async def test_direct_mode_without_dcr_or_static_client_is_an_error(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    idp.document_changes["registration_endpoint"] = None
    report = await check(clean_env(idp, upstream))
    severity, message, fix = finding(report, "no_registration")
    assert severity == ERROR
    assert "has no registration_endpoint" in message
    assert "STATIC_CLIENT_ID" in fix


async def test_client_id_metadata_documents_are_a_way_to_register(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    idp.document_changes.update(registration_endpoint=None,
                                client_id_metadata_document_supported=True)
    report = await check(clean_env(idp, upstream))
    assert report.codes(ERROR, WARNING) == set()
    assert "Client ID Metadata Documents" in finding(report, "registration")[1]


async def test_facade_mode_names_every_way_a_client_can_register(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    idp.document_changes["registration_endpoint"] = None  # the IdP's own offers do not matter
    env = clean_env(idp, upstream, STATIC_CLIENT_ID=STATIC_ID, STATE_SECRET=STATE_SECRET)
    message = finding(await check(env), "registration")[1]
    assert "Client ID Metadata Documents" in message
    assert "from any public host; without the consent page: chatgpt.com, claude.ai" in message
    assert f"/oauth/register and /register, handing out STATIC_CLIENT_ID={STATIC_ID}" in message
    assert "deprecated by MCP 2026-07-28" in message
    assert f"typed by hand ({STATIC_ID})" in message
    off = finding(await check({**env, "CIMD": "off"}), "registration")[1]
    assert "Client ID Metadata Documents" not in off
    assert "/oauth/register" in off


async def test_direct_mode_with_a_static_client_reaches_only_claude(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    idp.document_changes["registration_endpoint"] = None
    report = await check(clean_env(idp, upstream, AUTH_SERVER_MODE="direct",
                                   STATIC_CLIENT_ID=STATIC_ID))
    assert finding(report, "static_client_direct")[0] == WARNING
    assert "no_registration" not in report.codes()


# -- pitfall 6: audiences the IdP is unlikely to issue ---------------------------------------------


async def test_keycloak_issuer_warns_about_the_audience_mapper_until_a_token_proves_it(
    upstream: FakeUpstream,
) -> None:
    from aiohttp.test_utils import TestServer

    keycloak = FakeIdp(keys=[new_rsa()], issuer_suffix="/realms/demo")
    server = TestServer(keycloak.app(), host="127.0.0.1")
    await server.start_server()
    keycloak.server = server
    try:
        env = clean_env(keycloak, upstream)
        report = await check(env)
        severity, message, fix = finding(report, "audience_keycloak_mapper")
        assert severity == WARNING
        assert "aud=account by default" in message
        assert f"Included Custom Audience = {AUDIENCE}" in fix
        proven = await check(env, keycloak.mint())
        assert finding(proven, "audience_keycloak_mapper")[0] == NOTE
        assert proven.passed(strict=True)
    finally:
        await server.close()


def _audience_codes(
    issuer: str, audience: str, resource: str = RESOURCE_URL, claim: str = "aud"
) -> dict[str, str]:
    config = load({"OIDC_ISSUER_URL": issuer, "OIDC_AUDIENCE": audience, "RESOURCE_URL": resource,
                   "MCP_UPSTREAM_URL": "http://127.0.0.1:9", "ALLOW_SUBS": "u",
                   "JWT_AUDIENCE_CLAIM": claim})
    return {f.code: f.severity for f in audience_findings(config)}


@pytest.mark.parametrize(("issuer", "audience", "expected"), [
    ("https://accounts.google.com", "123.apps.googleusercontent.com",
     {"audience_google_opaque": ERROR}),
    ("https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC", AUDIENCE,
     {"audience_cognito_no_aud": ERROR}),
    ("https://kc.example.com/realms/demo", AUDIENCE, {"audience_keycloak_mapper": WARNING}),
    ("https://kc.example.com/realms/demo", "account", {"audience_keycloak_account": WARNING}),
    ("https://tenant.eu.auth0.com/", AUDIENCE, {"audience_auth0_api": WARNING}),
    ("https://tenant.auth0.com/", "https://tenant.auth0.com/userinfo",
     {"audience_auth0_userinfo": ERROR}),
    ("https://dev-1.okta.com/oauth2/default", AUDIENCE, {"audience_okta_default": WARNING}),
    ("https://dev-1.okta.com/oauth2/default", "api://default", {}),
    ("https://dev-1.okta.com", AUDIENCE, {"audience_okta_org_server": ERROR}),
    ("https://login.microsoftonline.com/0b1c2d3e-0000-4000-8000-000000000000/v2.0",
     "api://mcp", {"audience_entra_v2": WARNING}),
    ("https://login.microsoftonline.com/0b1c2d3e-0000-4000-8000-000000000000/v2.0",
     "8f1d2c3b-1111-4222-8333-944455566677", {}),
    ("https://login.microsoftonline.com/0b1c2d3e-0000-4000-8000-000000000000/v2.0",
     "00000003-0000-0000-c000-000000000000", {"audience_entra_graph": ERROR}),
    ("https://sts.windows.net/0b1c2d3e-0000-4000-8000-000000000000/", "api://mcp",
     {"audience_entra_v1": WARNING}),
    ("https://idp.example.test", "https://idp.example.test/", {"audience_is_issuer": WARNING}),
    ("https://idp.example.test", RESOURCE_URL + "/", {"audience_near_resource": WARNING}),
    ("https://idp.example.test", "my-client-id", {"audience_client_id": WARNING}),
    ("https://idp.example.test", AUDIENCE, {}),
])
def test_audience_heuristics_by_idp(issuer: str, audience: str, expected: dict[str, str]) -> None:
    assert _audience_codes(issuer, audience) == expected


COGNITO = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC"


@pytest.mark.parametrize(("audience", "expected"), [
    ("1example23456789abcdefghij", {}),
    (AUDIENCE, {"audience_cognito_client_id": WARNING}),
])
def test_cognito_with_the_audience_in_client_id(audience: str, expected: dict[str, str]) -> None:
    assert _audience_codes(COGNITO, audience, claim="client_id") == expected


def test_every_audience_hint_says_what_to_configure_at_the_idp() -> None:
    config = load({"OIDC_ISSUER_URL": "https://tenant.auth0.com/", "OIDC_AUDIENCE": AUDIENCE,
                   "RESOURCE_URL": RESOURCE_URL, "MCP_UPSTREAM_URL": "http://127.0.0.1:9",
                   "ALLOW_SUBS": "u"})
    [hint] = audience_findings(config)
    assert f"Identifier {RESOURCE_URL}" in hint.fix
    assert "Default Audience" in hint.fix


ENTRA_TENANT = "0b1c2d3e-0000-4000-8000-000000000000"
ENTRA_V2 = f"https://login.microsoftonline.com/{ENTRA_TENANT}/v2.0"
ENTRA_API = "8f1d2c3b-1111-4222-8333-944455566677"
ENTRA_PREFIX = f"api://{ENTRA_API}/"
ENTRA_FIXED = {"IDP_RESOURCE_PARAMETER": "omit", "IDP_SCOPE_PREFIX": ENTRA_PREFIX}


def _entra_codes(issuer: str, audience: str = ENTRA_API, **extra: str) -> dict[str, str]:
    config = load({"OIDC_ISSUER_URL": issuer, "OIDC_AUDIENCE": audience,
                   "RESOURCE_URL": RESOURCE_URL, "MCP_UPSTREAM_URL": "http://127.0.0.1:9",
                   "ALLOW_SUBS": "u", **extra})
    return {f.code: f.severity for f in entra_findings(config)}


@pytest.mark.parametrize(("issuer", "extra", "expected"), [
    (ENTRA_V2, {"STATIC_CLIENT_ID": STATIC_ID},
     {"entra_resource_parameter": WARNING, "entra_scope_prefix": WARNING}),
    (ENTRA_V2, {"STATIC_CLIENT_ID": STATIC_ID, **ENTRA_FIXED}, {}),
    (ENTRA_V2, {"STATIC_CLIENT_ID": STATIC_ID, "IDP_SCOPE_PREFIX": ENTRA_PREFIX},
     {"entra_resource_parameter": WARNING}),
    (ENTRA_V2, {"STATIC_CLIENT_ID": STATIC_ID, "IDP_RESOURCE_PARAMETER": "omit"},
     {"entra_scope_prefix": WARNING}),
    (ENTRA_V2, {"STATIC_CLIENT_ID": STATIC_ID, "IDP_RESOURCE_PARAMETER": "omit",
                "IDP_SCOPE_PREFIX": "api://11111111-2222-4333-8444-555555555555/"},
     {"entra_scope_prefix_app": WARNING}),
    (ENTRA_V2, {"STATIC_CLIENT_ID": STATIC_ID, "IDP_RESOURCE_PARAMETER": "omit",
                "IDP_SCOPE_PREFIX": "https://contoso.example/mcp-api/"}, {}),
    (ENTRA_V2, {}, {"entra_direct": WARNING}),
    (f"https://contoso.ciamlogin.com/{ENTRA_TENANT}/v2.0", {"STATIC_CLIENT_ID": STATIC_ID},
     {"entra_resource_parameter": WARNING, "entra_scope_prefix": WARNING}),
    (f"https://sts.windows.net/{ENTRA_TENANT}/", {"STATIC_CLIENT_ID": STATIC_ID},
     {"entra_v1_sign_in": NOTE}),
    (f"https://login.microsoftonline.com/{ENTRA_TENANT}/", {"STATIC_CLIENT_ID": STATIC_ID},
     {"entra_v1_sign_in": NOTE}),
    ("https://idp.example.test", {"STATIC_CLIENT_ID": STATIC_ID}, {}),
], ids=["v2-facade-unset", "v2-facade-set", "v2-prefix-only", "v2-omit-only",
        "v2-prefix-of-another-app", "v2-custom-app-id-uri", "v2-direct", "external-id",
        "v1-sts", "v1-login", "not-entra"])
def test_entra_issuer_gets_the_relay_settings_recommended(
    issuer: str, extra: dict[str, str], expected: dict[str, str]
) -> None:
    assert _entra_codes(issuer, **extra) == expected


@pytest.mark.parametrize(("audience", "prefix"), [
    (ENTRA_API, ENTRA_PREFIX),
    (f"api://{ENTRA_API}", ENTRA_PREFIX),
    ("api://contoso-mcp/", "api://contoso-mcp/"),
    (f"https://mcp.example.test/mcp,{ENTRA_API}", ENTRA_PREFIX),
])
def test_entra_hint_names_the_exact_prefix_from_the_audience(audience: str, prefix: str) -> None:
    config = load({"OIDC_ISSUER_URL": ENTRA_V2, "OIDC_AUDIENCE": audience,
                   "RESOURCE_URL": RESOURCE_URL, "MCP_UPSTREAM_URL": "http://127.0.0.1:9",
                   "ALLOW_SUBS": "u", "STATIC_CLIENT_ID": STATIC_ID})
    hints = {f.code: f for f in entra_findings(config)}
    assert hints["entra_scope_prefix"].fix.startswith(f"set IDP_SCOPE_PREFIX={prefix} ")
    assert "REQUIRED_SCOPES" in hints["entra_scope_prefix"].fix  # they stay bare
    assert hints["entra_resource_parameter"].fix.startswith("set IDP_RESOURCE_PARAMETER=omit")
    assert "AADSTS9010010" in hints["entra_resource_parameter"].message


def test_entra_without_an_app_id_in_the_audience_names_the_placeholder() -> None:
    config = load({"OIDC_ISSUER_URL": ENTRA_V2, "OIDC_AUDIENCE": RESOURCE_URL,
                   "RESOURCE_URL": RESOURCE_URL, "MCP_UPSTREAM_URL": "http://127.0.0.1:9",
                   "ALLOW_SUBS": "u"})
    [direct] = entra_findings(config)
    assert direct.code == "entra_direct"
    assert "IDP_SCOPE_PREFIX=api://<API app id>/" in direct.fix
    assert "IDP_RESOURCE_PARAMETER=omit" in direct.fix


# -- keys, IdP and upstream reachability, clock ----------------------------------------------------


async def test_no_key_usable_with_the_allowed_algorithms(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    idp.keys = [new_ec("ec-only")]
    report = await check(clean_env(idp, upstream, JWT_ALGORITHMS="RS256"))
    severity, message, fix = finding(report, "no_usable_key")
    assert severity == ERROR
    assert "no usable signing key" in message
    assert "JWT_ALGORITHMS (now RS256)" in fix
    assert any(line.startswith("kid 'ec-only': skipped: no allowed algorithm fits this key")
               for line in report.sections["keys"])


async def test_unreachable_discovery_and_jwks_are_errors(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    idp.down = True
    report = await check(clean_env(idp, upstream))
    assert finding(report, "discovery_failed")[0] == ERROR
    assert "HTTP 503" in finding(report, "discovery_failed")[1]

    idp.down = False

    async def broken(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500)

    idp.jwks_override = broken
    report = await check(clean_env(idp, upstream))
    assert finding(report, "jwks_unavailable") == (
        ERROR, "the IdP's key set: jwks: HTTP 500", "check that this host reaches the jwks_uri "
        "above")


async def test_unreachable_upstream_is_an_error(idp: FakeIdp, upstream: FakeUpstream) -> None:
    env = clean_env(idp, upstream, MCP_UPSTREAM_URL=f"http://127.0.0.1:{free_port()}")
    report = await check(env)
    severity, message, _ = finding(report, "upstream_unreachable")
    assert severity == ERROR
    assert message.startswith(f"GET {env['MCP_UPSTREAM_URL']}/mcp failed: ")


async def test_upstream_path_mapping_and_status_are_reported(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    report = await check(clean_env(idp, upstream, MCP_UPSTREAM_PATH="/v1/mcp"))
    assert f"GET {upstream.url}/v1/mcp -> HTTP 200: reachable" in report.sections["upstream"]
    assert upstream.requests[-1].path_qs == "/v1/mcp"


async def test_clock_skew_beyond_the_leeway_is_a_warning(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    async def late_clock(request: web.Request) -> web.StreamResponse:
        date = format_datetime(datetime.fromtimestamp(time.time() - 300, UTC), usegmt=True)
        return web.json_response({"keys": [k.jwk() for k in idp.keys]}, headers={"Date": date})

    idp.jwks_override = late_clock
    report = await check(clean_env(idp, upstream))
    severity, message, _ = finding(report, "clock_skew")
    assert severity == WARNING
    assert "ahead of the IdP's" in message
    [clock] = [line for line in report.sections["keys"] if line.startswith("clock:")]
    assert re.fullmatch(r"clock: this host is 5 m [0-2] s ahead of the IdP \(Date header\)", clock)


# -- spawn mode ------------------------------------------------------------------------------------


def spawn_env(idp: FakeIdp, upstream: FakeUpstream, port: int, *child: str,
              **extra: str) -> dict[str, str]:
    env = clean_env(idp, upstream, MCP_SPAWN_CMD=json.dumps([sys.executable, str(FAKE_CHILD),
                                                             *child]),
                    MCP_SPAWN_PORT=str(port), **extra)
    del env["MCP_UPSTREAM_URL"]
    return env


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
async def test_spawned_child_is_started_reported_ready_and_stopped(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    port = free_port()
    report = await check(spawn_env(idp, upstream, port, "serve", str(port)))
    assert report.codes(ERROR, WARNING) == set(), report.findings
    pid = report.child_pid
    assert pid is not None
    lines = report.sections["upstream"]
    assert f"child ready: pid {pid}, port {port} accepts connections" in lines
    assert f"GET http://127.0.0.1:{port}/mcp -> HTTP 200: reachable" in lines
    assert f"child stopped: pid {pid} and its group are gone" in lines
    assert not group_alive(pid)


@pytest.mark.slow
@pytest.mark.parametrize(("child", "why"), [
    (("exit-now", "3"), "exited before listening (exit code 3)"),
    (("never-listen",), "not ready after 1 s"),  # the peer orphaned this one
])
async def test_spawned_child_that_never_gets_ready_is_an_error_and_leaves_nothing(
    idp: FakeIdp, upstream: FakeUpstream, child: tuple[str, ...], why: str
) -> None:
    report = await check(spawn_env(idp, upstream, free_port(), *child,
                                   MCP_SPAWN_READY_TIMEOUT_SECONDS="1"))
    severity, message, _ = finding(report, "child_not_ready")
    assert severity == ERROR
    assert why in message
    assert report.child_pid is not None
    assert not group_alive(report.child_pid)
    assert any(line.startswith(f"child stopped: pid {report.child_pid} and its group are gone")
               for line in report.sections["upstream"])


STDIO_CHILD = Path(__file__).resolve().parent / "children" / "stdio_echo.py"


@pytest.mark.slow
async def test_check_starts_the_stdio_command_once_and_reports_what_it_saw(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    env = clean_env(idp, upstream, MCP_SPAWN_CMD=json.dumps([sys.executable, str(STDIO_CHILD)]))
    del env["MCP_UPSTREAM_URL"]
    report = await check(env)
    assert report.codes(ERROR, WARNING) == set(), report.findings
    lines = report.sections["upstream"]
    assert any(line.startswith("initialize: ") and "protocol 2025-11-25" in line
               for line in lines), lines
    [listed] = [line for line in lines if line.startswith("tools/list: ")]
    assert "echo" in listed
    [stopped] = [line for line in lines if line.startswith("child stopped: pid ")]
    pid = int(stopped.split()[3])
    assert not group_alive(pid)
    assert stopped.endswith("and its group are gone")


@pytest.mark.slow
async def test_check_reports_a_stdio_command_that_is_no_mcp_server(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    noisy = "import sys; print('listening on stdio'); sys.stdout.flush()"
    env = clean_env(idp, upstream, MCP_SPAWN_CMD=json.dumps([sys.executable, "-c", noisy]))
    del env["MCP_UPSTREAM_URL"]
    report = await check(env)
    severity, message, _ = finding(report, "stdio_child_failed")
    assert severity == ERROR
    assert "the server exited" in message
    assert finding(report, "stdio_stdout_noise")[0] == WARNING


# The rule (config_summary.MASK): values of credential-named options, URL passwords, and values
# that look like keys by themselves; paths, ports, plain words and URLs without a password stay
# readable.
SPAWN_SECRETS = ("sk-live-4eC39HqLyjWDarjtT1zdp7dc", "tok-plain-value", "hunter2", "pw-in-url",
                 "ghp_16C7e42F292c6912E7710c838347Ae178B4a", "0123456789abcdef0123456789abcdef")
SPAWN_ARGS = ("--api-key", SPAWN_SECRETS[0], "--token=" + SPAWN_SECRETS[1],
              "password=" + SPAWN_SECRETS[2], f"--db=postgres://me:{SPAWN_SECRETS[3]}@db/x",
              SPAWN_SECRETS[4], "--signing", SPAWN_SECRETS[5], "--key-file", "/run/secrets/key",
              "--name", "my-server-2024")


@pytest.mark.slow
async def test_check_prints_the_spawn_command_without_credential_values(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    port = free_port()
    env = spawn_env(idp, upstream, port, "serve", str(port), *SPAWN_ARGS)
    for flags in ((), ("--json",)):
        code, stdout, stderr = await run_cli("check", *flags, env=env)
        assert code == 0, stdout + stderr
        for secret in SPAWN_SECRETS:
            assert secret not in stdout + stderr
        text = "\n".join(decoded_strings(json.loads(stdout))) if flags else stdout
        assert ("--api-key '***' '--token=***' 'password=***' "
                "'--db=postgres://me:***@db/x' '***' --signing '***' "
                "--key-file /run/secrets/key --name my-server-2024") in text
        assert "child ready" in text  # the child got its real arguments


@pytest.mark.slow
async def test_check_escapes_claims_and_header_fields_it_prints(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    """A signed-in user chooses their email and name; whoever hands a token to an operator
    chooses its header: none of it may drive the operator's terminal."""
    email = "\x1b]0;pwned\x07\x1b[2k@example.com"  # ASCII (and folded already): shown as it is
    token = idp.mint(claims={"sub": FORGERY, "email": email, "email_verified": True},
                     header={"typ": "at+jwt\x1b[1A\x1b[2K", "x": "\u2028"})
    env = clean_env(idp, upstream, ALLOW_SUBS="", ALLOW_EMAILS="someone@example.com")
    for flags in ((), ("--json",)):
        code, stdout, stderr = await run_cli("check", "--token", token, *flags, env=env)
        assert code == 1, stdout + stderr  # refused: the operator still reads every claim
        assert not RAW_CONTROL.search(stdout.replace("\n", "")), RAW_CONTROL.findall(stdout)
        text = "\n".join(decoded_strings(json.loads(stdout))) if flags else stdout
        assert not RAW_CONTROL.search(text.replace("\n", "")), RAW_CONTROL.findall(text)
        assert "\\x1b]0;pwned\\x07\\x1b[2k@example.com" in text  # shown, escaped
        assert "at+jwt\\x1b[1A\\x1b[2K" in text


# -- --token: the explanation agrees with the real sidecar -----------------------------------------


Build = Callable[[FakeIdp], str]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def tampered(token: str) -> str:
    """One bit of the signature flipped."""
    head, body, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01
    return ".".join((head, body, b64url(bytes(raw))))


def minted(*, drop: tuple[str, ...] = (), header: dict[str, Any] | None = None,
           **claims: Any) -> Build:
    return lambda idp: idp.mint(claims=claims, header=header, drop=drop)


def with_header(**fields: Any) -> Build:
    """A token re-signed by the IdP's key under exactly this header (pyjwt adds nothing)."""

    def build(idp: FakeIdp) -> str:
        _, body, _ = idp.mint().split(".")
        signing_input = f"{b64url(json.dumps(fields).encode())}.{body}"
        key = idp.keys[0].private
        assert isinstance(key, rsa.RSAPrivateKey)
        signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(signature)}"

    return build


def unsigned_none(idp: FakeIdp) -> str:
    _, body, _ = idp.mint().split(".")
    return f"{b64url(json.dumps({'alg': 'none', 'kid': 'rsa-1'}).encode())}.{body}.AAAA"


HOUR = 3600
COGNITO_APP = "4l1c3app0cl1ent1d"
COGNITO_ENV = {"JWT_AUDIENCE_CLAIM": "client_id", "OIDC_AUDIENCE": COGNITO_APP}
AUTHENTIK = {"JWT_ID_TOKEN_CHECK": "client", "OIDC_AUDIENCE": "authentik-client"}
KELVIN = "\u212a"  # KELVIN SIGN: str.lower() made it "k"
# (extra env, token, the doctor's failed lines in order): every claim failure, header and typ
# variants, ID-token shapes, JWT_AUDIENCE_CLAIM=client_id, allow-list and scope refusals.
TOKEN_MATRIX = [
    pytest.param({}, minted(), [], id="valid"),
    pytest.param({}, minted(drop=("exp",)), ["exp"], id="exp-missing"),
    pytest.param({}, lambda i: i.mint(claims={"exp": int(time.time()) - HOUR}), ["exp"],
                 id="expired"),
    pytest.param({}, minted(exp="99999999999"), ["exp"], id="exp-a-string"),
    pytest.param({}, lambda i: i.mint(claims={"nbf": int(time.time()) + HOUR}), ["nbf"],
                 id="nbf-future"),
    pytest.param({}, lambda i: i.mint(claims={"iat": int(time.time()) + HOUR}), ["iat"],
                 id="iat-future"),
    pytest.param({}, minted(iat=None), ["iat"], id="iat-null"),
    pytest.param({}, minted(drop=("iss",)), ["iss"], id="iss-missing"),
    pytest.param({}, minted(iss="https://evil.example.test"), ["iss"], id="iss-wrong"),
    pytest.param({}, lambda i: i.mint(claims={"iss": i.issuer + "//"}), ["iss"],
                 id="iss-two-slashes"),
    pytest.param({}, minted(drop=("aud",)), ["aud"], id="aud-missing"),
    pytest.param({}, minted(aud="https://other.example.test/mcp"), ["aud"], id="aud-wrong"),
    pytest.param({}, minted(aud=[]), ["aud"], id="aud-empty-list"),
    pytest.param({}, minted(drop=("sub",)), ["sub"], id="sub-missing"),
    pytest.param({}, minted(sub=12345), ["sub"], id="sub-a-number"),
    pytest.param({}, minted(jti=7), ["jti"], id="jti-a-number"),
    pytest.param({}, lambda i: tampered(i.mint(claims={"exp": int(time.time()) - HOUR})),
                 ["exp", "signature"], id="expired-and-tampered"),
    pytest.param({}, lambda i: tampered(i.mint()), ["signature"], id="bad-signature"),
    pytest.param({}, minted(header={"kid": "never-published"}), ["key"], id="unknown-kid"),
    pytest.param({}, with_header(alg="ES256", kid="rsa-1"), ["key"], id="alg-key-mismatch"),
    pytest.param({}, unsigned_none, ["alg"], id="alg-none"),
    pytest.param({}, with_header(alg="RS256", kid="rsa-1", crit=["exp"]), ["crit"], id="crit"),
    pytest.param({}, with_header(alg="RS256", kid="rsa-1", cty="JWT"), ["cty"], id="nested"),
    pytest.param({}, with_header(alg="RS256", kid="k" * 300), ["kid"], id="kid-too-long"),
    pytest.param({}, lambda i: "eyJhIjoxfQ.not-json.c2ln", ["format"], id="malformed"),
    pytest.param({"JWT_MAX_TOKEN_BYTES": "1024"}, minted(pad="x" * 1200), ["format"],
                 id="too-large"),
    *[pytest.param({}, with_header(alg="RS256", kid="rsa-1", typ=typ), ["typ"], id=f"typ-{typ}")
      for typ in ("dpop+jwt", "application/dpop+jwt", "Application/Logout+JWT",
                  "application/id_token+jwt")],
    pytest.param({}, with_header(alg="RS256", kid="rsa-1", typ="application/at+jwt"), [],
                 id="typ-application/at+jwt"),
    pytest.param({}, minted(token_use="id"), ["id_token"], id="id-token-cognito-token_use"),
    pytest.param({}, minted(typ="ID", azp="c"), ["id_token"], id="id-token-keycloak-typ"),
    pytest.param({}, minted(at_hash="x4bt4E6Zs6n6m6vYd0Dk2w"), ["id_token"],
                 id="id-token-at_hash"),
    pytest.param({}, minted(nonce="n-1", azp="c"), [], id="access-token-with-nonce"),
    pytest.param({}, minted(cnf={"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}),
                 ["cnf"], id="dpop-bound"),
    pytest.param(AUTHENTIK, minted(aud="authentik-client", nonce="n-1"), ["id_token"],
                 id="id-token-authentik-no-azp"),
    pytest.param(AUTHENTIK, minted(aud="authentik-client", azp="authentik-client", nonce="n-1"),
                 [], id="access-token-authentik"),
    pytest.param(COGNITO_ENV, minted(drop=("aud",), client_id=COGNITO_APP, token_use="access"), [],
                 id="client_id-cognito-access-token"),
    pytest.param(COGNITO_ENV, minted(drop=("aud",), client_id="other-app", token_use="access"),
                 ["client_id"], id="client_id-other-app-client"),
    pytest.param(COGNITO_ENV, minted(aud=COGNITO_APP, token_use="id"), ["id_token", "client_id"],
                 id="client_id-cognito-id-token"),
    pytest.param({}, minted(sub="mallory"), ["allow-list"], id="not-allowed"),
    pytest.param({"ALLOW_EMAILS": "kim@example.com"},
                 minted(sub="u-2", email=f"{KELVIN}im@example.com", email_verified=True),
                 ["allow-list"], id="not-allowed-kelvin-sign-email"),
    pytest.param({"ALLOW_EMAILS": "kim@example.com"},
                 minted(sub="u-2", email="KIM@Example.com", email_verified=True), [],
                 id="allowed-email-ascii-case"),
    pytest.param({"REQUIRED_SCOPES": "mcp:write"}, minted(scope="mcp:read"), ["scope"],
                 id="missing-scope"),
    pytest.param({"REQUIRED_SCOPES": "mcp:write"}, minted(sub="mallory", scope="mcp:read"),
                 ["scope", "allow-list"], id="not-allowed-and-missing-scope"),
]


async def assert_the_sidecar_agrees(
    report: Report, sidecar: TestClient[web.Request, web.Application], token: str,
    failed: list[str],
) -> int:
    """The doctor's token verdict (status, reason, description, challenge) is what the real
    sidecar answers over HTTP for the same token, and its FAIL lines are exactly `failed`, one of
    them carrying the sidecar's logged reason. Returns the sidecar's status."""
    with capture_logs() as events:
        async with sidecar.post("/mcp", data=b"{}", headers=bearer(token)) as response:
            status, body = response.status, await response.read()
            challenge = response.headers.get("WWW-Authenticate", "")
    [line] = [event for event in events if event["event"] == "request"]
    assert report.token is not None
    assert report.token.status == status
    assert report.token.accepted == (status == 200) == (failed == [])
    assert report.token.reason == (line["auth_error"] or "")
    assert report.token.challenge == challenge
    assert report.token.failed_checks() == failed
    if status != 200:
        assert report.token.description == json.loads(body)["error_description"]
        assert line["auth_error"] in {c.reason for c in report.token.checks if c.ok is False}
    return status


@pytest.mark.parametrize(("extra", "build", "failed"), TOKEN_MATRIX)
async def test_check_token_agrees_with_the_sidecar_over_http(
    idp: FakeIdp, upstream: FakeUpstream, make_sidecar: SidecarFactory, *,
    extra: dict[str, str], build: Build, failed: list[str],
) -> None:
    """The doctor's verdict (status, reason, description, challenge) is what the real sidecar
    answers over HTTP for the same token and configuration, and its FAIL lines are exactly the
    checks that fail, one of them carrying the sidecar's logged reason."""
    extra = {"ALLOW_ALL_AUTHENTICATED": "false", "ALLOW_SUBS": "user-1", **extra}
    token = build(idp)
    report = await check(clean_env(idp, upstream, **extra), token)
    status = await assert_the_sidecar_agrees(report, await make_sidecar(**extra), token, failed)
    assert report.passed() == (status == 200)
    text = render(report)
    _, payload, signature = token.split(".")
    assert payload not in text
    assert signature not in text
    assert token not in json.dumps(dataclasses.asdict(report), default=str)


async def test_token_with_the_issuer_and_one_trailing_slash_is_accepted_and_says_so(
    idp: FakeIdp, upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    token = idp.mint(claims={"iss": idp.issuer + "/"})
    report = await check(sidecar_env(idp, upstream), token)
    ok, detail = check_of(report, "iss")
    assert ok is True
    assert detail == (f"'{idp.issuer}/' differs from OIDC_ISSUER_URL '{idp.issuer}' only by a "
                      "trailing slash: accepted (one trailing slash is tolerated)")
    sidecar = await make_sidecar()
    async with sidecar.post("/mcp", data=b"{}", headers=bearer(token)) as response:
        assert response.status == 200
    assert report.token is not None
    assert report.token.accepted


async def test_token_explanation_details(idp: FakeIdp, upstream: FakeUpstream) -> None:
    now = int(time.time())
    env = sidecar_env(idp, upstream, ALLOW_ALL_AUTHENTICATED="false",
                      ALLOW_EMAILS="alice@example.com", ALLOW_GROUPS="admins")
    expired = idp.mint(claims={"exp": now - 3600, "email": "alice@example.com",
                               "email_verified": False, "groups": ["staff"]})
    report = await check(env, expired)
    ok, detail = check_of(report, "exp")
    assert ok is False
    assert "expired 1 h 0 m 0 s ago (leeway 30 s)" in detail or "expired 1 h 0 m 1 s ago" in detail
    ok, detail = check_of(report, "allow-list")
    assert ok is False
    assert "email_verified=False" in detail
    assert "groups at claim groups: ['staff'], none in ALLOW_GROUPS" in detail
    assert report.token is not None
    assert report.token.reason == "expired"  # the verifier stops at the first failure

    admitted = await check(env, idp.mint(claims={"groups": ["admins"]}))
    ok, detail = check_of(admitted, "allow-list")
    assert ok is True
    assert "ALLOW_GROUPS has admins (claim groups)" in detail

    slashes = await check(env, idp.mint(claims={"iss": idp.issuer + "//"}))
    ok, detail = check_of(slashes, "iss")
    assert ok is False
    assert detail == ("The token is not from the trusted issuer (wrong_issuer): "
                      f"'{idp.issuer}//' is not OIDC_ISSUER_URL '{idp.issuer}' (they differ in "
                      "trailing slashes; only one is tolerated)")

    future = await check(env, idp.mint(claims={"nbf": now + 600, "groups": ["admins"]}))
    ok, detail = check_of(future, "nbf")
    assert ok is False
    assert "in the future, beyond the 30 s leeway" in detail
    assert future.token is not None
    assert future.token.reason == "not_yet_valid"


@pytest.mark.slow
async def test_token_from_a_file_through_the_command(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    token = idp.mint()
    path = tmp_path / "token"
    path.write_text(f"Bearer {token}\n")
    env = clean_env(idp, upstream)
    code, stdout, stderr = await run_cli("check", "--token-file", str(path), env=env)
    assert code == 0, stdout + stderr
    assert "verdict: ACCEPTED" in stdout
    assert "Result: PASS (0 error(s), 0 warning(s), token accepted)" in stdout
    for part in token.split(".")[1:]:
        assert part not in stdout
        assert part not in stderr


@pytest.mark.slow
async def test_refused_token_on_stdin_fails_the_command(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    token = idp.mint(claims={"aud": "https://other.example.test/mcp"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "oauth_sidecar", "check", "--token", "-",
        env=clean_env(idp, upstream), cwd=REPO, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(token.encode()), PROCESS_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stdout = out.decode()
    assert proc.returncode == 1, stdout + err.decode()
    assert "FAIL  aud" in stdout
    assert "verdict: REFUSED: HTTP 401 (wrong_audience)" in stdout
    assert token.split(".")[2] not in stdout + err.decode()


@pytest.mark.slow
async def test_real_idp_token_is_explained(
    oidc: RealIdp, upstream: FakeUpstream, public_port: int
) -> None:
    """A token minted by an independent implementation (typ at+jwt, RFC 8707 aud)."""
    env = facade_env(oidc, upstream, public_port)
    env.update(OIDC_AUDIENCE=env["RESOURCE_URL"], ALLOW_SUBS=oidc.client_id)
    token = await client_credentials_token(oidc, env["RESOURCE_URL"], "mcp:read")
    report = await check(env, token)
    assert report.token is not None
    assert report.token.accepted, report.token.checks
    assert check_of(report, "typ") == (True, "at+jwt (RFC 9068 access token)")


def test_read_token_sources(tmp_path: Path) -> None:
    assert read_token(None, None, io.StringIO("")) is None
    assert read_token("abc", None, io.StringIO("")) == "abc"
    assert read_token("-", None, io.StringIO("  Bearer xyz\n")) == "xyz"
    path = tmp_path / "t"
    path.write_text("from-file\n")
    assert read_token(None, str(path), io.StringIO("")) == "from-file"
    with pytest.raises(ValueError, match="empty"):
        read_token("-", None, io.StringIO("\n"))
    with pytest.raises(ValueError, match="cannot read"):
        read_token(None, str(tmp_path / "missing"), io.StringIO(""))


@pytest.mark.slow
async def test_help_says_tokens_on_the_command_line_land_in_history() -> None:
    code, stdout, _ = await run_cli("check", "--help", env={})
    assert code == 0
    assert "shell history" in " ".join(stdout.split())
    assert "--token-file PATH" in stdout
