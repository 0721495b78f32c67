"""The IdP discovery document and JWKS cache, against real aiohttp servers on loopback.

Most tests drive `IdentityProvider` directly (with a `TokenVerifier` on top to prove keys still
verify tokens); the start-up, flood and rotation stories also run through the production app.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import (
    AUDIENCE,
    FakeIdp,
    SidecarFactory,
    SigningKey,
    bearer,
    new_ec,
    new_ed25519,
    new_rsa,
    wait_until,
)
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from structlog.testing import capture_logs

from oauth_sidecar.app import IDP
from oauth_sidecar.auth.bearer import TokenError
from oauth_sidecar.auth.idp import (
    MAX_KEYS,
    IdentityProvider,
    IdpError,
    VerificationKey,
    discovery_urls,
    parse_jwks,
    same_issuer,
)
from oauth_sidecar.auth.tokens import TokenVerifier
from oauth_sidecar.config import DEFAULT_ALGORITHMS, IdpConfig, TokenConfig

Client = TestClient[web.Request, web.Application]
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]

ALGORITHMS = frozenset(DEFAULT_ALGORITHMS.split(","))
MIB = 1 << 20


# --- helpers ---------------------------------------------------------------------------------


@dataclass
class Site:
    """A loopback HTTP server whose paths a test fills in by hand; unknown paths are 404."""

    server: TestServer
    routes: dict[str, Route] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def count(self, path: str) -> int:
        return self.hits.count(path)

    def json(self, path: str, document: Any, headers: dict[str, str] | None = None) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            return web.json_response(document, headers=headers)

        self.routes[path] = handle


@asynccontextmanager
async def serve() -> AsyncIterator[Site]:
    site: Site

    async def dispatch(request: web.Request) -> web.StreamResponse:
        site.hits.append(request.path)
        route = site.routes.get(request.path)
        if route is None:
            raise web.HTTPNotFound
        return await route(request)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", dispatch)
    server = TestServer(app, host="127.0.0.1")
    site = Site(server)
    await server.start_server()
    try:
        yield site
    finally:
        await server.close()


def idp_config(
    issuer: str, *, timeout: float = 2.0, cooldown: float = 0.1, refresh: float = 3600.0
) -> IdpConfig:
    return IdpConfig(issuer=issuer, timeout=timeout, jwks_cooldown=cooldown, jwks_refresh=refresh)


def verifier_config(issuer: str) -> TokenConfig:
    return TokenConfig(
        issuer=issuer, audiences=(AUDIENCE,), algorithms=ALGORITHMS, leeway=30,
        max_token_bytes=16384, cache_size=0,
    )


def verifier_for(issuer: str, provider: IdentityProvider) -> TokenVerifier:
    """No token cache: every verify looks the key up in the provider's current set."""
    return TokenVerifier(verifier_config(issuer), provider)


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [k.jwk() for k in keys]}


def serve_idp(site: Site, issuer: str, key: SigningKey, discovery_path: str) -> None:
    """An IdP on `site` whose metadata lives only at `discovery_path`."""
    site.json(discovery_path, {"issuer": issuer, "jwks_uri": site.origin + "/jwks"})
    site.json("/jwks", jwks(key))


def mint(key: SigningKey, issuer: str) -> str:
    now = int(time.time())
    claims = {"iss": issuer, "aud": AUDIENCE, "sub": "user-1", "exp": now + 300, "iat": now}
    return jwt.encode(claims, key.private, algorithm=key.alg, headers={"kid": key.kid})


def respond(make: Callable[[], web.StreamResponse]) -> Route:
    async def handle(request: web.Request) -> web.StreamResponse:
        return make()

    return handle


async def unknown_kid_refresh(provider: IdentityProvider, cooldown: float) -> None:
    """Let the cooldown pass, then force one key-set fetch the way an unknown kid does."""
    await asyncio.sleep(cooldown + 0.05)
    await provider.refresh_for_unknown_kid()


# --- pure functions --------------------------------------------------------------------------


