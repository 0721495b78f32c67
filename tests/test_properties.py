"""Property-based tests (hypothesis): the sidecar's invariants under generated input.

Why: the table-driven tests pin the attacks we thought of; hypothesis generates the ones we did
not. Against the production app on loopback (fake IdP with real RSA keys, recording upstream):
never a 5xx of our own, never an upstream request without a genuine token, exactly one Bearer
challenge on every 401, and no token in any log line. Pure units: the strict parser and the
verifier refuse only with TokenError, `bearer_token()` takes only the Bearer scheme, the
allow-lists are monotonic, and the log redaction masks credentials wherever they sit.

"Genuine" is decided by an oracle independent of the sidecar: pyjwt alone, with the published
key, our issuer and audience (`Forge.accepts`). The sidecar may refuse more than the oracle (it
is stricter: no string times, no `typ: dpop+jwt` ...), never less.

Determinism: every property runs with `derandomize=True` and no example database, so CI sees the
same examples on every run. One sidecar serves all the examples of an HTTP property (hypothesis
does not reset function-scoped fixtures between examples, which is what we want here, hence the
suppressed `function_scoped_fixture` health check): upstream hits are counted per example as the
growth of `upstream.requests`, and a `Tally` checks after the last example that requests were
really sent and both outcomes (forwarded and refused) were seen.

Two product bugs found here are fixed and pinned by regression examples: a session id with a
non-UTF-8 byte reached another user's session (aiohttp's header writer drops the byte after the
binding check), and the log redaction missed a credential after a doubled scheme word.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import jwt
import pytest
import structlog
from conftest import AUDIENCE, FakeIdp, FakeUpstream, SidecarFactory, SigningKey, new_rsa
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from jwt.algorithms import RSAAlgorithm
from structlog.testing import capture_logs

from oauth_sidecar.auth.bearer import B64TOKEN, TokenError, bearer_token, parse_strict
from oauth_sidecar.auth.idp import VerificationKey
from oauth_sidecar.auth.policy import AccessPolicy, Denied
from oauth_sidecar.auth.tokens import TokenVerifier
from oauth_sidecar.config import DEFAULT_ALGORITHMS, PolicyConfig, TokenConfig
from oauth_sidecar.log import redact
from oauth_sidecar.request_keys import Principal

T = TypeVar("T")

METADATA_URL = "https://mcp.example.test/.well-known/oauth-protected-resource/mcp"
RAW_TIMEOUT = 5.0  # every request below is bounded
LEEWAY = 30  # JWT_LEEWAY_SECONDS default: the oracle tolerates the same clock skew
MAX_TOKEN = 16384  # JWT_MAX_TOKEN_BYTES default
ALGORITHMS = frozenset(DEFAULT_ALGORITHMS.split(","))
MIN_SENT = 50  # an HTTP property that sent fewer requests than this did not really run
SECRET_MIN = 16  # shorter strings may occur in logs by coincidence

# derandomize + no database: the same examples on every run, in CI and on a laptop.
UNIT = settings(max_examples=300, deadline=None, derandomize=True, database=None)
HTTP = settings(
    max_examples=150, deadline=None, derandomize=True, database=None,
    # One sidecar (function-scoped fixtures) deliberately serves every example; see the docstring.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# -- alphabets -------------------------------------------------------------------------------

B64URL = string.ascii_letters + string.digits + "-_"
B64TOKEN_CHARS = B64URL + ".~+/"
# Visible latin-1 (RFC 9110 field-vchar and obs-text) plus the two whitespace characters.
VISIBLE_LATIN1 = "".join(chr(c) for c in [*range(0x21, 0x7F), *range(0xA0, 0x100)]) + " \t"
TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"  # RFC 9110 §5.6.2 token
# A request target's characters, the tricky ones over-represented; no space, CR or LF (those
# make a different request, and request smuggling has its own tests in test_security.py).
PATH_CHARS = "abmcp%./;?#\\~-_:@!$&'()*+,=0123456789AaEeFf"

JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8,
)
JSON_OBJECTS: st.SearchStrategy[dict[str, Any]] = st.dictionaries(
    st.text(max_size=8), JSON_VALUES, max_size=5
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value).encode())


def sign(key: SigningKey | None, header: Any, payload: Any) -> str:
    """A compact JWS with exactly this header, RS256-signed by `key` (None: no signature)."""
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    if key is None:
        return signing_input + "."
    private = key.private
    assert isinstance(private, rsa.RSAPrivateKey)
    signature = private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def secret_parts(token: str) -> list[str]:
    """What must never be logged: the token, and each of its segments long enough to matter."""
    return [part for part in [token, *token.split(".")] if len(part) >= SECRET_MIN]


# -- the token forge and its oracle ----------------------------------------------------------


@dataclass(frozen=True)
class Forge:
    """Mints tokens for one issuer: genuine ones, and an attacker's near misses."""

    issuer: str
    key: SigningKey  # published by the IdP
    attacker: SigningKey  # never published; same kid as `key`

    def header(self, **overrides: Any) -> dict[str, Any]:
        return {"alg": self.key.alg, "typ": "JWT", "kid": self.key.kid, **overrides}

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        return {"iss": self.issuer, "aud": AUDIENCE, "sub": "user-1", "exp": now + 300,
                "iat": now, "nbf": now, **overrides}

    def valid(self, **claims: Any) -> str:
        return sign(self.key, self.header(), self.claims(**claims))

    def accepts(self, token: str) -> bool:
        """The oracle: would pyjwt alone, given the published key, accept this token?"""
        try:
            jwt.decode(
                token, self.key.private.public_key(), algorithms=[self.key.alg],
                audience=AUDIENCE, issuer=[self.issuer, self.issuer + "/"], leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except Exception:  # whatever pyjwt refuses or trips over is not a genuine token
            return False
        return True


def random_segments() -> st.SearchStrategy[str]:
    """Random bytes, base64url'd, in 1 to 5 dot-separated segments (5: the JWE shape)."""
    segment = st.binary(max_size=48).map(b64) | st.text(alphabet=B64URL, max_size=48)
    return st.lists(segment, min_size=1, max_size=5).map(".".join)


@st.composite
def flipped(draw: st.DrawFn, forge: Forge) -> str:
    """One character of one segment changed. Changing only the signature's padding bits leaves
    the token genuine: the oracle knows that, so such a token may reach the upstream."""
    segments = forge.valid().split(".")
    index = draw(st.integers(0, 2))
    segment = segments[index]
    position = draw(st.integers(0, len(segment) - 1))
    # Another character, chosen by offset so the draws do not depend on the key's signature.
    shift = draw(st.integers(1, len(B64URL) - 1))
    replacement = B64URL[(B64URL.index(segment[position]) + shift) % len(B64URL)]
    segments[index] = segment[:position] + replacement + segment[position + 1:]
    return ".".join(segments)


@st.composite
def reassembled(draw: st.DrawFn, forge: Forge) -> str:
    """The segments swapped, dropped, repeated (three of them in a new order, or 1, 2, 4, 5)."""
    segments = forge.valid().split(".")
    picks = draw(st.lists(st.integers(0, 2), min_size=1, max_size=5))
    return ".".join(segments[i] for i in picks)


@st.composite
def truncated_or_extended(draw: st.DrawFn, forge: Forge) -> str:
    token = forge.valid()
    extra = draw(st.text(alphabet=B64TOKEN_CHARS + "=", min_size=1, max_size=12))
    how = draw(st.sampled_from(["truncate", "append", "prepend"]))
    if how == "truncate":
        return token[:draw(st.integers(0, len(token) - 1))]
    return token + extra if how == "append" else extra + token


HEADER_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "alg": st.sampled_from(["none", "None", "NONE", "HS256", "RS384", "PS256", "ES256", "EdDSA",
                            "rs256", "", "RS256"]) | JSON_VALUES,
    "kid": st.sampled_from(["rsa-1", "", "unknown", "x" * 300, "../../jwks", "rsa-1 "])
    | JSON_VALUES,
    "typ": st.sampled_from(["JWT", "at+jwt", "dpop+jwt", "JWE", "id_token+jwt", "jwt"])
    | JSON_VALUES,
}
HEADER_EXTRAS: st.SearchStrategy[dict[str, Any]] = st.sampled_from([
    {}, {"crit": ["exp"]}, {"crit": []}, {"cty": "JWT"}, {"cty": "jwt"}, {"b64": False},
    {"jku": "http://127.0.0.1:9/jwks"}, {"x5u": "http://127.0.0.1:9/cert"}, {"x5c": ["AAAA"]},
    {"jwk": {"kty": "oct", "k": "c2VjcmV0"}}, {"enc": "A256GCM"}, {"zip": "DEF"},
])


