"""The official MCP SDK client signs in with a Client ID Metadata Document, end to end.

The stack of test_oauth_facade_e2e.py (the real oidc-provider child knowing one static client,
the sidecar in facade mode, the official-SDK echo server behind it), and the SDK's
`OAuthClientProvider(..., client_metadata_url=...)`. The client's document is served on
https://localhost:<port>/... by a test https server whose certificate comes from a throwaway CA
(the `pki` and `documents` fixtures of test_cimd_signin.py): the sidecar trusts that CA through
CIMD_CA_FILE and may fetch from 127.0.0.1 through the development setting
CIMD_ALLOW_PRIVATE_ADDRESSES=true (the SSRF rules themselves: test_client_documents.py).
CIMD_TRUSTED_HOSTS=localhost skips the consent page, except in the test that answers it.

What is shown: the SDK takes the CIMD path (its client id at /authorize and /token is the URL, it
never registers), the IdP only ever sees the static client, the SDK calls a tool, refreshes with
a refresh token sealed for its URL (not the IdP's) and calls again; the same SDK client without
client_metadata_url registers through the DCR shim as before; and a document that lists its
loopback redirect without a port, as Claude Code's does, signs in on the SDK's ephemeral port.
"""

from __future__ import annotations

import asyncio
import html
import re
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp
import pytest
from oauth_flow import (
    AuthorizationDenied,
    BrowserError,
    HeadlessBrowser,
    Hop,
    SdkOAuthClient,
    SdkOAuthResult,
    find_exception,
)
from processes import free_port
from test_cimd_signin import Documents, documents, pki
from test_oauth_facade_e2e import (
    STATE_SECRET,
    STATIC_ID,
    USER,
    FacadeStack,
    RelayedRequest,
    assert_facade_discovery,
    assert_mcp_tail,
    assert_only_the_sidecar,
    assert_secret_added,
    endpoint,
    facade_stack,
    post_form,
    query_of,
)

from oauth_sidecar.signin.state import StateCodec

__all__ = ["documents", "pki"]  # fixtures of test_cimd_signin.py, used here too

# Every test here runs real processes (see the marker in pyproject.toml).
pytestmark = pytest.mark.slow

TEXT = "hello from a document client"
DOCUMENT_PATH = "/oauth/sdk-client.json"
CLIENT_NAME = "oauth-sidecar SDK e2e"
TTL = 1  # seconds an access token lives at the provider: the next session must refresh
FORM_ACTION = re.compile(r'<form method="post" action="([^"]+)"')
REQUEST_FIELD = re.compile(r'name="request" value="([^"]+)"')


def cimd_env(pki: tuple[Path, Any], trusted: str = "localhost") -> dict[str, str]:
    return {"CIMD_CA_FILE": str(pki[0]), "CIMD_ALLOW_PRIVATE_ADDRESSES": "true",
            "CIMD_TRUSTED_HOSTS": trusted}


def loopback_redirect() -> str:
    return f"http://127.0.0.1:{free_port()}/callback"


def document_client(documents: Documents, *redirects: str) -> str:
    """Serve the SDK client's document listing `redirects`; its URL, the client id."""
    return documents.client(DOCUMENT_PATH, client_name=CLIENT_NAME, redirect_uris=list(redirects))


def opened(sealed: str) -> dict[str, Any]:
    """A value the sidecar sealed, opened with its STATE_SECRET."""
    values = StateCodec(STATE_SECRET.encode()).open(sealed)
    assert values is not None, f"not sealed by the sidecar: {sealed[:40]}..."
    return values


def token_requests(result: SdkOAuthResult) -> list[dict[str, str]]:
    return [e.form for e in result.exchanges if e.path == "/token"]