def test_discovery_urls_for_issuer_without_path_try_oidc_then_rfc8414() -> None:
    assert discovery_urls("https://idp.example") == [
        "https://idp.example/.well-known/openid-configuration",
        "https://idp.example/.well-known/oauth-authorization-server",
    ]
    assert discovery_urls("https://idp.example/") == discovery_urls("https://idp.example")


def test_discovery_urls_for_issuer_with_path_append_then_insert_well_known() -> None:
    assert discovery_urls("https://kc.example/realms/demo/") == [
        "https://kc.example/realms/demo/.well-known/openid-configuration",
        "https://kc.example/.well-known/oauth-authorization-server/realms/demo",
        "https://kc.example/.well-known/openid-configuration/realms/demo",
    ]


# (configured OIDC_ISSUER_URL, issuer presented by a token or a discovery document, same issuer?)
ISSUER_PAIRS = [
    ("https://a.example/x", "https://a.example/x", True),
    ("https://a.example/x", "https://a.example/x/", True),
    ("https://a.example/x/", "https://a.example/x", True),
    ("https://a.example/", "https://a.example", True),
    ("https://a.example/x/", "https://a.example/x/", True),
    ("https://a.example/x", "https://a.example/x//", False),
    ("https://a.example/x//", "https://a.example/x", False),
    ("https://a.example/x", "https://A.example/x", False),
    ("https://a.example/x", "https://a.example/X", False),
    ("https://a.example/x", "https://a.example/y", False),
    ("https://a.example", "http://a.example", False),
    ("https://a.example/x", "https://a.example:443/x", False),
    ("https://a.example/x", "https://a.example/x/.", False),
    ("https://a.example/x", "https://a.example/x ", False),
    ("https://a.example/x", "https://a.example/x?", False),
    ("https://login.microsoftonline.com/t/v2.0", "https://sts.windows.net/t/", False),
    ("https://a.example/x", "", False),
]


@dataclass
class OneKey:
    """A KeySource publishing exactly one key."""

    key: VerificationKey
    ready: bool = True

    def get_key(self, kid: str | None) -> VerificationKey | None:
        return self.key if kid == self.key.kid else None

    def all_keys(self) -> list[VerificationKey]:
        return [self.key]

    async def refresh_for_unknown_kid(self) -> None:
        return None


@pytest.mark.parametrize(("configured", "presented", "same"), ISSUER_PAIRS)
async def test_one_issuer_rule_for_discovery_and_tokens(
    signing_key: SigningKey, configured: str, presented: str, same: bool
) -> None:
    """same_issuer is the rule; the verifier's iss check gives the same answer for every pair
    (discovery and the doctor call same_issuer itself)."""
    assert same_issuer(configured, presented) is same
    assert same_issuer(presented, configured) is same
    public = VerificationKey(signing_key.kid, signing_key.private.public_key(),
                             frozenset({signing_key.alg}))
    verifier = TokenVerifier(verifier_config(configured), OneKey(public))
    now = int(time.time())
    token = jwt.encode({"iss": presented, "aud": AUDIENCE, "sub": "u", "exp": now + 300},
                       signing_key.private, algorithm=signing_key.alg,
                       headers={"kid": signing_key.kid})
    explanation = await verifier.explain(token)
    assert (explanation.outcomes["iss"] is None) is same
    assert (explanation.error is None) is same


def test_same_issuer_tolerates_only_one_trailing_slash() -> None:
    assert same_issuer("https://a.example/x", "https://a.example/x/")
    assert same_issuer("https://a.example/", "https://a.example")
    assert not same_issuer("https://a.example/x", "https://a.example/x//")
    assert not same_issuer("https://a.example/x", "https://A.example/x")
    assert not same_issuer("https://a.example/x", "https://a.example/y")
    assert not same_issuer("https://a.example", "http://a.example")


