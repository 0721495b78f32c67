"""AccessPolicy: who is admitted and with which scopes.

The policy is pure, so most of it is pinned by tables of claims; the rest runs through the
production app to show how a refusal looks on the wire (403, never leaking the allow-lists) and
that nothing refused ever reaches the upstream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import AUDIENCE, RESOURCE_URL, FakeIdp, FakeUpstream, SidecarFactory, bearer
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from oauth_sidecar.auth.policy import AccessPolicy, Denied
from oauth_sidecar.config import AllowFile, ConfigError, PolicyConfig, ascii_lower, load

Client = TestClient[web.Request, web.Application]

METADATA_URL = "https://mcp.example.test/.well-known/oauth-protected-resource/mcp"
BASE_ENV = {
    "OIDC_ISSUER_URL": "https://idp.example.test",
    "OIDC_AUDIENCE": AUDIENCE,
    "RESOURCE_URL": RESOURCE_URL,
    "MCP_UPSTREAM_URL": "http://127.0.0.1:9",
}


def make_policy(
    *,
    subs: Iterable[str] = (),
    emails: Iterable[str] = (),
    domains: Iterable[str] = (),
    groups: Iterable[str] = (),
    groups_claim: str = "groups",
    allow_all: bool = False,
    unverified: bool = False,
    required: tuple[str, ...] = (),
    forwarded: bool = True,
) -> AccessPolicy:
    return AccessPolicy(PolicyConfig(
        subs=frozenset(subs),
        emails=frozenset(ascii_lower(e) for e in emails),
        email_domains=frozenset(ascii_lower(d) for d in domains),
        groups=frozenset(groups),
        groups_claim=tuple(groups_claim.split(".")),
        allow_all_authenticated=allow_all,
        allow_unverified_email=unverified,
        required_scopes=required,
    ), forwarded=forwarded)


def admitted(policy: AccessPolicy, subject: str, claims: Mapping[str, Any]) -> bool:
    try:
        policy.check(subject, claims)
    except Denied:
        return False
    return True


def verified(email: Any) -> dict[str, Any]:
    return {"email": email, "email_verified": True}


# --- subjects -----------------------------------------------------------------------------------

SUBS = make_policy(subs={"alice", "00u1a2b3c4"})


@pytest.mark.parametrize(("subject", "expected"), [
    pytest.param("alice", True, id="exact_sub_admitted"),
    pytest.param("00u1a2b3c4", True, id="opaque_sub_admitted"),
    pytest.param("Alice", False, id="sub_is_case_sensitive"),
    pytest.param("ALICE", False, id="sub_upper_case_refused"),
    pytest.param("alice ", False, id="sub_with_trailing_space_refused"),
    pytest.param("alic", False, id="sub_prefix_refused"),
    pytest.param("alice2", False, id="sub_with_suffix_refused"),
    pytest.param("bob", False, id="other_sub_refused"),
])
def test_subjects_match_exactly(subject: str, expected: bool) -> None:
    assert admitted(SUBS, subject, {"sub": subject}) is expected


# --- emails -------------------------------------------------------------------------------------

EMAILS = make_policy(emails={"Alice@Example.com", "b@example.com"})


@pytest.mark.parametrize(("claims", "expected"), [
    pytest.param(verified("alice@example.com"), True, id="verified_email_admitted"),
    pytest.param(verified("ALICE@EXAMPLE.COM"), True, id="email_case_insensitive"),
    pytest.param(verified("Alice@example.COM"), True, id="email_mixed_case"),
    pytest.param({"email": "alice@example.com", "email_verified": "true"}, True,
                 id="verified_string_true_accepted"),
    pytest.param({"email": "alice@example.com", "email_verified": "TRUE"}, True,
                 id="verified_string_TRUE_accepted"),
    pytest.param({"email": "alice@example.com", "email_verified": False}, False,
                 id="verified_false_refused"),
    pytest.param({"email": "alice@example.com", "email_verified": "false"}, False,
                 id="verified_string_false_refused"),
    pytest.param({"email": "alice@example.com"}, False, id="verified_missing_refused"),
    pytest.param({"email": "alice@example.com", "email_verified": 1}, False,
                 id="verified_number_1_refused"),
    pytest.param({"email": "alice@example.com", "email_verified": "yes"}, False,
                 id="verified_string_yes_refused"),
    pytest.param({"email": "alice@example.com", "email_verified": None}, False,
                 id="verified_null_refused"),
    pytest.param({"email": "alice@example.com", "email_verified": ["true"]}, False,
                 id="verified_list_refused"),
    pytest.param(verified("a@b@example.com"), False, id="two_at_signs_refused"),
    pytest.param(verified("b@example.com@evil.org"), False, id="allowed_email_with_suffix"),
    pytest.param(verified("@example.com"), False, id="empty_local_part_refused"),
    pytest.param(verified("alice@"), False, id="empty_domain_refused"),
    pytest.param(verified("alice@example.com "), False, id="trailing_space_refused"),
    pytest.param(verified("alice.example.com"), False, id="no_at_sign_refused"),
    pytest.param(verified(12345), False, id="number_email_refused"),
    pytest.param(verified(["alice@example.com"]), False, id="list_email_refused"),
    pytest.param(verified({"address": "alice@example.com"}), False, id="object_email_refused"),
    pytest.param(verified(None), False, id="null_email_refused"),
    pytest.param({"email_verified": True}, False, id="missing_email_refused"),
    pytest.param(verified("mallory@example.com"), False, id="other_email_same_domain_refused"),
])
def test_emails_count_only_when_verified_and_well_formed(
    claims: dict[str, Any], expected: bool
) -> None:
    assert admitted(EMAILS, "someone", claims) is expected


@pytest.mark.parametrize("email_verified", [False, "false", None, 1])
def test_insecure_allow_unverified_email_admits_unverified_emails(email_verified: Any) -> None:
    policy = make_policy(emails={"alice@example.com"}, unverified=True)
    claims = {"email": "Alice@example.com", "email_verified": email_verified}
    assert admitted(policy, "someone", claims)
    assert admitted(policy, "someone", {"email": "alice@example.com"})
    # It relaxes verification only, never the shape of the address.
    assert not admitted(policy, "someone", {"email": "x@alice@example.com"})


def test_verified_email_is_lowercased() -> None:
    policy = make_policy(emails={"alice@example.com"})
    assert policy.verified_email(verified("Alice@Example.COM")) == "alice@example.com"
    assert policy.verified_email({"email": "alice@example.com"}) is None


# --- domains ------------------------------------------------------------------------------------

DOMAINS = make_policy(domains={"example.com"})


@pytest.mark.parametrize(("email", "expected"), [
    pytest.param("user@example.com", True, id="exact_domain_admitted"),
    pytest.param("user@EXAMPLE.COM", True, id="domain_case_insensitive"),
    pytest.param("User.Name+tag@Example.Com", True, id="plus_and_dots_in_local_part"),
    pytest.param("user@example.com.evil.org", False, id="domain_as_prefix_refused"),
    pytest.param("user@evil-example.com", False, id="domain_as_suffix_refused"),
    pytest.param("user@evilexample.com", False, id="domain_glued_suffix_refused"),
    pytest.param("user@sub.example.com", False, id="subdomain_refused"),
    pytest.param("user@example.com.", False, id="trailing_dot_refused"),
    pytest.param("user@example.co", False, id="shorter_domain_refused"),
    pytest.param("user@example.com@evil.org", False, id="second_at_sign_refused"),
    pytest.param("user@evil.org@example.com", False, id="second_at_sign_before_refused"),
    pytest.param("@example.com", False, id="empty_local_part_refused"),
    pytest.param("example.com", False, id="bare_domain_refused"),
])
def test_email_domains_match_exactly_after_the_single_at(email: str, expected: bool) -> None:
    assert admitted(DOMAINS, "someone", verified(email)) is expected


def test_email_domain_requires_a_verified_email() -> None:
    assert not admitted(DOMAINS, "someone", {"email": "user@example.com"})
    assert not admitted(DOMAINS, "someone",
                        {"email": "user@example.com", "email_verified": "false"})


# --- groups -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("groups_claim", "claims", "expected"), [
    pytest.param("groups", {"groups": ["staff", "mcp-users"]}, True, id="groups_list"),
    pytest.param("groups", {"groups": ["mcp-users"]}, True, id="single_group"),
    pytest.param("groups", {"groups": ["MCP-USERS"]}, False, id="groups_case_sensitive"),
    pytest.param("groups", {"groups": ["staff"]}, False, id="other_group_refused"),
    pytest.param("groups", {"groups": []}, False, id="empty_list_refused"),
    pytest.param("groups", {}, False, id="missing_claim_refused"),
    pytest.param("groups", {"groups": "mcp-users"}, False, id="string_claim_is_no_groups"),
    pytest.param("groups", {"groups": "staff mcp-users"}, False, id="spaced_string_no_groups"),
    pytest.param("groups", {"groups": {"mcp-users": True}}, False, id="dict_claim_is_no_groups"),
    pytest.param("groups", {"groups": [["mcp-users"]]}, False, id="nested_list_ignored"),
    pytest.param("groups", {"groups": [{"name": "mcp-users"}]}, False, id="object_items_ignored"),
    pytest.param("groups", {"groups": [1, 2.5, True, None]}, False, id="non_string_items"),
    pytest.param("groups", {"groups": [1, {"x": 1}, "mcp-users"]}, True,
                 id="string_items_count_among_others"),
    pytest.param("groups", {"groups": None}, False, id="null_claim_refused"),
    pytest.param("groups", {"realm_access": {"roles": ["mcp-users"]}}, False,
                 id="default_claim_ignores_keycloak_roles"),
    pytest.param("realm_access.roles", {"realm_access": {"roles": ["mcp-users"]}}, True,
                 id="keycloak_realm_roles"),
    pytest.param("realm_access.roles", {"groups": ["mcp-users"]}, False,
                 id="keycloak_path_ignores_groups"),
    pytest.param("realm_access.roles", {}, False, id="missing_intermediate_refused"),
    pytest.param("realm_access.roles", {"realm_access": None}, False,
                 id="null_intermediate_refused"),
    pytest.param("realm_access.roles", {"realm_access": "roles"}, False,
                 id="string_intermediate_refused"),
    pytest.param("realm_access.roles", {"realm_access": [{"roles": ["mcp-users"]}]}, False,
                 id="list_intermediate_refused"),
    pytest.param("realm_access.roles", {"realm_access": {"roles": "mcp-users"}}, False,
                 id="keycloak_string_roles_refused"),
    pytest.param("realm_access.roles", {"realm_access": {}}, False, id="missing_leaf_refused"),
    pytest.param("roles", {"roles": ["mcp-users"]}, True, id="entra_roles"),
    pytest.param("roles", {"groups": ["mcp-users"]}, False, id="entra_path_ignores_groups"),
])
def test_groups_come_only_from_a_list_of_strings_at_the_claim_path(
    groups_claim: str, claims: dict[str, Any], expected: bool
) -> None:
    policy = make_policy(groups={"mcp-users"}, groups_claim=groups_claim)
    assert admitted(policy, "someone", claims) is expected


def test_groups_returns_only_string_items() -> None:
    policy = make_policy(groups={"g"})
    assert policy.groups({"groups": ["a", 1, ["b"], {"c": 1}, "d", None]}) == ["a", "d"]
    assert policy.groups({"groups": "a"}) == []


# --- OR semantics -------------------------------------------------------------------------------

EVERY_LIST = make_policy(
    subs={"alice"}, emails={"bob@example.com"}, domains={"corp.example"}, groups={"admins"}
)


@pytest.mark.parametrize(("subject", "claims", "expected"), [
    pytest.param("alice", {}, True, id="sub_alone_admits"),
    pytest.param("alice", {"email": "x@evil.org", "email_verified": False}, True,
                 id="sub_admits_despite_unrelated_email"),
    pytest.param("carol", verified("bob@example.com"), True, id="email_alone_admits"),
    pytest.param("dave", verified("dave@corp.example"), True, id="domain_alone_admits"),
    pytest.param("erin", {"groups": ["admins"]}, True, id="group_alone_admits"),
    pytest.param("frank", {**verified("frank@evil.org"), "groups": ["admins"]}, True,
                 id="group_admits_despite_other_email"),
    pytest.param("mallory", {**verified("mallory@evil.org"), "groups": ["staff"]}, False,
                 id="nothing_matches_refused"),
    pytest.param("mallory", {"email": "bob@example.com"}, False,
                 id="unverified_allowed_email_refused"),
    pytest.param("mallory", {}, False, id="no_claims_refused"),
])
def test_any_matching_allow_list_admits(
    subject: str, claims: dict[str, Any], expected: bool
) -> None:
    assert admitted(EVERY_LIST, subject, claims) is expected


def test_allow_all_authenticated_admits_everyone_without_allow_lists() -> None:
    assert admitted(make_policy(allow_all=True), "anyone", {})


def test_allow_lists_win_over_allow_all_authenticated() -> None:
    policy = make_policy(subs={"alice"}, allow_all=True)
    assert admitted(policy, "alice", {})
    assert not admitted(policy, "bob", {})


def test_no_allow_list_and_no_allow_all_admits_nobody() -> None:
    assert not admitted(make_policy(), "alice", {"groups": ["admins"]})


def test_allow_list_denial_is_not_a_scope_problem() -> None:
    with pytest.raises(Denied) as caught:
        make_policy(subs={"alice"}).check("bob", {})
    assert caught.value.reason == "not_allowed"
    assert caught.value.scope_missing is False


# --- scopes -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("required", "claims", "expected"), [
    pytest.param(("mcp:read",), {"scope": "openid mcp:read"}, True, id="scope_string"),
    pytest.param(("mcp:read",), {"scope": "  mcp:read  "}, True, id="scope_string_padded"),
    pytest.param(("mcp:read",), {"scp": ["mcp:read", "other"]}, True, id="okta_scp_list"),
    pytest.param(("mcp:read",), {"scp": "mcp:read User.Read"}, True, id="entra_scp_string"),
    pytest.param(("mcp:read", "mcp:write"), {"scope": "mcp:read", "scp": ["mcp:write"]}, True,
                 id="scope_and_scp_union"),
    pytest.param(("mcp:read", "mcp:write"), {"scope": "mcp:write mcp:read"}, True,
                 id="order_irrelevant"),
    pytest.param(("mcp:read", "mcp:write"), {"scope": "mcp:read"}, False, id="one_of_two"),
    pytest.param(("mcp:read",), {}, False, id="no_scope_claims"),
    pytest.param(("mcp:read",), {"scope": ""}, False, id="empty_scope"),
    pytest.param(("mcp:read",), {"scope": "mcp:readwrite"}, False, id="scope_prefix_refused"),
    pytest.param(("mcp:read",), {"scope": "MCP:READ"}, False, id="scope_case_sensitive"),
    pytest.param(("mcp:read",), {"scope": "mcp:read,openid"}, False, id="comma_not_separator"),
    pytest.param(("mcp:read",), {"scp": 42}, False, id="numeric_scp_ignored"),
    pytest.param(("mcp:read",), {"scp": [["mcp:read"]]}, False, id="nested_scp_list_ignored"),
    pytest.param((), {}, True, id="no_required_scopes"),
])
def test_required_scopes_come_from_scope_and_scp(
    required: tuple[str, ...], claims: dict[str, Any], expected: bool
) -> None:
    policy = make_policy(allow_all=True, required=required)
    if expected:
        policy.check("alice", claims)
        return
    with pytest.raises(Denied) as caught:
        policy.check("alice", claims)
    assert caught.value.reason == "insufficient_scope"
    assert caught.value.scope_missing is True


def test_not_allowed_is_checked_before_scopes() -> None:
    policy = make_policy(subs={"alice"}, required=("mcp:read",))
    with pytest.raises(Denied) as caught:
        policy.check("bob", {})
    assert caught.value.reason == "not_allowed"
    assert caught.value.scope_missing is False
    with pytest.raises(Denied) as scoped:
        policy.check("alice", {})
    assert scoped.value.reason == "insufficient_scope"


# --- configuration ------------------------------------------------------------------------------

def problems(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load({**BASE_ENV, **env})
    return caught.value.problems


def test_no_allow_list_and_no_allow_all_refuses_to_start() -> None:
    assert any("no allow-list is set" in p for p in problems())
    assert any("no allow-list is set" in p for p in problems(ALLOW_ALL_AUTHENTICATED="false"))


def test_allow_all_authenticated_alone_starts_with_a_warning() -> None:
    config = load({**BASE_ENV, "ALLOW_ALL_AUTHENTICATED": "true"})
    assert config.policy.allow_all_authenticated
    assert any(w.startswith("ALLOW_ALL_AUTHENTICATED=true") for w in config.warnings)


def test_allow_all_authenticated_with_an_allow_list_gives_no_warning() -> None:
    config = load({**BASE_ENV, "ALLOW_ALL_AUTHENTICATED": "true", "ALLOW_SUBS": "alice"})
    assert not any("ALLOW_ALL_AUTHENTICATED" in w for w in config.warnings)


def test_allow_lists_are_parsed_and_normalised() -> None:
    config = load({
        **BASE_ENV, "ALLOW_SUBS": "alice, Bob  carol", "ALLOW_EMAILS": "Alice@Example.COM",
        "ALLOW_EMAIL_DOMAINS": "Example.COM, corp.example", "ALLOW_GROUPS": "admins,mcp-users",
        "GROUPS_CLAIM": "realm_access.roles", "REQUIRED_SCOPES": "mcp:read, mcp:write",
    })
    policy = config.policy
    assert policy.subs == {"alice", "Bob", "carol"}
    assert policy.emails == {"alice@example.com"}
    assert policy.email_domains == {"example.com", "corp.example"}
    assert policy.groups == {"admins", "mcp-users"}
    assert policy.groups_claim == ("realm_access", "roles")
    assert policy.required_scopes == ("mcp:read", "mcp:write")


@pytest.mark.parametrize("entry", [
    pytest.param("alice", id="no_at"),
    pytest.param("a@b@example.com", id="two_ats"),
    pytest.param("@example.com", id="empty_local"),
    pytest.param("alice@", id="empty_domain"),
])
def test_bad_allow_emails_entry_refuses_to_start(entry: str) -> None:
    found = problems(ALLOW_EMAILS=f"ok@example.com,{entry}")
    assert any(p.startswith("ALLOW_EMAILS entry") and entry.lower() in p for p in found)


@pytest.mark.parametrize("entry", [
    pytest.param("user@example.com", id="an_email"),
    pytest.param("exa@mple.com", id="at_inside"),
    pytest.param("*.example.com", id="wildcard"),
    pytest.param("*", id="bare_wildcard"),
    pytest.param(".example.com", id="leading_dot"),
    pytest.param("localhost", id="no_dot"),
])
def test_bad_allow_email_domains_entry_refuses_to_start(entry: str) -> None:
    found = problems(ALLOW_EMAIL_DOMAINS=entry)
    assert any(p.startswith("ALLOW_EMAIL_DOMAINS entry") for p in found)


def test_allow_email_domains_strips_one_leading_at() -> None:
    """`@example.com` is read as example.com (documented normalisation, still matched exactly)."""
    config = load({**BASE_ENV, "ALLOW_EMAIL_DOMAINS": "@Example.com"})
    assert config.policy.email_domains == {"example.com"}
    assert any(p.startswith("ALLOW_EMAIL_DOMAINS") for p in problems(ALLOW_EMAIL_DOMAINS="@@x.com"))


@pytest.mark.parametrize("claim", ["a..b", ".groups", "groups.", "."])
def test_malformed_groups_claim_refuses_to_start(claim: str) -> None:
    found = problems(ALLOW_GROUPS="admins", GROUPS_CLAIM=claim)
    assert any(p.startswith("GROUPS_CLAIM=") for p in found)


def test_insecure_unverified_email_with_email_lists_warns() -> None:
    config = load({**BASE_ENV, "ALLOW_EMAILS": "a@example.com",
                   "INSECURE_ALLOW_UNVERIFIED_EMAIL": "true"})
    assert any(w.startswith("INSECURE_ALLOW_UNVERIFIED_EMAIL=true") for w in config.warnings)


# --- through the production app -----------------------------------------------------------------

SECRET_LISTS = {
    "ALLOW_ALL_AUTHENTICATED": "false",
    "ALLOW_SUBS": "zq-secret-sub-7f3a",
    "ALLOW_EMAILS": "hidden.person.91@covert-corp.example",
    "ALLOW_EMAIL_DOMAINS": "classified-domain-42.example",
    "ALLOW_GROUPS": "grp-classified-0x1",
}
SECRET_FRAGMENTS = ("zq-secret", "hidden.person", "covert-corp", "classified-domain",
                    "grp-classified")


async def test_denied_caller_gets_403_that_reveals_no_allow_list(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar: Client = await make_sidecar(**SECRET_LISTS)
    token = idp.mint(claims={"sub": "user-1", **verified("user-1@elsewhere.example"),
                             "groups": ["staff"]})
    response = await sidecar.post("/mcp", data=b"{}", headers=bearer(token))
    assert response.status == 403
    body = await response.text()
    assert (await response.json())["error"] == "access_denied"
    assert "WWW-Authenticate" not in response.headers
    shown = body + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    for fragment in SECRET_FRAGMENTS:
        assert fragment not in shown
    assert upstream.requests == []


async def test_denial_is_logged_with_reason_and_subject(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar: Client = await make_sidecar(**SECRET_LISTS)
    token = idp.mint(claims={"sub": "intruder-9"})
    with capture_logs() as events:
        response = await sidecar.get("/mcp", headers=bearer(token))
    assert response.status == 403
    [line] = [e for e in events if e["event"] == "request"]
    assert line["auth_error"] == "not_allowed"
    assert line["sub"] == "intruder-9"
    assert line["status"] == 403
    assert upstream.requests == []


@pytest.mark.parametrize(("env", "claims"), [
    pytest.param({"ALLOW_SUBS": "alice"}, {"sub": "alice"}, id="by_sub"),
    pytest.param({"ALLOW_EMAILS": "alice@example.com"},
                 {"sub": "u-7", **verified("Alice@Example.com")}, id="by_email"),
    pytest.param({"ALLOW_EMAIL_DOMAINS": "example.com"},
                 {"sub": "u-8", **verified("bob@example.com")}, id="by_domain"),
    pytest.param({"ALLOW_GROUPS": "mcp-users"}, {"sub": "u-9", "groups": ["mcp-users"]},
                 id="by_group"),
    pytest.param({"ALLOW_GROUPS": "mcp-users", "GROUPS_CLAIM": "realm_access.roles"},
                 {"sub": "u-10", "realm_access": {"roles": ["mcp-users"]}}, id="by_keycloak_role"),
    # Auth0 Actions must namespace custom claims: the URL is one claim name, dots and all.
    pytest.param({"ALLOW_GROUPS": "mcp-users", "GROUPS_CLAIM": "https://mcp.example.com/roles"},
                 {"sub": "u-11", "https://mcp.example.com/roles": ["mcp-users"],
                  "https://mcp": {"example": {"com/roles": ["mcp-users"]}}},
                 id="by_auth0_namespaced_claim"),
])
async def test_allowed_caller_reaches_upstream(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream,
    env: dict[str, str], claims: dict[str, Any],
) -> None:
    sidecar: Client = await make_sidecar(ALLOW_ALL_AUTHENTICATED="false", **env)
    response = await sidecar.post("/mcp", data=b"{}", headers=bearer(idp.mint(claims=claims)))
    assert response.status == 200
    assert len(upstream.requests) == 1
    # A lookalike of the same caller is refused by the same sidecar.
    other = {**claims, "sub": "zz-other", "email": "zz@evil.example", "groups": ["x"],
             "realm_access": {"roles": ["x"]}, "https://mcp.example.com/roles": ["x"]}
    refused = await sidecar.post("/mcp", data=b"{}", headers=bearer(idp.mint(claims=other)))
    assert refused.status == 403
    assert len(upstream.requests) == 1


INSUFFICIENT_SCOPE = (
    'Bearer error="insufficient_scope", scope="mcp:read mcp:write", '
    f'resource_metadata="{METADATA_URL}"'
)


async def test_missing_required_scope_gets_403_step_up_challenge(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar: Client = await make_sidecar(REQUIRED_SCOPES="mcp:read mcp:write")
    token = idp.mint(claims={"scope": "openid mcp:read"})
    response = await sidecar.post("/mcp", data=b"{}", headers=bearer(token))
    assert response.status == 403
    assert response.headers.getall("WWW-Authenticate") == [INSUFFICIENT_SCOPE]
    assert (await response.json())["error"] == "insufficient_scope"
    assert upstream.requests == []


async def test_token_with_every_required_scope_reaches_upstream(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar: Client = await make_sidecar(REQUIRED_SCOPES="mcp:read mcp:write")
    for claims in ({"scope": "mcp:write mcp:read"}, {"scp": ["mcp:read", "mcp:write"]},
                   {"scope": "mcp:read", "scp": "mcp:write"}):
        response = await sidecar.post("/mcp", data=b"{}", headers=bearer(idp.mint(claims=claims)))
        assert response.status == 200, claims
    assert len(upstream.requests) == 3


async def test_not_allowed_caller_without_scopes_gets_access_denied(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> None:
    sidecar: Client = await make_sidecar(ALLOW_ALL_AUTHENTICATED="false", ALLOW_SUBS="alice",
                                         REQUIRED_SCOPES="mcp:read mcp:write")
    response = await sidecar.post("/mcp", data=b"{}",
                                  headers=bearer(idp.mint(claims={"sub": "bob"})))
    assert response.status == 403
    assert (await response.json())["error"] == "access_denied"
    assert "WWW-Authenticate" not in response.headers
    assert upstream.requests == []


async def test_required_scopes_are_advertised_in_challenge_and_metadata(
    make_sidecar: SidecarFactory, upstream: FakeUpstream
) -> None:
    sidecar: Client = await make_sidecar(REQUIRED_SCOPES="mcp:read mcp:write")
    response = await sidecar.post("/mcp", data=b"{}")
    assert response.status == 401
    assert response.headers.getall("WWW-Authenticate") == [
        f'Bearer resource_metadata="{METADATA_URL}", scope="mcp:read mcp:write"'
    ]
    metadata = await sidecar.get("/.well-known/oauth-protected-resource/mcp")
    assert metadata.status == 200
    assert (await metadata.json())["scopes_supported"] == ["mcp:read", "mcp:write"]
    assert upstream.requests == []


# --- Unicode: only ASCII letters are case-folded, nothing is normalised --------------------------

KELVIN, LONG_S, CAPITAL_I_DOT = "\u212a", "\u017f", "\u0130"  # lower()/casefold() reach ASCII
FULLWIDTH_K, FULLWIDTH_SMALL_K, FULLWIDTH_C = "\uff2b", "\uff4b", "\uff43"  # NFKC reaches ASCII
UNICODE_LISTS = {
    "ALLOW_ALL_AUTHENTICATED": "false",
    "ALLOW_EMAILS": "kim@example.com,sam@example.com,ian@example.com,"
                    "j\u00fcrgen@b\u00fccher.example",
    "ALLOW_EMAIL_DOMAINS": "kit.example,b\u00fccher.example",
}
# The same lists, but some entries in an allow file: files are read with the same rules.
FILE_ENTRIES = f"{KELVIN}en@example.com\n# a comment\nleo@example.com\n"


@pytest.mark.parametrize(("email", "expected"), [
    pytest.param("kim@example.com", True, id="ascii_exact"),
    pytest.param("KIM@Example.COM", True, id="ascii_case_folds"),
    pytest.param("Leo@EXAMPLE.com", True, id="file_entry_ascii_case_folds"),
    pytest.param(f"{KELVIN}im@example.com", False, id="kelvin_sign_is_not_k"),
    pytest.param(f"{LONG_S}am@example.com", False, id="long_s_is_not_s"),
    pytest.param(f"{CAPITAL_I_DOT}an@example.com", False, id="capital_i_with_dot_is_not_i"),
    pytest.param(f"{FULLWIDTH_SMALL_K}im@example.com", False, id="fullwidth_k_is_not_k"),
    pytest.param(f"{FULLWIDTH_K}IM@example.com", False, id="fullwidth_capital_k_is_not_k"),
    pytest.param(f"kim@example.{FULLWIDTH_C}om", False, id="fullwidth_in_the_domain"),
    pytest.param("ki\u006d\u0301@example.com", False, id="combining_accent_is_another_address"),
    pytest.param(f"bob@{KELVIN}it.example", False, id="kelvin_sign_in_a_domain"),
    pytest.param(f"bob@{FULLWIDTH_SMALL_K}it.example", False, id="fullwidth_in_a_domain"),
    pytest.param("bob@KIT.example", True, id="ascii_domain_case_folds"),
    pytest.param(f"{KELVIN}en@example.com", True, id="non_ascii_file_entry_matches_exactly"),
    pytest.param("ken@example.com", False, id="ascii_never_matches_a_kelvin_entry"),
    pytest.param("KEN@example.com", False, id="ascii_upper_never_matches_a_kelvin_entry"),
    pytest.param("j\u00fcrgen@b\u00fccher.example", True, id="unicode_address_exactly"),
    pytest.param("J\u00fcrgen@B\u00fccher.example", True, id="unicode_address_ascii_case"),
    pytest.param("j\u00dcrgen@b\u00fccher.example", True, id="unicode_domain_entry_admits"),
    pytest.param("x@B\u00dcCHER.example", False, id="non_ascii_case_is_not_folded"),
    pytest.param("x@xn--bcher-kva.example", False, id="idn_a_label_is_not_the_u_label"),
])
async def test_emails_fold_ascii_case_only_through_the_sidecar(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path, *,
    email: str, expected: bool,
) -> None:
    """A user who registers `\\u212aim@example.com` (KELVIN SIGN) at an IdP that allows it must
    not pass ALLOW_EMAILS=kim@example.com, nor any address that only Unicode case folding or
    NFKC turns into an allowed ASCII one; entries are read the same way (variable and file)."""
    allow_file = tmp_path / "emails.txt"
    allow_file.write_text(FILE_ENTRIES, encoding="utf-8")
    sidecar: Client = await make_sidecar(**UNICODE_LISTS, ALLOW_EMAILS_FILE=str(allow_file))
    token = idp.mint(claims={"sub": "someone", **verified(email)})
    response = await sidecar.post("/mcp", data=b"{}", headers=bearer(token))
    assert response.status == (200 if expected else 403), email
    assert len(upstream.requests) == (1 if expected else 0)


def test_allow_entries_lowercase_ascii_letters_only() -> None:
    config = load({**BASE_ENV, "ALLOW_EMAILS": f"KIM@Example.COM,{KELVIN}EN@Example.COM",
                   "ALLOW_EMAIL_DOMAINS": f"{KELVIN}IT.Example,B\u00dcCHER.example"})
    assert config.policy.emails == {"kim@example.com", f"{KELVIN}en@example.com"}
    assert config.policy.email_domains == {f"{KELVIN}it.example", "b\u00dccher.example"}


# --- what the verified-token cache keeps (kept_claims) ------------------------------------------

CLAIM_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(
        ["g1", "g2", "a@example.test", "A@EXAMPLE.TEST", "b@x@y", "true", "TRUE", "mcp", "mcp x",
         "other", ""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["roles", "groups", "x"]), inner, max_size=3),
    max_leaves=8,
)
CLAIMS = st.dictionaries(
    st.sampled_from(["email", "email_verified", "scope", "scp", "groups", "realm_access", "name",
                     "tid", "roles"]),
    CLAIM_VALUES, max_size=7,
)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(claims=CLAIMS, groups_claim=st.sampled_from(["groups", "realm_access.roles", "scp"]),
       lists=st.sampled_from(["none", "groups", "emails", "domains", "subs"]),
       required=st.sampled_from([(), ("mcp",)]), unverified=st.booleans(),
       forwarded=st.booleans())
def test_kept_claims_give_every_answer_the_whole_claims_give(
    *, claims: dict[str, Any], groups_claim: str, lists: str, required: tuple[str, ...],
    unverified: bool, forwarded: bool,
) -> None:
    """A cache hit sees only kept_claims(): the verdict, and the email and groups forwarded
    upstream, must be what the whole claims give, whatever the IdP put in them."""
    policy = make_policy(
        subs=["alice"] if lists == "subs" else (), emails=["a@example.test"] if lists == "emails"
        else (), domains=["example.test"] if lists == "domains" else (),
        groups=["g1"] if lists == "groups" else (), groups_claim=groups_claim,
        allow_all=lists == "none", unverified=unverified, required=required, forwarded=forwarded)
    kept, admits = policy.kept_claims("bob", claims)
    assert admits == admitted(policy, "bob", claims)
    assert set(kept) <= set(claims)
    assert policy.missing_scopes(kept) == policy.missing_scopes(claims)
    if forwarded or lists == "groups":
        assert policy.groups(kept) == policy.groups(claims)
    assert policy.verified_email(kept) == policy.verified_email(claims)


def test_groups_are_kept_only_when_something_reads_them() -> None:
    claims = {"groups": ["g1"], "email": "a@example.test", "scp": "mcp", "name": "x" * 100}
    unread = make_policy(allow_all=True, forwarded=False).kept_claims("s", claims)
    assert unread == ({"email": "a@example.test", "scp": "mcp"}, True)
    assert "groups" in make_policy(groups=["g9"], forwarded=False).kept_claims("s", claims)[0]
    assert "groups" in make_policy(allow_all=True, forwarded=True).kept_claims("s", claims)[0]
    # A groups file empty for now may list groups later: they are read, so they are kept.
    config = replace(make_policy()._config, files=(
        AllowFile("groups", "/groups.txt", frozenset()),))
    assert "groups" in AccessPolicy(config, forwarded=False).kept_claims("s", claims)[0]
