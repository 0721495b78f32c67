"""The identity-provider pages and the Claude.ai connector guide stay true for this code.

Every environment block in them (a ```sh block of `KEY=value` lines, comments allowed) names only
variables the sidecar knows and loads with the production `config.load()` without a problem or a
warning; the index table's mode and groups claim match each page; every relative link resolves.
Then the settings of each page run a real sidecar (`make_sidecar`) in front of the fake IdP, and
tokens shaped like that IdP's pass or fail as the page says.

Opaque tokens: each IdP page has a section "Opaque tokens (introspection)". Its env block, where
there is one, adds to the page's main block and is loaded merged with it; the ORY Hydra page's main
block is an introspection setup itself. Every block loads, and the introspection answers shaped
like each IdP's run through a real sidecar against a fake introspection endpoint.

Placeholders: `<anything>` in a block is what the reader fills in; the test puts a 32-character
stand-in there (long enough for STATE_SECRET, valid in host names, IDs and secrets).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import shlex
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import FakeIdp, FakeUpstream, SidecarFactory, bearer

from oauth_sidecar.config import VARIABLES, Config, ConfigError, load

Client = TestClient[web.Request, web.Application]

REPO = Path(__file__).resolve().parent.parent
IDP_DIR = REPO / "examples" / "identity-providers"
INDEX = IDP_DIR / "README.md"
CONNECTOR = REPO / "examples" / "claude-ai-connector.md"
IDP_PAGES = {
    name: IDP_DIR / f"{name}.md"
    for name in (
        "keycloak", "authentik", "auth0", "okta", "entra-id", "google", "cognito", "ory-hydra",
    )
}
WITHOUT_ENV_BLOCK = {"google"}  # not supported directly: the page must not offer settings
DOCS = [INDEX, *IDP_PAGES.values(), CONNECTOR]

OPAQUE_SECTION = "Opaque tokens (introspection)"
WITH_INTROSPECTION_BLOCK = {"keycloak", "okta", "authentik"}
"""Pages whose opaque-tokens section adds settings to the page's main block."""
INTROSPECTION_ONLY = {"ory-hydra"}
"""Pages whose main block validates by introspection (no JWT shape to admit)."""

INTROSPECTION_VARIABLES = frozenset({
    "TOKEN_VALIDATION", "INTROSPECTION_ENDPOINT", "INTROSPECTION_CLIENT_ID",
    "INTROSPECTION_CLIENT_SECRET", "INTROSPECTION_CLIENT_SECRET_FILE", "INTROSPECTION_AUTH_METHOD",
    "INTROSPECTION_CACHE_SECONDS", "INTROSPECTION_NEGATIVE_CACHE_SECONDS",
    "INTROSPECTION_REQUIRE_EXP", "INTROSPECTION_MAX_CONCURRENCY", "INTROSPECTION_TIMEOUT_SECONDS",
})
"""The introspection variables, as the pages name them."""
KNOWN_VARIABLES = frozenset(VARIABLES)
"""What a page may name: the registry."""

FENCE = re.compile(r"^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```", re.MULTILINE | re.DOTALL)
ASSIGNMENT = re.compile(r"(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)")
COMMENTED_ASSIGNMENT = re.compile(r"#\s*(?P<name>[A-Z][A-Z0-9_]*)=")
PLACEHOLDER = re.compile(r"<[^<>\n]+>")
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
HEADING = re.compile(r"^#+\s+(?P<title>.+)$", re.MULTILINE)


def stand_in(placeholder: str) -> str:
    """A placeholder's test value: deterministic, 32 characters of [0-9a-f] after a letter."""
    return "p" + hashlib.sha256(placeholder.encode()).hexdigest()[:31]


@dataclass(frozen=True)
class EnvBlock:
    source: str
    """Where it is (file:line), for messages."""
    env: dict[str, str]
    commented: tuple[str, ...]
    """Names in commented-out assignments (`# KEY=value`): a typo there misleads readers too."""
    section: str = ""
    """The title of the heading the block is under."""

    @property
    def opaque(self) -> bool:
        """An opaque-tokens section's block: additions to the page's main block."""
        return self.section == OPAQUE_SECTION


def is_env_block(body: str) -> bool:
    """Every non-blank line a comment or an assignment (a command block has other lines)."""
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    return bool(lines) and all(
        line.startswith("#") or ASSIGNMENT.match(line) for line in lines
    ) and any(not line.startswith("#") for line in lines)


