"""Opaque access tokens -> Principal by asking the identity provider (RFC 7662), or TokenError.

Why: an opaque (reference) token means nothing to us; only its issuer can say whether it is
active and whose it is. The answer is judged by the same claim rules as a JWT's payload
(claims.py: issuer, audience, exp/nbf/iat with the leeway, ID, refresh and sender-constrained
tokens refused) and makes the same Principal, so nothing after the gate can tell the paths apart.
The IdP must never see load driven by our callers, and must never be able to turn its trouble
into an accept: answers are cached by the token's SHA-256 (active ones until min(exp, now +
INTROSPECTION_CACHE_SECONDS), the revocation lag the operator chooses; refusals briefly),
concurrent questions about one token share one call, at most INTROSPECTION_MAX_CONCURRENCY
calls are in flight, and a slow, failing or refusing IdP is a 503 with Retry-After, never an
accept and never a cached refusal. The sidecar authenticates as its own client (RFC 6749 §2.3),
never with the caller's token; neither the token nor the secret is ever logged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol
from urllib.parse import quote_plus, urlencode, urlsplit

import aiohttp
import jwt
import structlog

from oauth_sidecar.auth.bearer import TokenError, invalid, parse_strict
from oauth_sidecar.auth.claims import (
    TIME_CLAIMS,
    Check,
    ClaimChecks,
    KeptClaims,
    explain_checks,
    keep_all,
    principal_of,
)
from oauth_sidecar.auth.idp import acceptable_url, same_issuer
from oauth_sidecar.auth.token_cache import ENTRY_OVERHEAD, TokenCache, footprint
from oauth_sidecar.auth.tokens import KeySource, media_type, select_key
from oauth_sidecar.config import IntrospectionConfig, TokenConfig
from oauth_sidecar.metrics import Metrics
from oauth_sidecar.request_keys import Principal
from oauth_sidecar.response_body import ResponseTooLarge, read_capped

log = structlog.get_logger("oauth_sidecar.introspection")

# An answer is a small JSON object; one with many groups stays far below this.
MAX_ANSWER_BYTES = 256 << 10
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
SIGNED_ANSWER = "application/token-introspection+jwt"  # RFC 9701 §5 (media type and JWT typ)
SIGNED_ANSWER_MAX_AGE = 300  # seconds: an older signed answer may be a replay (RFC 9701 §8.1)
# token_type (RFC 7662 §2.2), token_use (Cognito) or typ (Keycloak) naming a refresh token;
# Keycloak's typ is "Offline" for one issued with offline_access (its TokenUtil.TOKEN_TYPE_OFFLINE).
REFRESH_TYPES = frozenset({
    "refresh_token", "refresh", "offline", "urn:ietf:params:oauth:token-type:refresh_token"})
TYPE_CLAIMS = ("token_type", "token_use", "typ")
NO_HEADER: dict[str, Any] = {}  # an answer's checks get no JOSE header
AUTH_METHOD_LISTS = ("introspection_endpoint_auth_methods_supported",
                     "token_endpoint_auth_methods_supported")
# What a call to the IdP came to: a bounded label for metrics and the log.
CALL_OUTCOMES = ("active", "inactive", "rejected", "error", "timeout", "refused", "unavailable")
CACHE_RESULTS = ("hit", "negative_hit", "miss")
UNAVAILABLE_DESCRIPTION = "The identity provider could not check the token; try again later"


class IntrospectionFailed(Exception):
    """A call that gave no usable answer: never an accept, never cached (a 503)."""

    def __init__(self, outcome: str, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.outcome, self.reason, self.detail = outcome, reason, detail

    def token_error(self) -> TokenError:
        return TokenError(self.reason, UNAVAILABLE_DESCRIPTION, error="temporarily_unavailable",
                          status=503)


class IntrospectionSource(KeySource, Protocol):
    """What the introspector needs from the identity provider (idp.IdentityProvider): the
    discovery document (endpoint, client authentication methods, signing algorithms) and, for
    signed answers, the keys."""

    @property
    def metadata(self) -> dict[str, Any] | None: ...


def fresh(error: TokenError) -> TokenError:
    """A copy without the traceback: a cached refusal is raised again on every replay."""
    return TokenError(error.reason, error.description, error=error.error, status=error.status)


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to ask, decided once per discovery document."""

    url: str
    method: str
    headers: dict[str, str]
    form: tuple[tuple[str, str], ...]
    signed: bool
    """The IdP may sign its answers (RFC 9701): we ask for them and accept them."""