@st.composite
def header_changed(draw: st.DrawFn, forge: Forge) -> str:
    """alg / kid / typ kept, dropped or changed, extensions added; re-signed by the published
    key (only the header checks can refuse) or keeping the original signature."""
    header = forge.header()
    for name, values in HEADER_VALUES.items():
        action = draw(st.sampled_from(["keep", "drop", "change"]))
        if action == "drop":
            del header[name]
        elif action == "change":
            header[name] = draw(values)
    header.update(draw(HEADER_EXTRAS))
    if draw(st.booleans()):
        return sign(forge.key, header, forge.claims())
    _, payload, signature = forge.valid().split(".")
    return f"{b64json(header)}.{payload}.{signature}"


@st.composite
def claims_changed(draw: st.DrawFn, forge: Forge) -> str:
    """iss / aud / sub / exp / nbf / iat kept, dropped, changed or junk; signed by the published
    key, the attacker's key (same kid, or its own), not at all, or the original signature kept."""
    now = int(time.time())
    choices: dict[str, st.SearchStrategy[Any]] = {
        "iss": st.sampled_from([forge.issuer + "/", forge.issuer + "//", forge.issuer.upper(),
                                "https://evil.example.test", ""]),
        "aud": st.sampled_from([[AUDIENCE], [AUDIENCE, "https://other.example.test"],
                                ["https://other.example.test"], AUDIENCE + "/", []]),
        "sub": st.sampled_from(["user-2", "", " ", "\u0000"]),
        "exp": st.sampled_from([now - 3600, now - 2 * LEEWAY, now + 10**9, str(now + 300),
                                float(now + 300), 10**400, float("inf"), float("nan"), True]),
        "nbf": st.sampled_from([now + 3600, now + LEEWAY // 2, str(now), float("nan")]),
        "iat": st.sampled_from([now + 3600, "now", -(10**30)]),
    }
    claims = forge.claims()
    for name, values in choices.items():
        action = draw(st.sampled_from(["keep", "drop", "change", "junk"]))
        if action == "drop":
            del claims[name]
        elif action == "change":
            claims[name] = draw(values)
        elif action == "junk":
            claims[name] = draw(JSON_VALUES)
    signer = draw(st.sampled_from(["published", "attacker", "attacker-kid", "none", "original"]))
    if signer == "published":
        return sign(forge.key, forge.header(), claims)
    if signer == "attacker":
        return sign(forge.attacker, forge.header(), claims)
    if signer == "attacker-kid":
        return sign(forge.attacker, forge.header(kid="attacker-1"), claims)
    if signer == "none":
        return sign(None, forge.header(alg="none"), claims)
    header, _, signature = forge.valid().split(".")
    return f"{header}.{b64json(claims)}.{signature}"


@st.composite
def generated_json(draw: st.DrawFn, forge: Forge) -> str:
    """Header and payload generated as JSON, with a real RS256 signature by either key."""
    header = draw(JSON_OBJECTS)
    if draw(st.booleans()):
        header["alg"] = "RS256"
    if draw(st.booleans()):
        header["kid"] = forge.key.kid
    payload = draw(JSON_OBJECTS)
    if draw(st.booleans()):
        payload = {**forge.claims(), **payload}
    return sign(draw(st.sampled_from([forge.attacker, forge.key])), header, payload)


@st.composite
def hmac_confused(draw: st.DrawFn, forge: Forge) -> str:
    """HS256/384/512 keyed with the published public key in PEM, DER or JWK form."""
    alg = draw(st.sampled_from(["HS256", "HS384", "HS512"]))
    public = forge.key.private.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    secret = draw(st.sampled_from([
        public.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        RSAAlgorithm.to_jwk(public).encode(),
        b"",
    ]))
    signing_input = f"{b64json(forge.header(alg=alg))}.{b64json(forge.claims())}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), digest).digest())}"


def genuine(forge: Forge) -> st.SearchStrategy[str]:
    """Genuine tokens, told apart by their jti (hypothesis runs an example without any entropy of
    its own only once, so a constant strategy would be tried a single time)."""
    return st.text(alphabet=B64URL, min_size=1, max_size=16).map(lambda jti: forge.valid(jti=jti))


def tokens(forge: Forge) -> st.SearchStrategy[str]:
    """Every kind of bearer token we generate, genuine ones included."""
    return st.one_of(
        genuine(forge), random_segments(), flipped(forge), reassembled(forge),
        truncated_or_extended(forge), header_changed(forge), claims_changed(forge),
        generated_json(forge), hmac_confused(forge),
    )


def mostly_forged(forge: Forge) -> st.SearchStrategy[str]:
    """tokens(), with more genuine ones, so that acceptance is exercised as well."""
    return st.integers(0, 3).flatmap(lambda n: genuine(forge) if n == 0 else tokens(forge))


# -- talking to the sidecar over a raw socket (nothing normalises what we send) -----------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, list[str]]  # lower-cased names


async def exchange(
    port: int, method: str, target: str, headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> Answer:
    """One HTTP/1.1 request on a fresh connection, sent byte for byte as given (latin-1).

    Reads to EOF (the server closes after `Connection: close`), so the access-log line has been
    written and any upstream request has been recorded; an event stream is not waited for.
    """
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             *(f"{name}: {value}" for name, value in headers)]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    async with asyncio.timeout(RAW_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(payload)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
            parsed: dict[str, list[str]] = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                parsed.setdefault(name.strip().lower(), []).append(value.strip())
            if not any("text/event-stream" in v for v in parsed.get("content-type", [])):
                with suppress(ConnectionError):
                    await reader.read()
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
    return Answer(int(status_line.split(" ")[1]), parsed)


@dataclass(frozen=True)
class Target:
    """The running sidecar, what stands behind it, and tokens for its IdP."""

    port: int
    upstream: FakeUpstream
    forge: Forge


@dataclass
class Tally:
    """What the examples of one HTTP property did, checked after the last one: enough requests,
    some forwarded, and every status in `must_see` answered at least once."""

    statuses: Counter[int] = field(default_factory=Counter)
    forwarded: int = 0
    must_see: set[int] = field(default_factory=set)


@pytest.fixture(scope="module")
def attacker() -> SigningKey:
    """A key the IdP never published, under the published key's own kid ("rsa-1")."""
    return new_rsa()


@pytest.fixture
async def target(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream, attacker: SigningKey
) -> Target:
    # The per-IP failure budget would turn bad tokens into 429s after 600 examples: off here
    # (test_ratelimit.py covers it). Per-subject limits are off in conftest's environment.
    client = await make_sidecar(RATE_LIMIT_UNAUTHENTICATED_RPM="0")
    assert client.port is not None
    assert attacker.kid == idp.keys[0].kid
    return Target(client.port, upstream, Forge(idp.issuer, idp.keys[0], attacker))


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    failed_before = request.session.testsfailed
    seen = Tally()
    yield seen
    if request.session.testsfailed > failed_before:
        return  # the property itself failed: that report says everything
    sent = sum(seen.statuses.values())
    assert sent >= MIN_SENT, f"only {sent} requests were sent"
    assert seen.forwarded > 0, "no example reached the upstream: the oracle was never exercised"
    missing = seen.must_see - set(seen.statuses)
    assert not missing, f"no example answered {sorted(missing)}: {dict(seen.statuses)}"


NEVER_UPSTREAM = frozenset({"authorization", "cookie", "proxy-authorization", "x-forwarded-user",
                            "x-forwarded-email", "x-forwarded-groups", "x-forwarded-issuer",
                            "remote-user", "x-remote-user", "forwarded", "x-real-ip"})


def check(
    answer: Answer, target: Target, hits_before: int, genuine_token: bool, tally: Tally
) -> None:
    """The invariants every HTTP property asserts, whatever was sent."""
    reached = target.upstream.requests[hits_before:]
    tally.statuses[answer.status] += 1
    tally.forwarded += len(reached)
    event(f"status {answer.status}")
    # With a healthy upstream even the proxy's documented 502/504 cannot occur.
    assert answer.status < 500, answer
    if not genuine_token:
        assert reached == [], f"reached the upstream without a genuine token: {reached}"
    for recorded in reached:
        names = {name.lower().replace("_", "-") for name in recorded.headers}
        assert not names & NEVER_UPSTREAM, recorded.headers
        assert not any(name.startswith("x-auth-request-") for name in names), recorded.headers
    challenges = answer.headers.get("www-authenticate", [])
    if answer.status == 401:
        assert len(challenges) == 1, answer
        assert challenges[0].startswith("Bearer "), challenges
        assert f'resource_metadata="{METADATA_URL}"' in challenges[0], challenges


METHODS = st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"])
BODY = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'


# -- HTTP: generated tokens, Authorization values, paths and headers -----------------------------


@settings(HTTP, max_examples=200)
@given(data=st.data())
async def test_generated_tokens_never_5xx_and_reach_upstream_only_when_genuine(
    data: st.DataObject, target: Target, tally: Tally
) -> None:
    tally.must_see |= {200, 401}
    token = data.draw(mostly_forged(target.forge), label="token")
    method = data.draw(METHODS, label="method")
    before = len(target.upstream.requests)
    answer = await exchange(target.port, method, "/mcp", [("Authorization", f"Bearer {token}")],
                            BODY if method in ("POST", "PUT", "PATCH") else b"")
    check(answer, target, before, target.forge.accepts(token), tally)


SCHEMES = st.sampled_from([
    "Bearer", "bearer", "BEARER", "bEaReR", "Basic", "Digest", "DPoP", "Token", "Negotiate",
    "Bearer,", "Bear", "Bearerx", "", "B\u00e9arer", "Bearer:",
]) | st.text(alphabet=VISIBLE_LATIN1, max_size=8)
SEPARATORS = st.sampled_from([" ", "", "  ", "\t", " \t", "\xa0", ",", "=", " , "])
PADDING = st.sampled_from(["", " ", "  ", "\t", ","])


@st.composite
def authorization_value(draw: st.DrawFn, forge: Forge) -> str:
    kind = draw(st.sampled_from(["token", "text", "empty"]))
    credential_strategy = {
        "token": mostly_forged(forge), "text": st.text(alphabet=VISIBLE_LATIN1, max_size=30),
        "empty": st.just(""),
    }[kind]
    credential = draw(credential_strategy)
    if draw(st.booleans()):  # a well-formed Bearer line half the time, so some are accepted
        return f"Bearer {credential}"
    return (draw(PADDING) + draw(SCHEMES) + draw(SEPARATORS) + credential
            + draw(PADDING))


def carries_genuine_token(values: Sequence[str], forge: Forge) -> bool:
    """Permissive on purpose: any whitespace/comma/equals-separated word the oracle accepts."""
    return any(forge.accepts(word) for value in values
               for word in re.split(r"[\s,=\xa0]+", value) if word)


@settings(HTTP, max_examples=200)
@given(data=st.data())
async def test_generated_authorization_headers_never_5xx_and_never_smuggle_a_token(
    data: st.DataObject, target: Target, tally: Tally
) -> None:
    tally.must_see |= {200, 400, 401}
    one = authorization_value(target.forge)
    # Mostly one header (two or more are refused as duplicates before anything else is looked at).
    count = data.draw(st.integers(0, 9).map(lambda n: 1 if n < 6 else n - 6), label="count")
    values = data.draw(st.lists(one, min_size=count, max_size=count), label="values")
    before = len(target.upstream.requests)
    answer = await exchange(target.port, "POST", "/mcp",
                            [("Authorization", value) for value in values], BODY)
    check(answer, target, before, carries_genuine_token(values, target.forge), tally)


PATH_SEGMENTS = st.sampled_from([
    "mcp", "MCP", "Mcp", "healthz", "readyz", ".well-known", "oauth-protected-resource",
    "oauth-authorization-server", "openid-configuration", "authorize", "token", "register",
    "oauth", "callback", ".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "%2f", "%2F", "%5c", "%5C",
    "%00", "%23", "%3F", "%3b", ";", ";x=1", "mcp;", "%", "%zz", "%c3%a9", "%ff", "\\", "~",
    "%7e", "", "mcp?access_token=x", "healthz#frag", "%252e%252e",
]) | st.text(alphabet=PATH_CHARS, max_size=10) | st.text(max_size=6).map(
    lambda s: quote(s, safe="")
) | st.text(alphabet="".join(chr(c) for c in range(0xA0, 0x100)), min_size=1, max_size=3)


@st.composite
def request_targets(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 30)) == 0:
        return "*"
    prefix = draw(st.just("") | st.sampled_from(["http://127.0.0.1", "http://mcp.example.test"]))
    slashes = "/" * draw(st.integers(0, 3))
    segments = draw(st.lists(PATH_SEGMENTS, max_size=5))
    tail = draw(st.sampled_from(["", "/", "?x=1", "?", "#x", "?a=%2e%2e/mcp"]))
    return prefix + slashes + "/".join(segments) + tail


@settings(HTTP, max_examples=200)
@given(data=st.data())
async def test_generated_paths_never_skip_authentication_or_5xx(
    data: st.DataObject, target: Target, tally: Tally
) -> None:
    tally.must_see |= {200, 400, 401}
    request_target = data.draw(request_targets(), label="target")
    method = data.draw(METHODS, label="method")
    token = target.forge.valid() if data.draw(st.booleans(), label="with_token") else None
    headers = [("Authorization", f"Bearer {token}")] if token else []
    before = len(target.upstream.requests)
    answer = await exchange(target.port, method, request_target, headers,
                            BODY if method in ("POST", "PUT", "PATCH") else b"")
    check(answer, target, before, token is not None, tally)


FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "expect", "upgrade",
                     "host", "te", "keep-alive", "authorization"})
