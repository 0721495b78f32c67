"""The doctor decides nothing of its own: a token's verdict is the verifier's (through the gate's
bearer parsing), and the challenge it prints is the one the running sidecar sends.

Why beside test_doctor.py: that file checks what the doctor finds; this one pins that the doctor
and the serving pieces cannot drift apart, row by row over the same token table.
"""

from __future__ import annotations

import pytest
from conftest import FakeIdp, FakeUpstream, SidecarFactory, sidecar_env, wait_until
from test_doctor import TOKEN_MATRIX, Build
from test_doctor_introspection import ANSWER_MATRIX, LOGIN, introspection_at

from oauth_sidecar.auth.access_tokens import token_check, verifier_for
from oauth_sidecar.auth.bearer import TokenError, bearer_token
from oauth_sidecar.auth.idp import IdentityProvider
from oauth_sidecar.auth.introspection import Introspector
from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.auth.tokens import TokenVerifier
from oauth_sidecar.config import Config, load
from oauth_sidecar.doctor import diagnose
from oauth_sidecar.doctor.explainer import explain_token

POLICY_REASONS = {"not_allowed", "insufficient_scope"}  # the policy's, after the verifier's
POLICY_CHECKS = {"scope", "allow-list"}
NO_TOKEN_CHALLENGE = "401 challenge (WWW-Authenticate) without a token"


async def verifier_verdict(config: Config, keys: IdentityProvider, token: str) -> TokenError | None:
    """What the gate's authentication makes of the token: bearer_token, then verify()."""
    try:
        bearer_token([f"Bearer {token}"], [], config.tokens.max_token_bytes)
        await TokenVerifier(config.tokens, keys).verify(token)
    except TokenError as exc:
        return exc
    return None


@pytest.mark.parametrize(("extra", "build", "failed"), TOKEN_MATRIX)
async def test_doctor_verdict_is_the_verifiers_for_every_token(
    idp: FakeIdp, upstream: FakeUpstream, *, extra: dict[str, str], build: Build,
    failed: list[str],
) -> None:
    config = load(sidecar_env(idp, upstream, **extra))
    token = build(idp)
    keys = IdentityProvider(config.idp, config.tokens.algorithms)
    async with keys.running():
        await wait_until(lambda: keys.ready)
        refused = await verifier_verdict(config, keys, token)
        explanation = await TokenVerifier(config.tokens, keys).explain(token)
        report = await explain_token(config, keys, token)
    token_failures = [name for name in report.failed_checks() if name not in POLICY_CHECKS]
    if refused is None:
        assert explanation.error is None
        assert report.reason in {"", *POLICY_REASONS}
        assert token_failures == []
        return
    if explanation.error is not None:  # the format checks are bearer_token's, not explain()'s
        assert explanation.error.reason == refused.reason
    assert (report.accepted, report.status, report.reason, report.description) == (
        False, refused.status, refused.reason, refused.description)
    assert token_failures != []


async def gate_verdict(config: Config, keys: IdentityProvider, token: str
                       ) -> tuple[TokenError | None, str]:
    """What the gate's authentication makes of the token in the configured TOKEN_VALIDATION
    mode (bearer_token, then token_check(...).verify, with the serving policy's kept claims), and
    the verifier it went to."""
    kept = AccessPolicy.serving(config).kept_claims
    introspector = Introspector(config.tokens, keys, kept)
    tokens = token_check(config.tokens.validation, TokenVerifier(config.tokens, keys, kept),
                         introspector)
    async with introspector.running():
        try:
            bearer_token([f"Bearer {token}"], [], config.tokens.max_token_bytes)
            await tokens.verify(token)
        except TokenError as exc:
            return exc, verifier_for(config.tokens.validation, token)
    return None, verifier_for(config.tokens.validation, token)


@pytest.mark.parametrize("mode", ["introspection", "auto"])
@pytest.mark.parametrize(("extra", "claims", "failed"), ANSWER_MATRIX)
async def test_doctor_verdict_is_the_introspectors_for_every_answer(
    idp: FakeIdp, upstream: FakeUpstream, *, mode: str, extra: dict[str, str],
    claims: dict[str, object], failed: list[str],
) -> None:
    """An opaque token: the doctor's verdict is the one token_check's verifier reaches, row by
    row over the answers the IdP may give; its token lines fail exactly when the gate refuses."""
    async with introspection_at(idp) as endpoint:
        config = load(sidecar_env(idp, upstream, **{**LOGIN, "TOKEN_VALIDATION": mode, **extra}))
        token = endpoint.issue(**claims)
        keys = IdentityProvider(config.idp, config.tokens.algorithms)
        async with keys.running():
            await wait_until(lambda: keys.ready)
            refused, route = await gate_verdict(config, keys, token)
            report = await explain_token(config, keys, token)
    assert route == "introspection"
    token_failures = [name for name in report.failed_checks() if name not in POLICY_CHECKS]
    if refused is None:
        assert report.reason in {"", *POLICY_REASONS}
        assert token_failures == []
        assert [name for name in failed if name not in POLICY_CHECKS] == []
        return
    assert (report.accepted, report.status, report.reason, report.description) == (
        False, refused.status, refused.reason, refused.description)
    assert token_failures == failed


@pytest.mark.parametrize(("extra", "build", "failed"), TOKEN_MATRIX[:12])
async def test_in_auto_mode_a_jwt_gets_the_jwt_verifiers_verdict(
    idp: FakeIdp, upstream: FakeUpstream, *, extra: dict[str, str], build: Build,
    failed: list[str],
) -> None:
    """auto: a JWS-shaped token stays with the JWT verifier whatever its fate; the doctor says
    so and reaches the same verdict without asking the IdP."""
    async with introspection_at(idp) as endpoint:
        config = load(sidecar_env(idp, upstream, **{**LOGIN, "TOKEN_VALIDATION": "auto",
                                                    **extra}))
        token = build(idp)
        keys = IdentityProvider(config.idp, config.tokens.algorithms)
        async with keys.running():
            await wait_until(lambda: keys.ready)
            refused, route = await gate_verdict(config, keys, token)
            report = await explain_token(config, keys, token)
    assert route == "jwt"
    assert endpoint.calls == []
    assert report.checks[0].name == "verifier"
    assert (report.status, report.reason) == (
        (refused.status, refused.reason) if refused is not None else (200, ""))
    assert [n for n in report.failed_checks() if n not in POLICY_CHECKS] == failed


@pytest.mark.parametrize(
    "extra",
    [{}, {"SCOPES_SUPPORTED": "mcp:read mcp:write"}, {"REQUIRED_SCOPES": "mcp:write"},
     {"RESOURCE_URL": "https://mcp.example.test/tenant/a/mcp",
      "OIDC_AUDIENCE": "https://mcp.example.test/tenant/a/mcp"}],
    ids=["plain", "scopes-supported", "required-scopes", "resource-with-path"],
)
async def test_doctor_shows_the_challenge_the_running_sidecar_sends(
    idp: FakeIdp, upstream: FakeUpstream, make_sidecar: SidecarFactory, extra: dict[str, str],
) -> None:
    report = await diagnose(load(sidecar_env(idp, upstream, **extra)))
    sidecar = await make_sidecar(**extra)
    path = "/tenant/a/mcp" if "RESOURCE_URL" in extra else "/mcp"
    async with sidecar.post(path, data=b"{}") as response:
        assert response.status == 401
        sent = response.headers.getall("WWW-Authenticate")
    assert sent == [report.documents[NO_TOKEN_CHALLENGE]]
