"""Header hygiene between the caller and the upstream, both ways.

Why a module of its own: which headers may cross is a security decision made per header name,
and it is the proxy's hot path. Upstream, the caller's credentials, hop-by-hop fields, method and
URL overrides and every identity another front end would vouch for are dropped (only the token
and the TCP peer are believed here), then the sidecar's own forwarding and identity headers are
added. Downstream, the upstream's software banner, its own challenge, hop-by-hop fields and CORS
headers are dropped, and its self-references are rewritten to public URLs. The drop lists are
precomputed, and each distinct header name's verdict is remembered (bounded).
"""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy

from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.client_ip import ClientAddress, forwarded_chain
from oauth_sidecar.config import Config
from oauth_sidecar.request_keys import Principal
from oauth_sidecar.upstream.credential import UpstreamCredential
from oauth_sidecar.upstream.paths import LocationRewriter

# RFC 9110 §7.6.1 hop-by-hop fields, plus the non-standard ones proxies also drop.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})  # fmt: skip
# Never upstream: the caller's credentials, its Host/Origin, framing we recompute, and the
# forwarding headers we set ourselves.
REQUEST_DROP = HOP_BY_HOP | {"authorization", "cookie", "host", "origin", "expect", "forwarded"}
# They change the method or path the upstream acts on after we authenticated another (Rails and
# Express method-override, Symfony and IIS URL rewriting), or the host it builds URLs from.
OVERRIDE_HEADERS = frozenset({
    "x-http-method-override", "x-http-method", "x-method-override", "x-original-url",
    "x-rewrite-url", "x-original-method", "x-host", "x-http-host-override", "x-original-host",
})  # fmt: skip
# Identities, client addresses and the original scheme and host that other front ends vouch
# for: here only the token and the TCP peer do, so a caller's copies never reach the upstream.
IDENTITY_HEADERS = frozenset({
    "remote-user", "x-remote-user", "x-user", "x-webauth-user", "x-authenticated-user",
    "x-authenticated-users", "x-authenticated-userid", "true-client-ip", "cf-connecting-ip",
    "x-real-ip", "x-client-ip", "x-cluster-client-ip", "fastly-client-ip", "x-originating-ip",
})  # fmt: skip
IDENTITY_PREFIXES = (
    "x-forwarded-", "x-auth-request-", "x-user-",
    "x-goog-authenticated-user-", "x-ms-client-principal", "x-amzn-oidc-", "cf-access-",
)  # Google IAP, Azure App Service, AWS ALB and Cloudflare Access identities
# MCP's per-call parameter headers may carry any token character in their names (`_`, `.`).
MCP_PARAM_PREFIX = "mcp-param-"
# A name with another separator than "-" is what WSGI/CGI/PHP servers confuse with a real one
# (PEP 3333 environ: `Mcp_Session_Id` and `Mcp-Session-Id` are both HTTP_MCP_SESSION_ID).
PLAIN_NAME = re.compile(r"[a-z0-9-]+")
# The filter remembers its verdict per distinct header name, at most this many names of at most
# this length (about 150 KB); other names are decided each time, so callers cannot grow it.
MAX_VERDICTS, MAX_REMEMBERED_NAME = 1024, 64
RESPONSE_DROP = HOP_BY_HOP | {
    # They name the upstream's software and version; our own Server header applies.
    "server", "x-powered-by", "x-aspnet-version", "x-aspnetmvc-version",
    # A challenge of the upstream's own protection space (its resource_metadata, often an
    # internal URL): MCP clients would follow it away from the sidecar, which is theirs.
    "www-authenticate",
}
RESPONSE_DROP_PREFIXES = ("access-control-",)  # our CORS headers win (cors.py)
# URLs the upstream names itself by: given back under the public origin (paths.py).
RESPONSE_REWRITTEN = frozenset({"location", "content-location"})
# Identity headers carry printable ASCII only; anything else (and "%", "," inside a group name)
# is percent-encoded so a claim can never split or inject a header. A lone surrogate (JSON's
# "\ud800", in a JWT's payload or an introspection answer) is encoded as its own three bytes
# (surrogatepass), never a UnicodeEncodeError (a 500); no valid UTF-8 text encodes to them.
HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "%,")


def connection_named(headers: CIMultiDictProxy[str]) -> set[str]:
    """Fields listed in every Connection header line are hop-by-hop too (RFC 9110 §7.6.1)."""
    names = ",".join(headers.getall("Connection", [])).split(",")
    return {name.strip().lower() for name in names if name.strip()}


