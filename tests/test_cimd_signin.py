"""Sign-in with a Client ID Metadata Document through the real facade.

The client's document is served by a real https server on 127.0.0.1 with a certificate from a
throwaway CA (CIMD_CA_FILE), for the name `localhost`; the development setting
CIMD_ALLOW_PRIVATE_ADDRESSES=true lets the sidecar fetch it there (the SSRF rules themselves are
tested in test_client_documents.py, refusing before any connection). The IdP is the fake one of
conftest with the recording token endpoint of test_authserver.py.
"""

from __future__ import annotations

import html
import ipaddress
import json
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import FakeIdp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_authserver import (
    CALLBACK,
    CLIENT_ID,
    FACADE,
    ISSUER,
    TOKEN_RESPONSE,
    VERIFIER,
    Client,
    Reply,
    Start,
    TokenEndpoint,
    authorize_params,
    basic,
    call,
    form,
    idp_answers,
    start,
    token_endpoint,
)

from oauth_sidecar.signin.consent import form_targets

__all__ = ["start", "token_endpoint"]  # fixtures of test_authserver.py, used here too

REDIRECT = "https://client.example.test/callback"
REQUEST_FIELD = re.compile(r'name="request" value="([^"]+)"')


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


@dataclass(frozen=True)
class Pki:
    """A throwaway CA (ca_file) and a certificate it signed (cert_file, key_file)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def throwaway_pki(folder: Path, *names: str) -> Pki:
    """A throwaway CA and a server certificate for `names` (DNS names) and 127.0.0.1."""
    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("cimd test CA"))
          .issuer_name(_name("cimd test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    alternatives: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alternatives.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pki = Pki(*(folder / n for n in ("ca.pem", "cert.pem", "key.pem")))
    pki.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    """A throwaway CA, and a server context for `localhost` and 127.0.0.1 signed by it."""
    made = throwaway_pki(tmp_path_factory.mktemp("cimd-pki"), "localhost")
    return made.ca_file, made.server_context()


@dataclass
class Documents:
    port: int = 0
    served: dict[str, Any] = field(default_factory=dict)
    hits: int = 0

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"

    def client(self, path: str = "/client.json", **changes: Any) -> str:
        url = self.url(path)
        self.served[path] = {"client_id": url, "client_name": "Example <b>Client</b>",
                             "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none",
                             "grant_types": ["authorization_code", "refresh_token"],
                             "response_types": ["code"], **changes}
        return url

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if request.path not in self.served:
            raise web.HTTPNotFound
        return web.json_response(self.served[request.path])


@pytest.fixture
async def documents(pki: tuple[Path, ssl.SSLContext]) -> AsyncIterator[Documents]:
    served = Documents()
    app = web.Application()
    app.router.add_get("/{tail:.*}", served.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=pki[1])
    await site.start()
    served.port = runner.addresses[0][1]
    try:
        yield served
    finally:
        await runner.cleanup()


def cimd_env(pki: tuple[Path, ssl.SSLContext], **extra: str) -> dict[str, str]:
    return {**FACADE, "STATIC_CLIENT_SECRET": "static-secret-0123", "CIMD_CA_FILE": str(pki[0]),
            "CIMD_ALLOW_PRIVATE_ADDRESSES": "true", "CIMD_TRUSTED_HOSTS": "none", **extra}


def consent_request(page: Reply) -> str:
    found = REQUEST_FIELD.search(page.text)
    assert found is not None, page.text
    return html.unescape(found.group(1))


def cookie_of(page: Reply) -> tuple[str, str]:
    header = page.headers["Set-Cookie"]
    name, _, rest = header.partition("=")
    return name, rest.partition(";")[0]


async def answer(client: Client, page: Reply, decision: str, *,
                 cookie: tuple[str, str] | None = None) -> Reply:
    name, value = cookie or cookie_of(page)
    sent = form(request=consent_request(page), decision=decision)
    sent["headers"]["Cookie"] = f"{name}={value}"
    return await call(client, "POST", "/authorize/consent", **sent)


# -- authorization ---------------------------------------------------------------------------


async def test_a_trusted_document_client_goes_straight_to_the_idp_as_the_static_client(
    start: Start, documents: Documents, pki: Any, idp: FakeIdp
) -> None:
    client = await start(**cimd_env(pki, CIMD_TRUSTED_HOSTS="localhost"))
    url = documents.client()
    reply = await call(client, "GET", "/authorize",
                       params=authorize_params(client_id=url, redirect_uri=REDIRECT))
    assert reply.status == 302, reply.text
    base, query = reply.target()
    params = dict(query)
    assert base == idp.origin + "/authorize"
    assert params["client_id"] == CLIENT_ID  # the IdP only knows ours
    assert params["redirect_uri"] == CALLBACK
    metadata = (await call(client, "GET", "/.well-known/oauth-authorization-server")).json()
    assert metadata["client_id_metadata_document_supported"] is True
    assert "none" in metadata["token_endpoint_auth_methods_supported"]


async def test_an_untrusted_client_gets_the_consent_page(
    start: Start, documents: Documents, pki: Any, idp: FakeIdp
) -> None:
    client = await start(**cimd_env(pki))
    url = documents.client()
    page = await call(client, "GET", "/authorize",
                      params=authorize_params(client_id=url, redirect_uri=REDIRECT))
    assert page.status == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    # The form's answer redirects to the IdP or the client: a browser checks form-action on
    # each redirect (test_consent_browser.py clicks both buttons in Chromium).
    assert (f"form-action 'self' {idp.origin} https://client.example.test;"
            in page.headers["Content-Security-Policy"])
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Cache-Control"] == "no-store"
    cookie = page.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert cookie.startswith("__Host-")  # RESOURCE_URL is https
    assert "Secure" in cookie
    assert "Example &lt;b&gt;Client&lt;/b&gt;" in page.text  # the name, escaped
    assert ">localhost</span>" in page.text  # where the document lives
    assert ">client.example.test</span>" in page.text  # where the code would go
    assert "<script" not in page.text
    assert "http" not in page.text.split("<body>")[0].replace("https://mcp.example.test", "")


def test_the_pages_form_targets_are_origins_or_schemes_and_never_more_text() -> None:
    assert form_targets("https://idp.example/authorize?x=1", "https://client.example:8443/cb"
                        ) == "https://idp.example https://client.example:8443"
    assert form_targets("http://127.0.0.1:33418/callback", "cursor://anysphere/cb",
                        "http://[::1]:8080/cb", "http://127.0.0.1:33418/other"
                        ) == "http://127.0.0.1:33418 cursor: http:"
    # A document's redirect URI is anyone's text: a host CSP cannot spell is its scheme only.
    assert form_targets("https://a;script-src *;/cb", "https://a b/cb") == "https:"
    assert form_targets("https://x:99999/cb", "1http://x/") == ""


async def test_approve_continues_to_the_idp_and_deny_tells_the_client(
    start: Start, documents: Documents, pki: Any, idp: FakeIdp
) -> None:
    client = await start(**cimd_env(pki))
    url = documents.client()
    params = authorize_params(client_id=url, redirect_uri=REDIRECT)
    page = await call(client, "GET", "/authorize", params=params)
    approved = await answer(client, page, "approve")
    assert approved.status == 303, approved.text
    base, query = approved.target()
    assert base == idp.origin + "/authorize"
    assert dict(query)["client_id"] == CLIENT_ID
    assert "Max-Age=0" in approved.headers["Set-Cookie"] or 'expires' in approved.headers[
        "Set-Cookie"].lower()
    page = await call(client, "GET", "/authorize", params=params)
    denied = await answer(client, page, "deny")
    assert denied.status == 303
    base, query = denied.target()
    assert base == REDIRECT
    assert dict(query) == {"error": "access_denied",
                           "error_description": "The user did not allow this client",
                           "state": "client-state-42", "iss": ISSUER}


async def test_the_consent_answer_needs_this_browsers_cookie_and_is_used_once(
    start: Start, documents: Documents, pki: Any
) -> None:
    client = await start(**cimd_env(pki))
    params = authorize_params(client_id=documents.client(), redirect_uri=REDIRECT)
    page = await call(client, "GET", "/authorize", params=params)
    other = await call(client, "GET", "/authorize", params=params)  # another browser's page
    name, _ = cookie_of(page)
    assert (await answer(client, page, "approve", cookie=(name, "forged"))).status == 400
    assert (await answer(client, page, "approve", cookie=cookie_of(other))).status == 400
    no_cookie = await call(client, "POST", "/authorize/consent",
                           **form(request=consent_request(page), decision="approve"))
    assert no_cookie.status == 400
    assert "Location" not in no_cookie.headers
    assert (await answer(client, page, "approve")).status == 303
    assert (await answer(client, page, "approve")).status == 400  # replayed
    assert (await answer(client, other, "maybe")).status == 400


async def test_a_redirect_uri_not_in_the_document_is_refused_without_a_redirect(
    start: Start, documents: Documents, pki: Any
) -> None:
    client = await start(**cimd_env(pki))
    url = documents.client()
    for redirect in ("https://evil.example/callback", "https://client.example.test/callback/x"):
        reply = await call(client, "GET", "/authorize",
                           params=authorize_params(client_id=url, redirect_uri=redirect))
        assert reply.status == 400
        assert "Location" not in reply.headers


async def test_a_refused_document_is_invalid_client_without_a_redirect(
    start: Start, documents: Documents, pki: Any
) -> None:
    client = await start(**cimd_env(pki))
    url = documents.client(client_id="https://localhost/another.json")
    reply = await call(client, "GET", "/authorize",
                       params=authorize_params(client_id=url, redirect_uri=REDIRECT))
    assert reply.status == 400
    assert reply.json()["error"] == "invalid_client"
    assert "Location" not in reply.headers


async def test_with_cimd_off_a_url_client_id_is_unknown_and_not_advertised(
    start: Start, documents: Documents, pki: Any
) -> None:
    client = await start(**cimd_env(pki, CIMD="off"))
    reply = await call(client, "GET", "/authorize",
                       params=authorize_params(client_id=documents.client(),
                                               redirect_uri=REDIRECT))
    assert reply.status == 400
    assert documents.hits == 0
    metadata = (await call(client, "GET", "/.well-known/oauth-authorization-server")).json()
    assert "client_id_metadata_document_supported" not in metadata


# -- tokens ----------------------------------------------------------------------------------


async def document_client_code(client: Client, idp: FakeIdp, url: str) -> str:
    page = await call(client, "GET", "/authorize",
                      params=authorize_params(client_id=url, redirect_uri=REDIRECT))
    approved = await answer(client, page, "approve")
    state = dict(approved.target()[1])["state"]
    back = await idp_answers(client, code="idp-code-1", state=state, iss=idp.issuer)
    assert back.status == 302, back.text
    base, query = back.target()
    assert base == REDIRECT
    return dict(query)["code"]


async def test_code_and_refresh_token_are_bound_to_the_document_client(
    start: Start, documents: Documents, pki: Any, idp: FakeIdp, token_endpoint: TokenEndpoint
) -> None:
    client = await start(**cimd_env(pki))
    url, other = documents.client(), documents.client("/other.json")
    code = await document_client_code(client, idp, url)
    stolen = await call(client, "POST", "/token", **form(
        grant_type="authorization_code", code=code, redirect_uri=REDIRECT,
        code_verifier=VERIFIER, client_id=other))
    assert stolen.status == 400
    assert token_endpoint.calls == []
    code = await document_client_code(client, idp, url)
    reply = await call(client, "POST", "/token", **form(
        grant_type="authorization_code", code=code, redirect_uri=REDIRECT,
        code_verifier=VERIFIER, client_id=url))
    assert reply.status == 200, reply.text
    sent = dict(token_endpoint.last.form)
    assert sent["client_id"] == CLIENT_ID
    assert sent["code"] == "idp-code-1"
    assert sent["redirect_uri"] == CALLBACK
    assert token_endpoint.last.headers["Authorization"] == basic(CLIENT_ID, "static-secret-0123")
    tokens = reply.json()
    assert tokens["access_token"] == TOKEN_RESPONSE["access_token"]
    sealed = tokens["refresh_token"]
    assert sealed != TOKEN_RESPONSE["refresh_token"]
    assert str(TOKEN_RESPONSE["refresh_token"]) not in reply.text
    token_endpoint.calls.clear()

    for thief in (other, CLIENT_ID):
        refused = await call(client, "POST", "/token", **form(
            grant_type="refresh_token", refresh_token=sealed, client_id=thief))
        if thief == other:
            assert refused.status == 400
            assert refused.json()["error"] == "invalid_grant"
        else:  # the static client gets no secret lent to a blob the IdP never issued
            assert dict(token_endpoint.last.form)["refresh_token"] == sealed
            token_endpoint.calls.clear()
    assert token_endpoint.calls == []
    refreshed = await call(client, "POST", "/token", **form(
        grant_type="refresh_token", refresh_token=sealed, client_id=url))
    assert refreshed.status == 200, refreshed.text
    sent = dict(token_endpoint.last.form)
    assert sent["refresh_token"] == TOKEN_RESPONSE["refresh_token"]
    assert sent["client_id"] == CLIENT_ID
    assert json.loads(refreshed.text)["refresh_token"] != TOKEN_RESPONSE["refresh_token"]


def test_a_refresh_token_too_long_to_seal_is_never_handed_out_unbound() -> None:
    from oauth_sidecar.signin.bound_refresh import open_for, seal_answer
    from oauth_sidecar.signin.state import StateCodec
    from oauth_sidecar.signin.token_request import TokenRefused

    states = StateCodec(b"k" * 32)
    url = "https://client.example.test/client.json"
    short = json.loads(seal_answer(states, json.dumps(TOKEN_RESPONSE).encode(), url))
    fields = {"refresh_token": short["refresh_token"]}
    open_for(states, fields, url)
    assert fields["refresh_token"] == TOKEN_RESPONSE["refresh_token"]
    with pytest.raises(TokenRefused):
        open_for(states, {"refresh_token": short["refresh_token"]}, url + "x")
    huge = {**TOKEN_RESPONSE, "refresh_token": "r" * 9000}
    answer = json.loads(seal_answer(states, json.dumps(huge).encode(), url))
    assert "refresh_token" not in answer
    assert answer["access_token"] == TOKEN_RESPONSE["access_token"]
    assert seal_answer(states, b"not json", url) == b"not json"