def test_https_issuer_accepts_only_https_jwks_uri_with_a_host() -> None:
    https = IdentityProvider(idp_config("https://idp.example"), ALGORITHMS)
    assert https._acceptable_url("https://keys.example/jwks")
    assert not https._acceptable_url("http://keys.example/jwks")
    assert not https._acceptable_url("https:///jwks")
    assert not https._acceptable_url("/jwks")
    plain = IdentityProvider(idp_config("http://127.0.0.1:9"), ALGORITHMS)
    assert plain._acceptable_url("http://127.0.0.1:9/jwks")
    assert plain._acceptable_url("https://keys.example/jwks")
    assert not plain._acceptable_url("ftp://127.0.0.1/jwks")


# --- parse_jwks ------------------------------------------------------------------------------


def test_parse_jwks_skips_unusable_keys_and_keeps_the_usable_one() -> None:
    good = new_rsa("good")
    small = new_rsa("small", bits=1024)
    ec_key = new_ec("ec-as-rs256")
    # A careless IdP publishing its private keys: only the public parts may be loaded.
    rsa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_jwk = {**RSAAlgorithm.to_jwk(rsa_private, as_dict=True), "kid": "private-parts"}
    private_jwk.pop("key_ops")  # pyjwt marks a private JWK "sign"; an IdP might not
    ec_private = ec.generate_private_key(ec.SECP256R1())
    ec_private_jwk = {**ECAlgorithm.to_jwk(ec_private, as_dict=True), "kid": "ec-private-parts"}
    assert "d" in private_jwk
    assert "d" in ec_private_jwk
    document = {
        "keys": [
            good.jwk(),
            {**new_rsa("enc").jwk(), "use": "enc"},
            {**new_rsa("wrap").jwk(), "key_ops": ["encrypt", "wrapKey"]},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            small.jwk(),
            {**ec_key.jwk(), "alg": "RS256"},
            private_jwk,
            ec_private_jwk,
            {**new_rsa("good").jwk()},  # duplicate kid: the first one wins
            "not-a-jwk",
            ["neither"],
        ]
    }
    key_set = parse_jwks(document, ALGORITHMS)
    assert set(key_set.by_kid) == {"good", "private-parts", "ec-private-parts"}
    assert key_set.skipped == 8
    good_key = key_set.by_kid["good"].key
    assert isinstance(good_key, rsa.RSAPublicKey)
    assert isinstance(good.private, rsa.RSAPrivateKey)
    assert good_key.public_numbers() == good.private.public_key().public_numbers()
    rsa_loaded = key_set.by_kid["private-parts"].key
    assert isinstance(rsa_loaded, rsa.RSAPublicKey)
    assert not isinstance(rsa_loaded, rsa.RSAPrivateKey)
    assert rsa_loaded.public_numbers() == rsa_private.public_key().public_numbers()
    ec_loaded = key_set.by_kid["ec-private-parts"].key
    assert isinstance(ec_loaded, ec.EllipticCurvePublicKey)
    assert not isinstance(ec_loaded, ec.EllipticCurvePrivateKey)
    assert ec_loaded.public_numbers() == ec_private.public_key().public_numbers()


def test_parse_jwks_key_ops_with_verify_and_missing_alg_are_usable() -> None:
    rsa_key = new_rsa("ps")
    rsa_key.publish_alg = False
    ec_key = new_ec("ec")
    ed_key = new_ed25519("ed")
    document = {"keys": [{**rsa_key.jwk(), "key_ops": ["verify"]}, ec_key.jwk(), ed_key.jwk()]}
    key_set = parse_jwks(document, ALGORITHMS)
    # Without `alg`, an RSA key verifies the whole allowed RSA family (PS256 included).
    assert {"RS256", "PS256"} <= key_set.by_kid["ps"].algorithms
    assert key_set.by_kid["ec"].algorithms == frozenset({"ES256"})
    assert key_set.by_kid["ed"].algorithms == frozenset({"EdDSA"})
    assert key_set.skipped == 0


def test_parse_jwks_without_any_usable_key_raises() -> None:
    with pytest.raises(IdpError, match="no usable signing key"):
        parse_jwks({"keys": [{**new_rsa().jwk(), "use": "enc"}, "junk"]}, ALGORITHMS)
    with pytest.raises(IdpError, match="no usable signing key"):
        parse_jwks({"keys": []}, ALGORITHMS)