def parse_env_block(body: str, source: str, section: str = "") -> EnvBlock:
    """KEY=value lines as a shell would read them after placeholders are filled in."""
    env: dict[str, str] = {}
    commented = []
    for raw in body.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            match = COMMENTED_ASSIGNMENT.match(line)
            if match:
                commented.append(match.group("name"))
            continue
        match = ASSIGNMENT.match(line)
        assert match, f"{source}: not KEY=value: {line!r}"
        name = match.group("name")
        filled = PLACEHOLDER.sub(lambda m: stand_in(m.group(0)), match.group("value"))
        words = shlex.split(filled, comments=True)
        assert len(words) <= 1, f"{source}: {name}'s value is several shell words: quote it"
        assert name not in env, f"{source}: {name} is set twice"
        env[name] = words[0] if words else ""
    return EnvBlock(source, env, tuple(commented), section)


def sh_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, body) of each ```sh block."""
    text = path.read_text()
    return [
        (text.count("\n", 0, match.start()) + 1, match.group("body"))
        for match in FENCE.finditer(text) if match.group("lang") == "sh"
    ]


def heading_before(text: str, line: int) -> str:
    """The title of the last heading above `line` (1-based); "" when there is none."""
    titles = [m.group("title") for m in HEADING.finditer(text)
              if text.count("\n", 0, m.start()) + 1 < line]
    return titles[-1].strip() if titles else ""


def env_blocks(path: Path) -> list[EnvBlock]:
    text = path.read_text()
    return [
        parse_env_block(body, f"{path.relative_to(REPO)}:{line}", heading_before(text, line))
        for line, body in sh_blocks(path) if is_env_block(body)
    ]


def main_blocks(path: Path) -> list[EnvBlock]:
    return [block for block in env_blocks(path) if not block.opaque]


def opaque_blocks(path: Path) -> list[EnvBlock]:
    return [block for block in env_blocks(path) if block.opaque]


def page_env(name: str) -> dict[str, str]:
    (block,) = main_blocks(IDP_PAGES[name])
    return block.env


def page_opaque_env(name: str) -> dict[str, str]:
    """The page's settings with its opaque-tokens section's additions, as the reader adds them."""
    if name in INTROSPECTION_ONLY:
        return page_env(name)
    (block,) = opaque_blocks(IDP_PAGES[name])
    return {**page_env(name), **block.env}


def effective_env(path: Path, block: EnvBlock) -> dict[str, str]:
    """What the reader runs with: an opaque-tokens block on top of its page's main block."""
    if not block.opaque:
        return block.env
    (main,) = main_blocks(path)
    return {**main.env, **block.env}


def uses_introspection(env: dict[str, str]) -> bool:
    return bool(INTROSPECTION_VARIABLES & set(env))


def page_config(name: str) -> Config:
    return load(page_env(name))


# --------------------------------------------------------------------------------------------
# The extractor itself: it must find blocks and be able to fail
# --------------------------------------------------------------------------------------------

SAMPLE = """Some prose.

```sh
curl -i https://mcp.example.com/mcp
```

```sh
OIDC_ISSUER_URL=https://<tenant>.example.com/   # a comment
OIDC_AUDIANCE=<api id>
SCOPES_SUPPORTED="openid profile"
# GROUPS_CLAIMS=roles
```
"""


def test_the_extractor_finds_env_blocks_fills_placeholders_and_exposes_typos(
    tmp_path: Path,
) -> None:
    page = tmp_path / "sample.md"
    page.write_text(SAMPLE)
    (block,) = [parse_env_block(body, "sample") for _, body in sh_blocks(page)
                if is_env_block(body)]
    assert block.env == {
        "OIDC_ISSUER_URL": f"https://{stand_in('<tenant>')}.example.com/",
        "OIDC_AUDIANCE": stand_in("<api id>"),
        "SCOPES_SUPPORTED": "openid profile",
    }
    assert block.commented == ("GROUPS_CLAIMS",)
    # Both misspellings are what the every-page check reports as unknown.
    named = set(block.env) | set(block.commented)
    assert named - set(VARIABLES) == {"OIDC_AUDIANCE", "GROUPS_CLAIMS"}
    with pytest.raises(ConfigError):  # and the load check fails on the typo'd block
        load(block.env)


def test_an_unquoted_value_with_spaces_is_refused() -> None:
    with pytest.raises(AssertionError, match="several shell words"):
        parse_env_block("SCOPES_SUPPORTED=openid profile\n", "sample")


def test_stand_ins_are_long_enough_for_a_state_secret() -> None:
    assert len(stand_in("<openssl rand -hex 32>")) >= 32


# --------------------------------------------------------------------------------------------
# Every page's blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(IDP_PAGES))
def test_each_idp_page_has_exactly_one_env_block_or_none_when_unsupported(name: str) -> None:
    expected = 0 if name in WITHOUT_ENV_BLOCK else 1
    assert len(main_blocks(IDP_PAGES[name])) == expected


@pytest.mark.parametrize("name", sorted(IDP_PAGES))
def test_each_idp_page_says_whether_it_needs_introspection_in_one_section(name: str) -> None:
    """Every page answers "opaque tokens?"; only those that need settings give a block there."""
    titles = [title.strip() for title in HEADING.findall(IDP_PAGES[name].read_text())]
    assert titles.count(OPAQUE_SECTION) == 1, name
    blocks = opaque_blocks(IDP_PAGES[name])
    assert len(blocks) == (1 if name in WITH_INTROSPECTION_BLOCK else 0), name
    for block in blocks:  # additions only: the page's main block has the rest
        assert block.env.get("TOKEN_VALIDATION") == "introspection", block.source
        assert not {"OIDC_ISSUER_URL", "OIDC_AUDIENCE", "STATIC_CLIENT_ID"} & set(block.env)


@pytest.mark.parametrize("name", sorted(IDP_PAGES))
def test_only_pages_that_validate_by_introspection_set_it_in_their_main_block(name: str) -> None:
    env = {} if name in WITHOUT_ENV_BLOCK else page_env(name)
    assert uses_introspection(env) == (name in INTROSPECTION_ONLY), name


def test_the_hydra_page_asks_the_admin_api_without_client_credentials() -> None:
    """Hydra's admin API takes none; a client secret sent there would only be exposed."""
    env = page_env("ory-hydra")
    assert env["TOKEN_VALIDATION"] == "introspection"
    assert env["INTROSPECTION_AUTH_METHOD"] == "none"
    assert env["INTROSPECTION_ENDPOINT"].endswith("/admin/oauth2/introspect")
    assert not {"INTROSPECTION_CLIENT_SECRET", "INTROSPECTION_CLIENT_SECRET_FILE"} & set(env)
    assert env["OIDC_ISSUER_URL"].startswith("https://")  # OIDC_ALLOW_HTTP is for the admin API


def test_the_introspection_variables_the_pages_name_are_the_sidecars() -> None:
    """Switched on by the merge: a variable renamed on the sidecar's side fails the pages here."""
    assert set(VARIABLES) >= INTROSPECTION_VARIABLES


def test_the_connector_guide_has_its_env_block() -> None:
    assert len(env_blocks(CONNECTOR)) == 1


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_env_blocks_name_only_variables_the_sidecar_knows(path: Path) -> None:
    for block in env_blocks(path):
        unknown = (set(block.env) | set(block.commented)) - KNOWN_VARIABLES
        assert unknown == set(), block.source


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_command_blocks_set_no_sidecar_variable(path: Path) -> None:
    """A sidecar variable outside an env block would escape the load check."""
    for line, body in sh_blocks(path):
        if is_env_block(body):
            continue
        for text in body.splitlines():
            match = ASSIGNMENT.match(text.strip())
            assert not (match and match.group("name") in KNOWN_VARIABLES), f"{path.name}:{line}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_env_blocks_load_without_problems_or_warnings(path: Path) -> None:
    for block in env_blocks(path):
        env = effective_env(path, block)
        try:
            config = load(env)
        except ConfigError as exc:
            pytest.fail(f"{block.source}: {exc.problems}")
        assert config.warnings == (), block.source


@pytest.mark.parametrize("name", sorted(WITH_INTROSPECTION_BLOCK | INTROSPECTION_ONLY))
def test_introspection_blocks_load_merged_with_their_page(name: str) -> None:
    try:
        config = load(page_opaque_env(name))
    except ConfigError as exc:
        pytest.fail(f"{name}: {exc.problems}")
    assert config.warnings == (), name


# --------------------------------------------------------------------------------------------
# The index table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    page: str
    cells: list[str]

    @property
    def audience(self) -> str:
        return self.cells[2]

    @property
    def groups(self) -> str:
        return self.cells[3]

    @property
    def mode(self) -> str:
        return self.cells[-1]


def table_rows() -> dict[str, Row]:
    rows = {}
    for line in INDEX.read_text().splitlines():
        match = re.match(r"\| \[[^]]+\]\((?P<page>[a-z0-9-]+)\.md\) \|", line)
        if match:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[match.group("page")] = Row(match.group("page"), cells)
    return rows


def test_the_index_table_has_one_row_per_idp_page() -> None:
    assert set(table_rows()) == set(IDP_PAGES)
    assert {len(row.cells) for row in table_rows().values()} == {7}


@pytest.mark.parametrize("name", sorted(IDP_PAGES))
def test_the_index_table_mode_matches_the_page(name: str) -> None:
    row = table_rows()[name]
    if name in WITHOUT_ENV_BLOCK:
        assert row.mode.startswith("not supported")
        return
    facade = bool(page_env(name).get("STATIC_CLIENT_ID"))
    assert row.mode == ("facade" if facade else "direct")
    assert page_config(name).auth_server.facade == facade  # and the code agrees


@pytest.mark.parametrize("name", sorted(set(IDP_PAGES) - WITHOUT_ENV_BLOCK))
def test_the_index_table_names_the_pages_groups_claim_and_audience_claim(name: str) -> None:
    row, config = table_rows()[name], page_config(name)
    groups, audience_claim = ".".join(config.policy.groups_claim), config.tokens.audience_claim
    assert f"`{groups}`" in row.groups
    if audience_claim != "aud":
        assert f"`JWT_AUDIENCE_CLAIM={audience_claim}`" in row.audience


# --------------------------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------------------------


def slug(title: str) -> str:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    links = [m.group("target") for m in LINK.finditer(path.read_text())]
    relative = [t for t in links if not re.match(r"[a-z]+:", t)]
    for target in relative:
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        assert resolved.is_file(), f"{path.name}: {target}"
        if anchor:
            titles = HEADING.findall(resolved.read_text())
            assert anchor in {slug(t) for t in titles}, f"{path.name}: {target}"


def test_every_idp_page_links_back_to_the_index_and_the_index_to_the_guide() -> None:
    for name, path in IDP_PAGES.items():
        if name not in WITHOUT_ENV_BLOCK:
            assert "](README.md#check-it)" in path.read_text(), name
    assert "](../claude-ai-connector.md)" in INDEX.read_text()


# --------------------------------------------------------------------------------------------
# Each page's settings against a real sidecar, with tokens shaped like that IdP's
# --------------------------------------------------------------------------------------------

TokenBuilder = Callable[[FakeIdp, Config], str]


async def sidecar_for(
    name: str, make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream
) -> tuple[Client, Config]:
    """The page's environment, pointed at the fake IdP and upstream; nothing else changed."""
    env = {**page_env(name), "OIDC_ISSUER_URL": idp.issuer, "MCP_UPSTREAM_URL": upstream.url,
           "ALLOW_ALL_AUTHENTICATED": "false"}
    return await make_sidecar(**env), load({**env, "JWKS_COOLDOWN_SECONDS": "1"})


async def call(sidecar: Client, token: str) -> tuple[int, dict[str, Any]]:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    async with sidecar.post("/mcp", json=body, headers={
        **bearer(token), "Accept": "application/json, text/event-stream",
    }) as response:
        return response.status, await response.json()


def keycloak(idp: FakeIdp, config: Config, *, roles: tuple[str, ...] = ("mcp-users",),
             aud: Any = None) -> str:
    return idp.mint(claims={
        "aud": aud if aud is not None else [config.tokens.audiences[0], "account"],
        "sub": str(uuid.uuid4()), "typ": "Bearer", "azp": config.auth_server.client_id,
        "realm_access": {"roles": ["default-roles-mcp", "offline_access", *roles]},
        "resource_access": {"account": {"roles": ["manage-account", "view-profile"]}},
        "scope": "openid profile email", "email_verified": True, "email": "alice@example.com",
        "preferred_username": "alice",
    }, header={"typ": "JWT"})


def authentik_id_token(idp: FakeIdp, config: Config, *,
                       groups: tuple[str, ...] = ("mcp-users",)) -> str:
    """What authentik's token endpoint returns as id_token: the ID-token claims alone."""
    return idp.mint(claims={
        "iss": idp.issuer + "/",  # authentik's issuer ends with a slash
        "aud": config.tokens.audiences[0], "sub": hashlib.sha256(b"user-7").hexdigest(),
        "auth_time": 1_700_000_000, "acr": "goauthentik.io/providers/oauth2/default",
        "amr": ["pwd"], "nonce": "n-0S6_WzA2Mj", "sid": hashlib.sha256(b"session").hexdigest(),
        "email": "alice@example.com", "email_verified": False,  # the 2025.10+ default
        "name": "Alice", "preferred_username": "alice", "groups": list(groups),
    })


def authentik(idp: FakeIdp, config: Config, *, groups: tuple[str, ...] = ("mcp-users",)) -> str:
    """authentik's access token: its ID token's claims (nonce included) plus azp and uid."""
    _, payload, _ = authentik_id_token(idp, config, groups=groups).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims |= {"azp": config.tokens.audiences[0], "uid": uuid.uuid4().hex}
    return idp.mint(claims=claims)


def keycloak_id_token(idp: FakeIdp, config: Config) -> str:
    """Keycloak's ID token when the Audience mapper also has *Add to ID token* on: our audience
    is in aud, but its typ claim says ID and it hashes the access token issued beside it."""
    return idp.mint(claims={
        "aud": [config.auth_server.client_id, config.tokens.audiences[0]],
        "sub": str(uuid.uuid4()), "typ": "ID", "azp": config.auth_server.client_id,
        "nonce": "n-0S6_WzA2Mj", "at_hash": "x4bt4E6Zs6n6m6vYd0Dk2w", "sid": str(uuid.uuid4()),
        "realm_access": {"roles": ["mcp-users"]}, "email_verified": True,
        "email": "alice@example.com",
    }, header={"typ": "JWT"})


def auth0(idp: FakeIdp, config: Config, *, permissions: tuple[str, ...] = ("use:mcp",)) -> str:
    return idp.mint(claims={
        "iss": idp.issuer + "/",
        "aud": [config.tokens.audiences[0], idp.issuer + "/userinfo"],
        "sub": "auth0|6581a1b2c3d4e5f6", "azp": config.auth_server.client_id,
        "scope": "openid profile email", "permissions": list(permissions),
    })


def okta(idp: FakeIdp, config: Config, *, groups: tuple[str, ...] = ("mcp-users",)) -> str:
    return idp.mint(claims={
        "ver": 1, "aud": config.tokens.audiences[0], "cid": config.auth_server.client_id,
        "uid": "00u1a2b3c4d5e6f7g8h9", "sub": "alice@example.com",
        "scp": ["openid", "profile", "email"], "groups": list(groups),
    })


ENTRA_GROUPS = 200  # the most a JWT carries before Entra switches to an overage pointer


def entra(idp: FakeIdp, config: Config, *, roles: tuple[str, ...] = ("MCP.User",),
          scp: str = "mcp.access", version: str = "2.0") -> str:
    tenant = str(uuid.UUID(int=7))
    claims: dict[str, Any] = {
        "aud": config.tokens.audiences[0], "ver": version, "tid": tenant,
        "azp": config.auth_server.client_id, "azpacr": "1", "oid": str(uuid.uuid4()),
        "sub": "Xy3kLm9PqR2sTuVw4XyZ0aBcDeFgHiJkLmNoPqRsTu", "name": "Alice Example",
        "preferred_username": "alice@example.com", "scp": scp, "roles": list(roles),
        "groups": [str(uuid.uuid4()) for _ in range(ENTRA_GROUPS)],
        "uti": "AbCdEfGhIjKlMnOpQrStUv", "rh": "0.AAAA" + "x" * 60,
    }
    if version == "1.0":  # what an API still on token version 1 gets, even via the v2 endpoint
        claims |= {"iss": f"https://sts.windows.net/{tenant}/", "aud": "api://mcp-api"}
    return idp.mint(claims=claims, header={"typ": "JWT", "x5t": "a" * 27})


def cognito(idp: FakeIdp, config: Config, *, client_id: str | None = None,
            groups: tuple[str, ...] = ("mcp-users",)) -> str:
    claims: dict[str, Any] = {
        "sub": str(uuid.uuid4()), "token_use": "access", "scope": "openid email profile",
        "client_id": client_id or config.tokens.audiences[0], "username": "alice",
        "origin_jti": str(uuid.uuid4()), "event_id": str(uuid.uuid4()), "version": 2,
        "auth_time": 1_700_000_000,
    }
    if groups:
        claims["cognito:groups"] = list(groups)
    return idp.mint(claims=claims, drop=("aud",))


def cognito_id_token(idp: FakeIdp, config: Config) -> str:
    return idp.mint(claims={
        "aud": config.tokens.audiences[0], "token_use": "id", "sub": str(uuid.uuid4()),
        "cognito:groups": ["mcp-users"], "email": "alice@example.com", "email_verified": True,
        "cognito:username": "alice",
    })


ADMITTED: list[Any] = [
    pytest.param("keycloak", keycloak, id="keycloak"),
    pytest.param("authentik", authentik, id="authentik"),
    pytest.param("auth0", auth0, id="auth0"),
    pytest.param("okta", okta, id="okta"),
    pytest.param("entra-id", entra, id="entra-id"),
    pytest.param("cognito", cognito, id="cognito"),
]


def test_every_page_with_settings_has_an_admitted_token_shape() -> None:
    with_jwts = set(IDP_PAGES) - WITHOUT_ENV_BLOCK - INTROSPECTION_ONLY
    assert {p.values[0] for p in ADMITTED} == with_jwts


@pytest.mark.parametrize(("name", "build"), ADMITTED)
async def test_the_pages_settings_admit_its_idps_access_token(
    name: str, build: TokenBuilder, make_sidecar: SidecarFactory, idp: FakeIdp,
    upstream: FakeUpstream,
) -> None:
    sidecar, config = await sidecar_for(name, make_sidecar, idp, upstream)
    status, body = await call(sidecar, build(idp, config))
    assert status == 200, body
    assert len(upstream.requests) == 1
    assert "Authorization" not in upstream.requests[0].headers


WRONG_AUDIENCE = "The token was not issued for this resource"
ID_TOKEN = "An ID token is not an access token"
REFUSED: list[Any] = [
    # Keycloak without the Audience mapper: its default aud is "account".
    pytest.param("keycloak", lambda i, c: keycloak(i, c, aud="account"), 401, WRONG_AUDIENCE,
                 id="keycloak-default-aud"),
    pytest.param("keycloak", lambda i, c: keycloak(i, c, roles=()), 403,
                 "This account may not use this server", id="keycloak-without-realm-role"),
    pytest.param("keycloak", keycloak_id_token, 401, ID_TOKEN, id="keycloak-id-token"),
    # authentik's ID token has the access token's aud; only JWT_ID_TOKEN_CHECK=client refuses it.
    pytest.param("authentik", authentik_id_token, 401, ID_TOKEN, id="authentik-id-token"),
    pytest.param("authentik", lambda i, c: authentik(i, c, groups=("staff",)), 403,
                 "This account may not use this server", id="authentik-other-group"),
    pytest.param("auth0", lambda i, c: auth0(i, c, permissions=()), 403,
                 "This account may not use this server", id="auth0-without-permission"),
    pytest.param("okta", lambda i, c: okta(i, c, groups=("Everyone",)), 403,
                 "This account may not use this server", id="okta-other-group"),
    pytest.param("entra-id", lambda i, c: entra(i, c, roles=()), 403,
                 "This account may not use this server", id="entra-without-app-role"),
    pytest.param("entra-id", lambda i, c: entra(i, c, scp="User.Read"), 403,
                 "The token lacks a required scope", id="entra-without-api-scope"),
    pytest.param("entra-id", lambda i, c: entra(i, c, version="1.0"), 401,
                 "The token is not from the trusted issuer", id="entra-v1-token"),
    pytest.param("cognito", lambda i, c: cognito(i, c, client_id="another-app-client"), 401,
                 WRONG_AUDIENCE, id="cognito-other-app-client"),
    pytest.param("cognito", cognito_id_token, 401, ID_TOKEN,
                 id="cognito-id-token"),
    pytest.param("cognito", lambda i, c: cognito(i, c, groups=()), 403,
                 "This account may not use this server", id="cognito-in-no-group"),
]


@pytest.mark.parametrize(("name", "build", "status", "description"), REFUSED)
async def test_the_pages_settings_refuse_what_the_page_says_they_refuse(
    name: str, build: TokenBuilder, status: int, description: str, *,
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream,
) -> None:
    sidecar, config = await sidecar_for(name, make_sidecar, idp, upstream)
    got, body = await call(sidecar, build(idp, config))
    assert (got, body["error_description"]) == (status, description)
    assert upstream.requests == []


def test_cognito_groups_claim_is_one_claim_name_not_a_path() -> None:
    assert page_config("cognito").policy.groups_claim == ("cognito:groups",)


async def test_an_entra_token_with_200_groups_is_about_11_kb_and_fits_the_pages_settings(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream,
) -> None:
    """entra-id.md: "a token with 200 group IDs is about 11 KB, within the defaults"."""
    assert "a token with 200 group IDs is about 11 KB" in IDP_PAGES["entra-id"].read_text()
    sidecar, config = await sidecar_for("entra-id", make_sidecar, idp, upstream)
    token = entra(idp, config)
    assert 10_000 <= len(token) <= 12_500, len(token)
    assert len(token) <= config.tokens.max_token_bytes
    assert config.max_header_bytes >= len("Bearer ") + config.tokens.max_token_bytes
    status, body = await call(sidecar, token)
    assert status == 200, body


async def test_a_smaller_token_limit_would_refuse_that_entra_token(
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream,
) -> None:
    """The size matters: the same token against an 8 KB limit is cut off."""
    env = {**page_env("entra-id"), "OIDC_ISSUER_URL": idp.issuer, "MCP_UPSTREAM_URL": upstream.url,
           "JWT_MAX_TOKEN_BYTES": "8192"}
    sidecar = await make_sidecar(**env)
    status, body = await call(sidecar, entra(idp, load(env)))
    assert (status, body["error_description"]) == (401, "The bearer token is too large")


# --------------------------------------------------------------------------------------------
# The opaque-tokens sections against a real sidecar: introspection answers shaped like each
# IdP's, served by a fake RFC 7662 endpoint on loopback (no IdP here issues opaque tokens): they
# pin what the pages promise.
# --------------------------------------------------------------------------------------------


@dataclass
class IntrospectionCall:
    authorization: str | None
    form: dict[str, str]


@dataclass
class FakeIntrospection:
    """An RFC 7662 endpoint: a scripted answer per token, `{"active": false}` for the rest."""

    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[IntrospectionCall] = field(default_factory=list)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}/introspect"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/introspect", self._introspect)
        return app

    async def _introspect(self, request: web.Request) -> web.StreamResponse:
        form = {key: str(value) for key, value in (await request.post()).items()}
        self.calls.append(IntrospectionCall(request.headers.get("Authorization"), form))
        return web.json_response(self.answers.get(form.get("token", ""), {"active": False}))


@pytest.fixture
async def introspection() -> AsyncIterator[FakeIntrospection]:
    fake = FakeIntrospection()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.server = server
    yield fake
    await server.close()


AnswerBuilder = Callable[[FakeIdp, dict[str, str]], dict[str, Any]]


def times(lifetime: int = 300) -> dict[str, int]:
    now = int(time.time())
    return {"iat": now, "exp": now + lifetime}


def keycloak_answer(idp: FakeIdp, env: dict[str, str], *, refresh: bool = False,
                    roles: tuple[str, ...] = ("mcp-users",)) -> dict[str, Any]:
    """A (lightweight) Keycloak token's introspection: the full claims, `aud` naming the
    introspection client (26.6.2+). A refresh token's `aud` is the realm itself."""
    aud: Any = idp.issuer if refresh else [env["OIDC_AUDIENCE"], env["INTROSPECTION_CLIENT_ID"],
                                            "account"]
    return {
        "active": True, **times(1800 if refresh else 300), "iss": idp.issuer, "aud": aud,
        "sub": str(uuid.uuid4()), "typ": "Refresh" if refresh else "Bearer",
        "azp": env["STATIC_CLIENT_ID"], "sid": str(uuid.uuid4()),
        "realm_access": {"roles": ["default-roles-mcp", "offline_access", *roles]},
        "scope": "openid profile email", "email_verified": True, "email": "alice@example.com",
        "preferred_username": "alice", "client_id": env["STATIC_CLIENT_ID"], "username": "alice",
    }


def okta_answer(idp: FakeIdp, env: dict[str, str], *, refresh: bool = False,
                groups: tuple[str, ...] = ("mcp-users",)) -> dict[str, Any]:
    """Okta's /v1/introspect: the token's claims plus its members; its documented refresh-token
    answer has `token_type: Bearer` too, and no `aud` or `iss`."""
    answer: dict[str, Any] = {
        "active": True, "token_type": "Bearer", "scope": "openid profile email",
        "client_id": env["STATIC_CLIENT_ID"], "username": "alice@example.com",
        "sub": "alice@example.com", **times(),
    }
    if refresh:
        return answer | {"device_id": "q4SZgrA9sOeHkfst5uaa"}
    return answer | {
        "aud": env["OIDC_AUDIENCE"], "iss": idp.issuer, "jti": "AT." + secrets.token_urlsafe(16),
        "uid": "00u1a2b3c4d5e6f7g8h9", "groups": list(groups),
    }


def authentik_answer(idp: FakeIdp, env: dict[str, str], *,
                     aud: str | None = None) -> dict[str, Any]:
    """authentik: the claims of the ID token issued with the token, then active, scope and the
    *caller's* client_id (its provider's credentials)."""
    return {
        "iss": idp.issuer + "/", "sub": hashlib.sha256(b"user-7").hexdigest(),
        "aud": aud or env["OIDC_AUDIENCE"], **times(), "auth_time": 1_700_000_000,
        "acr": "goauthentik.io/providers/oauth2/default", "amr": ["pwd"],
        "sid": hashlib.sha256(b"session").hexdigest(), "email": "alice@example.com",
        "email_verified": False, "name": "Alice", "preferred_username": "alice",
        "groups": ["mcp-users"], "active": True, "scope": "openid profile email",
        "client_id": env["INTROSPECTION_CLIENT_ID"],
    }


def hydra_answer(idp: FakeIdp, env: dict[str, str], *, use: str = "access_token",
                 client: str | None = None,
                 groups: tuple[str, ...] = ("mcp-users",)) -> dict[str, Any]:
    """Hydra v2's /admin/oauth2/introspect: `token_type` is Bearer for access and refresh
    tokens alike, `token_use` tells them apart; the consent session is under `ext`."""
    now = int(time.time())
    return {
        "active": True, "client_id": client or env["STATIC_CLIENT_ID"], "scope": "openid offline",
        "exp": now + (2_592_000 if use == "refresh_token" else 3600), "iat": now, "nbf": now,
        "sub": "user-7", "username": "", "ext": {"groups": list(groups)}, "aud": [],
        "iss": idp.issuer, "token_type": "Bearer", "token_use": use,
    }


def opaque_token() -> str:
    return secrets.token_urlsafe(32)


def lightweight_keycloak_token(idp: FakeIdp, env: dict[str, str]) -> str:
    """A JWT with almost nothing in it: what `TOKEN_VALIDATION=introspection` must still ask
    about (the JWT check would refuse it: no `sub`, no audience)."""
    return idp.mint(claims={"typ": "Bearer", "azp": env["STATIC_CLIENT_ID"]}, drop=("aud", "sub"))


IDP_METADATA: dict[str, dict[str, Any]] = {
    "keycloak": {"introspection_endpoint_auth_methods_supported": [
        "private_key_jwt", "client_secret_basic", "client_secret_post", "tls_client_auth",
        "client_secret_jwt"]},
    "okta": {"introspection_endpoint_auth_methods_supported": [
        "client_secret_basic", "client_secret_post", "client_secret_jwt", "private_key_jwt",
        "none"]},
    # authentik's names no introspection auth method: its page sets client_secret_basic.
}
"""What else these IdPs' metadata say about introspection (sketched, not copied)."""

TokenFor = Callable[[FakeIdp, dict[str, str]], str]
INTROSPECTED: list[Any] = [
    pytest.param("keycloak", lightweight_keycloak_token, keycloak_answer, 200, id="keycloak"),
    pytest.param("keycloak", lambda i, e: opaque_token(),
                 lambda i, e: keycloak_answer(i, e, refresh=True), 401,
                 id="keycloak-refresh-token"),
    pytest.param("keycloak", lambda i, e: opaque_token(),
                 lambda i, e: keycloak_answer(i, e, roles=()), 403,
                 id="keycloak-without-realm-role"),
    pytest.param("okta", lambda i, e: opaque_token(), okta_answer, 200, id="okta"),
    pytest.param("okta", lambda i, e: opaque_token(),
                 lambda i, e: okta_answer(i, e, refresh=True), 401, id="okta-refresh-token"),
    pytest.param("okta", lambda i, e: opaque_token(),
                 lambda i, e: okta_answer(i, e, groups=("Everyone",)), 403,
                 id="okta-other-group"),
    pytest.param("authentik", lambda i, e: opaque_token(), authentik_answer, 200,
                 id="authentik"),
    pytest.param("authentik", lambda i, e: opaque_token(),
                 lambda i, e: authentik_answer(i, e, aud="another-provider"), 401,
                 id="authentik-other-provider"),
    pytest.param("ory-hydra", lambda i, e: opaque_token(), hydra_answer, 200, id="ory-hydra"),
    pytest.param("ory-hydra", lambda i, e: opaque_token(),
                 lambda i, e: hydra_answer(i, e, use="refresh_token"), 401,
                 id="ory-hydra-refresh-token"),
    pytest.param("ory-hydra", lambda i, e: opaque_token(),
                 lambda i, e: hydra_answer(i, e, client="another-client"), 401,
                 id="ory-hydra-other-client"),
    pytest.param("ory-hydra", lambda i, e: opaque_token(),
                 lambda i, e: hydra_answer(i, e, groups=()), 403, id="ory-hydra-in-no-group"),
]


def test_every_page_that_introspects_has_an_admitted_answer() -> None:
    admitted = {p.values[0] for p in INTROSPECTED if p.values[3] == 200}
    assert admitted == WITH_INTROSPECTION_BLOCK | INTROSPECTION_ONLY


@pytest.mark.parametrize(("name", "token_for", "answer_for", "status"), INTROSPECTED)
async def test_the_pages_introspection_settings_treat_its_idps_answers_as_the_page_says(
    name: str, token_for: TokenFor, answer_for: AnswerBuilder, status: int, *,
    make_sidecar: SidecarFactory, idp: FakeIdp, upstream: FakeUpstream,
    introspection: FakeIntrospection,
) -> None:
    env = {**page_opaque_env(name), "OIDC_ISSUER_URL": idp.issuer,
           "MCP_UPSTREAM_URL": upstream.url, "ALLOW_ALL_AUTHENTICATED": "false"}
    if "INTROSPECTION_ENDPOINT" in env:  # the page names it (Hydra): point it at the fake
        env["INTROSPECTION_ENDPOINT"] = introspection.url
    else:  # the page relies on the IdP's metadata naming it, as these IdPs' metadata do
        idp.document_changes |= {"introspection_endpoint": introspection.url,
                                 **IDP_METADATA.get(name, {})}
    sidecar = await make_sidecar(**env)
    token = token_for(idp, env)
    introspection.answers[token] = answer_for(idp, env)
    got, body = await call(sidecar, token)
    assert got == status, body
    assert len(upstream.requests) == (1 if status == 200 else 0)
    # The sidecar asked about this very token, with the page's credentials, never the token's.
    (asked,) = introspection.calls
    assert asked.form["token"] == token
    if env.get("INTROSPECTION_AUTH_METHOD") == "none":
        assert asked.authorization is None
        assert "client_secret" not in asked.form
    else:
        credentials = f"{env['INTROSPECTION_CLIENT_ID']}:{env['INTROSPECTION_CLIENT_SECRET']}"
        assert asked.authorization == "Basic " + base64.b64encode(credentials.encode()).decode()