def assert_document_sign_in(
    result: SdkOAuthResult, stack: FacadeStack, url: str, redirect: str
) -> None:
    """The SDK took the CIMD path: its client id is the document URL, from /authorize to /token,
    and it never registered; the browser went to the IdP as the static client."""
    sidecar = stack.sidecar
    assert_facade_discovery(result, sidecar)
    metadata = result.authorization_server_metadata
    assert metadata is not None
    assert metadata.client_id_metadata_document_supported is True
    assert "/oauth/register" not in [e.path for e in result.exchanges], result.describe()
    info = result.client_info
    assert info is not None
    assert (info.client_id, info.client_secret, info.token_endpoint_auth_method) == (
        url, None, "none")
    asked = result.authorization_params()
    assert (asked["client_id"], asked["redirect_uri"]) == (url, redirect)
    to_idp = next(h for h in result.hops if endpoint(h.url) == stack.idp.issuer + "/auth")
    sent_to_idp = query_of(to_idp.url)
    assert sent_to_idp["client_id"] == STATIC_ID  # the IdP only knows the static client
    assert sent_to_idp["redirect_uri"] == sidecar.origin + "/oauth/callback"
    assert opened(sent_to_idp["state"])["cid"] == url  # the sign-in stays the document's
    [code_request] = token_requests(result)
    assert code_request["grant_type"] == "authorization_code"
    assert (code_request["client_id"], code_request["redirect_uri"]) == (url, redirect)
    assert "client_secret" not in code_request
    assert opened(code_request["code"])["cid"] == url
    assert result.iss == sidecar.origin
    assert_only_the_sidecar(result, sidecar)


def assert_relayed_as_static_client(relayed: RelayedRequest, stack: FacadeStack) -> None:
    assert (relayed.url, relayed.status) == (stack.idp_metadata["token_endpoint"], 200), relayed
    assert relayed.form["client_id"] == STATIC_ID
    assert_secret_added(relayed, stack.idp_metadata)


def assert_static_client_token(result: SdkOAuthResult, stack: FacadeStack) -> None:
    claims = result.claims
    assert claims is not None, "the access token is not a JWT"
    assert (claims["aud"], claims["sub"], claims["iss"], claims["client_id"]) == (
        stack.sidecar.mcp_url, USER, stack.idp.issuer, STATIC_ID)


# -- the CIMD path, with refresh ---------------------------------------------------------------


async def test_sdk_signs_in_with_its_document_calls_refreshes_and_calls_again(  # noqa: PLR0915 (one sign-in and two refreshes, step by step)
    tmp_path: Path, documents: Documents, pki: tuple[Path, Any]
) -> None:
    redirect = loopback_redirect()
    url = document_client(documents, redirect)
    async with facade_stack(tmp_path, access_token_ttl=TTL, env=cimd_env(pki)) as stack:
        client = SdkOAuthClient(stack.sidecar.mcp_url, redirect_uri=redirect,
                                client_metadata_url=url)
        sessions = [await client.session([("echo", {"text": TEXT})])]
        assert len(stack.relay) == 1
        for _ in range(2):  # twice: a refreshed (and re-sealed) refresh token refreshes again
            await asyncio.sleep(TTL + 0.2)  # the SDK now holds an expired access token
            sessions.append(await client.session([("echo", {"text": TEXT})]))
        held = client.storage.tokens
        assert held is not None
        assert held.refresh_token is not None
        # Whoever else presents the refresh token the SDK holds gets nothing: another
        # document client is refused before the IdP; the static client hands the IdP a blob
        # it never issued.
        relayed_before = len(stack.relay)
        token_url = stack.sidecar.origin + "/token"
        other = await post_form(token_url, {"grant_type": "refresh_token", "client_id":
                                            documents.url("/another-client.json"),
                                            "refresh_token": held.refresh_token})
        assert len(stack.relay) == relayed_before
        static = await post_form(token_url, {"grant_type": "refresh_token", "client_id": STATIC_ID,
                                             "refresh_token": held.refresh_token})
    first, refreshes = sessions[0], sessions[1:]
    relay = stack.relay

    # 1. Sign-in: the document URL is the client id; the IdP sees the static client only.
    assert_document_sign_in(first, stack, url, redirect)
    assert first.hops[0].status == 302  # trusted host: no consent page
    assert endpoint(first.hops[0].location or "") == stack.idp.issuer + "/auth"
    assert documents.hits == 1  # fetched once, at /authorize; never at /token
    assert_relayed_as_static_client(relay[0], stack)
    assert relay[0].form["redirect_uri"] == stack.sidecar.origin + "/oauth/callback"
    assert first.text == TEXT
    assert_static_client_token(first, stack)

    # 2. The refresh token the SDK got is sealed for its URL, not the provider's own.
    tokens = first.tokens
    assert tokens is not None
    assert tokens.expires_in == TTL
    assert tokens.refresh_token is not None
    sealed = opened(tokens.refresh_token)
    assert (sealed["kind"], sealed["cid"]) == ("refresh", url)
    assert sealed["t"] != tokens.refresh_token

    # 3. Each later session refreshes at the sidecar first, as the document client; the relay
    #    unseals it for the IdP as the static client, and the SDK calls the tool again.
    assert len(relay) == 4, relay  # the code, two refreshes, the static client's attempt
    previous = tokens
    for index, session in enumerate(refreshes, start=1):
        assert session.authorization_urls == [], session.describe()
        assert session.hops == []
        refresh = session.exchanges[0]
        assert refresh.short() == ("POST", token_url, 200), session.describe()
        assert refresh.authorization is None
        sent = refresh.form
        assert previous.refresh_token is not None
        assert (sent["grant_type"], sent["client_id"], sent["refresh_token"]) == (
            "refresh_token", url, previous.refresh_token)
        assert "client_secret" not in sent
        relayed = relay[index]
        assert_relayed_as_static_client(relayed, stack)
        assert relayed.form["refresh_token"] == opened(previous.refresh_token)["t"]
        assert relayed.form["resource"] == stack.sidecar.mcp_url
        assert_mcp_tail(session.exchanges[1:], stack.sidecar)
        assert session.text == TEXT
        current = session.tokens
        assert current is not None
        assert current.access_token != previous.access_token
        assert current.refresh_token is not None
        assert current.refresh_token != previous.refresh_token
        assert opened(current.refresh_token)["cid"] == url  # re-sealed for the same client
        assert_static_client_token(session, stack)
        previous = current
    assert documents.hits == 1

    status, body, _ = other
    assert (status, body["error"]) == (400, "invalid_grant"), body
    status, body, _ = static
    assert (status, body["error"]) == (400, "invalid_grant"), body
    assert relay[-1].form["refresh_token"] == held.refresh_token  # the blob, not unsealed
    assert relay[-1].status == 400