HEADER_NAMES = st.sampled_from([
    "X-Forwarded-For", "X-Forwarded-User", "X_Forwarded_User", "X-Forwarded-Host",
    "X-Forwarded-Proto", "Forwarded", "X-Real-IP", "Remote-User", "X-Remote-User",
    "X-Auth-Request-User", "X-Auth-Request-Email", "Cookie", "Proxy-Authorization", "Origin",
    "Mcp-Session-Id", "MCP-Protocol-Version", "X-Request-Id", "Accept", "Content-Type",
    "Accept-Encoding", "Access-Control-Request-Method", "Access-Control-Request-Headers",
    "Last-Event-ID", "Range", "Via", "Max-Forwards", "X-HTTP-Method-Override", "Authorization_",
    "Cache-Control",
]) | st.text(alphabet=TCHAR, min_size=1, max_size=20)
HEADER_VALUES_TEXT = st.sampled_from([
    "https://claude.ai", "https://evil.example.test", "null", "GET", "POST",
    "Mcp-Param-Name, Mcp-Param-\u00e9", "2025-11-25", "127.0.0.1", "admin", "",
]) | st.text(alphabet=VISIBLE_LATIN1, max_size=40)


@HTTP
@given(data=st.data())
async def test_generated_extra_headers_never_5xx_or_reach_upstream_without_a_token(
    data: st.DataObject, target: Target, tally: Tally
) -> None:
    """Names are RFC 9110 tokens, values visible latin-1 sent as raw bytes. Framing headers are
    left out: they change where the request ends, which test_security.py covers."""
    tally.must_see |= {200, 401}
    extra = data.draw(st.lists(
        st.tuples(HEADER_NAMES.filter(lambda n: n.lower() not in FRAMING), HEADER_VALUES_TEXT),
        max_size=6,
    ), label="headers")
    method = data.draw(METHODS, label="method")
    token = target.forge.valid() if data.draw(st.booleans(), label="with_token") else None
    headers = [*extra, *([("Authorization", f"Bearer {token}")] if token else [])]
    before = len(target.upstream.requests)
    answer = await exchange(target.port, method, "/mcp", headers,
                            BODY if method in ("POST", "PUT", "PATCH") else b"")
    check(answer, target, before, token is not None, tally)