@pytest.mark.parametrize("document", [None, [], {"keys": "x"}, {"nokeys": []}, "text"])
def test_parse_jwks_rejects_a_document_that_is_not_a_key_set(document: Any) -> None:
    with pytest.raises(IdpError, match="keys array"):
        parse_jwks(document, ALGORITHMS)


def test_parse_jwks_refuses_more_than_max_keys() -> None:
    one = new_ec().jwk()
    with pytest.raises(IdpError, match="more than 100"):
        parse_jwks({"keys": [{**one, "kid": f"k{i}"} for i in range(MAX_KEYS + 1)]}, ALGORITHMS)
    assert len(parse_jwks({"keys": [{**one, "kid": f"k{i}"} for i in range(MAX_KEYS)]},
                          ALGORITHMS).by_kid) == MAX_KEYS


# --- discovery -------------------------------------------------------------------------------


async def test_issuer_without_path_is_discovered_at_openid_configuration() -> None:
    key = new_rsa()
    async with serve() as site:
        serve_idp(site, site.origin, key, "/.well-known/openid-configuration")
        provider = IdentityProvider(idp_config(site.origin), ALGORITHMS)
        async with provider.running():
            await wait_until(lambda: provider.ready)
            assert provider.metadata is not None
            assert provider.metadata["issuer"] == site.origin
            assert site.hits[:2] == ["/.well-known/openid-configuration", "/jwks"]
            assert provider.last_error is None


async def test_keycloak_style_issuer_with_path_verifies_tokens(signing_key: SigningKey) -> None:
    fake = FakeIdp(keys=[signing_key], issuer_suffix="/realms/demo")
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.server = server
    try:
        provider = IdentityProvider(idp_config(fake.issuer), ALGORITHMS)
        async with provider.running():
            await wait_until(lambda: provider.ready)
            principal = await verifier_for(fake.issuer, provider).verify(fake.mint())
            assert principal.issuer == fake.issuer
            assert fake.hits == {"discovery": 1, "jwks": 1}
    finally:
        await server.close()


@pytest.mark.parametrize("served_at", [1, 2])
async def test_issuer_with_path_falls_back_in_order_when_first_url_404s(served_at: int) -> None:
    key = new_rsa()
    async with serve() as site:
        issuer = site.origin + "/tenant"
        urls = discovery_urls(issuer)
        assert [u.removeprefix(site.origin) for u in urls] == [
            "/tenant/.well-known/openid-configuration",
            "/.well-known/oauth-authorization-server/tenant",
            "/.well-known/openid-configuration/tenant",
        ]
        serve_idp(site, issuer, key, urls[served_at].removeprefix(site.origin))
        provider = IdentityProvider(idp_config(issuer), ALGORITHMS)
        async with provider.running():
            await wait_until(lambda: provider.ready)
            tried = [u.removeprefix(site.origin) for u in urls[: served_at + 1]]
            assert site.hits[: served_at + 2] == [*tried, "/jwks"]
            principal = await verifier_for(issuer, provider).verify(mint(key, issuer))
            assert principal.issuer == issuer


async def test_issuer_without_path_falls_back_to_rfc8414_metadata() -> None:
    key = new_rsa()
    async with serve() as site:
        serve_idp(site, site.origin, key, "/.well-known/oauth-authorization-server")
        provider = IdentityProvider(idp_config(site.origin), ALGORITHMS)
        async with provider.running():
            await wait_until(lambda: provider.ready)
            assert site.hits[:3] == [
                "/.well-known/openid-configuration",
                "/.well-known/oauth-authorization-server",
                "/jwks",
            ]


async def test_no_discovery_document_anywhere_keeps_provider_not_ready() -> None:
    async with serve() as site:
        provider = IdentityProvider(idp_config(site.origin + "/x"), ALGORITHMS)
        async with provider.running():
            await wait_until(lambda: len(site.hits) >= 3)
            await asyncio.sleep(0.1)
            assert not provider.ready
            assert provider.metadata is None


