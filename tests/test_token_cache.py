"""The verified-token cache: bounded in entries and bytes, refused tokens on a shelf of their own,
its byte count never below what it really holds, and only what a hit needs kept.

Unit tests pin TokenCache and footprint(); the byte count is checked against tracemalloc with
real tokens through the real TokenVerifier and AccessPolicy; the rest runs the production app.
"""

from __future__ import annotations

import sys
import time
import tracemalloc
import uuid
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import AUDIENCE, FakeIdp, FakeUpstream, SidecarFactory, bearer, new_ec
from multidict import CIMultiDict
from test_properties import PublishedKey

from oauth_sidecar.app import VERIFIER
from oauth_sidecar.auth.idp import VerificationKey
from oauth_sidecar.auth.policy import AccessPolicy
from oauth_sidecar.auth.token_cache import MAX_CACHE_BYTES, REFUSED_SHARE, TokenCache, footprint
from oauth_sidecar.auth.tokens import TokenVerifier
from oauth_sidecar.config import PolicyConfig, TokenConfig
from oauth_sidecar.request_keys import Principal

Client = TestClient[web.Request, web.Application]

ISSUER = "https://idp.example.test"
GROUPS = [str(uuid.UUID(int=i)) for i in range(200)]  # an Entra token's worth


def digest(n: int) -> bytes:
    return n.to_bytes(32, "big")


# --- footprint() --------------------------------------------------------------------------------


def reference_size(value: object) -> int:
    """sys.getsizeof over every member, recursively: what footprint() must equal."""
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(reference_size(k) + reference_size(v)
                                          for k, v in value.items())
    if isinstance(value, list | tuple):
        return sys.getsizeof(value) + sum(map(reference_size, value))
    return sys.getsizeof(value)


@pytest.mark.parametrize("value", [
    "", "ascii", "caf\u00e9", "\u4e2d\u6587", "\U0001f600", 0, 10**40, 1.5, True, None,
    [], {}, GROUPS, ["a", 1, None, [2.5, {"x": ["y"]}]],
    {"realm_access": {"roles": ["admin", "\u00e9"]}, "scp": "a b", "n": [[[]]]},
], ids=repr)
def test_footprint_counts_every_member_as_cpython_allocates_it(value: object) -> None:
    assert footprint(value) == reference_size(value)


def test_footprint_walks_nesting_deeper_than_the_recursion_limit() -> None:
    depth = sys.getrecursionlimit() * 2
    nested: list[Any] = []
    for _ in range(depth):
        nested = [nested]
    assert footprint(nested) == sys.getsizeof([[]]) * depth + sys.getsizeof([])


# --- TokenCache ---------------------------------------------------------------------------------


def test_oldest_entries_go_first_past_the_byte_budget() -> None:
    budget = 8000
    admitted_budget = budget - budget // REFUSED_SHARE  # 6000: six entries of 1000 bytes
    cache: TokenCache[int] = TokenCache(1000, max_bytes=budget)
    for n in range(20):
        cache.put(digest(n), n, 1000, admitted=True)
        assert cache.bytes <= admitted_budget
    assert len(cache) == 6
    assert [cache.get(digest(n)) for n in range(20)] == [None] * 14 + list(range(14, 20))


def test_oldest_entries_go_first_past_the_entry_bound() -> None:
    cache: TokenCache[int] = TokenCache(8, max_bytes=MAX_CACHE_BYTES)  # 6 admitted, 2 refused
    for n in range(10):
        cache.put(digest(n), n, 100, admitted=True)
    assert len(cache) == 6
    assert cache.get(digest(3)) is None
    assert cache.get(digest(4)) == 4


def test_refused_tokens_never_push_out_admitted_ones() -> None:
    cache: TokenCache[str] = TokenCache(100, max_bytes=40_000)
    for n in range(10):
        cache.put(digest(n), "admitted", 1000, admitted=True)
    for n in range(100, 10_000):
        cache.put(digest(n), "refused", 1000, admitted=False)
    assert all(cache.get(digest(n)) == "admitted" for n in range(10))
    assert cache.bytes <= 40_000
    assert cache.get(digest(9_999)) == "refused"  # the newest refused ones are kept


def test_an_entry_larger_than_its_shelf_is_not_kept() -> None:
    cache: TokenCache[str] = TokenCache(100, max_bytes=4000)  # refused shelf: 1000 bytes
    cache.put(digest(1), "small", 10, admitted=False)
    cache.put(digest(2), "huge", 1001, admitted=False)
    assert cache.get(digest(2)) is None
    assert cache.get(digest(1)) == "small"  # not evicted for something that cannot fit


def test_a_token_moves_shelf_when_its_verdict_changes_and_is_counted_once() -> None:
    cache: TokenCache[str] = TokenCache(100, max_bytes=4000)
    cache.put(digest(1), "refused", 100, admitted=False)
    cache.put(digest(1), "admitted", 200, admitted=True)
    assert (len(cache), cache.bytes, cache.get(digest(1))) == (1, 200, "admitted")
    cache.drop(digest(1))
    assert (len(cache), cache.bytes, cache.get(digest(1))) == (0, 0, None)


def test_a_size_of_zero_keeps_nothing() -> None:
    cache: TokenCache[str] = TokenCache(0)
    cache.put(digest(1), "x", 1, admitted=True)
    cache.put(digest(2), "x", 1, admitted=False)
    assert len(cache) == 0


# --- through the real verifier: the count against tracemalloc -----------------------------------


def everyone(*, forwarded: bool) -> AccessPolicy:
    config = PolicyConfig(subs=frozenset(), emails=frozenset(), email_domains=frozenset(),
                          groups=frozenset(), groups_claim=("groups",),
                          allow_all_authenticated=True, allow_unverified_email=False,
                          required_scopes=())
    return AccessPolicy(config, forwarded=forwarded)