# -- HTTP: session binding ------------------------------------------------------------------------


@st.composite
def near_session_ids(draw: st.DrawFn, session_id: str) -> str:
    """`session_id` with one to three obs-text bytes (0x80-0xFF) inserted anywhere."""
    chars = list(session_id)
    for _ in range(draw(st.integers(1, 3))):
        chars.insert(draw(st.integers(0, len(chars))),
                     draw(st.sampled_from([chr(c) for c in range(0x80, 0x100)])))
    return "".join(chars)


@settings(HTTP, max_examples=60)
@example(session_id="session-1\xff")
@given(session_id=near_session_ids("session-1") | st.text(alphabet=VISIBLE_LATIN1, max_size=12))
async def test_another_users_session_id_never_reaches_the_upstream_in_any_spelling(
    session_id: str, target: Target
) -> None:
    forge = target.forge
    alice = sign(forge.key, forge.header(), forge.claims(sub="alice"))
    bob = sign(forge.key, forge.header(), forge.claims(sub="bob"))
    # Alice's request makes the fake upstream issue "session-1", which is bound to her.
    created = await exchange(target.port, "POST", "/mcp", [("Authorization", f"Bearer {alice}")],
                             BODY)
    assert created.status == 200
    assert created.headers["mcp-session-id"] == ["session-1"]
    before = len(target.upstream.requests)
    answer = await exchange(target.port, "POST", "/mcp", [
        ("Authorization", f"Bearer {bob}"), ("Mcp-Session-Id", session_id)], BODY)
    assert answer.status < 500, answer
    for recorded in target.upstream.requests[before:]:
        presented = {k.lower(): v for k, v in recorded.headers.items()}.get("mcp-session-id")
        assert presented != "session-1", f"Bob reached Alice's session with {session_id!r}"