# -- DCR still works for the same client without a document URL ---------------------------------


async def test_sdk_without_a_document_url_registers_through_the_dcr_shim(
    tmp_path: Path, documents: Documents, pki: tuple[Path, Any]
) -> None:
    """CIMD on and advertised, but the SDK was given no client_metadata_url: it registers at
    /oauth/register and signs in as the static client, its refresh token the IdP's own."""
    async with facade_stack(tmp_path, env=cimd_env(pki)) as stack:
        client = SdkOAuthClient(stack.sidecar.mcp_url)
        result = await client.session([("echo", {"text": TEXT})])
    origin = stack.sidecar.origin
    metadata = result.authorization_server_metadata
    assert metadata is not None
    assert metadata.client_id_metadata_document_supported is True
    assert result.summary()[3] == ("POST", origin + "/oauth/register", 201), result.describe()
    info = result.client_info
    assert info is not None
    assert info.client_id == STATIC_ID
    assert result.authorization_params()["client_id"] == STATIC_ID
    assert [form["client_id"] for form in token_requests(result)] == [STATIC_ID]
    assert result.text == TEXT
    assert_static_client_token(result, stack)
    tokens = result.tokens
    assert tokens is not None
    assert tokens.refresh_token is not None
    assert StateCodec(STATE_SECRET.encode()).open(tokens.refresh_token) is None  # the IdP's
    assert documents.hits == 0


# -- the consent page, answered by the user agent ------------------------------------------------


class ConsentingBrowser(HeadlessBrowser):
    """Answers the sidecar's consent page as a person would: submits its form (the hidden
    sealed request and a decision) from the same session, so with the cookie the page set."""

    decision = "approve"

    async def answer_page(
        self, session: aiohttp.ClientSession, url: str, status: int, body: str
    ) -> str:
        action, request = FORM_ACTION.search(body), REQUEST_FIELD.search(body)
        if status != 200 or action is None or request is None:
            return await super().answer_page(session, url, status, body)
        target = urljoin(url, html.unescape(action.group(1)))
        form = {"request": html.unescape(request.group(1)), "decision": self.decision}
        async with session.post(target, data=form, allow_redirects=False) as response:
            location = response.headers.get("Location")
            self.hops.append(Hop("POST", target, response.status, location))
            if response.status != 303 or not location:
                text = (await response.text(errors="replace"))[:1000]
                raise BrowserError(f"POST {target} answered {response.status}: {text}")
        return location


