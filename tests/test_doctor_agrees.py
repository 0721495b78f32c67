"""The doctor decides nothing of its own: a token's verdict is the verifier's (through the gate's
bearer parsing), and the challenge it prints is the one the running sidecar sends.

Why beside test_doctor.py: that file checks what the doctor finds; this one pins that the doctor
and the serving pieces cannot drift apart, row by row over the same token table.
"""

from __future__ import annotations

import pytest
from conftest import FakeIdp, FakeUpstream, SidecarFactory, sidecar_env, wait_until
from test_doctor import TOKEN_MATRIX, Build

from oauth_sidecar.auth.bearer import TokenError, bearer_token
from oauth_sidecar.auth.idp import IdentityProvider
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
