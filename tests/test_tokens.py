"""Bad tokens against the real sidecar: every refusal is a clean 4xx with one RFC 6750 challenge,
names the right reason in the access log, and nothing reaches the upstream.

The bad-input checklist (mcp-auth.md §7: credentials, structure, algorithm and header, claims)
is driven as tables through `POST /mcp` of the production app; a short unit section pins
`bearer_token()` and `parse_strict()` directly.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from aiohttp import ClientError, web
from aiohttp.test_utils import TestClient, TestServer
from conftest import (
    AUDIENCE,
    FakeIdp,
    FakeUpstream,
    SidecarFactory,
    SigningKey,
    new_ec,
    new_ed25519,
    new_rsa,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict
from structlog.testing import capture_logs

from oauth_sidecar.app import IDP, VERIFIER
from oauth_sidecar.auth import tokens
from oauth_sidecar.auth.bearer import TokenError, bearer_token, parse_strict
from oauth_sidecar.auth.tokens import NON_ACCESS_TYPES, expired

Client = TestClient[web.Request, web.Application]
Start = Callable[..., Awaitable[Client]]

METADATA = "https://mcp.example.test/.well-known/oauth-protected-resource/mcp"
MAX_TOKEN = 16384  # JWT_MAX_TOKEN_BYTES default
REQUEST_TIMEOUT = 10.0  # every request in this file is bounded


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """The published keys: the IdP's RSA key, plus an EC and an Ed25519 key beside it."""

    idp: FakeIdp
    rsa: SigningKey
    ec: SigningKey
    ed: SigningKey


@pytest.fixture
def start(make_sidecar: SidecarFactory) -> Start:
    """conftest's factory: the production app, served the way __main__ serves it."""
    return make_sidecar


@pytest.fixture
def ctx(idp: FakeIdp) -> Ctx:
    ec, ed = new_ec(), new_ed25519()
    idp.keys.extend([ec, ed])
    return Ctx(idp=idp, rsa=idp.keys[0], ec=ec, ed=ed)


@pytest.fixture
async def sidecar(ctx: Ctx, start: Start) -> Client:
    """The sidecar with RSA, EC and Ed25519 keys published (overrides conftest's `sidecar`)."""
    return await start()


# --------------------------------------------------------------------------------------------
# Sending and checking
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status: int
    challenges: list[str]
    body: Any
    reason: str | None  # the access log's `auth_error`: which check refused the token
    logged: bool  # False when aiohttp refused the request before our middleware ran


async def send(
    client: Client, headers: CIMultiDict[str] | Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None, data: bytes = b"{}",
) -> Outcome:
    with capture_logs() as logs:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            response = await client.post("/mcp", data=data, headers=headers, params=params)
            text = await response.text()
    lines = [entry for entry in logs if entry.get("event") == "request"]
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = text
    return Outcome(
        status=response.status,
        challenges=response.headers.getall("WWW-Authenticate", []),
        body=body,
        reason=lines[0].get("auth_error") if lines else None,
        logged=bool(lines),
    )


def auth(token: str, scheme: str = "Bearer") -> dict[str, str]:
    return {"Authorization": f"{scheme} {token}"}


def parse_challenge(value: str) -> dict[str, str]:
    """A Bearer challenge's auth-params, insisting on the exact grammar we emit."""
    assert value.startswith("Bearer "), value
    params: dict[str, str] = {}
    for part in value.removeprefix("Bearer ").split(", "):
        name, sep, quoted = part.partition("=")
        assert sep, value
        assert quoted.startswith('"'), value
        assert quoted.endswith('"'), value
        assert name not in params, value
        params[name] = quoted[1:-1]
    return params


def assert_refused(
    outcome: Outcome, upstream: FakeUpstream, *, reason: str, status: int = 401,
    error: str | None = "invalid_token", forwarded: int = 0,
) -> None:
    """One challenge; an error code only when credentials were sent (RFC 6750 §3.1)."""
    assert (outcome.status, outcome.reason) == (status, reason), outcome
    assert len(outcome.challenges) == 1, outcome.challenges
    params = parse_challenge(outcome.challenges[0])
    assert params["resource_metadata"] == METADATA
    if error is None:
        assert outcome.challenges[0] == f'Bearer resource_metadata="{METADATA}"'
        assert outcome.body["error"] == "unauthorized"
    else:
        assert set(params) == {"error", "error_description", "resource_metadata"}
        assert params["error"] == error
        assert outcome.body["error"] == error
        assert params["error_description"] == outcome.body["error_description"]
    assert len(upstream.requests) == forwarded  # nothing more reached the upstream


def assert_accepted(outcome: Outcome, upstream: FakeUpstream, count: int = 1) -> None:
    assert outcome.status == 200, outcome
    assert outcome.challenges == []
    assert len(upstream.requests) == count
    assert "Authorization" not in upstream.requests[-1].headers


# --------------------------------------------------------------------------------------------
# Token building by hand (pyjwt refuses to build most of these)
# --------------------------------------------------------------------------------------------

Json = Mapping[str, Any] | str | bytes
Builder = Callable[[Ctx], str]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def seg(value: Json) -> str:
    if isinstance(value, bytes):
        return b64(value)
    if isinstance(value, str):
        return b64(value.encode())
    return b64(json.dumps(value).encode())


def claims(ctx: Ctx, **override: Any) -> dict[str, Any]:
    return claims_for(ctx.idp, **override)


def claims_for(idp: FakeIdp, **override: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": idp.issuer, "aud": AUDIENCE, "sub": "user-1", "exp": now + 300,
        "iat": now, "nbf": now,
    }
    base.update(override)
    return base


def forge(header: Json, payload: Json, key: SigningKey, alg: str | None = None) -> str:
    """A compact JWS with a real signature by `key` over exactly these header/payload bytes."""
    signing_input = f"{seg(header)}.{seg(payload)}"
    algorithm = jwt.get_algorithm_by_name(alg or key.alg)
    return f"{signing_input}.{b64(algorithm.sign(signing_input.encode(), key.private))}"


def unsigned(header: Json, payload: Json, signature: str = "") -> str:
    return f"{seg(header)}.{seg(payload)}.{signature}"


def rsa_header(ctx: Ctx, **extra: Any) -> dict[str, Any]:
    return {"alg": "RS256", "typ": "JWT", "kid": ctx.rsa.kid, **extra}


def with_claims(**override: Any) -> Builder:
    return lambda c: c.idp.mint(claims=override)


def without(*names: str) -> Builder:
    return lambda c: c.idp.mint(drop=names)


def with_header(**header: Any) -> Builder:
    return lambda c: c.idp.mint(header=header)


def now() -> int:
    return int(time.time())


@functools.cache
def _attacker_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def attacker_key(kid: str = "attacker") -> SigningKey:
    return SigningKey(kid, "RS256", _attacker_private())


@functools.cache
def _weak_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - must be refused