# -- HTTP: no generated token in any log line -----------------------------------------------------

CARRIERS = st.sampled_from([
    "bearer", "bearer-lower", "basic", "dpop", "proxy-authorization", "cookie",
    "query-access-token", "query-token", "token-endpoint",
])


def carry(carrier: str, token: str) -> tuple[str, str, list[tuple[str, str]], bytes]:
    """(method, target, headers, body) presenting `token` the way `carrier` says."""
    form = [("Content-Type", "application/x-www-form-urlencoded")]
    return {
        "bearer": ("POST", "/mcp", [("Authorization", f"Bearer {token}")], BODY),
        "bearer-lower": ("GET", "/mcp", [("Authorization", f"bearer  {token} ")], b""),
        "basic": ("POST", "/mcp", [("Authorization", f"Basic {token}")], BODY),
        "dpop": ("POST", "/mcp", [("Authorization", f"DPoP {token}")], BODY),
        "proxy-authorization": ("POST", "/mcp", [("Proxy-Authorization", f"Bearer {token}")],
                                BODY),
        "cookie": ("GET", "/mcp", [("Cookie", f"access_token={token}")], b""),
        "query-access-token": ("GET", f"/mcp?access_token={token}", [], b""),
        "query-token": ("GET", f"/healthz?token={token}", [], b""),
        "token-endpoint": ("POST", "/token", [*form, ("Authorization", f"Bearer {token}")],
                           f"grant_type=refresh_token&refresh_token={token}".encode()),
    }[carrier]


@settings(HTTP, max_examples=150)
@given(data=st.data())
async def test_no_generated_token_appears_in_any_log_line(
    data: st.DataObject, target: Target, tally: Tally, caplog: pytest.LogCaptureFixture
) -> None:
    tally.must_see |= {200, 401}
    opaque = st.text(alphabet=B64TOKEN_CHARS, min_size=SECRET_MIN, max_size=64)
    token = data.draw(mostly_forged(target.forge) | opaque, label="token")
    method, request_target, headers, body = carry(data.draw(CARRIERS, label="carrier"), token)
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    before = len(target.upstream.requests)
    with capture_logs() as events:
        answer = await exchange(target.port, method, request_target, headers, body)
    check(answer, target, before, target.forge.accepts(token), tally)
    assert any(e.get("event") == "request" for e in events), events  # the access line was caught
    # aiohttp.access is the test servers' own access log; production runs with access_log=None.
    stdlib = [r.getMessage() + repr(r.args) + repr(r.exc_info)
              for r in caplog.records if r.name != "aiohttp.access"]
    logged = repr(events) + "\n".join(stdlib)
    for part in secret_parts(token):
        assert part not in logged, f"token material in the logs: {part[:12]}..."


# -- pure units: parser, verifier, bearer_token, policy, redaction -------------------------------


def outcome(call: Callable[[], T]) -> T | TokenError:
    """The result, or the TokenError refusal; any other exception fails the property."""
    try:
        return call()
    except TokenError as exc:
        return exc


def junk_text() -> st.SearchStrategy[str]:
    """Strings of every kind: text, latin-1 decoded bytes, JWT-ish shapes, deep JSON."""
    deep = st.integers(1, 3000).map(lambda n: b64(("[" * n + "]" * n).encode()))
    return st.one_of(
        st.text(), st.binary().map(lambda b: b.decode("latin-1")), random_segments(),
        st.builds(lambda h, p, s: f"{h}.{p}.{s}", JSON_OBJECTS.map(b64json),
                  JSON_VALUES.map(b64json), st.binary(max_size=16).map(b64)),
        st.builds(lambda h, p: f"{h}.{p}.c2ln", st.just(b64json({"alg": "RS256"})), deep),
        st.text(alphabet=B64TOKEN_CHARS + "=", max_size=80),
    )