async def test_discovery_document_naming_another_issuer_is_refused(idp: FakeIdp) -> None:
    idp.issuer_in_document = "https://evil.example"
    provider = IdentityProvider(idp_config(idp.issuer), ALGORITHMS)
    async with provider.running():
        await wait_until(lambda: idp.hits.get("discovery", 0) >= 1)
        await asyncio.sleep(0.2)
        assert not provider.ready
        assert provider.metadata is None
        assert "jwks" not in idp.hits


async def test_discovery_issuer_mismatch_is_reported_in_last_error(idp: FakeIdp) -> None:
    idp.issuer_in_document = "https://evil.example"
    provider = IdentityProvider(idp_config(idp.issuer), ALGORITHMS)
    async with provider.running():
        await wait_until(lambda: "issuer" in (provider.last_error or ""), within=1.5)


@pytest.mark.parametrize(("configured", "in_document"), [("/", ""), ("", "/")])
async def test_issuers_differing_only_by_trailing_slash_match(
    configured: str, in_document: str
) -> None:
    key = new_rsa()
    async with serve() as site:
        serve_idp(site, site.origin + in_document, key, "/.well-known/openid-configuration")
        published = site.origin + in_document
        provider = IdentityProvider(idp_config(site.origin + configured), ALGORITHMS)
        with capture_logs() as logs:
            async with provider.running():
                await wait_until(lambda: provider.ready)
    # Tokens pass, but MCP clients compare the metadata's issuer exactly: say so once.
    warned = [e for e in logs if e["event"] == "issuer_trailing_slash"]
    assert [(e["log_level"], e["fix"]) for e in warned] == [
        ("warning", f"set OIDC_ISSUER_URL={published}")]


@pytest.mark.parametrize("jwks_uri", [None, 42, "", "ftp://127.0.0.1/jwks", "/jwks"])
async def test_discovery_without_usable_jwks_uri_keeps_provider_not_ready(
    jwks_uri: Any,
) -> None:
    async with serve() as site:
        document: dict[str, Any] = {"issuer": site.origin}
        if jwks_uri is not None:
            document["jwks_uri"] = jwks_uri
        site.json("/.well-known/openid-configuration", document)
        provider = IdentityProvider(idp_config(site.origin), ALGORITHMS)
        async with provider.running():
            await wait_until(lambda: len(site.hits) >= 1)
            await asyncio.sleep(0.2)
            assert not provider.ready
            assert site.hits == ["/.well-known/openid-configuration"]


async def test_http_jwks_uri_is_allowed_for_a_loopback_http_issuer(idp: FakeIdp) -> None:
    provider = IdentityProvider(idp_config(idp.issuer), ALGORITHMS)
    async with provider.running():
        await wait_until(lambda: provider.ready)
        assert provider.key_count() == 1


# --- failures keep the last good key set -----------------------------------------------------


def huge_response(chunked: bool) -> Route:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = b'{"keys": [' + b" " * (10 * MIB) + b"]}"
        if not chunked:
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for start in range(0, len(body), 65536):
                await response.write(body[start : start + 65536])
        except ConnectionError:
            pass  # the client stopped reading at its limit, as it should
        return response

    return handle


FAILURES = {
    "http_500": "HTTP 500",
    "html": "not JSON",
    "empty_keys": "no usable signing key",
    "huge_with_length": "larger than 1048576 bytes",
    "huge_chunked": "larger than 1048576 bytes",
    "redirect_other_host": "redirect to another host",
}


