"""The identity provider as the sidecar will meet it: its discovery document, each published key
with why it is usable or not, its clock, and the pitfalls its metadata shows (an issuer that
differs by a slash, no PKCE S256, no way for clients to register, scopes it does not offer).

Why the production pieces: discovery and key parsing are IdentityProvider's and parse_jwk's, and
issuers are compared by same_issuer, so a key or an issuer the doctor calls fine is one the
sidecar accepts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from oauth_sidecar.auth.idp import (
    MAX_REDIRECTS,
    IdentityProvider,
    discovery_urls,
    parse_jwk,
    same_issuer,
)
from oauth_sidecar.doctor.probes import until
from oauth_sidecar.doctor.report import ERROR, NOTE, WARNING, Checker
from oauth_sidecar.doctor.words import describe_key, span
from oauth_sidecar.response_body import ResponseTooLarge, read_capped
from oauth_sidecar.signin.authserver import CALLBACK_PATH
from oauth_sidecar.signin.idp_request import idp_scope

CLOCK_SLACK = 2.0  # seconds: the Date header is truncated to seconds and the request took time
# IdPs known to put RFC 9207 `iss` in authorization responses even where metadata is silent.
ISS_SENDER_HOSTS = (("clerk.", "Clerk"), (".clerk.accounts.dev", "Clerk"),
                    ("fusionauth", "FusionAuth"))


class IdpChecks(Checker):
    """The IdP's discovery, keys, clock and metadata, written into the report."""

    async def identity_provider(self, idp: IdentityProvider) -> None:
        config, section = self.config, "identity provider"
        urls = discovery_urls(config.idp.issuer)
        self.line(section, f"discovery URLs tried in order: {', '.join(urls)}")
        initial = idp.last_error
        # Each URL may redirect (MAX_REDIRECTS) and each request is bounded by the timeout.
        bound = config.idp.timeout * 4 * (len(urls) + 1) + 1.0
        settled = await until(lambda: idp.ready or idp.last_error != initial, bound)
        metadata = idp.metadata
        if metadata is not None:
            self.line(section, f"discovery document: issuer {metadata.get('issuer')!r}")
            for name in ("authorization_endpoint", "token_endpoint", "registration_endpoint",
                         "jwks_uri"):
                self.line(section, f"  {name}: {metadata.get(name, '(absent)')}")
        if idp.ready:
            self.line(section, f"keys loaded: {idp.key_count()}")
            return
        error = idp.last_error if settled else f"no answer within {bound:g} s"
        if metadata is None:
            fix = ("set OIDC_ISSUER_URL to the issuer exactly as the IdP's discovery document "
                   "names it") if "names issuer" in str(error) else (
                "check OIDC_ISSUER_URL and that this host reaches the IdP (the sidecar answers "
                "every request with 503 until it does)")
            self.add(ERROR, "discovery_failed", f"the IdP's discovery document: {error}", fix)
        elif "no usable signing key" in str(error):
            self.add(ERROR, "no_usable_key", f"the IdP's key set: {error}",
                     f"allow the IdP's signing algorithm in JWT_ALGORITHMS (now "
                     f"{','.join(sorted(config.tokens.algorithms))}); see the keys listed above")
        else:
            self.add(ERROR, "jwks_unavailable", f"the IdP's key set: {error}",
                     "check that this host reaches the jwks_uri above")

    async def keys(self, metadata: Mapping[str, Any]) -> None:
        """Every published key with the reason it is usable or not (parse_jwk, as the IdP does),
        and the IdP's clock from the Date header."""
        section, session = "keys", self.session
        jwks_uri = metadata.get("jwks_uri")
        if not isinstance(jwks_uri, str) or session is None:
            return
        try:
            async with session.get(jwks_uri, max_redirects=MAX_REDIRECTS,
                                   headers={"Accept": "application/json"}) as response:
                body = await read_capped(response, self.config.idp.max_document_bytes)
                status, date, age = (response.status, response.headers.get("Date"),
                                     response.headers.get("Age"))
        except (aiohttp.ClientError, TimeoutError, ResponseTooLarge) as exc:
            # ResponseTooLarge: the sidecar's own key fetch refuses the same body.
            self.line(section, f"cannot list the keys: {type(exc).__name__}: {exc}")
            return
        if date:
            self._clock(date, age)
        try:
            entries = json.loads(body).get("keys") if status == 200 else None
        except (ValueError, UnicodeDecodeError, AttributeError):
            entries = None
        if not isinstance(entries, list):
            self.line(section, f"cannot list the keys: HTTP {status}, no keys array")
            return
        for entry in entries:
            kid = entry.get("kid") if isinstance(entry, dict) else None
            name = f"kid {str(kid)[:64]!r}" if kid is not None else "(no kid)"
            try:
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
                key = parse_jwk(entry, self.config.tokens.algorithms)
            except ValueError as exc:
                self.line(section, f"{name}: skipped: {exc}")
                continue
            self.line(section, f"{name}: {describe_key(key)}")

    def _clock(self, date: str, age: str | None) -> None:
        try:
            idp_now = parsedate_to_datetime(date).timestamp() + (int(age) if age else 0)
        except (TypeError, ValueError):
            return
        skew = time.time() - idp_now
        leeway = self.config.tokens.leeway
        if abs(skew) <= CLOCK_SLACK:
            self.line("keys", f"clock: agrees with the IdP's Date header (within "
                              f"{CLOCK_SLACK:g} s)")
        else:
            self.line("keys", f"clock: this host is {span(skew)} "
                              f"{'ahead of' if skew >= 0 else 'behind'} the IdP (Date header)")
        if abs(skew) > leeway + CLOCK_SLACK:
            effect = ("fresh tokens look not yet valid (nbf/iat in the future)" if skew < 0
                      else "tokens are still accepted after they expired, and refused early "
                           "at the IdP's side")
            self.add(WARNING, "clock_skew",
                     f"this host's clock is {span(skew)} {'ahead of' if skew >= 0 else 'behind'}"
                     f" the IdP's, more than JWT_LEEWAY_SECONDS={leeway}: {effect}",
                     "synchronise the clock (NTP); raising JWT_LEEWAY_SECONDS only hides it")

    # -- the IdP's metadata: the pitfalls -------------------------------------------------------

    def metadata_checks(self, metadata: Mapping[str, Any]) -> None:  # noqa: PLR0912 (independent checks, one finding each)
        config = self.config
        facade = config.auth_server.facade
        configured, named = config.idp.issuer, metadata.get("issuer")
        sends_iss, sender = self._sends_iss(metadata)
        if isinstance(named, str) and named != configured and same_issuer(named, configured):
            if facade:
                self.add(WARNING, "issuer_trailing_slash",
                         f"OIDC_ISSUER_URL {configured!r} and the IdP's issuer {named!r} differ by "
                         "a trailing slash. Tolerated here: the sidecar accepts both forms in "
                         "tokens and in the relay's RFC 9207 check, and clients see the "
                         "sidecar's own issuer; it breaks as soon as clients talk to the IdP "
                         "directly (AUTH_SERVER_MODE=direct)",
                         f"set OIDC_ISSUER_URL={named}")
            else:
                also = (" The IdP also sends iss in authorization responses (RFC 9207), which "
                        "clients compare with that same issuer.") if sends_iss else ""
                self.add(ERROR, "issuer_trailing_slash",
                         f"OIDC_ISSUER_URL {configured!r} and the IdP's issuer {named!r} differ by "
                         "a trailing slash. The sidecar tolerates it (tokens carry the IdP's "
                         "form and are accepted), but MCP clients do not: the protected-resource "
                         f"metadata names {configured!r} as authorization server, and clients "
                         "compare the issuer of its metadata exactly (RFC 8414 §3.3) and refuse "
                         f"to sign in.{also}",
                         f"set OIDC_ISSUER_URL={named}")

        methods = metadata.get("code_challenge_methods_supported")
        if not isinstance(methods, list) or "S256" not in methods:
            shown = "absent" if methods is None else json.dumps(methods)
            if facade:
                self.add(WARNING, "pkce_s256_missing",
                         f"the IdP's metadata does not list S256 in "
                         f"code_challenge_methods_supported ({shown}); the facade's metadata "
                         "claims S256 for it, so sign-in fails at the token step if the IdP does "
                         "not actually support PKCE",
                         "check that the IdP supports PKCE with S256 (most do without saying so)")
            else:
                self.add(ERROR, "pkce_s256_missing",
                         f"the IdP's metadata does not list S256 in "
                         f"code_challenge_methods_supported ({shown}): MCP clients read this "
                         "document directly in direct mode and refuse to sign in without it",
                         "enable PKCE S256 at the IdP, or use facade mode (STATIC_CLIENT_ID), "
                         "whose metadata advertises S256")

        if sends_iss:
            why = (f"{sender} is known to send it" if sender
                   else "authorization_response_iss_parameter_supported is true")
            if facade:
                self.add(NOTE, "rfc9207_iss",
                         f"the IdP sends iss in authorization responses (RFC 9207; {why}); "
                         "in facade mode the sidecar always relays the authorization response "
                         f"(/authorize -> IdP -> {CALLBACK_PATH}), checks the IdP's iss and "
                         "gives clients its own, so clients that discovered the sidecar as "
                         "issuer accept it. (No configuration rewrites the issuer without "
                         "relaying.)")
            else:
                self.add(NOTE, "rfc9207_iss",
                         f"the IdP sends iss in authorization responses (RFC 9207; {why}); in "
                         "direct mode clients discovered the IdP's own issuer, so it matches")

        if facade:
            self._facade_registration()
        else:
            self._registration(metadata)
        for name in ("authorization_endpoint", "token_endpoint"):
            if not isinstance(metadata.get(name), str):
                self.add(ERROR, "endpoint_missing",
                         f"the IdP's metadata has no {name}: no client can sign in",
                         "check that OIDC_ISSUER_URL names an OAuth authorization server")
        offered = metadata.get("scopes_supported")
        prefix = config.auth_server.scope_prefix if facade else ""
        if isinstance(offered, list):
            # A scope the relay prefixes is the API's (Entra: api://<app id>/mcp:read), which
            # the IdP's own document does not list.
            missing = [s for s in config.advertised_scopes
                       if s not in offered and idp_scope(s, prefix) == s]
            if missing:
                self.add(WARNING, "scope_not_offered",
                         f"scope(s) {', '.join(missing)} advertised to clients (SCOPES_SUPPORTED"
                         f" / REQUIRED_SCOPES) but absent from the IdP's scopes_supported: it may "
                         "refuse them at sign-in",
                         "define these scopes at the IdP, or advertise the ones it issues")

    def _sends_iss(self, metadata: Mapping[str, Any]) -> tuple[bool, str]:
        if metadata.get("authorization_response_iss_parameter_supported") is True:
            return True, ""
        host = (urlsplit(self.config.idp.issuer).hostname or "").lower()
        for marker, name in ISS_SENDER_HOSTS:
            if marker in host:
                return True, name
        return False, ""

    def _facade_registration(self) -> None:
        """Facade mode: the ways a client can get a client id here, whatever the IdP offers."""
        auth = self.config.auth_server
        documents = auth.client_documents
        paths = []
        if documents.enabled:
            allowed = ", ".join(sorted(documents.allowed_hosts)) or "any public host"
            trusted = ", ".join(sorted(documents.trusted_hosts)) or "none"
            paths.append(f"Client ID Metadata Documents (CIMD: Claude, VS Code, ChatGPT, Codex) "
                         f"from {allowed}; without the consent page: {trusted}")
        paths.append(f"Dynamic Client Registration at /oauth/register and /register, handing "
                     f"out STATIC_CLIENT_ID={auth.client_id} (older clients: Cursor, the MCP "
                     "Inspector; deprecated by MCP 2026-07-28)")
        paths.append(f"the static client id typed by hand ({auth.client_id})")
        self.add(NOTE, "registration", "clients can register by " + "; ".join(paths))

    def _registration(self, metadata: Mapping[str, Any]) -> None:
        """Direct mode: clients register with the IdP itself, or are handed the static client
        only if they call /register on the MCP origin (Claude.ai does, SDK clients do not)."""
        if isinstance(metadata.get("registration_endpoint"), str):
            self.add(NOTE, "registration", "the IdP offers Dynamic Client Registration")
            return
        if metadata.get("client_id_metadata_document_supported") is True:
            self.add(NOTE, "registration", "the IdP accepts Client ID Metadata Documents")
            return
        client_id = self.config.auth_server.client_id
        if client_id:
            self.add(WARNING, "static_client_direct",
                     f"direct mode with STATIC_CLIENT_ID={client_id} and no registration at the "
                     "IdP: only clients that call /register on the MCP origin (Claude.ai) get "
                     "the static client; SDK-based clients post to the IdP's /register and fail",
                     "use facade mode (unset AUTH_SERVER_MODE: it is the default with "
                     "STATIC_CLIENT_ID)")
            return
        self.add(ERROR, "no_registration",
                 "no way for a client to register: the IdP's metadata has no "
                 "registration_endpoint (no DCR) nor client_id_metadata_document_supported, and "
                 "STATIC_CLIENT_ID is not set. MCP clients stop there (Claude.ai asks the user "
                 "to type a client id, which must then exist at the IdP with its callback)",
                 "register one client at the IdP with the callback <RESOURCE_URL origin>"
                 f"{CALLBACK_PATH} and set STATIC_CLIENT_ID (facade mode), or enable DCR")