@settings(UNIT, max_examples=500)
@given(token=junk_text())
def test_parse_strict_returns_two_objects_or_refuses_with_token_error(token: str) -> None:
    result = outcome(lambda: parse_strict(token))
    if isinstance(result, TokenError):
        assert result.reason in {"malformed", "encrypted"}
        assert result.status == 401
    else:
        header, payload = result
        assert isinstance(header, dict)
        assert isinstance(payload, dict)
        assert token.count(".") == 2


FINITE_JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8,
)


@UNIT
@given(
    header=st.dictionaries(st.text(max_size=8), FINITE_JSON, max_size=4),
    payload=st.dictionaries(st.text(max_size=8), FINITE_JSON, max_size=4),
    signature=st.binary(min_size=1, max_size=32),
)
def test_parse_strict_round_trips_every_json_object(
    header: dict[str, Any], payload: dict[str, Any], signature: bytes
) -> None:
    token = f"{b64json(header)}.{b64json(payload)}.{b64(signature)}"
    assert parse_strict(token) == (header, payload)


@dataclass
class PublishedKey:
    """A KeySource that always has exactly one key (what the verifier sees of a healthy IdP)."""

    key: VerificationKey
    refreshes: int = 0

    @property
    def ready(self) -> bool:
        return True

    def get_key(self, kid: str | None) -> VerificationKey | None:
        return self.key if kid == self.key.kid else None

    def all_keys(self) -> list[VerificationKey]:
        return [self.key]

    async def refresh_for_unknown_kid(self) -> None:
        self.refreshes += 1


@pytest.fixture(scope="module")
def unit_forge(attacker: SigningKey) -> Forge:
    return Forge("https://idp.example.test/realms/demo", new_rsa(), attacker)


@settings(UNIT, max_examples=400)
@given(data=st.data())
async def test_verifier_refuses_only_with_token_error_and_accepts_only_genuine_tokens(
    data: st.DataObject, unit_forge: Forge
) -> None:
    forge = unit_forge
    junk = data.draw(st.integers(0, 2).map(lambda n: n == 0), label="junk")
    token = data.draw(junk_text() if junk else mostly_forged(forge), label="token")
    published = VerificationKey(forge.key.kid, forge.key.private.public_key(),
                                frozenset({forge.key.alg}))
    verifier = TokenVerifier(TokenConfig(
        issuer=forge.issuer, audiences=(AUDIENCE,), algorithms=ALGORITHMS, leeway=LEEWAY,
        max_token_bytes=MAX_TOKEN, cache_size=8,
    ), PublishedKey(published))
    try:
        result: Principal | TokenError = await verifier.verify(token)
    except TokenError as exc:
        result = exc
    if isinstance(result, TokenError):
        event(f"refused: {result.reason}")
        assert result.status == 401
        assert result.error == "invalid_token"
    else:
        principal = result
        event("accepted")
        assert forge.accepts(token), token
        assert principal.subject == principal.claims["sub"]
        assert principal.issuer in (forge.issuer, forge.issuer + "/")
        assert verifier.cached(token) == principal


@settings(UNIT, max_examples=400)
@given(data=st.data())
async def test_explain_gives_the_verdict_verify_gives_for_every_generated_token(
    data: st.DataObject, unit_forge: Forge
) -> None:
    """`oauth-sidecar check --token` renders explain(): its first failure is exactly what
    verify() raises, and a token it finds no fault with is one verify() accepts."""
    forge = unit_forge
    junk = data.draw(st.integers(0, 2).map(lambda n: n == 0), label="junk")
    token = data.draw(junk_text() if junk else mostly_forged(forge), label="token")
    mode = data.draw(st.sampled_from(["marked", "client", "off"]), label="JWT_ID_TOKEN_CHECK")
    published = VerificationKey(forge.key.kid, forge.key.private.public_key(),
                                frozenset({forge.key.alg}))
    config = TokenConfig(issuer=forge.issuer, audiences=(AUDIENCE,), algorithms=ALGORITHMS,
                         leeway=LEEWAY, max_token_bytes=MAX_TOKEN, cache_size=0,
                         id_token_check=mode)
    verifier = TokenVerifier(config, PublishedKey(published))
    explanation = await verifier.explain(token)
    try:
        result: Principal | TokenError = await verifier.verify(token)
    except TokenError as exc:
        result = exc
    if isinstance(result, TokenError):
        event(f"refused: {result.reason}")
        assert explanation.error is not None, token
        assert (explanation.error.reason, explanation.error.description) == (
            result.reason, result.description)
        # The verdict is one of the lines the doctor shows.
        assert any(error is explanation.error for error in explanation.outcomes.values())
    else:
        event("accepted")
        assert explanation.error is None
        assert all(error is None for error in explanation.outcomes.values())


@settings(UNIT, max_examples=500)
@given(
    values=st.lists(st.text(alphabet=VISIBLE_LATIN1 + "\xa0\x85", max_size=40)
                    | st.builds(lambda s, t: s + t, SCHEMES, st.text(B64TOKEN_CHARS + " =")),
                    max_size=3),
    query_keys=st.lists(st.sampled_from(["access_token", "token", "x", "Access_Token"]),
                        max_size=2),
)
def test_bearer_token_returns_only_a_single_bearer_credential(
    values: list[str], query_keys: list[str]
) -> None:
    token = outcome(lambda: bearer_token(values, query_keys, MAX_TOKEN))
    if isinstance(token, TokenError):
        assert token.status in (400, 401)
    else:
        assert "access_token" not in query_keys
        [value] = values
        scheme, _, rest = value.strip().partition(" ")
        assert scheme.lower() == "bearer"
        assert token == rest.strip(" ")
        assert B64TOKEN.fullmatch(token)
        assert 0 < len(token) <= MAX_TOKEN


@settings(UNIT, max_examples=500)
@example(scheme="Basic", separator=" ", credential="dXNlcjpwYXNz")
@example(scheme="Bearer,", separator=" ", credential="abc")
@example(scheme="Bearerabc", separator="", credential="")
@given(
    scheme=SCHEMES.filter(lambda s: s.strip().lower() != "bearer"),
    separator=SEPARATORS,
    credential=st.text(alphabet=B64TOKEN_CHARS + "=", max_size=40),
)
def test_bearer_token_never_returns_a_credential_of_another_scheme(
    scheme: str, separator: str, credential: str
) -> None:
    value = scheme + separator + credential
    # The scheme is the first space-delimited word: e.g. "Bear" + "er tok" is a Bearer value.
    assume(value.strip().partition(" ")[0].lower() != "bearer")
    with pytest.raises(TokenError) as refused:
        bearer_token([value], [], MAX_TOKEN)
    assert refused.value.reason in {"not_bearer", "missing"}
    assert refused.value.error is None  # RFC 6750 §3.1: a plain challenge, no error code


