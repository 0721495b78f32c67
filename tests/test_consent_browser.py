"""The consent page in a real browser: headless Chromium (tests/chromium.py) against the real
sidecar.

The sidecar serves https with a throwaway CA's certificate for mcp.example.test, the public
origin of conftest's RESOURCE_URL, and the browser resolves that name to the sidecar's loopback
port and trusts exactly that certificate's key. So the browser sees what a user's does: the
__Host- cookie (Secure, SameSite=Strict, HttpOnly; a browser keeps no Secure cookie from plain
http), a same-origin form, a cross-site attacker on another origin (http://127.0.0.1:PORT). The
client's document is on a second https server (test_cimd_signin.py); the IdP is conftest's fake
one, whose /authorize the browser reaches and which answers 404: where the browser went is what
counts. The client's redirect_uri host does not resolve; the browser's request to it is seen all
the same (Network.requestWillBeSent).
"""

from __future__ import annotations

import html
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import pytest
from aiohttp import web
from chromium import EXECUTABLE, Browser, Tab, browser, spki_hash
from conftest import FakeIdp
from test_authserver import CLIENT_ID, ISSUER, Start, authorize_params, start, token_endpoint
from test_cimd_signin import (
    REDIRECT,
    REQUEST_FIELD,
    Documents,
    Pki,
    cimd_env,
    documents,
    throwaway_pki,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(EXECUTABLE is None, reason="chromium is not installed (.ci/run installs "
                       "Debian's package; this machine has none)"),
]
__all__ = ["documents", "start", "token_endpoint"]  # fixtures of other modules, used here

PUBLIC_HOST = urlsplit(ISSUER).hostname or ""
COOKIE = "__Host-oauth_sidecar_consent"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10.0)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One certificate for the sidecar (mcp.example.test) and the document server (localhost)."""
    return throwaway_pki(tmp_path_factory.mktemp("browser-pki"), "localhost", PUBLIC_HOST)


@pytest.fixture(scope="module")
def pki(tls: Pki) -> tuple[Path, ssl.SSLContext]:
    """test_cimd_signin's `documents` server, with this module's certificate."""
    return tls.ca_file, tls.server_context()


@dataclass
class OtherSite:
    """Another origin, for the attacker's pages: path -> HTML."""

    pages: dict[str, str] = field(default_factory=dict)
    origin: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path not in self.pages:
            raise web.HTTPNotFound
        return web.Response(text=self.pages[request.path], content_type="text/html")