class DenyingBrowser(ConsentingBrowser):
    decision = "deny"


async def test_sdk_signs_in_after_the_consent_page_is_approved_and_not_when_denied(
    tmp_path: Path, documents: Documents, pki: tuple[Path, Any]
) -> None:
    approving, denying = loopback_redirect(), loopback_redirect()
    url = document_client(documents, approving, denying)
    async with facade_stack(tmp_path, env=cimd_env(pki, trusted="none")) as stack:
        client = SdkOAuthClient(stack.sidecar.mcp_url, redirect_uri=approving,
                                client_metadata_url=url)
        client.browser = ConsentingBrowser
        approved = await client.session([("echo", {"text": TEXT})])
        refuser = SdkOAuthClient(stack.sidecar.mcp_url, redirect_uri=denying,
                                 client_metadata_url=url)
        refuser.browser = DenyingBrowser
        denied = await refuser.session(allow_failure=True)
    origin = stack.sidecar.origin

    assert_document_sign_in(approved, stack, url, approving)
    page, answer = approved.hops[:2]
    assert (endpoint(page.url), page.status, page.location) == (origin + "/authorize", 200, None)
    assert (answer.method, answer.url, answer.status) == ("POST", origin + "/authorize/consent",
                                                          303)
    assert answer.location is not None
    assert endpoint(answer.location) == stack.idp.issuer + "/auth"
    assert query_of(answer.location)["client_id"] == STATIC_ID
    assert approved.text == TEXT
    assert_static_client_token(approved, stack)
    [relayed] = stack.relay  # the denied sign-in never reached the token endpoint
    assert_relayed_as_static_client(relayed, stack)

    refused = find_exception(denied.error, AuthorizationDenied)
    assert refused is not None, denied.describe()
    assert refused.params == {
        "error": "access_denied", "error_description": "The user did not allow this client",
        "state": denied.authorization_params()["state"], "iss": origin}
    assert [(h.method, endpoint(h.url), h.status) for h in denied.hops] == [
        ("GET", origin + "/authorize", 200), ("POST", origin + "/authorize/consent", 303)]
    assert denied.hops[-1].location is not None
    assert endpoint(denied.hops[-1].location) == denying
    assert token_requests(denied) == []
    assert documents.hits == 1  # both sign-ins used the one cached document


# -- a native client's document names its loopback redirect without the port --------------------


async def test_a_document_listing_a_portless_loopback_redirect_signs_in_on_any_port(
    tmp_path: Path, documents: Documents, pki: tuple[Path, Any]
) -> None:
    """Claude Code's document lists http://localhost/callback and http://127.0.0.1/callback and
    it calls back on an ephemeral port: the authorization server must allow any port for a
    loopback redirect (RFC 8252 §7.3, RFC 9700 §2.1). The SDK, like it, listens on a free port
    its published document cannot know."""
    redirect = loopback_redirect()
    url = document_client(documents, "http://localhost/callback", "http://127.0.0.1/callback")
    async with facade_stack(tmp_path, env=cimd_env(pki)) as stack:
        client = SdkOAuthClient(stack.sidecar.mcp_url, redirect_uri=redirect,
                                client_metadata_url=url)
        result = await client.session([("echo", {"text": TEXT})])
        # The latitude is the port's only: another path or another host is still refused.
        for other in ("http://127.0.0.1:8080/other", "http://[::1]:8080/callback",
                      "https://127.0.0.1:8080/callback"):
            refused = await authorize_status(stack, url, other)
            assert refused == 400, other
    assert_document_sign_in(result, stack, url, redirect)
    assert result.text == TEXT
    assert_static_client_token(result, stack)
    [relayed] = stack.relay
    assert_relayed_as_static_client(relayed, stack)


async def authorize_status(stack: FacadeStack, client_id: str, redirect_uri: str) -> int:
    """The status of a GET /authorize for client_id with redirect_uri (redirects not followed)."""
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
             "state": "s", "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
             "code_challenge_method": "S256", "resource": stack.sidecar.mcp_url}
    timeout = aiohttp.ClientTimeout(total=10.0)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, session.get(
        stack.sidecar.origin + "/authorize", params=query, allow_redirects=False
    ) as response:
        return response.status