def header_value(value: str) -> str:
    return quote(value, safe=HEADER_SAFE, errors="surrogatepass")


class HeaderFilter:
    """The request headers the upstream gets, and the response headers the caller gets."""

    def __init__(
        self, config: Config, *, policy: AccessPolicy, addresses: ClientAddress,
        locations: LocationRewriter, credential: UpstreamCredential | None = None,
    ) -> None:
        self._policy = policy
        self._addresses = addresses
        self._locations = locations
        self._credential = credential
        self._forward_identity = config.forward_identity
        public = urlsplit(config.resource_url)
        self._forwarded_proto = public.scheme
        self._forwarded_host = public.netloc
        strip = config.strip_request_headers
        self._drop = REQUEST_DROP | OVERRIDE_HEADERS | IDENTITY_HEADERS | {
            name for name in strip if not name.endswith("*")}
        self._drop_prefixes = IDENTITY_PREFIXES + tuple(
            name.removesuffix("*") for name in strip if name.endswith("*"))
        self._verdicts: dict[str, str | None] = {}
        """Header name as sent -> _verdict(name): decided once per distinct name."""

    def request(self, request: web.Request, principal: Principal) -> dict[str, str]:
        """The caller's headers less everything on the drop lists, in one pass, then ours."""
        headers: dict[str, str] = {}
        named = connection_named(request.headers)
        verdicts = self._verdicts
        for name, value in request.headers.items():
            lower = verdicts.get(name, "")
            if lower == "":  # a name not seen before
                lower = self._verdict(name)
                if len(verdicts) < MAX_VERDICTS and len(name) <= MAX_REMEMBERED_NAME:
                    verdicts[name] = lower
            if lower is None or lower in named:
                continue
            if lower in headers:  # repeated lines, any case: one list (RFC 9110 §5.3)
                headers[lower] += ", " + value
            else:
                headers[lower] = value
        headers["x-forwarded-for"] = self._addresses.forwarded_for(
            request.remote, forwarded_chain(request.headers)
        )
        self._add_own(headers, principal)
        return headers

    def own(self, principal: Principal) -> dict[str, str]:
        """The headers the sidecar itself sends with a request of this caller, less
        X-Forwarded-For (it needs the request): `check --token` asks the upstream with these."""
        headers: dict[str, str] = {}
        self._add_own(headers, principal)
        return headers

    def _add_own(self, headers: dict[str, str], principal: Principal) -> None:
        headers["x-forwarded-proto"] = self._forwarded_proto
        headers["x-forwarded-host"] = self._forwarded_host
        if self._credential is not None and self._credential.authorization:
            headers["authorization"] = self._credential.authorization
        if self._forward_identity:
            self._add_identity(headers, principal)

    def _verdict(self, name: str) -> str | None:
        """The lowercase name a caller's header goes upstream under; None: it never does."""
        lower = key = name.lower()
        if not PLAIN_NAME.fullmatch(lower):
            if not lower.startswith(MCP_PARAM_PREFIX):
                return None  # X_Forwarded_User, Mcp.Session.Id, "_": what nginx drops too
            key = lower.replace("_", "-")  # for the drop lists only: sent as it came
        if key in self._drop or key.startswith(self._drop_prefixes):
            return None
        return lower

    def _add_identity(self, headers: dict[str, str], principal: Principal) -> None:
        """X-Forwarded-User/Email/Groups/Issuer; caller copies were dropped above."""
        headers["x-forwarded-user"] = header_value(principal.subject)
        headers["x-forwarded-issuer"] = header_value(principal.issuer)
        email = self._policy.verified_email(principal.claims)
        if email is not None:
            headers["x-forwarded-email"] = header_value(email)
        groups = self._policy.groups(principal.claims)
        if groups:
            headers["x-forwarded-groups"] = ",".join(header_value(g) for g in groups)

    def response(self, upstream: aiohttp.ClientResponse, response: web.StreamResponse) -> None:
        """The upstream's headers onto our response, less the drop lists; its own URLs given
        back under the public origin (never its internal address)."""
        named = connection_named(upstream.headers)
        for name, value in upstream.headers.items():
            lower = name.lower()
            if lower in RESPONSE_DROP or lower in named or lower.startswith(RESPONSE_DROP_PREFIXES):
                continue
            if lower in RESPONSE_REWRITTEN:
                public = self._locations.rewrite(value)
                if public is not None:  # None: no public URL reaches it; never its address
                    response.headers.add(name, public)
                continue
            response.headers.add(name, value)