def padded_token(ctx: Ctx, length: int) -> str:
    """A validly signed token of exactly `length` characters (padding in private members).

    A base64url segment is never 1 more than a multiple of 4 characters long, so both the
    header and the payload are padded to reach every length."""
    for header_pad in range(4):
        header = {"x-pad": "h" * header_pad}
        base = len(ctx.idp.mint(claims={"pad": "", "jti": "fixed"}, header=header))
        for pad in range(max(0, (length - base) * 3 // 4 - 8), length):
            token = ctx.idp.mint(claims={"pad": "x" * pad, "jti": "fixed"}, header=header)
            if len(token) == length:
                return token
            if len(token) > length:
                break
    raise AssertionError(f"no padding gives a token of exactly {length} characters")


# --------------------------------------------------------------------------------------------
# Credentials: how the token is presented
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Presented:
    headers: list[tuple[str, str]] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)


Presenter = Callable[[str], Presented]


def header(value: str) -> Presenter:
    return lambda token: Presented([("Authorization", value.format(token=token))])


CREDENTIALS_ACCEPTED = [
    pytest.param(header("Bearer {token}"), id="canonical-Bearer"),
    pytest.param(header("bearer {token}"), id="lowercase-scheme"),
    pytest.param(header("BEARER {token}"), id="uppercase-scheme"),
    pytest.param(header("Bearer  {token}"), id="double-space-rfc6750-1*SP"),
    pytest.param(header("Bearer {token}  "), id="trailing-whitespace"),
]


@pytest.mark.parametrize("present", CREDENTIALS_ACCEPTED)
async def test_bearer_credential_forms_that_are_accepted(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream, present: Presenter
) -> None:
    shown = present(ctx.idp.mint())
    outcome = await send(sidecar, CIMultiDict(shown.headers), shown.params)
    assert_accepted(outcome, upstream)


CREDENTIALS_REFUSED = [
    pytest.param(lambda t: Presented(), 401, None, "missing", id="no-authorization-header"),
    pytest.param(header("Bearer"), 401, "invalid_token", "empty_token", id="Bearer-without-token"),
    pytest.param(header("Bearer {token} x"), 401, "invalid_token", "malformed",
                 id="token-with-inner-space"),
    pytest.param(header("Bearer {token},Bearer {token}"), 401, "invalid_token", "malformed",
                 id="two-credentials-in-one-header"),
    pytest.param(lambda t: Presented([("Authorization", f"Bearer {t}")] * 2), 400,
                 "invalid_request", "duplicate_authorization", id="two-authorization-headers"),
    pytest.param(lambda t: Presented([("Authorization", f"Bearer {t}"),
                                      ("Authorization", "Basic dXNlcjpwYXNz")]), 400,
                 "invalid_request", "duplicate_authorization",
                 id="bearer-and-basic-authorization-headers"),
    pytest.param(lambda t: Presented(params={"access_token": t}), 400, "invalid_request",
                 "token_in_query", id="access_token-in-query"),
    pytest.param(lambda t: Presented([("Authorization", f"Bearer {t}")], {"access_token": t}),
                 400, "invalid_request", "token_in_query", id="header-and-access_token-in-query"),
    pytest.param(header("Basic dXNlcjpwYXNz"), 401, None, "not_bearer", id="basic-auth"),
    pytest.param(header("Token {token}"), 401, None, "not_bearer", id="other-scheme"),
    pytest.param(header("Bearer{token}"), 401, None, "not_bearer", id="no-space-after-scheme"),
    pytest.param(header("Bearer\t{token}"), 401, None, "not_bearer", id="tab-is-not-1*SP"),
    pytest.param(lambda t: Presented([("Cookie", f"access_token={t}; token={t}")]), 401, None,
                 "missing", id="token-only-in-a-cookie"),
]


@pytest.mark.parametrize(("present", "status", "error", "reason"), CREDENTIALS_REFUSED)
async def test_credential_forms_that_are_refused(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream, *, present: Presenter, status: int,
    error: str | None, reason: str,
) -> None:
    shown = present(ctx.idp.mint())
    outcome = await send(sidecar, CIMultiDict(shown.headers), shown.params)
    assert_refused(outcome, upstream, status=status, error=error, reason=reason)


async def test_token_in_a_form_body_is_not_a_credential(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream
) -> None:
    """RFC 6750 §2.2 form-encoded body parameter: not supported, so no credentials at all."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    outcome = await send(sidecar, form, data=f"access_token={ctx.idp.mint()}".encode())
    assert_refused(outcome, upstream, reason="missing", error=None)


# --------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------


def good(ctx: Ctx) -> str:
    return ctx.idp.mint()


def segments(token: str) -> list[str]:
    return token.split(".")


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


STRUCTURE_REFUSED = [
    pytest.param(lambda c: segments(good(c))[0], "malformed", id="one-segment"),
    pytest.param(lambda c: ".".join(segments(good(c))[:2]), "malformed", id="two-segments"),
    pytest.param(lambda c: good(c) + ".AAAA", "malformed", id="four-segments"),
    pytest.param(lambda c: ".".join([seg({"alg": "RSA-OAEP", "enc": "A256GCM"}),
                                     "AAAA", "AAAA", "AAAA", "AAAA"]), "encrypted",
                 id="five-segments-jwe"),
    pytest.param(lambda c: good(c).rsplit(".", 1)[0] + ".", "malformed", id="empty-signature"),
    pytest.param(lambda c: "." + good(c).split(".", 1)[1], "malformed", id="empty-header"),
    pytest.param(lambda c: "..", "malformed", id="only-dots"),
    pytest.param(lambda c: good(c)[:-2] + "!*", "malformed", id="non-b64token-characters"),
    pytest.param(lambda c: good(c)[:-2] + "+/", "malformed", id="standard-base64-alphabet"),
    pytest.param(lambda c: good(c) + "==", "malformed", id="padded-signature"),
    pytest.param(lambda c: "{}==.{}".format(*segments(good(c))[:2]) + ".AAAA", "malformed",
                 id="padded-header"),
    pytest.param(lambda c: forge("not json", claims(c), c.rsa), "malformed",
                 id="header-not-json"),
    pytest.param(lambda c: forge(rsa_header(c), "not json", c.rsa), "malformed",
                 id="payload-not-json"),
    pytest.param(lambda c: forge(rsa_header(c), b"\xff\xfe{}", c.rsa), "malformed",
                 id="payload-not-utf8"),
    pytest.param(lambda c: forge('["RS256"]', claims(c), c.rsa), "malformed",
                 id="header-json-array"),
    pytest.param(lambda c: forge('"RS256"', claims(c), c.rsa), "malformed",
                 id="header-json-string"),
    pytest.param(lambda c: forge(rsa_header(c), "[1, 2]", c.rsa), "malformed",
                 id="payload-json-array"),
    pytest.param(lambda c: forge(rsa_header(c), "null", c.rsa), "malformed",
                 id="payload-json-null"),
    pytest.param(lambda c: forge(f'{{"alg":"none","kid":"{c.rsa.kid}","alg":"RS256"}}',
                                 claims(c), c.rsa), "malformed",
                 id="duplicate-alg-in-header-last-wins-would-verify"),
    pytest.param(lambda c: forge(f'{{"alg":"RS256","kid":"other","kid":"{c.rsa.kid}"}}',
                                 claims(c), c.rsa), "malformed", id="duplicate-kid-in-header"),
    pytest.param(lambda c: forge(rsa_header(c), json.dumps(claims(c))[:-1] + ', "sub": "admin"}',
                                 c.rsa), "malformed",
                 id="duplicate-sub-in-payload"),
    pytest.param(lambda c: forge(rsa_header(c), json.dumps(claims(c))[:-1]
                                 + ', "x": {"a": 1, "a": 2}}', c.rsa), "malformed",
                 id="duplicate-key-in-nested-payload-object"),
    pytest.param(lambda c: forge(nested(1500), claims(c), c.rsa), "malformed",
                 id="deeply-nested-header-json"),
    pytest.param(lambda c: forge(rsa_header(c, cty="JWT"), claims(c), c.rsa), "nested_jwt",
                 id="nested-jwt-cty-JWT-with-claims"),
    pytest.param(lambda c: forge(rsa_header(c, cty="jwt"), claims(c), c.rsa), "nested_jwt",
                 id="nested-jwt-cty-lowercase"),
    pytest.param(lambda c: forge(rsa_header(c, cty="JWT"), good(c), c.rsa), "malformed",
                 id="nested-jwt-with-inner-token-payload"),
    pytest.param(lambda c: forge(rsa_header(c, typ="dpop+jwt"), claims(c), c.rsa), "wrong_type",
                 id="dpop-proof-as-access-token"),
    pytest.param(lambda c: padded_token(c, MAX_TOKEN + 1), "token_too_large",
                 id="16KB-plus-one-valid-signature"),
    pytest.param(lambda c: padded_token(c, 20000), "token_too_large", id="20KB-valid-signature"),
]


@pytest.mark.parametrize(("build", "reason"), STRUCTURE_REFUSED)
async def test_malformed_token_is_refused(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream, build: Builder, reason: str
) -> None:
    outcome = await send(sidecar, auth(build(ctx)))
    assert_refused(outcome, upstream, reason=reason)


@pytest.mark.parametrize("length", [8192, MAX_TOKEN], ids=["8KB", "exactly-16384"])
async def test_large_valid_token_up_to_the_cap_is_accepted(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream, length: int
) -> None:
    outcome = await send(sidecar, auth(padded_token(ctx, length)))
    assert_accepted(outcome, upstream)


@pytest.mark.parametrize("size", [64 * 1024, 1024 * 1024], ids=["64KB", "1MB"])
async def test_token_beyond_the_header_limit_gets_a_clean_400_quickly(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream, size: int
) -> None:
    token = ctx.idp.mint(claims={"pad": "x" * (size * 3 // 4)})
    started = time.monotonic()
    try:
        outcome = await send(sidecar, auth(token))
    except ClientError:
        pytest.fail("the server dropped the connection instead of answering 400")
    assert time.monotonic() - started < 5.0
    assert outcome.status == 400, outcome  # aiohttp: header field above MAX_HEADER_BYTES
    assert not outcome.logged  # refused before any handler or token parsing ran
    assert upstream.requests == []


# --------------------------------------------------------------------------------------------
# Algorithm and header
# --------------------------------------------------------------------------------------------


def hs256_with_public_key(form: str) -> Builder:
    """CVE-2022-29217 class: HMAC keyed with the bytes of the RSA public key."""

    def build(ctx: Ctx) -> str:
        public = ctx.rsa.private.public_key()
        spki = PublicFormat.SubjectPublicKeyInfo
        secret = {
            "pem-spki": lambda: public.public_bytes(Encoding.PEM, spki),
            "pem-pkcs1": lambda: public.public_bytes(Encoding.PEM, PublicFormat.PKCS1),
            "der": lambda: public.public_bytes(Encoding.DER, spki),
            "openssh": lambda: public.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH),
            "jwk-json": lambda: json.dumps(ctx.rsa.jwk()).encode(),
        }[form]()
        signing_input = f"{seg({'alg': 'HS256', 'typ': 'JWT', 'kid': ctx.rsa.kid})}"
        signing_input += f".{seg(claims(ctx))}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(mac)}"

    return build


def es256_signature(ctx: Ctx, how: str) -> str:
    """A real ES256 token whose raw r||s signature (RFC 7518 §3.4) is replaced by 64 zero bytes
    ("zero") or by the same r, s in DER, the encoding OpenSSL-based signers emit ("der")."""
    token = ctx.idp.mint(ctx.ec)
    signing_input, raw = token.rsplit(".", 1)
    signature = base64.urlsafe_b64decode(raw + "==")
    if how == "zero":
        return f"{signing_input}.{b64(bytes(64))}"
    r, s = int.from_bytes(signature[:32]), int.from_bytes(signature[32:])
    return f"{signing_input}.{b64(encode_dss_signature(r, s))}"


def signed_with_alg(alg: Any) -> Builder:
    """Really signed RS256 by the published key; only the header's `alg` is wrong."""
    return lambda c: forge({"alg": alg, "kid": c.rsa.kid}, claims(c), c.rsa, "RS256")


def none_token(casing: str, signature: str) -> Builder:
    return lambda c: unsigned({"alg": casing, "typ": "JWT", "kid": c.rsa.kid}, claims(c), signature)


ALG_REFUSED = [
    *[pytest.param(none_token(casing, ""), "malformed", id=f"alg-{casing}-empty-signature")
      for casing in ("none", "None", "NONE", "nOnE")],
    *[pytest.param(none_token(casing, "AAAA"), "alg_not_allowed", id=f"alg-{casing}-junk-signature")
      for casing in ("none", "None", "NONE", "nOnE")],
    *[pytest.param(hs256_with_public_key(form), "alg_not_allowed", id=f"hs256-keyed-with-{form}")
      for form in ("pem-spki", "pem-pkcs1", "der", "openssh", "jwk-json")],
    pytest.param(lambda c: forge({"alg": "RS256", "kid": c.ec.kid}, claims(c), c.rsa),
                 "alg_key_mismatch", id="RS256-header-on-EC-key"),
    pytest.param(lambda c: forge({"alg": "ES256", "kid": c.rsa.kid}, claims(c), c.ec),
                 "alg_key_mismatch", id="ES256-header-on-RSA-key"),
    pytest.param(lambda c: forge({"alg": "EdDSA", "kid": c.rsa.kid}, claims(c), c.ed),
                 "alg_key_mismatch", id="EdDSA-header-on-RSA-key"),
    pytest.param(lambda c: forge({"alg": "ES256", "kid": c.ed.kid}, claims(c), c.ec),
                 "alg_key_mismatch", id="ES256-header-on-Ed25519-key"),
    pytest.param(lambda c: forge({"alg": "ES384", "kid": c.ec.kid}, claims(c), c.ec, "ES384"),
                 "alg_key_mismatch", id="ES384-header-on-P-256-key"),
    pytest.param(lambda c: forge({"alg": "PS256", "kid": c.rsa.kid}, claims(c), c.rsa, "PS256"),
                 "alg_key_mismatch", id="PS256-on-RSA-key-published-as-RS256"),
    pytest.param(lambda c: es256_signature(c, "zero"), "bad_signature", id="ES256-all-zero-sig"),
    pytest.param(lambda c: es256_signature(c, "der"), "bad_signature", id="ES256-DER-signature"),
    pytest.param(lambda c: forge({"typ": "JWT", "kid": c.rsa.kid}, claims(c), c.rsa),
                 "alg_not_allowed", id="alg-missing"),
    *[pytest.param(signed_with_alg(value), "alg_not_allowed", id=f"alg-{name}")
      for name, value in [("null", None), ("number", 256), ("list", ["RS256"]),
                          ("object", {"RS256": True}), ("true", True), ("lowercase-rs256", "rs256"),
                          ("HS256", "HS256"), ("ES512-not-configured", "ES512")]],
    pytest.param(lambda c: forge(rsa_header(c, crit=["exp"]), claims(c), c.rsa),
                 "crit_not_supported", id="crit-present"),
    pytest.param(lambda c: forge(rsa_header(c, crit=[]), claims(c), c.rsa),
                 "crit_not_supported", id="crit-empty-list"),
    pytest.param(lambda c: forge(rsa_header(c, typ=7), claims(c), c.rsa), "wrong_type",
                 id="typ-not-a-string"),
]


@pytest.mark.parametrize(("build", "reason"), ALG_REFUSED)
async def test_algorithm_and_header_attacks_are_refused(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream, build: Builder, reason: str
) -> None:
    outcome = await send(sidecar, auth(build(ctx)))
    assert_refused(outcome, upstream, reason=reason)


def signed_with_kid(kid: Any) -> Builder:
    return lambda c: forge({"alg": "RS256", "typ": "JWT", "kid": kid}, claims(c), c.rsa)


KID_REFUSED = [
    pytest.param(signed_with_kid("no-such-key"), "unknown_kid", id="kid-unknown"),
    pytest.param(signed_with_kid("../../etc/passwd"), "unknown_kid", id="kid-path-traversal"),
    pytest.param(signed_with_kid("/dev/null"), "unknown_kid", id="kid-absolute-path"),
    pytest.param(signed_with_kid("' OR '1'='1' --"), "unknown_kid", id="kid-sql-injection"),
    pytest.param(signed_with_kid("x" * 257), "kid_invalid", id="kid-257-chars"),
    pytest.param(signed_with_kid("k" * 10240), "kid_invalid", id="kid-10KB"),
    pytest.param(signed_with_kid(""), "kid_invalid", id="kid-empty"),
    pytest.param(signed_with_kid(1), "kid_invalid", id="kid-number"),
    pytest.param(signed_with_kid(["rsa-1"]), "kid_invalid", id="kid-list"),
    pytest.param(signed_with_kid({"kid": "rsa-1"}), "kid_invalid", id="kid-object"),
    pytest.param(signed_with_kid(True), "kid_invalid", id="kid-true"),
]


@pytest.mark.parametrize(("build", "reason"), KID_REFUSED)
async def test_bad_kid_is_refused_even_with_a_valid_signature(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream, build: Builder, reason: str
) -> None:
    outcome = await send(sidecar, auth(build(ctx)))
    assert_refused(outcome, upstream, reason=reason)


@dataclass
class Attacker:
    """An attacker-controlled origin that serves its own JWKS/cert at any path, and counts."""

    key: SigningKey
    server: TestServer
    hits: list[str]

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
async def attacker() -> AsyncIterator[Attacker]:
    key = attacker_key()
    hits: list[str] = []

    async def serve(request: web.Request) -> web.StreamResponse:
        hits.append(request.path_qs)
        return web.json_response({"keys": [key.jwk()]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", serve)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield Attacker(key, server, hits)
    await server.close()


def self_signed_x5c(key: SigningKey) -> list[str]:
    assert isinstance(key.private, rsa.RSAPrivateKey)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
    moment = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.private.public_key()).serial_number(1)
        .not_valid_before(moment - timedelta(days=1)).not_valid_after(moment + timedelta(days=1))
        .sign(key.private, hashes.SHA256())
    )
    return [base64.b64encode(cert.public_bytes(Encoding.DER)).decode()]


def key_reference(kind: str, attacker: Attacker, ctx: Ctx) -> dict[str, Any]:
    jwk = attacker.key.jwk()
    references: dict[str, dict[str, Any]] = {
        "jwk": {"jwk": jwk},
        "jku": {"jku": attacker.origin + "/attacker/jwks.json"},
        "jku-on-idp-origin": {"jku": ctx.idp.origin + "/jwks"},
        "x5u": {"x5u": attacker.origin + "/attacker/cert.pem"},
        "x5c": {"x5c": self_signed_x5c(attacker.key)},
        "all": {"jwk": jwk, "jku": attacker.origin + "/attacker/jwks.json",
                "x5u": attacker.origin + "/attacker/cert.pem",
                "x5c": self_signed_x5c(attacker.key)},
    }
    return references[kind]


# kid: the victim's kid (most dangerous), the attacker's own, or none at all.
KEY_REFERENCE_CASES = [
    *[pytest.param(kind, kid, reason, id=f"{kind}-{kid}")
      for kind in ("jwk", "jku", "x5u", "x5c", "all")
      for kid, reason in (("victim-kid", "bad_signature"), ("attacker-kid", "unknown_kid"),
                          ("no-kid", "bad_signature"))],
    pytest.param("jku-on-idp-origin", "victim-kid", "bad_signature",
                 id="jku-naming-the-idp-jwks-url"),
]


@pytest.mark.parametrize(("kind", "kid", "reason"), KEY_REFERENCE_CASES)
async def test_key_references_in_the_header_are_never_followed_or_trusted(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream, attacker: Attacker, *, kind: str,
    kid: str, reason: str,
) -> None:
    head: dict[str, Any] = {"alg": "RS256", "typ": "JWT", **key_reference(kind, attacker, ctx)}
    if kid != "no-kid":
        head["kid"] = ctx.rsa.kid if kid == "victim-kid" else attacker.key.kid
    token = forge(head, claims(ctx), attacker.key)
    idp_state = sidecar.app[IDP]
    fetches_before, idp_hits_before = idp_state.fetches, sum(ctx.idp.hits.values())

    outcome = await send(sidecar, auth(token))

    assert_refused(outcome, upstream, reason=reason)
    assert attacker.hits == []
    fetches = idp_state.fetches - fetches_before
    assert sum(ctx.idp.hits.values()) - idp_hits_before == fetches  # all went to the real IdP
    if kid != "attacker-kid":
        assert fetches == 0  # a known (or absent) kid never causes any fetch


# `typ` is a media type (RFC 7515 §4.1.9): case-insensitive, `application/` optional.
TYP_FORMS = [
    pytest.param(lambda t: t, id="short"),
    pytest.param(str.upper, id="short-uppercase"),
    pytest.param(lambda t: f"application/{t}", id="application-prefix"),
    pytest.param(lambda t: f"Application/{t.upper()}", id="application-prefix-mixed-case"),
    pytest.param(lambda t: f"application/{t}; charset=utf-8", id="with-a-parameter"),
    pytest.param(lambda t: f" {t} ", id="surrounding-spaces"),
]


@pytest.mark.parametrize("spell", TYP_FORMS)
@pytest.mark.parametrize("kind", sorted(NON_ACCESS_TYPES))
async def test_every_non_access_typ_is_refused_in_every_spelling_of_its_media_type(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream, kind: str, spell: Callable[[str], str]
) -> None:
    """A DPoP proof, a logout token, a security event or an ID token signed by the IdP is not an
    access token, whether its header says `dpop+jwt` or `application/dpop+jwt`."""
    typ = spell(kind)
    token = forge(rsa_header(ctx, typ=typ), claims(ctx), ctx.rsa)
    assert_refused(await send(sidecar, auth(token)), upstream, reason="wrong_type")


@pytest.mark.parametrize("typ", ["JWT", "jwt", "application/jwt", "at+jwt", "AT+JWT",
                                 "application/at+jwt", "Application/At+Jwt"])
async def test_access_token_types_are_accepted_in_every_spelling(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream, typ: str
) -> None:
    token = forge(rsa_header(ctx, typ=typ), claims(ctx), ctx.rsa)
    assert_accepted(await send(sidecar, auth(token)), upstream)


# --------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------


def with_iss(make: Callable[[str], Any]) -> Builder:
    return lambda c: c.idp.mint(claims={"iss": make(c.idp.issuer)})


CLAIMS_REFUSED = [
    pytest.param(without("exp"), "claim_missing", id="exp-missing"),
    pytest.param(lambda c: c.idp.mint(claims={"exp": now() - 3600}), "expired", id="exp-past"),
    pytest.param(lambda c: c.idp.mint(claims={"exp": now() - 60}), "expired",
                 id="exp-past-beyond-leeway"),
    pytest.param(with_claims(exp="99999999999"), "claim_invalid", id="exp-numeric-string"),
    pytest.param(with_claims(exp=-1), "expired", id="exp-negative"),
    pytest.param(with_claims(exp=0), "expired", id="exp-zero"),
    pytest.param(with_claims(exp=True), "claim_invalid", id="exp-boolean"),
    pytest.param(with_claims(exp=None), "claim_missing", id="exp-null"),
    pytest.param(with_claims(exp=[9999999999]), "claim_invalid", id="exp-list"),
    pytest.param(with_claims(exp=math.nan), "claim_invalid", id="exp-NaN"),
    pytest.param(with_claims(exp=math.inf), "claim_invalid", id="exp-Infinity"),
    pytest.param(
        with_claims(exp=10**400), "claim_invalid", id="exp-integer-too-big-for-a-float",
    ),
    pytest.param(
        with_claims(nbf=10**400), "claim_invalid", id="nbf-integer-too-big-for-a-float",
    ),
    pytest.param(lambda c: c.idp.mint(claims={"nbf": now() + 3600}), "not_yet_valid",
                 id="nbf-in-an-hour"),
    pytest.param(lambda c: c.idp.mint(claims={"nbf": now() + 60}), "not_yet_valid",
                 id="nbf-beyond-leeway"),
    pytest.param(with_claims(nbf="0"), "claim_invalid", id="nbf-string"),
    pytest.param(lambda c: c.idp.mint(claims={"iat": now() + 3600}), "not_yet_valid",
                 id="iat-in-an-hour"),
    pytest.param(lambda c: c.idp.mint(claims={"iat": now() + 60}), "not_yet_valid",
                 id="iat-beyond-leeway"),
    pytest.param(with_claims(iat="0"), "claim_invalid", id="iat-string"),
    pytest.param(without("iss"), "claim_missing", id="iss-missing"),
    pytest.param(with_claims(iss="https://evil.example"), "wrong_issuer", id="iss-wrong"),
    pytest.param(with_iss(lambda i: i[:-1]), "wrong_issuer", id="iss-prefix-of-ours"),
    pytest.param(with_iss(lambda i: i + "0"), "wrong_issuer", id="iss-ours-plus-suffix"),
    pytest.param(with_iss(lambda i: i + "/evil"), "wrong_issuer", id="iss-ours-plus-path"),
    pytest.param(with_iss(lambda i: i + ".evil.example"), "wrong_issuer", id="iss-host-suffix"),
    pytest.param(with_iss(str.upper), "wrong_issuer", id="iss-uppercase"),
    pytest.param(with_iss(lambda i: i.replace("http://", "HTTP://")), "wrong_issuer",
                 id="iss-scheme-case"),
    pytest.param(with_iss(lambda i: i.replace("http://", "https://")), "wrong_issuer",
                 id="iss-https-variant"),
    pytest.param(with_iss(lambda i: i + "//"), "wrong_issuer", id="iss-two-trailing-slashes"),
    pytest.param(lambda c: forge(rsa_header(c), claims(c, iss=[c.idp.issuer]), c.rsa),
                 "wrong_issuer", id="iss-list"),
    pytest.param(lambda c: forge(rsa_header(c), claims(c, iss=1), c.rsa), "wrong_issuer",
                 id="iss-number"),
    pytest.param(without("aud"), "claim_missing", id="aud-missing"),
    pytest.param(with_claims(aud="https://other.example.test/mcp"), "wrong_audience",
                 id="aud-wrong"),
    pytest.param(with_claims(aud=["https://other.example.test/mcp", "account"]),
                 "wrong_audience", id="aud-list-without-ours"),
    pytest.param(with_claims(aud=[]), "claim_missing", id="aud-empty-list"),
    pytest.param(with_claims(aud=AUDIENCE.replace("https:", "http:")), "wrong_audience",
                 id="aud-http-instead-of-https"),
    pytest.param(with_claims(aud=AUDIENCE + "/"), "wrong_audience", id="aud-trailing-slash"),
    pytest.param(with_claims(aud=AUDIENCE.upper()), "wrong_audience", id="aud-uppercase"),
    pytest.param(with_claims(aud=AUDIENCE[:-1]), "wrong_audience", id="aud-prefix-of-ours"),
    pytest.param(with_claims(aud=1), "wrong_audience", id="aud-number"),
    pytest.param(without("sub"), "claim_missing", id="sub-missing"),
    pytest.param(with_claims(sub=12345), "claim_invalid", id="sub-number"),
    pytest.param(with_claims(sub=None), "claim_invalid", id="sub-null"),
    pytest.param(with_claims(sub=["user-1"]), "claim_invalid", id="sub-list"),
    pytest.param(with_claims(sub=""), "claim_invalid", id="sub-empty"),
    pytest.param(with_claims(sub="   "), "claim_invalid", id="sub-whitespace"),
]


@pytest.mark.parametrize(("build", "reason"), CLAIMS_REFUSED)
async def test_bad_claims_are_refused(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream, build: Builder, reason: str
) -> None:
    outcome = await send(sidecar, auth(build(ctx)))
    assert_refused(outcome, upstream, reason=reason)


ACCEPTED = [
    pytest.param(good, id="baseline-RS256"),
    pytest.param(lambda c: c.idp.mint(c.ec), id="ES256"),
    pytest.param(lambda c: c.idp.mint(c.ed), id="EdDSA-Ed25519"),
    pytest.param(lambda c: forge({"alg": "RS256"}, claims(c), c.rsa),
                 id="no-kid-with-one-fitting-key"),
    pytest.param(with_header(typ="at+jwt"), id="typ-at+jwt"),
    pytest.param(lambda c: c.idp.mint(claims={"exp": now() + 300.5}), id="exp-float"),
    pytest.param(with_claims(exp=10**12), id="exp-year-33658"),
    pytest.param(with_claims(exp=2**62), id="exp-2**62"),
    pytest.param(lambda c: c.idp.mint(claims={"exp": now() - 10}), id="exp-past-within-leeway"),
    pytest.param(lambda c: c.idp.mint(claims={"nbf": now() + 10}), id="nbf-future-within-leeway"),
    pytest.param(lambda c: c.idp.mint(claims={"iat": now() + 10}), id="iat-future-within-leeway"),
    pytest.param(without("nbf", "iat"), id="nbf-and-iat-optional"),
    pytest.param(with_iss(lambda i: i + "/"), id="iss-one-trailing-slash-tolerated"),
    pytest.param(with_claims(aud=[AUDIENCE]), id="aud-list-with-ours"),
    pytest.param(with_claims(aud=["account", AUDIENCE]), id="aud-list-with-ours-and-others"),
]


@pytest.mark.parametrize("build", ACCEPTED)
async def test_valid_token_variants_are_accepted(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream, build: Builder
) -> None:
    outcome = await send(sidecar, auth(build(ctx)))
    assert_accepted(outcome, upstream)


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


async def test_ps256_token_verifies_against_rsa_jwk_published_without_alg(
    idp: FakeIdp, upstream: FakeUpstream, start: Start
) -> None:
    key = new_rsa(kid="ps-1", alg="PS256")
    key.publish_alg = False
    idp.keys[:] = [key]
    client = await start()
    assert_accepted(await send(client, auth(idp.mint(key))), upstream)


async def test_token_signed_with_a_1024_bit_rsa_key_is_refused_because_the_key_is_skipped(
    idp: FakeIdp, upstream: FakeUpstream, start: Start
) -> None:
    weak = SigningKey("weak-1024", "RS256", _weak_private())
    idp.keys.append(weak)
    client = await start()
    assert client.app[IDP].get_key("weak-1024") is None
    assert client.app[IDP].get_key(idp.keys[0].kid) is not None
    token = forge({"alg": "RS256", "kid": weak.kid}, claims_for(idp), weak)  # pyjwt would warn
    assert_refused(await send(client, auth(token)), upstream, reason="unknown_kid")


# --------------------------------------------------------------------------------------------
# The verified-token cache
# --------------------------------------------------------------------------------------------


async def test_same_token_is_accepted_twice(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream
) -> None:
    token = ctx.idp.mint()
    assert_accepted(await send(sidecar, auth(token)), upstream, count=1)
    assert_accepted(await send(sidecar, auth(token)), upstream, count=2)


async def test_cached_token_is_refused_once_it_expires(
    idp: FakeIdp, upstream: FakeUpstream, start: Start
) -> None:
    client = await start(JWT_LEEWAY_SECONDS="0")
    exp = math.ceil(time.time()) + 2
    token = idp.mint(claims={"exp": exp})
    assert_accepted(await send(client, auth(token)), upstream)
    await asyncio.sleep(max(0.0, exp - time.time()) + 0.1)  # bounded: at most ~3 s
    assert time.time() > exp
    assert_refused(await send(client, auth(token)), upstream, reason="expired", forwarded=1)


@pytest.mark.parametrize("leeway", [0, 30])
def test_expiry_starts_at_exp_plus_leeway_to_the_instant(leeway: int) -> None:
    exp = 1_700_000_000
    assert not expired(exp, exp + leeway - 0.001, leeway)
    assert expired(exp, exp + leeway, leeway)
    assert expired(exp + 0.75, exp + leeway, leeway)  # exp counts in whole seconds (pyjwt)


class FrozenClock:
    """The tokens module's clock only (never the event loop's or the IdP's)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.mark.parametrize("exp_offset", [0.0, 0.5])
@pytest.mark.parametrize("leeway", [0, 30])
async def test_cache_hit_and_fresh_verification_expire_at_the_same_instant(
    idp: FakeIdp, start: Start, monkeypatch: pytest.MonkeyPatch, leeway: int,
    exp_offset: float,
) -> None:
    """A cached token is refused at exactly the instant a fresh verification refuses it, also
    for an exp with a fraction (the cache once kept it half a second longer)."""
    client = await start(JWT_LEEWAY_SECONDS=str(leeway))
    verifier = client.app[VERIFIER]
    exp = math.ceil(time.time()) + 1000
    token = idp.mint(claims={"exp": exp + exp_offset})
    clock = FrozenClock(exp + leeway - 1)
    monkeypatch.setattr(tokens, "time", clock)
    await verifier.verify(token)
    assert verifier.cached(token) is not None

    clock.now = exp + leeway  # the same instant for both
    assert verifier.cached(token) is None
    with pytest.raises(TokenError) as fresh:
        await verifier.verify(token)
    assert fresh.value.reason == "expired"


async def rotate_to(client: Client, idp: FakeIdp, key: SigningKey) -> None:
    """Publish only `key`, then present a token with its (unknown) kid until the sidecar
    refetches the JWKS after JWKS_COOLDOWN_SECONDS=1 and accepts it (bounded: 5 s)."""
    idp.keys[:] = [key]
    deadline = time.monotonic() + 5.0
    while (await send(client, auth(idp.mint(key)))).status != 200:
        assert time.monotonic() < deadline, "the rotated key was never fetched"
        await asyncio.sleep(0.2)


async def test_cached_token_is_refused_after_its_key_leaves_the_jwks(
    idp: FakeIdp, upstream: FakeUpstream, start: Start
) -> None:
    client = await start()
    old_token = idp.mint()
    assert_accepted(await send(client, auth(old_token)), upstream)

    await rotate_to(client, idp, new_rsa(kid="rsa-2"))
    forwarded = len(upstream.requests)

    outcome = await send(client, auth(old_token))
    assert_refused(outcome, upstream, reason="unknown_kid", forwarded=forwarded)


async def test_cached_token_is_refused_when_its_kid_now_names_a_different_key(
    idp: FakeIdp, upstream: FakeUpstream, start: Start
) -> None:
    client = await start()
    old_key = idp.keys[0]
    old_token = idp.mint(old_key)
    assert_accepted(await send(client, auth(old_token)), upstream)
    await rotate_to(client, idp, new_rsa(kid="interim"))
    await rotate_to(client, idp, new_rsa(kid=old_key.kid))  # same kid, new material
    forwarded = len(upstream.requests)

    outcome = await send(client, auth(old_token))  # uncached, its signature no longer verifies
    assert_refused(outcome, upstream, reason="bad_signature", forwarded=forwarded)


# --------------------------------------------------------------------------------------------
# Unit: bearer_token() and parse_strict()
# --------------------------------------------------------------------------------------------

TOKEN = "aaa.bbb.ccc"


@pytest.mark.parametrize(
    ("authorization", "query", "expected"),
    [
        pytest.param([f"Bearer {TOKEN}"], [], TOKEN, id="canonical"),
        pytest.param([f"bearer {TOKEN}"], [], TOKEN, id="lowercase-scheme"),
        pytest.param([f"Bearer   {TOKEN}  "], [], TOKEN, id="extra-spaces"),
        pytest.param([f"  Bearer {TOKEN}"], [], TOKEN, id="leading-space"),
        pytest.param([f"Bearer {TOKEN}=="], [], TOKEN + "==", id="b64token-trailing-equals"),
        pytest.param([f"Bearer {TOKEN}"], ["state", "code"], TOKEN, id="unrelated-query"),
        pytest.param(["Bearer " + "a" * 1024], [], "a" * 1024, id="exactly-max-bytes"),
    ],
)
def test_bearer_token_extracts_the_token(
    authorization: list[str], query: list[str], expected: str
) -> None:
    assert bearer_token(authorization, query, 1024) == expected


@pytest.mark.parametrize(
    ("authorization", "query", "reason", "error", "status"),
    [
        pytest.param([], [], "missing", None, 401, id="no-header"),
        pytest.param([f"Bearer {TOKEN}"], ["access_token"], "token_in_query", "invalid_request",
                     400, id="token-in-query"),
        pytest.param([], ["access_token"], "token_in_query", "invalid_request", 400,
                     id="token-only-in-query"),
        pytest.param([f"Bearer {TOKEN}"] * 2, [], "duplicate_authorization", "invalid_request",
                     400, id="two-headers"),
        pytest.param(["Basic dXNlcjpwYXNz"], [], "not_bearer", None, 401, id="basic"),
        pytest.param(["Bearer"], [], "empty_token", "invalid_token", 401, id="no-token"),
        pytest.param(["Bearer    "], [], "empty_token", "invalid_token", 401, id="only-spaces"),
        pytest.param([""], [], "not_bearer", None, 401, id="empty-header"),
        pytest.param(["Bearer " + "a" * 1025], [], "token_too_large", "invalid_token", 401,
                     id="over-max-bytes"),
        pytest.param([f"Bearer {TOKEN} x"], [], "malformed", "invalid_token", 401,
                     id="inner-space"),
        pytest.param(["Bearer a=b.c"], [], "malformed", "invalid_token", 401,
                     id="equals-not-at-end"),
        pytest.param(["Bearer tökén"], [], "malformed", "invalid_token", 401, id="non-ascii"),
        pytest.param(["Bearer a\x00b"], [], "malformed", "invalid_token", 401, id="nul-byte"),
    ],
)
def test_bearer_token_refusals(
    authorization: list[str], query: list[str], reason: str, error: str | None, status: int
) -> None:
    with pytest.raises(TokenError) as caught:
        bearer_token(authorization, query, 1024)
    assert (caught.value.reason, caught.value.error, caught.value.status) == (
        reason, error, status)


def test_parse_strict_returns_header_and_payload() -> None:
    header_in, payload_in = {"alg": "RS256", "kid": "k"}, {"sub": "u", "n": [1, {"a": 2}]}
    assert parse_strict(unsigned(header_in, payload_in, "c2ln")) == (header_in, payload_in)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        pytest.param("a.b.c.d.e", "encrypted", id="five-segments"),
        pytest.param("abc", "malformed", id="one-segment"),
        pytest.param("a.b", "malformed", id="two-segments"),
        pytest.param("a.b.c.d", "malformed", id="four-segments"),
        pytest.param(unsigned({"alg": "RS256"}, {}, ""), "malformed", id="empty-signature"),
        pytest.param(unsigned({"alg": "RS256"}, {}, "c2ln") + "=", "malformed", id="padding"),
        pytest.param(unsigned({"alg": "RS256"}, {}, "c2/n"), "malformed", id="slash"),
        pytest.param(f"{seg('{')}.{seg({})}.c2ln", "malformed", id="header-not-json"),
        pytest.param(f"{seg('[]')}.{seg({})}.c2ln", "malformed", id="header-array"),
        pytest.param(f"{seg({})}.{seg('1')}.c2ln", "malformed", id="payload-number"),
        pytest.param(seg('{"a":1,"a":1}') + "." + seg({}) + ".c2ln", "malformed",
                     id="header-duplicate-identical-keys"),
        pytest.param(seg({}) + "." + seg('{"a":{"b":1,"b":2}}') + ".c2ln", "malformed",
                     id="payload-nested-duplicate"),
        pytest.param(f"{seg(nested(100_000))}.{seg({})}.c2ln", "malformed",
                     id="recursion-bomb"),
        pytest.param("A.e30.c2ln", "malformed", id="segment-length-1-mod-4"),
    ],
)
def test_parse_strict_refusals(token: str, reason: str) -> None:
    with pytest.raises(TokenError) as caught:
        parse_strict(token)
    assert (caught.value.reason, caught.value.error, caught.value.status) == (
        reason, "invalid_token", 401)


# --------------------------------------------------------------------------------------------
# JWT_AUDIENCE_CLAIM=client_id: AWS Cognito access tokens carry the app client in `client_id`
# --------------------------------------------------------------------------------------------

COGNITO_CLIENT = "4l1c3app0cl1ent1d"


def cognito_access(ctx: Ctx, **override: Any) -> str:
    payload = claims(ctx, **{"client_id": COGNITO_CLIENT, "token_use": "access", **override})
    del payload["aud"]
    return forge(rsa_header(ctx), payload, ctx.rsa)


COGNITO_REFUSED = [
    pytest.param(lambda c: cognito_access(c, client_id="another-client"), "wrong_audience",
                 id="other-app-client"),
    pytest.param(lambda c: cognito_access(c, client_id=[]), "claim_missing",
                 id="client-id-empty"),
    # An ID token names the client in `aud`, has no client_id and says token_use=id.
    pytest.param(lambda c: forge(rsa_header(c), claims(c, aud=COGNITO_CLIENT, token_use="id"),
                                 c.rsa), "id_token", id="id-token"),
    pytest.param(lambda c: forge(rsa_header(c), claims(c, aud=COGNITO_CLIENT), c.rsa),
                 "claim_missing", id="id-token-without-token-use"),
]


@pytest.mark.parametrize(("build", "reason"), COGNITO_REFUSED)
async def test_audience_in_client_id_refuses_other_clients_and_id_tokens(
    ctx: Ctx, start: Start, upstream: FakeUpstream, build: Builder, reason: str
) -> None:
    sidecar = await start(JWT_AUDIENCE_CLAIM="client_id", OIDC_AUDIENCE=COGNITO_CLIENT)
    assert_refused(await send(sidecar, auth(build(ctx))), upstream, reason=reason)


async def test_audience_in_client_id_admits_the_app_clients_access_token(
    ctx: Ctx, start: Start, upstream: FakeUpstream
) -> None:
    sidecar = await start(JWT_AUDIENCE_CLAIM="client_id", OIDC_AUDIENCE=COGNITO_CLIENT)
    assert_accepted(await send(sidecar, auth(cognito_access(ctx))), upstream)


async def test_client_id_is_not_an_audience_by_default(
    sidecar: Client, ctx: Ctx, upstream: FakeUpstream
) -> None:
    """Without the setting, a token whose only audience is client_id=<ours> has no aud."""
    token = cognito_access(ctx, client_id=AUDIENCE)
    assert_refused(await send(sidecar, auth(token)), upstream, reason="claim_missing")


# --------------------------------------------------------------------------------------------
# ID tokens presented as access tokens (JWT_ID_TOKEN_CHECK)
# --------------------------------------------------------------------------------------------

CLIENT = "mcp-client-7"


def id_shaped(**claims_: Any) -> Builder:
    """A genuine, signed token of our issuer and audience with these claims added."""
    return lambda c: forge(rsa_header(c), claims(c, **claims_), c.rsa)


MARKED_ID_TOKENS = [
    pytest.param(id_shaped(token_use="id"), id="cognito-token_use-id"),
    pytest.param(id_shaped(typ="ID", azp=CLIENT), id="keycloak-typ-claim-ID"),
    pytest.param(id_shaped(at_hash="x4bt4E6Zs6n6m6vYd0Dk2w"), id="at_hash"),
    pytest.param(id_shaped(c_hash="LDktKdoQak3Pk0cnXxCltA"), id="c_hash"),
    pytest.param(id_shaped(s_hash="5IN-E3hWFmu2CqF1zdXnzA"), id="s_hash-fapi"),
]
ACCESS_TOKENS = [
    pytest.param(id_shaped(azp=CLIENT, nonce="n-0S6_WzA2Mj"), id="authentik-access-with-nonce"),
    pytest.param(id_shaped(typ="Bearer", azp=CLIENT), id="keycloak-typ-claim-Bearer"),
    pytest.param(id_shaped(token_use="access", client_id=CLIENT), id="cognito-token_use-access"),
    pytest.param(id_shaped(cid=CLIENT), id="okta-cid"),
    pytest.param(id_shaped(appid=CLIENT), id="entra-v1-appid"),
]


@pytest.mark.parametrize("mode", ["marked", "client"])
@pytest.mark.parametrize("build", MARKED_ID_TOKENS)
async def test_tokens_that_say_they_are_id_tokens_are_refused(
    ctx: Ctx, start: Start, upstream: FakeUpstream, build: Builder, mode: str
) -> None:
    sidecar = await start(**({} if mode == "marked" else {"JWT_ID_TOKEN_CHECK": mode}))
    assert_refused(await send(sidecar, auth(build(ctx))), upstream, reason="id_token")


@pytest.mark.parametrize("mode", ["marked", "client"])
@pytest.mark.parametrize("build", ACCESS_TOKENS)
async def test_access_tokens_pass_the_id_token_check(
    ctx: Ctx, start: Start, upstream: FakeUpstream, build: Builder, mode: str
) -> None:
    sidecar = await start(JWT_ID_TOKEN_CHECK=mode)
    assert_accepted(await send(sidecar, auth(build(ctx))), upstream)


@pytest.mark.parametrize("build", [
    pytest.param(id_shaped(), id="authentik-id-token-no-azp"),
    pytest.param(id_shaped(nonce="n-0S6_WzA2Mj", auth_time=1_700_000_000, acr="1"),
                 id="id-token-with-nonce-only"),
    pytest.param(id_shaped(azp=""), id="empty-azp"),
    pytest.param(id_shaped(client_id=[CLIENT]), id="client_id-not-a-string"),
])
async def test_client_mode_refuses_tokens_that_name_no_client(
    ctx: Ctx, start: Start, upstream: FakeUpstream, build: Builder
) -> None:
    """authentik: the ID token and the access token share aud (the client id); only the access
    token carries azp. Unmarked, the ID token passes under `marked` and is refused under
    `client`."""
    marked = await start()
    assert_accepted(await send(marked, auth(build(ctx))), upstream)
    client = await start(JWT_ID_TOKEN_CHECK="client")
    assert_refused(await send(client, auth(build(ctx))), upstream, reason="id_token_no_client",
                   forwarded=1)


async def test_off_accepts_even_a_marked_id_token(
    ctx: Ctx, start: Start, upstream: FakeUpstream
) -> None:
    sidecar = await start(JWT_ID_TOKEN_CHECK="off")
    assert_accepted(await send(sidecar, auth(id_shaped(token_use="id", at_hash="x")(ctx))),
                    upstream)


@pytest.mark.parametrize("build", [
    pytest.param(id_shaped(cnf={"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}),
                 id="dpop-jkt"),
    pytest.param(id_shaped(cnf={"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}),
                 id="mtls-x5t"),
    pytest.param(id_shaped(cnf={}), id="empty-cnf"),
])
async def test_sender_constrained_tokens_are_refused_as_bearer_tokens(
    ctx: Ctx, start: Start, upstream: FakeUpstream, build: Builder
) -> None:
    """A DPoP- or mTLS-bound token's binding would silently fall away under `Bearer`, and a stolen
    copy would work without the client's key (RFC 9449 §7.2): refused, whatever the mode."""
    for mode in ("marked", "off"):
        sidecar = await start(JWT_ID_TOKEN_CHECK=mode)
        assert_refused(await send(sidecar, auth(build(ctx))), upstream,
                       reason="sender_constrained")
