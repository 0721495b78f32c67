"""The consent interstitial: a person approves a client the operator did not name.

Why: with Client ID Metadata Documents anyone can publish a client (a URL and a JSON document),
so a link to /authorize could start a sign-in for a client the user never chose, and an IdP that
remembers the user's consent would send the code straight on. Before relaying such a client to
the IdP, the sidecar shows one small page naming the client: its name as its document gives it
(anyone can write that) and the host of its document and redirect URI (nobody can fake those),
and what it wants to reach. Approve continues to the IdP; Deny answers the client with
access_denied.

The page is its own and only its own: no external asset, no script, not frameable
(frame-ancestors 'none', X-Frame-Options), never cached, no referrer. Its form leads only here
and where the answer redirects, the IdP's authorization endpoint or the client's redirect URI
(form-action: Chromium checks it on each redirect a form submission follows, so a bare 'self'
blocks both answers; tests/test_consent_browser.py clicks them in a real browser). The answer
is a POST that must carry the page's sealed request (single-use, expiring: state.py) and a
cookie the page set in the same browser (SameSite=Strict, HttpOnly), so another site cannot
approve on a user's behalf by posting the form itself (CSRF): it can obtain a sealed request of
its own, but never the cookie that goes with it.
"""

from __future__ import annotations

import hmac
import html
import re
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from oauth_sidecar.config.urls import SCHEME
from oauth_sidecar.signin.state import StateCodec, unsealed

COOKIE = "oauth_sidecar_consent"
SECURE_COOKIE = "__Host-" + COOKIE  # https: bound to this origin, never sent over http
CONSENT_PATH = "/authorize/consent"
CONSENT_FIELDS = ("id", "go", "r", "n")
MAX_FORM_BYTES = 16 * 1024
# The page's policy; {targets}: where its form's answer may redirect (form_targets).
POLICY = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'{targets}; "
          "frame-ancestors 'none'; base-uri 'none'")
# A host a CSP host-source can name (CSP3 §2.3.1: labels of letters, digits and "-"); anything
# else (an IPv6 literal, a name urlsplit let through with odd characters) gets its scheme only.
SOURCE_HOST = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)*")
HEADERS = {
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Allow {name_text}?</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 34rem; margin: 3rem auto;
       padding: 0 1rem; color: #1b1b1b; }}
.host {{ font-family: ui-monospace, monospace; background: #f1f1f1; padding: 0 .3rem; }}
.actions {{ display: flex; gap: 1rem; margin-top: 2rem; }}
button {{ font: inherit; padding: .5rem 1.5rem; cursor: pointer; }}
</style></head>
<body>
<h1>Allow <span id="client-name">{name_text}</span>?</h1>
<p>An application identified by <span class="host" id="client-host">{host}</span> asks to
use <span class="host" id="resource">{resource}</span> in your name. After you sign in, it
will be sent back to <span class="host" id="redirect-host">{redirect_host}</span>.</p>
<p>The name above is what the application says about itself; the hosts are where it really
lives. Continue only if you started this sign-in from an application you trust.</p>
<form method="post" action="{action}">
<input type="hidden" name="request" value="{request}">
<div class="actions">
<button type="submit" name="decision" value="approve" id="approve">Continue to sign in</button>
<button type="submit" name="decision" value="deny" id="deny">Deny</button>
</div></form>
</body></html>
"""


@dataclass(frozen=True, slots=True)
class Decision:
    id: str
    """The page's redemption id: each page is answered once (redemptions.py)."""
    expires: int
    approved: bool
    go: str
    """Approved: where to send the browser (the IdP's authorization URL)."""
    redirect_uri: str
    """Denied: where the client hears it (its redirect_uri, with the state in `params`)."""
    params: dict[str, str]


def form_targets(*urls: str) -> str:
    """CSP sources for the places the page's answer redirects to: scheme://host[:port] for an
    http(s) URL, the scheme alone for a native app's (cursor:) or a host CSP cannot spell. Only
    characters the patterns allow reach the header: a redirect URI comes from a document anyone
    can write, and a ";" would start a directive of theirs."""
    sources: list[str] = []
    for url in urls:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            continue
        if not SCHEME.fullmatch(parts.scheme):
            continue
        host = parts.hostname or ""
        if parts.scheme in ("http", "https") and SOURCE_HOST.fullmatch(host):
            source = f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")
        else:
            source = parts.scheme + ":"
        if source not in sources:
            sources.append(source)
    return " ".join(sources)


class ConsentRefused(Exception):
    """Not a valid answer to a page of ours (forged, replayed, expired, another browser's)."""


class Consent:
    def __init__(self, states: StateCodec, resource: str, *, secure: bool) -> None:
        """secure: the public origin is https (the cookie is then __Host- and Secure)."""
        self._states = states
        self._resource = resource
        self._secure = secure
        self.cookie = SECURE_COOKIE if secure else COOKIE

    def page(self, *, client_name: str | None, host: str, redirect_host: str, go: str,
             redirect_uri: str, deny_params: dict[str, str]) -> web.Response:
        """The interstitial for one authorization request: `go` is where Approve leads,
        `redirect_uri` with `deny_params` where Deny does."""
        nonce = secrets.token_urlsafe(24)
        sealed = self._states.seal({"kind": "consent", "go": go, "r": redirect_uri,
                                    "p": deny_params, "n": nonce})
        name_text = html.escape(client_name or host, quote=True)
        body = PAGE.format(name_text=name_text, host=html.escape(host, quote=True),
                           resource=html.escape(self._resource, quote=True),
                           redirect_host=html.escape(redirect_host, quote=True),
                           action=CONSENT_PATH, request=html.escape(sealed, quote=True))
        targets = form_targets(go, redirect_uri)
        policy = POLICY.format(targets=f" {targets}" if targets else "")
        response = web.Response(status=200, text=body, content_type="text/html", headers={
            "Content-Security-Policy": policy, **HEADERS})
        response.set_cookie(self.cookie, nonce, path="/", secure=self._secure, httponly=True,
                            samesite="Strict", max_age=600)
        return response

    def decision(self, form: dict[str, str], cookies: dict[str, str]) -> Decision:
        """The person's answer; ConsentRefused unless it is from the page this browser got."""
        values: dict[str, Any] | None = unsealed(self._states, form.get("request"), "consent",
                                                 CONSENT_FIELDS)
        cookie = cookies.get(self.cookie)
        if values is None or cookie is None or not hmac.compare_digest(
                cookie.encode(), str(values["n"]).encode()):
            raise ConsentRefused
        choice = form.get("decision")
        if choice not in ("approve", "deny"):
            raise ConsentRefused
        params = values.get("p")
        if not isinstance(params, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
            raise ConsentRefused
        return Decision(values["id"], int(values["exp"]), choice == "approve", values["go"],
                        values["r"], params)

    def forget(self, response: web.StreamResponse) -> None:
        """The answer's response clears the cookie: one page, one answer."""
        response.del_cookie(self.cookie, path="/", secure=self._secure, httponly=True,
                            samesite="Strict")