@pytest.fixture
async def other_site() -> AsyncIterator[OtherSite]:
    site = OtherSite()
    app = web.Application()
    app.router.add_get("/{tail:.*}", site.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    site.origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield site
    finally:
        await runner.cleanup()


@dataclass
class Scene:
    browser: Browser
    port: int
    """The sidecar's loopback port (the browser knows it as https://mcp.example.test)."""
    authorize: str
    """A document client's authorization request URL, at the public origin."""
    idp: FakeIdp
    ca_file: Path


@pytest.fixture
async def scene(start: Start, documents: Documents, pki: tuple[Path, ssl.SSLContext], tls: Pki,
                idp: FakeIdp) -> AsyncIterator[Scene]:
    client = await start(ssl=tls.server_context(), **cimd_env(pki))
    assert client.server.port is not None
    query = urlencode(authorize_params(client_id=documents.client(), redirect_uri=REDIRECT))
    async with browser(hosts={PUBLIC_HOST: f"127.0.0.1:{client.server.port}"},
                       trusted_keys=(spki_hash(tls.cert_file.read_bytes()),)) as chromium:
        yield Scene(chromium, client.server.port, f"{ISSUER}/authorize?{query}", idp,
                    tls.ca_file)


async def consent_page(scene: Scene) -> Tab:
    tab = await scene.browser.new_tab()
    await tab.navigate(scene.authorize)
    assert tab.responses() == [(scene.authorize, 200)]
    return tab


def query_of(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


async def test_the_page_renders_the_client_escaped_and_approve_leads_to_the_idp(
    scene: Scene,
) -> None:
    tab = await consent_page(scene)
    text = await tab.evaluate("""({
        name: document.getElementById('client-name').textContent,
        host: document.getElementById('client-host').textContent,
        redirect: document.getElementById('redirect-host').textContent,
        resource: document.getElementById('resource').textContent,
        bold: document.querySelectorAll('b, script').length,
        title: document.title})""")
    assert text == {"name": "Example <b>Client</b>", "host": "localhost",
                    "redirect": "client.example.test", "resource": "https://mcp.example.test/mcp",
                    "bold": 0, "title": "Allow Example <b>Client</b>?"}
    [cookie] = [c for c in await tab.cookies() if c["name"] == COOKIE]
    assert (cookie["domain"], cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (
        PUBLIC_HOST, True, True, "Strict")

    mark = len(tab.events)
    await tab.click_and_wait("#approve")
    visited = tab.documents(mark)
    assert visited[0] == f"{ISSUER}/authorize/consent"
    assert tab.cookies_sent(visited[0], mark) == {COOKIE: []}  # sent: same site
    assert visited[-1].startswith(scene.idp.origin + "/authorize?")
    assert query_of(visited[-1])["client_id"] == CLIENT_ID
    assert query_of(visited[-1])["redirect_uri"] == ISSUER + "/oauth/callback"
    assert await tab.evaluate("location.href") == visited[-1]  # it got there (the IdP's 404)
    assert not [c for c in await tab.cookies() if c["name"] == COOKIE]  # one page, one answer


async def test_deny_leads_to_the_clients_redirect_uri_with_access_denied(scene: Scene) -> None:
    tab = await consent_page(scene)
    mark = len(tab.events)
    await tab.click_and_wait("#deny")
    visited = tab.documents(mark)
    assert visited[-1].startswith(REDIRECT + "?")
    assert query_of(visited[-1]) == {"error": "access_denied",
                                     "error_description": "The user did not allow this client",
                                     "state": "client-state-42", "iss": ISSUER}
    assert not any(url.startswith(scene.idp.origin) for url in visited)


async def test_another_site_cannot_frame_the_page(scene: Scene, other_site: OtherSite) -> None:
    control = f"{ISSUER}/.well-known/oauth-authorization-server"  # frameable: the harness sees it
    other_site.pages["/frame"] = (f'<iframe src="{html.escape(scene.authorize)}"></iframe>'
                                  f'<iframe src="{html.escape(control)}"></iframe>')
    tab = await scene.browser.new_tab()
    await tab.navigate(other_site.origin + "/frame")
    assert dict(tab.responses())[scene.authorize] == 200  # the sidecar answered, with the page
    assert (scene.authorize, "net::ERR_BLOCKED_BY_RESPONSE") in tab.failures()
    assert control not in dict(tab.failures())
    assert dict(tab.responses())[control] == 200
    assert any("frame-ancestors 'none'" in message for message in tab.messages())


async def test_another_site_cannot_answer_for_the_user(
    scene: Scene, other_site: OtherSite
) -> None:
    """CSRF: a page on another origin posts the consent form itself, with approve. Whether its
    request value is one it fetched itself (bound to a cookie of its own) or the very one of the
    page this browser holds (read here from the page, as if it had leaked), SameSite=Strict keeps
    the browser's cookie back, the sidecar refuses and the browser never reaches the IdP. The
    page's own button works afterwards with that same request value: the refusal was the cookie."""
    page = await consent_page(scene)
    leaked = await page.evaluate("document.querySelector('input[name=request]').value")
    assert isinstance(leaked, str)
    fetched = await fetched_request(scene)
    assert fetched != leaked
    consent = f"{ISSUER}/authorize/consent"
    for request in (fetched, leaked):
        other_site.pages["/csrf"] = (
            f'<form id="f" method="post" action="{consent}">'
            f'<input type="hidden" name="request" value="{html.escape(request)}">'
            '<input type="hidden" name="decision" value="approve"></form>'
            "<script>document.getElementById('f').submit()</script>")
        attacker = await scene.browser.new_tab()
        await attacker.send("Page.navigate", {"url": other_site.origin + "/csrf"})
        await attacker.wait_loaded(consent)
        assert attacker.documents() == [other_site.origin + "/csrf", consent]
        # Withheld for SameSite=Strict (Chromium names it SchemefulSameSiteStrict when the
        # sites differ in scheme too, as http://127.0.0.1 and https://mcp.example.test do).
        [reason] = attacker.cookies_sent(consent)[COOKIE]
        assert reason.endswith("SameSiteStrict")
        assert attacker.responses()[-1] == (consent, 400)
        assert "start the sign-in again" in await attacker.evaluate("document.body.textContent")

    mark = len(page.events)
    await page.click_and_wait("#approve")
    assert page.cookies_sent(consent, mark) == {COOKIE: []}
    assert page.documents(mark)[-1].startswith(scene.idp.origin + "/authorize?")


async def fetched_request(scene: Scene) -> str:
    """The request value of a consent page the test fetches for itself, as an attacker can."""
    context = ssl.create_default_context(cafile=scene.ca_file)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT, trust_env=False) as http:
        url = scene.authorize.replace(ISSUER, f"https://127.0.0.1:{scene.port}")
        async with http.get(url, ssl=context) as response:
            assert response.status == 200
            assert COOKIE in response.cookies
            found = REQUEST_FIELD.search(await response.text())
    assert found is not None
    return html.unescape(found.group(1))