@pytest.mark.parametrize(("claims", "forwarded"), [
    pytest.param({}, False, id="plain"),
    pytest.param({"groups": GROUPS}, False, id="groups_nobody_reads"),
    pytest.param({"groups": GROUPS}, True, id="groups_forwarded"),
])
async def test_the_counted_bytes_never_fall_below_what_the_cache_holds(
    claims: dict[str, Any], forwarded: bool
) -> None:
    key = new_ec()
    published = VerificationKey(key.kid, key.private.public_key(), frozenset({key.alg}))
    config = TokenConfig(issuer=ISSUER, audiences=(AUDIENCE,), algorithms=frozenset({key.alg}),
                         leeway=0, max_token_bytes=1 << 16, cache_size=10_000)
    verifier = TokenVerifier(config, PublishedKey(published),
                             everyone(forwarded=forwarded).kept_claims)
    now = int(time.time())
    tokens = [jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": f"user-{n}", "exp": now + 600,
                          "jti": uuid.uuid4().hex, "email": f"u{n}@example.test", "scp": "a b",
                          **claims}, key.private, algorithm=key.alg, headers={"kid": key.kid})
              for n in range(600)]
    warm, measured = tokens[:100], tokens[100:]  # first-use allocations are not the cache's
    for token in warm:
        await verifier.verify(token)
    _, counted_before = verifier.cache_use
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for token in measured:
            await verifier.verify(token)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    entries, counted = verifier.cache_use
    counted -= counted_before
    assert entries == len(tokens)
    assert counted >= held, (counted / len(measured), held / len(measured))
    assert counted < 1.5 * held  # and near it: the budget is not wasted on guesses


# --- what a hit keeps, through the production app -----------------------------------------------


def kept(verifier: TokenVerifier, token: str) -> Mapping[str, Any]:
    principal = verifier.cached(token)
    assert principal is not None
    return principal.claims


async def test_a_hit_keeps_only_the_claims_the_policy_and_forwarding_read(
    make_sidecar: SidecarFactory, idp: FakeIdp
) -> None:
    token = idp.mint(claims={"groups": GROUPS, "email": "a@example.test",
                             "email_verified": True, "scp": "mcp", "name": "x" * 2000,
                             "tid": "tenant"})
    plain: Client = await make_sidecar()
    assert (await plain.get("/mcp", headers=bearer(token))).status == 200
    assert set(kept(plain.app[VERIFIER], token)) == {"email", "email_verified", "scp"}

    forwarding: Client = await make_sidecar(FORWARD_IDENTITY="true")
    assert (await forwarding.get("/mcp", headers=bearer(token))).status == 200
    assert set(kept(forwarding.app[VERIFIER], token)) == {
        "email", "email_verified", "scp", "groups"}

    by_group: Client = await make_sidecar(ALLOW_ALL_AUTHENTICATED="false",
                                          ALLOW_GROUPS=GROUPS[7])
    assert (await by_group.get("/mcp", headers=bearer(token))).status == 200
    assert kept(by_group.app[VERIFIER], token)["groups"] == GROUPS


async def test_a_hit_admits_refuses_and_forwards_exactly_as_the_miss_did(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar: Client = await make_sidecar(
        ALLOW_ALL_AUTHENTICATED="false", ALLOW_GROUPS="g1", ALLOW_EMAILS="b@example.test",
        REQUIRED_SCOPES="mcp", FORWARD_IDENTITY="true")
    tokens = {
        "by_group": idp.mint(claims={"groups": ["g1", "g2"], "scp": "mcp other"}),
        "by_email": idp.mint(claims={"email": "B@example.test", "email_verified": "true",
                                     "scope": ["mcp"]}),
        "unverified": idp.mint(claims={"email": "b@example.test", "scope": "mcp"}),
        "no_scope": idp.mint(claims={"groups": ["g1"]}),
        "other_group": idp.mint(claims={"groups": ["g3"], "scp": "mcp"}),
    }
    for name, token in tokens.items():
        answers = []
        for _ in range(2):  # a miss, then a hit
            answer = await sidecar.get("/mcp", headers=bearer(token))
            forwarded = CIMultiDict(upstream.requests[-1].headers if answer.status == 200
                                    else {})
            answers.append((answer.status, answer.headers.get("WWW-Authenticate"),
                            forwarded.get("X-Forwarded-Email"),
                            forwarded.get("X-Forwarded-Groups")))
        assert answers[0] == answers[1], name
        assert sidecar.app[VERIFIER].cached(token) is not None, name  # refused ones too
    statuses = {name: (await sidecar.get("/mcp", headers=bearer(token))).status
                for name, token in tokens.items()}
    assert statuses == {"by_group": 200, "by_email": 200, "unverified": 403, "no_scope": 403,
                        "other_group": 403}


async def test_a_refused_token_is_cached_so_its_retries_cost_no_verification(
    make_sidecar: SidecarFactory, idp: FakeIdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused caller's retries are answered from the cache: the per-IP budget counts only
    invalid tokens, so each retry would otherwise cost a signature check, unbudgeted."""
    sidecar: Client = await make_sidecar(ALLOW_ALL_AUTHENTICATED="false", ALLOW_SUBS="alice")
    verifier = sidecar.app[VERIFIER]
    verified: list[str] = []
    verify = verifier.verify

    async def counting(token: str) -> Principal:  # the real verify(), counted
        verified.append(token)
        return await verify(token)

    monkeypatch.setattr(verifier, "verify", counting)
    token = idp.mint(claims={"sub": "mallory"})
    for _ in range(5):
        assert (await sidecar.get("/mcp", headers=bearer(token))).status == 403
    assert verified == [token]