@pytest.mark.parametrize("failure", list(FAILURES))
async def test_failed_jwks_fetch_keeps_last_good_keys(idp: FakeIdp, failure: str) -> None:
    other_key = new_rsa("other-host-key")
    async with serve() as other:
        other.json("/jwks", jwks(other_key))
        overrides: dict[str, Route] = {
            "http_500": respond(lambda: web.Response(status=500, text="oops")),
            "html": respond(
                lambda: web.Response(text="<html>login</html>", content_type="text/html")),
            "empty_keys": respond(lambda: web.json_response({"keys": []})),
            "huge_with_length": huge_response(chunked=False),
            "huge_chunked": huge_response(chunked=True),
            "redirect_other_host": respond(
                lambda: web.Response(status=302, headers={"Location": other.origin + "/jwks"})),
        }
        provider = IdentityProvider(idp_config(idp.issuer), ALGORITHMS)
        verifier = verifier_for(idp.issuer, provider)
        async with provider.running():
            await wait_until(lambda: provider.ready)
            before = idp.hits["jwks"]
            good_at = provider.last_success
            idp.jwks_override = overrides[failure]
            await unknown_kid_refresh(provider, 0.1)
            assert idp.hits["jwks"] == before + 1
            assert provider.last_error is not None
            assert provider.last_error.startswith("jwks: ")
            assert FAILURES[failure] in provider.last_error
            assert provider.ready
            assert provider.last_success == good_at
            assert provider.get_key("rsa-1") is not None
            assert provider.get_key("other-host-key") is None
            assert other.hits == []
            principal = await verifier.verify(idp.mint())
            assert principal.kid == "rsa-1"
            # ...and the next good fetch clears the error.
            idp.jwks_override = None
            await unknown_kid_refresh(provider, 0.1)
            assert provider.last_error is None


async def test_redirect_on_the_same_host_is_followed(idp: FakeIdp) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        if request.query.get("moved"):
            return web.json_response(jwks(*idp.keys))
        raise web.HTTPFound("/jwks?moved=1")

    idp.jwks_override = redirect
    provider = IdentityProvider(idp_config(idp.issuer), ALGORITHMS)
    async with provider.running():
        await wait_until(lambda: provider.ready)
        assert idp.hits["jwks"] == 2


