"""The whole diagnosis in its order: the configuration's own pitfalls, the IdP (documents, keys,
clock, relay probe), what an MCP client will see, the token if one was given, then the upstream.

Why one conductor: the parts share one HTTP session and one running IdentityProvider (started
and stopped as the sidecar does), and a given token settles the audience guesses made from the
configuration alone, so the order and the hand-offs are decided here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractAsyncContextManager, nullcontext

import aiohttp

from oauth_sidecar.auth.challenge import Challenges
from oauth_sidecar.auth.idp import IdentityProvider
from oauth_sidecar.auth.introspection import Introspector
from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.auth.resource_metadata import (
    authorization_server_metadata_paths,
    protected_resource_document,
    protected_resource_paths,
    public_origin,
)
from oauth_sidecar.config import UNSHARED_SEALING_WARNING, Config
from oauth_sidecar.config_summary import summary
from oauth_sidecar.doctor.explainer import explain_caller
from oauth_sidecar.doctor.idp_metadata import IdpChecks
from oauth_sidecar.doctor.introspection_probe import IntrospectionChecks
from oauth_sidecar.doctor.lint import (
    UNLIKELY_AUDIENCE,
    audience_findings,
    entra_findings,
    resource_findings,
    state_secret_findings,
)
from oauth_sidecar.doctor.probes import Probes
from oauth_sidecar.doctor.report import (
    INTROSPECTION,
    NOTE,
    SECTIONS,
    WARNING,
    Checker,
    Report,
)
from oauth_sidecar.doctor.tool_access import caller_tools
from oauth_sidecar.signin.metadata import facade_metadata


async def diagnose(config: Config, token: str | None = None) -> Report:
    names = list(SECTIONS)
    if config.tokens.introspection is not None:  # after the keys, before the upstream
        names.insert(names.index("keys") + 1, INTROSPECTION)
    report = Report(summary=summary(config), sections={name: [] for name in names})
    await Diagnosis(config, report).run(token)
    return report


class Diagnosis(Checker):
    async def run(self, token: str | None) -> None:
        config = self.config
        replicas = state_secret_findings(config)
        for warning in config.warnings:
            if not (replicas and warning == UNSHARED_SEALING_WARNING):  # said more precisely below
                self.add(WARNING, "config_warning", warning)
        self.report.findings += replicas
        self.report.findings += resource_findings(config)
        self.report.findings += entra_findings(config)
        audience = audience_findings(config)
        timeout = aiohttp.ClientTimeout(total=config.idp.timeout)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False,
                                         cookie_jar=aiohttp.DummyCookieJar()) as session:
            checks = IdpChecks(config, self.report, session)
            probes = Probes(config, self.report, session)
            idp = IdentityProvider(config.idp, config.tokens.algorithms)
            # One introspector for the probe and the token: its log line per kind of trouble
            # then appears once in a check, as it does once in a serving sidecar's log.
            introspector = Introspector(config.tokens, idp, AccessPolicy.serving(
                config).kept_claims) if config.tokens.introspection is not None else None
            async with idp.running(), self._running(introspector):
                await checks.identity_provider(idp)
                metadata = idp.metadata
                if metadata is not None:
                    await checks.keys(metadata)
                    checks.metadata_checks(metadata)
                    if config.auth_server.facade:
                        await probes.probe_relay(metadata)
                if introspector is not None:
                    await IntrospectionChecks(config, self.report, session).run(
                        introspector, metadata)
                self._documents(idp)
                caller = None
                if token is not None:
                    self.report.token, caller = await explain_caller(config, idp, token,
                                                                     introspector)
            if not config.tool_rules.configured:
                caller = None
            await probes.upstream(caller)
        token_report = self.report.token
        if caller is not None and token_report is not None:
            token_report.tools = caller_tools(config, caller, probes.lists, probes.lists_source,
                                              probes.unlisted)
        aud_ok = token_report is not None and any(
            c.name == config.tokens.audience_claim and c.ok for c in token_report.checks)
        for guess in audience:  # a real token with a matching aud settles the guess
            settled = aud_ok and guess.code in UNLIKELY_AUDIENCE
            self.report.findings.append(dataclasses.replace(
                guess, severity=NOTE, message=guess.message + " (but the given token's aud "
                "matched)") if settled else guess)

    @staticmethod
    def _running(introspector: Introspector | None) -> AbstractAsyncContextManager[object]:
        return introspector.running() if introspector is not None else nullcontext()

    def _documents(self, idp: IdentityProvider) -> None:
        """What an MCP client sees: the challenge the gate sends, and the metadata documents."""
        config, origin = self.config, public_origin(self.config)
        self.report.documents["401 challenge (WWW-Authenticate) without a token"] = (
            Challenges(config).no_credentials)
        prm_urls = ", ".join(origin + path for path in reversed(protected_resource_paths(config)))
        self.report.documents[f"protected-resource metadata (RFC 9728) at {prm_urls}"] = (
            protected_resource_document(config))
        metadata = idp.metadata
        if config.auth_server.facade:
            urls = ", ".join(origin + p for p in authorization_server_metadata_paths(config))
            title = f"authorization-server metadata (RFC 8414), served by the sidecar at {urls}"
            self.report.documents[title] = (
                facade_metadata(config, metadata) if metadata is not None
                else "(unavailable: the sidecar answers 503 until the IdP's metadata loads)")
        else:
            title = (f"authorization-server metadata, the IdP's own (direct mode: clients fetch "
                     f"it from {config.idp.issuer})")
            self.report.documents[title] = metadata if metadata is not None else "(unavailable)"