@dataclass(frozen=True, slots=True)
class IntrospectionExplanation:
    """Every check's outcome for one introspected token (`oauth-sidecar check --token`)."""

    outcomes: dict[str, TokenError | None]
    error: TokenError | None
    answer: dict[str, Any] | None = None
    """The IdP's answer as it came (the RFC 9701 claim's value for a signed one)."""
    signed: bool = False
    endpoint: str = ""
    method: str = ""
    """The client authentication the call used (Target.method)."""
    detail: str = ""
    """Why the call gave no usable answer (IntrospectionFailed.detail): never the token or the
    secret."""


def basic_credentials(client_id: str, secret: str) -> str:
    """RFC 6749 §2.3.1: id and secret are form-urlencoded before they are joined and base64ed
    (a `:` or `%` in a secret would otherwise change what the IdP reads)."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def offered_auth_methods(metadata: Mapping[str, Any] | None) -> tuple[str, list[Any]] | None:
    """The metadata's list that decides the client authentication, and its name: its
    introspection_endpoint_auth_methods_supported (RFC 8414 §2); some IdPs (oidc-provider) list
    none, their introspection endpoint taking the token endpoint's client authentication, whose
    token_endpoint_auth_methods_supported decides then. None: neither is listed."""
    if metadata:
        for name in AUTH_METHOD_LISTS:
            methods = metadata.get(name)
            if isinstance(methods, list):
                return name, methods
    return None


def choose_auth_method(metadata: Mapping[str, Any] | None) -> str:
    """basic preferred, then post, from offered_auth_methods; nothing listed, basic (RFC 6749
    §2.3.1: every server supports it)."""
    offered = offered_auth_methods(metadata)
    methods = offered[1] if offered is not None else []
    if "client_secret_basic" not in methods and "client_secret_post" in methods:
        return "client_secret_post"
    return "client_secret_basic"


@dataclass(slots=True)
class Counts:
    """What the introspector did, read by metrics at scrape time (nothing per request)."""

    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CALL_OUTCOMES, 0))
    lookups: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CACHE_RESULTS, 0))


class Introspector:
    """Introspects tokens at one IdP for one audience set; safe to share across requests."""

    def __init__(self, config: TokenConfig, provider: IntrospectionSource,
                 kept_claims: KeptClaims = keep_all, metrics: Metrics | None = None) -> None:
        if config.introspection is None:
            raise ValueError("TOKEN_VALIDATION=jwt has no introspection client")
        self._config = config
        self._settings: IntrospectionConfig = config.introspection
        self._provider = provider
        self._kept_claims = kept_claims
        self._metrics = metrics or Metrics()
        # (the answer, fresh until, vouched for until): see vouched().
        self._cache: TokenCache[tuple[Principal | TokenError, float, float]] = TokenCache(
            config.cache_size)
        self._flights: dict[bytes, asyncio.Task[Principal]] = {}
        # A quarter of the slots is kept for re-checks of tokens the IdP called active: a flood
        # of made-up tokens (from many IPs, each within its budget) cannot starve the callers
        # already signed in. New tokens take a stranger's slot first, then a slot.
        most = self._settings.max_concurrency
        self._slots = asyncio.Semaphore(most)
        self._stranger_slots = asyncio.Semaphore(most - most // 4)
        self._session: aiohttp.ClientSession | None = None
        self._target: Target | None = None
        self._target_for: object = None
        self._trouble: str | None = None
        self.counts = Counts()
        self._claims = claims = ClaimChecks(config)
        audience = config.audience_claim
        required = ("exp", audience, "sub") if self._settings.require_exp else (audience, "sub")
        # RFC 7662 §2.2 first, then the JWT path's checks in its order; iss only when present.
        self.checks: tuple[tuple[str, Check], ...] = (
            ("active", self._active), ("token_type", self._not_refresh_token),
            *claims.id_tokens(), ("cnf", claims.not_sender_constrained),
            *((name, claims.number(name)) for name in TIME_CLAIMS), ("sub", claims.sub_type),
            *((name, claims.present(name)) for name in required),
            ("iat", claims.not_in_future("iat")), ("nbf", claims.not_in_future("nbf")),
            ("exp", claims.not_expired), ("iss", self._issuer), (audience, claims.audience),
            ("jti", claims.jti),
        )
        self._checks = tuple(check for _, check in self.checks)

    # -- lifetime --------------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Introspector]:
        """Own the HTTP session to the IdP for the app's lifetime (no cookies, no proxies from
        the environment); calls still in flight at the end are cancelled."""
        # A backstop only: the timeout that counts (queue included) is in _answer.
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout + 1)
        connector = aiohttp.TCPConnector(limit=self._settings.max_concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False,
                                         cookie_jar=aiohttp.DummyCookieJar()) as session:
            self._session = session
            try:
                yield self
            finally:
                flights = list(self._flights.values())
                for flight in flights:
                    flight.cancel()
                for flight in flights:
                    with suppress(asyncio.CancelledError, TokenError):
                        await flight
                self._session = None

    @property
    def in_flight(self) -> int:
        """Tokens being introspected now (each one call, however many requests wait for it)."""
        return len(self._flights)

    @property
    def cache_use(self) -> tuple[int, int]:
        """(entries, bytes) the answer cache holds, refusals included."""
        return len(self._cache), self._cache.bytes

    # -- the hot path ----------------------------------------------------------------------------

    def cached(self, token: str) -> Principal | None:
        """The Principal of an active answer still fresh, without any call; refusals are not
        returned here (verify() replays them, after the gate charged the caller's budget)."""
        entry = self._cache.get(hashlib.sha256(token.encode()).digest())
        if entry is not None and type(entry[0]) is Principal and time.time() < entry[1]:
            self.counts.lookups["hit"] += 1
            return entry[0]
        return None

    def vouched(self, token: str) -> bool:
        """True for a token the IdP called active before, whose answer is stale but whose exp has
        not passed: asking again is a re-check of a caller already admitted, not a stranger's
        guess, so the gate does not charge it to the client IP's budget (many users behind one
        egress IP would otherwise pay one unit per token every cache window). A revoked one is
        asked once, refused, and its refusal replaces this entry."""
        entry = self._cache.get(hashlib.sha256(token.encode()).digest())
        return entry is not None and type(entry[0]) is Principal and time.time() < entry[2]

    async def verify(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode()).digest()
        entry = self._cache.get(digest)
        vouched = False
        if entry is not None:
            value, until, vouched_until = entry
            now = time.time()
            if now < until:
                if isinstance(value, TokenError):
                    self.counts.lookups["negative_hit"] += 1
                    raise fresh(value)  # no traceback growing with each replay
                self.counts.lookups["hit"] += 1
                return value
            vouched = type(value) is Principal and now < vouched_until
            if not vouched:  # kept while it vouches; the new answer replaces it
                self._cache.drop(digest)
        self.counts.lookups["miss"] += 1
        flight = self._flights.get(digest)
        if flight is None:  # one call per token however many ask at once
            flight = asyncio.create_task(self._introspect(token, digest, vouched))
            self._flights[digest] = flight
            flight.add_done_callback(partial(self._landed, digest))
        # Shielded: a caller that leaves does not cancel the others' answer.
        return await asyncio.shield(flight)

    def _landed(self, digest: bytes, flight: asyncio.Task[Principal]) -> None:
        if self._flights.get(digest) is flight:
            del self._flights[digest]
        if not flight.cancelled():
            flight.exception()  # retrieved even when every waiter left

    async def _introspect(self, token: str, digest: bytes, vouched: bool) -> Principal:
        answer = await self._answer(token, vouched)
        now = time.time()
        try:
            for check in self._checks:
                check(NO_HEADER, answer, now)
        except TokenError as refusal:
            self._count("inactive" if refusal.reason == "inactive" else "rejected")
            until = now + self._settings.negative_cache_seconds
            if until > now:  # a copy: the raised one's traceback holds this request's frames
                self._cache.put(digest, (fresh(refusal), until, 0.0), ENTRY_OVERHEAD,
                                admitted=False)
            raise
        self._count("active")
        exp = answer.get("exp")
        principal, admitted = self.principal(answer)
        until = vouched_until = now + self._settings.cache_seconds
        if exp is not None:  # never past what a fresh answer's exp check would accept
            vouched_until = int(exp) + self._config.leeway
            until = min(until, vouched_until)
        if vouched_until > now:
            cost = ENTRY_OVERHEAD + sum(map(footprint, (
                principal.issuer, principal.subject, principal.claims)))
            self._cache.put(digest, (principal, until, vouched_until), cost, admitted=admitted)
        return principal

    def principal(self, answer: dict[str, Any]) -> tuple[Principal, bool]:
        """The Principal of an answer that passed every check (an answer without iss speaks for
        our issuer), and whether the policy admits it now: the gate's and the doctor's."""
        exp = answer.get("exp")
        return principal_of(answer, self._kept_claims,
                            issuer=answer.get("iss") or self._config.issuer,
                            expires_at=float(exp) if exp is not None else math.inf, kid=None)

    def _count(self, outcome: str) -> None:
        self.counts.calls[outcome] += 1

    # -- asking the IdP --------------------------------------------------------------------------

    async def _answer(self, token: str, vouched: bool = False) -> dict[str, Any]:
        """The IdP's answer, or TokenError 503: timeouts (waiting for a slot included), network
        failures, 5xx, refusals of our credentials and garbage are never the caller's fault."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._settings.timeout):
                async with nullcontext() if vouched else self._stranger_slots, (
                        self._slots):
                    answer, _ = await self._ask(token)
        except IntrospectionFailed as failed:
            self._failed(failed, started)
            raise failed.token_error() from None
        except TimeoutError:
            late = self._late()
            self._failed(late, started)
            raise late.token_error() from None
        self._metrics.introspection_answered(time.monotonic() - started)
        self._recovered()
        return answer

    def _late(self) -> IntrospectionFailed:
        return IntrospectionFailed("timeout", "introspection_timeout",
                                   f"no answer within {self._settings.timeout} s")

    def _recovered(self) -> None:
        if self._trouble is not None:
            log.info("introspection_recovered", after=self._trouble)
            self._trouble = None

    def _failed(self, failed: IntrospectionFailed, started: float) -> None:
        self._count(failed.outcome)
        self._metrics.introspection_answered(time.monotonic() - started)
        if failed.reason != self._trouble:  # once per kind of trouble, not once per request
            self._trouble = failed.reason
            event = ("introspection_client_refused" if failed.outcome == "refused"
                     else "introspection_failed")
            log.warning(event, reason=failed.reason, detail=failed.detail)

    def target(self) -> Target:
        """Where and how to ask now: INTROSPECTION_ENDPOINT or the metadata's endpoint (held to
        the rule jwks_uri is held to), the client authentication, and whether answers may be
        signed. Recomputed only when a new discovery document arrives."""
        metadata = self._provider.metadata
        if self._target is not None and metadata is self._target_for:
            return self._target
        settings = self._settings
        url: object = settings.endpoint
        if not url:
            if metadata is None:
                raise IntrospectionFailed("unavailable", "introspection_unavailable",
                                          "the IdP's discovery document is not loaded yet")
            url = metadata.get("introspection_endpoint")
            # User-info in it: aiohttp would send it as Basic credentials, or raise ValueError
            # beside ours (a 500); INTROSPECTION_ENDPOINT may not carry any either.
            if not isinstance(url, str) or not acceptable_url(url, self._config.issuer) or (
                "@" in urlsplit(url).netloc
            ):
                raise IntrospectionFailed(
                    "unavailable", "introspection_endpoint_unknown",
                    "the IdP's metadata names no usable introspection_endpoint (https, or http "
                    "when the issuer is; no user-info): set INTROSPECTION_ENDPOINT")
        method = settings.auth_method or choose_auth_method(metadata)
        algs = metadata.get("introspection_signing_alg_values_supported") if metadata else None
        signed = isinstance(algs, list) and bool(algs)
        headers = {"Content-Type": FORM, "Accept": f"{SIGNED_ANSWER}, {JSON}" if signed else JSON}
        form: tuple[tuple[str, str], ...] = ()
        if method == "client_secret_basic":
            headers["Authorization"] = basic_credentials(settings.client_id,
                                                         settings.client_secret)
        elif method == "client_secret_post":
            form = (("client_id", settings.client_id), ("client_secret", settings.client_secret))
        elif settings.client_id:  # none: a public client names itself (RFC 6749 §2.3)
            form = (("client_id", settings.client_id),)
        self._target = Target(str(url), method, headers, form, signed)
        self._target_for = metadata
        return self._target

    async def _ask(self, token: str) -> tuple[dict[str, Any], bool]:
        """POST the token (RFC 7662 §2.1) and read the answer; (answer, signed)."""
        session = self._session
        if session is None:
            raise IntrospectionFailed("unavailable", "introspection_unavailable", "not running")
        target = self.target()
        # urlencode, not FormData: the same bytes, measured faster.
        body = urlencode((("token", token), ("token_type_hint", "access_token"), *target.form))
        try:
            async with session.post(target.url, data=body.encode("ascii"),
                                    headers=target.headers, allow_redirects=False) as response:
                status, content_type = response.status, response.content_type
                raw = await read_capped(response, MAX_ANSWER_BYTES)
        except ResponseTooLarge:
            raise IntrospectionFailed("error", "introspection_failed",
                                      f"answer larger than {MAX_ANSWER_BYTES} bytes") from None
        except TimeoutError:  # aiohttp's own (ServerTimeoutError is a ClientError too)
            raise
        except (aiohttp.ClientError, ValueError, OSError) as exc:  # ValueError: a bad URL
            raise IntrospectionFailed("unavailable", "introspection_unavailable",
                                      type(exc).__name__) from None
        if status == 200:
            if content_type == SIGNED_ANSWER and target.signed:
                return await self._signed_answer(raw), True
            return self._json_answer(raw), False
        error = self._error_code(raw) if status in (400, 401, 403) else ""
        if error == "unsupported_token_type":  # RFC 7009 §2.2.1, as RFC 7662 §2.3 uses it
            return {"active": False}, False
        if status in (400, 401, 403):
            raise IntrospectionFailed(
                "refused", "introspection_refused",
                f"HTTP {status} {error}".rstrip() + ": the IdP refused the sidecar's "
                "introspection client (check INTROSPECTION_CLIENT_ID, its secret, "
                "INTROSPECTION_AUTH_METHOD and that the client may introspect)")
        raise IntrospectionFailed("error", "introspection_failed", f"HTTP {status}")

    @staticmethod
    def _error_code(raw: bytes) -> str:
        """The OAuth error code of a 400 (RFC 6749 §5.2), if it is a short safe word."""
        with suppress(ValueError, UnicodeDecodeError, RecursionError):
            document = json.loads(raw)
            error = document.get("error") if isinstance(document, dict) else None
            if isinstance(error, str) and len(error) <= 64 and error.replace("_", "").isalnum():
                return error
        return ""

    @staticmethod
    def _json_answer(raw: bytes) -> dict[str, Any]:
        try:
            answer = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise IntrospectionFailed("error", "introspection_failed",
                                      "the answer is not JSON") from None
        if not isinstance(answer, dict):
            raise IntrospectionFailed("error", "introspection_failed",
                                      "the answer is not a JSON object")
        return answer

    async def _signed_answer(self, raw: bytes) -> dict[str, Any]:
        """RFC 9701 §5: a JWT signed with the IdP's published keys, typ
        token-introspection+jwt, from the issuer, for us, fresh; the answer is its
        token_introspection claim. Anything wrong is the IdP's trouble (or a forgery): 503."""
        def bad(detail: str) -> IntrospectionFailed:
            return IntrospectionFailed("error", "introspection_bad_signature", detail)

        try:
            text = raw.decode("ascii").strip()
            header, _ = parse_strict(text)
        except (UnicodeDecodeError, TokenError):
            raise bad("the signed answer is not a compact JWS") from None
        typ, alg = header.get("typ"), header.get("alg")
        if not isinstance(typ, str) or media_type(typ) != SIGNED_ANSWER:
            raise bad(f"the signed answer's typ is {typ!r}, not token-introspection+jwt")
        if not isinstance(alg, str) or alg not in self._config.algorithms:
            raise bad(f"the signed answer's alg {alg!r} is not in JWT_ALGORITHMS")
        kid = header.get("kid")
        try:
            key = await select_key(self._provider, kid if isinstance(kid, str) else None, alg)
        except TokenError as exc:
            raise bad(f"no key for the signed answer ({exc.reason})") from None
        audiences = [self._settings.client_id, *self._config.audiences]
        try:
            payload = jwt.decode(
                text, key.key, algorithms=[alg], audience=[a for a in audiences if a],
                leeway=self._config.leeway,
                options={"require": ["iss", "aud", "iat"], "verify_iss": False})
        except jwt.InvalidTokenError as exc:
            raise bad(f"the signed answer does not verify ({type(exc).__name__})") from None
        iss, iat = payload.get("iss"), payload.get("iat")
        if not isinstance(iss, str) or not same_issuer(iss, self._config.issuer):
            raise bad("the signed answer is not from the trusted issuer")
        if not isinstance(iat, int | float) or (
            time.time() - iat > SIGNED_ANSWER_MAX_AGE + self._config.leeway
        ):
            raise bad(f"the signed answer is older than {SIGNED_ANSWER_MAX_AGE} s")
        answer = payload.get("token_introspection")
        if not isinstance(answer, dict):
            raise bad("the signed answer has no token_introspection object")
        return answer

    # -- the answer's own checks (RFC 7662 §2.2) --------------------------------------------------

    def _active(self, header: dict[str, Any], answer: dict[str, Any], now: float) -> None:
        if answer.get("active") is not True:  # a boolean, not "true" (RFC 7662 §2.2)
            raise invalid("inactive", "The token is not active")

    def _not_refresh_token(self, header: dict[str, Any], answer: dict[str, Any],
                           now: float) -> None:
        """A refresh token is for the token endpoint; some IdPs answer active for it.

        With the audience taken from client_id (JWT_AUDIENCE_CLAIM), a refresh token the IdP
        leaves unmarked (oidc-provider: no token_type, no aud) names the same client as its
        access token, so only a positive mark can tell them apart: the answer must carry a
        token_type (RFC 7662 §2.2) or token_use naming an access token."""
        marked = False
        for name in TYPE_CLAIMS:
            value = answer.get(name)
            if isinstance(value, str) and value:
                if value.lower() in REFRESH_TYPES:
                    raise invalid("refresh_token", "A refresh token is not an access token")
                marked = True
        if not marked and self._config.audience_claim != "aud":
            raise invalid("token_type_missing",
                          "The IdP's answer does not say this is an access token (no token_type "
                          f"or token_use), and {self._config.audience_claim} names a client, "
                          "not a resource")

    def _issuer(self, header: dict[str, Any], answer: dict[str, Any], now: float) -> None:
        """iss is optional in an answer (RFC 7662 §2.2); when there, the JWT path's check."""
        if "iss" in answer:
            self._claims.issuer(header, answer, now)

    # -- the doctor's view -----------------------------------------------------------------------

    async def explain(self, token: str) -> IntrospectionExplanation:
        """Ask the IdP (no cache) and run every check on its answer, reporting each; the first
        failure is what verify() raises."""
        started = time.monotonic()
        target: Target | None = None
        try:
            target = self.target()
            async with asyncio.timeout(self._settings.timeout):
                answer, signed = await self._ask(token)
        except (IntrospectionFailed, TimeoutError) as exc:
            failed = exc if isinstance(exc, IntrospectionFailed) else self._late()
            self._failed(failed, started)  # logged once per kind of trouble, as when serving
            error = failed.token_error()
            return IntrospectionExplanation(
                {"introspection": error}, error, endpoint=target.url if target else "",
                method=target.method if target else "", detail=failed.detail)
        self._recovered()
        outcomes: dict[str, TokenError | None] = {"introspection": None}
        failures: list[TokenError] = []
        explain_checks(self.checks, NO_HEADER, answer, time.time(),
                       outcomes=outcomes, failures=failures)
        return IntrospectionExplanation(outcomes, failures[0] if failures else None, answer,
                                        signed, target.url, target.method)