NAMES = st.sampled_from(["alice", "bob", "Alice", "user-1", "ops", ""])
DOMAINS = st.sampled_from(["example.com", "Example.COM", "evil.com", "sub.example.com",
                           "example.com.evil.com", "com"])
EMAILS = st.builds(lambda local, domain: f"{local}@{domain}", NAMES, DOMAINS) | st.sampled_from(
    ["", "no-at", "a@b@example.com", "@example.com", "alice@"]
)
GROUPS = st.sampled_from(["admins", "devs", "Admins", "ops", ""])
SCOPES = st.sampled_from(["read", "write", "admin", "mcp:tools"])


@st.composite
def policy_configs(draw: st.DrawFn) -> PolicyConfig:
    """As config.load builds them: emails and domains lower-cased."""
    return PolicyConfig(
        subs=frozenset(draw(st.lists(NAMES, max_size=2))),
        emails=frozenset(e.lower() for e in draw(st.lists(EMAILS, max_size=2))),
        email_domains=frozenset(d.lower() for d in draw(st.lists(DOMAINS, max_size=2))),
        groups=frozenset(draw(st.lists(GROUPS, max_size=2))),
        groups_claim=draw(st.sampled_from([("groups",), ("realm_access", "roles")])),
        allow_all_authenticated=draw(st.booleans()),
        allow_unverified_email=draw(st.booleans()),
        required_scopes=tuple(draw(st.lists(SCOPES, max_size=2, unique=True))),
    )


@st.composite
def callers(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A verified subject and claims: realistic values, junk types now and then."""
    subject = draw(NAMES.filter(bool))
    claims: dict[str, Any] = {"sub": subject}
    if draw(st.booleans()):
        claims["email"] = draw(EMAILS | JSON_VALUES)
    if draw(st.booleans()):
        claims["email_verified"] = draw(st.sampled_from([True, False, "true", "TRUE", "false",
                                                         1, None]))
    groups = draw(st.lists(GROUPS, max_size=3) | JSON_VALUES)
    where = draw(st.sampled_from(["groups", "realm_access", "nowhere"]))
    if where == "groups":
        claims["groups"] = groups
    elif where == "realm_access":
        claims["realm_access"] = {"roles": groups}
    scopes = draw(st.lists(SCOPES, max_size=3))
    scope_form = draw(st.sampled_from(["scope", "scp", "none", "junk"]))
    if scope_form == "scope":
        claims["scope"] = " ".join(scopes)
    elif scope_form == "scp":
        claims["scp"] = scopes
    elif scope_form == "junk":
        claims["scope"] = draw(JSON_VALUES)
    return subject, claims


def decision(config: PolicyConfig, subject: str, claims: dict[str, Any]) -> str:
    try:
        AccessPolicy(config).check(subject, claims)
    except Denied as denied:
        return denied.reason
    return "allowed"


LISTS = ("subs", "emails", "email_domains", "groups")


@UNIT
@given(config=policy_configs(), caller=callers(), where=st.sampled_from(LISTS),
       entry=NAMES | EMAILS | DOMAINS | GROUPS)
def test_adding_an_allow_list_entry_never_turns_allow_into_deny(
    config: PolicyConfig, caller: tuple[str, dict[str, Any]], where: str, entry: str
) -> None:
    # With no list set, ALLOW_ALL_AUTHENTICATED decides; the first entry replaces it (by design),
    # so monotonicity is a property of configurations that already have an allow-list.
    assume(any(getattr(config, name) for name in LISTS))
    entry = entry.lower() if where in ("emails", "email_domains") else entry
    grown = dataclasses.replace(config, **{where: getattr(config, where) | {entry}})
    before, after = decision(config, *caller), decision(grown, *caller)
    event(f"{before} -> {after}")
    if before == "allowed":
        assert after == "allowed"
    if after == "not_allowed":
        assert before == "not_allowed"


@UNIT
@given(config=policy_configs(), caller=callers(), data=st.data())
def test_an_entry_matching_the_caller_always_admits_them(
    config: PolicyConfig, caller: tuple[str, dict[str, Any]], data: st.DataObject
) -> None:
    subject, claims = caller
    policy = AccessPolicy(config)
    email, groups = policy.verified_email(claims), policy.groups(claims)
    entries: list[tuple[str, str]] = [("subs", subject)]
    if email is not None:
        entries += [("emails", email), ("email_domains", email.partition("@")[2])]
    entries += [("groups", group) for group in groups]
    where, entry = data.draw(st.sampled_from(entries), label="matching entry")
    grown = dataclasses.replace(config, **{where: getattr(config, where) | {entry}})
    outcome = decision(grown, subject, claims)
    event(f"{where}: {outcome}")
    assert outcome != "not_allowed"
    assert (outcome == "allowed") == (set(config.required_scopes) <= policy.scopes(claims))


@UNIT
@given(config=policy_configs(), caller=callers(), more=st.lists(SCOPES, min_size=1, max_size=3),
       fewer=st.integers(0, 2))
def test_more_token_scopes_or_fewer_required_scopes_never_deny(
    config: PolicyConfig, caller: tuple[str, dict[str, Any]], more: list[str], fewer: int
) -> None:
    subject, claims = caller
    held = AccessPolicy(config).scopes(claims)
    richer = {**claims, "scope": " ".join(sorted(held | set(more)))}
    richer.pop("scp", None)
    relaxed = dataclasses.replace(config, required_scopes=config.required_scopes[fewer:])
    before = decision(config, subject, claims)
    event(before)
    if before == "allowed":
        assert decision(config, subject, richer) == "allowed"
        assert decision(relaxed, subject, claims) == "allowed"
    if before == "not_allowed":  # scopes never decide the allow-list
        assert decision(relaxed, subject, richer) == "not_allowed"


# -- redaction: the processor chain as log.configure_logging builds it ---------------------------

CREDENTIAL = st.text(alphabet=B64TOKEN_CHARS, min_size=SECRET_MIN, max_size=64).flatmap(
    lambda body: st.sampled_from(["", "=", "=="]).map(lambda pad: body + pad)
)
REDACT_SCHEMES = st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR", "Basic", "basic"])
WHITESPACE = st.sampled_from([" ", "  ", "\t", " \t", "\n"])
# Realistic surroundings (an Authorization line, a raw request line, a doubled scheme) or random
# text.
FILLER = st.sampled_from([
    "", " ", "Authorization: ", "b'GET /mcp?x=1 HTTP/1.1\\r\\nAuthorization: ", "' HTTP/1.1",
    "\\r\\n", ", refused", "token was ", "(", ")", '"', "'", ":", "\n", "Bearer ", "Basic ",
]) | st.text(max_size=16)


@st.composite
def embedded_secrets(draw: st.DrawFn) -> tuple[str, list[str]]:
    """(text that carries a secret at a random position, the parts that must not be logged)."""
    if draw(st.booleans()):
        # A JOSE header opens with a registered name, so its base64url opens with "eyJ" (`{"`
        # and a letter): that is what "JWT-shaped" means to the filter.
        first = {draw(st.sampled_from(["alg", "typ", "kid", "enc", "cty"])): draw(JSON_VALUES)}
        header = {**first, **draw(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3))}
        segments = [b64json(header), b64json(draw(JSON_OBJECTS)),
                    b64(draw(st.binary(max_size=64)))]
        if draw(st.booleans()):  # the JWE shape: five segments
            segments += [b64(draw(st.binary(min_size=1, max_size=32))) for _ in range(2)]
        secret = ".".join(segments)
        parts = secret_parts(secret)
        if draw(st.booleans()):
            secret = draw(REDACT_SCHEMES) + draw(WHITESPACE) + secret
    else:
        credential = draw(CREDENTIAL)
        secret = draw(REDACT_SCHEMES) + draw(WHITESPACE) + credential
        parts = [credential]
    before, after = draw(FILLER), draw(FILLER)
    for part in parts:
        assume(part not in before + after)
    return before + secret + after, parts


@st.composite
def nested(draw: st.DrawFn, value: str, secrets: list[str]) -> Any:
    """`value` placed at a random depth inside lists, tuples and dicts of other JSON values
    (which never happen to contain one of the secrets themselves)."""
    sibling = FINITE_JSON.filter(lambda v: not any(s in repr(v) for s in secrets))
    result: Any = value
    for _ in range(draw(st.integers(0, 3))):
        siblings = draw(st.lists(sibling, max_size=2))
        kind = draw(st.sampled_from(["list", "tuple", "dict"]))
        position = draw(st.integers(0, len(siblings)))
        items = [*siblings[:position], result, *siblings[position:]]
        if kind == "dict":
            result = {f"k{i}": item for i, item in enumerate(items)}
        else:
            result = items if kind == "list" else tuple(items)
    return result


FIELD_NAMES = st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True).filter(
    lambda name: name not in {"event", "exc_info", "stack_info", "detail"}
)


def structlog_chain(renderer: Any) -> Any:
    """configure_logging's structlog chain, on a logger that returns the rendered line."""
    return structlog.wrap_logger(structlog.ReturnLogger(), processors=[
        structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info, redact, renderer,
    ])


def stdlib_formatter(renderer: Any) -> logging.Formatter:
    """configure_logging's formatter for aiohttp's and asyncio's stdlib records."""
    return structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, redact, renderer],
        foreign_pre_chain=[structlog.contextvars.merge_contextvars,
                           structlog.processors.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=True),
                           structlog.stdlib.add_logger_name],
    )