async def test_redirect_loop_is_cut_off(idp: FakeIdp) -> None:
    async def loop(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/jwks")

    provider = IdentityProvider(idp_config(idp.issuer), ALGORITHMS)
    async with provider.running():
        await wait_until(lambda: provider.ready)
        idp.jwks_override = loop
        before = idp.hits["jwks"]
        await unknown_kid_refresh(provider, 0.1)
        assert provider.last_error == "jwks: too many redirects"
        assert idp.hits["jwks"] - before == 4
        assert provider.ready


async def test_shutdown_after_a_failed_jwks_fetch_is_clean(idp: FakeIdp) -> None:
    provider = IdentityProvider(idp_config(idp.issuer), ALGORITHMS)
    async with provider.running():
        await wait_until(lambda: provider.ready)
        idp.jwks_override = respond(lambda: web.Response(status=500))
        await unknown_kid_refresh(provider, 0.1)
        assert provider.last_error == "jwks: HTTP 500"
    assert provider.ready  # leaving the context once re-raised IdpError("HTTP 500")


async def test_slow_jwks_beyond_timeout_fails_fast_without_hanging() -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        async with asyncio.timeout(3):
            await release.wait()
        return web.json_response(jwks(new_rsa()))

    async with serve() as site:
        site.json("/.well-known/openid-configuration",
                  {"issuer": site.origin, "jwks_uri": site.origin + "/jwks"})
        site.routes["/jwks"] = slow
        provider = IdentityProvider(idp_config(site.origin, timeout=0.5), ALGORITHMS)
        started = time.monotonic()
        async with asyncio.timeout(3), provider.running():
            await wait_until(lambda: provider.last_error != "not fetched yet", within=2.0)
            assert provider.last_error == "jwks: TimeoutError"
            assert time.monotonic() - started < 1.5
            assert not provider.ready
        release.set()


async def test_slow_discovery_does_not_block_shutdown() -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.json_response({})

    async with serve() as site:
        site.routes["/.well-known/openid-configuration"] = slow
        provider = IdentityProvider(idp_config(site.origin, timeout=0.5), ALGORITHMS)
        async with asyncio.timeout(2):
            async with provider.running():
                await wait_until(lambda: len(site.hits) >= 1)
            assert not provider.ready


# --- unknown kids, single flight, rotation ---------------------------------------------------


def rogue_tokens(idp: FakeIdp, count: int) -> list[str]:
    """Tokens signed by a key the IdP never published, each with a fresh random kid."""
    rogue = new_rsa("rogue")
    return [idp.mint(rogue, header={"kid": uuid.uuid4().hex}) for _ in range(count)]


async def test_unknown_kid_flood_causes_at_most_one_jwks_fetch(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(JWKS_COOLDOWN_SECONDS="30")
    initial = idp.hits["jwks"]
    tokens = rogue_tokens(idp, 200)
    async with asyncio.timeout(10):
        responses = await asyncio.gather(
            *(client.post("/mcp", data=b"{}", headers=bearer(t)) for t in tokens)
        )
    assert [r.status for r in responses] == [401] * 200
    assert all('error="invalid_token"' in r.headers["WWW-Authenticate"] for r in responses)
    assert idp.hits["jwks"] - initial <= 1


async def test_unknown_kid_flood_after_cooldown_shares_exactly_one_fetch(idp: FakeIdp) -> None:
    provider = IdentityProvider(idp_config(idp.issuer, cooldown=0.3), ALGORITHMS)
    verifier = verifier_for(idp.issuer, provider)
    tokens = rogue_tokens(idp, 100)
    async with provider.running():
        await wait_until(lambda: provider.ready)
        await asyncio.sleep(0.35)
        initial = idp.hits["jwks"]
        results = await asyncio.gather(*(verifier.verify(t) for t in tokens),
                                       return_exceptions=True)
        assert all(isinstance(r, TokenError) and r.reason == "unknown_kid" for r in results)
        assert idp.hits["jwks"] - initial == 1


async def test_concurrent_unknown_kid_refreshes_share_one_fetch(idp: FakeIdp) -> None:
    async def slow_jwks(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.2)
        return web.json_response(jwks(*idp.keys))

    provider = IdentityProvider(idp_config(idp.issuer, cooldown=0.2), ALGORITHMS)
    async with provider.running():
        await wait_until(lambda: provider.ready)
        new = new_rsa("rsa-2")
        idp.keys.append(new)
        idp.jwks_override = slow_jwks
        await asyncio.sleep(0.25)
        initial = idp.hits["jwks"]

        async def caller() -> bool:
            await provider.refresh_for_unknown_kid()
            return provider.get_key("rsa-2") is not None

        seen = await asyncio.gather(*(caller() for _ in range(50)))
        assert seen == [True] * 50  # every caller waited for the one shared fetch
        assert idp.hits["jwks"] - initial == 1


async def test_key_rotation_new_kid_accepted_and_removed_kid_rejected(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    client = await make_sidecar(JWKS_COOLDOWN_SECONDS="1")
    old_key = idp.keys[0]
    old_token = idp.mint(old_key)
    assert (await client.post("/mcp", data=b"{}", headers=bearer(old_token))).status == 200

    new_key = new_rsa("rsa-2")
    idp.keys.append(new_key)
    await asyncio.sleep(1.1)  # past the cooldown of the start-up fetch
    before = idp.hits["jwks"]
    response = await client.post("/mcp", data=b"{}", headers=bearer(idp.mint(new_key)))
    assert response.status == 200
    assert idp.hits["jwks"] - before == 1
    # The old key is still published: its tokens, cached or fresh, keep working.
    assert (await client.post("/mcp", data=b"{}", headers=bearer(old_token))).status == 200
    fresh_old = idp.mint(old_key)
    assert (await client.post("/mcp", data=b"{}", headers=bearer(fresh_old))).status == 200

    idp.keys.remove(old_key)
    await asyncio.sleep(1.1)
    before = idp.hits["jwks"]
    unknown = await client.post("/mcp", data=b"{}", headers=bearer(rogue_tokens(idp, 1)[0]))
    assert unknown.status == 401
    assert idp.hits["jwks"] - before == 1  # that refresh dropped the old key
    for token in (old_token, fresh_old, idp.mint(old_key)):
        rejected = await client.post("/mcp", data=b"{}", headers=bearer(token))
        assert rejected.status == 401
        assert 'error="invalid_token"' in rejected.headers["WWW-Authenticate"]
    assert (await client.post("/mcp", data=b"{}", headers=bearer(idp.mint(new_key)))).status == 200


# --- IdP down at start-up --------------------------------------------------------------------


async def test_idp_down_at_start_gives_503_then_recovers_by_itself(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    idp.down = True
    client = await make_sidecar(wait_ready=False)
    await wait_until(lambda: idp.hits.get("discovery", 0) >= 1)

    ready = await client.get("/readyz")
    assert ready.status == 503
    assert await ready.json() == {"status": "not_ready",
                                  "checks": {"idp": "no_keys", "upstream": "ready"}}

    token = idp.mint()
    refused = await client.post("/mcp", data=b"{}", headers=bearer(token))
    assert refused.status == 503
    assert refused.headers["Retry-After"].isdigit()
    assert "WWW-Authenticate" not in refused.headers
    assert (await refused.json())["error"] == "temporarily_unavailable"

    idp.down = False
    provider = client.app[IDP]
    started = time.monotonic()
    await wait_until(lambda: provider.ready, within=6.0)
    assert time.monotonic() - started < 3.0  # the first retry comes after about a second
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["checks"]["idp"] == "ready"
    assert (await client.post("/mcp", data=b"{}", headers=bearer(token))).status == 200


async def test_readyz_says_why_while_idp_is_down_in_the_log_only(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    """The caller learns that the IdP part is not ready; the IdP's address and what it answered
    go to the log (and to `oauth-sidecar check`)."""
    idp.down = True
    client = await make_sidecar(wait_ready=False)
    await wait_until(lambda: idp.hits.get("discovery", 0) >= 1)
    await wait_until(lambda: client.app[IDP].last_error != "not fetched yet")
    with capture_logs() as events:
        ready = await client.get("/readyz")
    text = await ready.text()
    assert (await ready.json())["checks"]["idp"] == "no_keys"
    assert "503" not in text
    assert str(idp.server.port) not in text  # type: ignore[union-attr]
    [change] = [e for e in events if e["event"] == "not_ready"]
    assert change["parts"] == ["idp"]
    assert "503" in change["idp"]
    assert str(idp.server.port) in change["idp"]  # type: ignore[union-attr]


# --- Cache-Control max-age -------------------------------------------------------------------


async def test_jwks_max_age_schedules_the_background_refresh(idp: FakeIdp) -> None:
    idp.jwks_max_age = 2
    provider = IdentityProvider(idp_config(idp.issuer, cooldown=1.0, refresh=3600), ALGORITHMS)
    async with provider.running():
        await wait_until(lambda: provider.ready)
        loaded = time.monotonic()
        assert idp.hits["jwks"] == 1
        await wait_until(lambda: idp.hits["jwks"] >= 2, within=4.0)
        assert time.monotonic() - loaded > 1.5  # not before max-age ran out


async def test_without_max_age_no_refresh_before_jwks_refresh_seconds(idp: FakeIdp) -> None:
    provider = IdentityProvider(idp_config(idp.issuer, cooldown=0.1, refresh=3600), ALGORITHMS)
    async with provider.running():
        await wait_until(lambda: provider.ready)
        await asyncio.sleep(1.2)  # the refresher would have run after its 1 s minimum sleep
        assert idp.hits == {"discovery": 1, "jwks": 1}


async def test_max_age_zero_does_not_make_the_refresher_spin(idp: FakeIdp) -> None:
    idp.jwks_max_age = 0
    provider = IdentityProvider(idp_config(idp.issuer, cooldown=1.0, refresh=3600), ALGORITHMS)
    async with provider.running():
        await wait_until(lambda: provider.ready)
        await asyncio.sleep(1.2)
        assert idp.hits["jwks"] <= 2  # bounded below by the cooldown