RENDERERS = {
    "json": structlog.processors.JSONRenderer(),
    "console": structlog.dev.ConsoleRenderer(colors=False,
                                             exception_formatter=structlog.dev.plain_traceback),
}


def render_everywhere(carrier: str, where: str, value: Any, fields: dict[str, Any]) -> str:
    """The carrier logged as a field value, as the event, in an exception and by the stdlib."""
    lines: list[str] = []
    for renderer in RENDERERS.values():
        logger = structlog_chain(renderer)
        if where == "field":
            lines.append(logger.info("event", **fields, detail=value))
        elif where == "event":
            lines.append(logger.info(carrier, **fields))
        else:
            lines.append(logger.info("failed", **fields, exc_info=ValueError(carrier)))
        try:
            raise ValueError(carrier)  # a real traceback for the record
        except ValueError:
            record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1,
                                       "Error handling request %s", (carrier,), sys.exc_info())
        lines.append(stdlib_formatter(renderer).format(record))
    assert all(isinstance(line, str) for line in lines)
    return "\n".join(lines)


@UNIT
@given(data=st.data(), where=st.sampled_from(["field", "event", "exception"]),
       fields=st.dictionaries(FIELD_NAMES, FINITE_JSON, max_size=4))
def test_redaction_masks_credentials_embedded_anywhere_in_an_event(
    data: st.DataObject, where: str, fields: dict[str, Any]
) -> None:
    carrier, parts = data.draw(embedded_secrets(), label="carrier")
    value = data.draw(nested(carrier, parts), label="value")
    for part in parts:
        assume(part not in repr(fields))
    rendered = render_everywhere(carrier, where, value, fields)
    assert "[redacted]" in rendered
    for part in parts:
        assert part not in rendered, f"{part!r} survived redaction"


@pytest.mark.parametrize("line", [
    "Authorization: Bearer Bearer opaque-credential-0123456789",
    "Authorization: Basic Bearer opaque-credential-0123456789",
    "bearer\tBEARER opaque-credential-0123456789",
])
def test_redaction_masks_the_credential_after_a_doubled_scheme(line: str) -> None:
    rendered = render_everywhere(line, "field", line, {})
    assert "opaque-credential-0123456789" not in rendered
