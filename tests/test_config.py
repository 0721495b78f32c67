"""config.load: one pass over the environment, every problem reported together, safe defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from oauth_sidecar.config import (
    ASYMMETRIC_ALGORITHMS,
    CHILD_ENV_FORBIDDEN,
    DEFAULT_ALGORITHMS,
    VARIABLES,
    Config,
    ConfigError,
    ListenerConfig,
    canonical_resource,
    load,
    split_list,
)

BASE = {
    "OIDC_ISSUER_URL": "https://idp.example.test/realms/demo",
    "OIDC_AUDIENCE": "https://mcp.example.test/mcp",
    "RESOURCE_URL": "https://mcp.example.test/mcp",
    "MCP_UPSTREAM_URL": "http://127.0.0.1:9000",
    "ALLOW_SUBS": "user-1",
}
REQUIRED = ("OIDC_ISSUER_URL", "OIDC_AUDIENCE", "RESOURCE_URL", "MCP_UPSTREAM_URL")


def problems_for(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(env)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def loads(**overrides: str) -> Config:
    return load({**BASE, **overrides})


# -- required variables --------------------------------------------------------------------------


def test_empty_environment_lists_every_required_variable_at_once() -> None:
    problems = problems_for({})
    assert len(problems) == len(REQUIRED) + 1
    for name, problem in zip(REQUIRED, problems, strict=False):
        assert problem.startswith(f"{name} is required")
    assert problems[-1].startswith("no allow-list is set")


@pytest.mark.parametrize("missing", REQUIRED)
def test_each_required_variable_is_reported_when_missing_or_blank(missing: str) -> None:
    for value in (None, "", "   "):
        env = {k: v for k, v in BASE.items() if k != missing}
        if value is not None:
            env[missing] = value
        assert problems_for(env) == [problems_for({})[REQUIRED.index(missing)]]


def test_every_problem_is_reported_together() -> None:
    problems = problems_for({
        "OIDC_ISSUER_URL": "http://idp.example.test",
        "RESOURCE_URL": "https://mcp.example.test/mcp?x=1",
        "MCP_UPSTREAM_URL": "http://127.0.0.1:9000",
        "PORT": "http",
        "JWT_ALGORITHMS": "HS256",
        "LOG_LEVEL": "loud",
        "CORS_ALLOW_ORIGINS": "claude.ai",
        "RATE_LIMIT_STORAGE_URI": "mongodb://x",
    })
    joined = "\n".join(problems)
    for name in ("OIDC_ISSUER_URL", "OIDC_AUDIENCE", "RESOURCE_URL", "PORT", "JWT_ALGORITHMS",
                 "LOG_LEVEL", "CORS_ALLOW_ORIGINS", "RATE_LIMIT_STORAGE_URI", "allow-list"):
        assert name in joined, name
    assert len(problems) == 9


# -- table of refused values ---------------------------------------------------------------------

BAD_VALUES: list[tuple[dict[str, str], str]] = [
    # numbers and ranges
    ({"PORT": "abc"}, "PORT='abc' is not a number"),
    ({"PORT": "8080.5"}, "PORT='8080.5' is not a number"),
    ({"PORT": "0"}, "PORT=0 is out of range: use 1..65535"),
    ({"PORT": "65536"}, "PORT=65536 is out of range"),
    ({"JWT_LEEWAY_SECONDS": "-1"}, "JWT_LEEWAY_SECONDS=-1 is out of range"),
    ({"JWT_LEEWAY_SECONDS": "301"}, "JWT_LEEWAY_SECONDS=301 is out of range"),
    ({"JWT_MAX_TOKEN_BYTES": "100"}, "JWT_MAX_TOKEN_BYTES=100 is out of range"),
    ({"TOKEN_CACHE_SIZE": "-5"}, "TOKEN_CACHE_SIZE=-5 is out of range"),
    ({"IDP_TIMEOUT_SECONDS": "0"}, "IDP_TIMEOUT_SECONDS=0 is out of range"),
    ({"IDP_TIMEOUT_SECONDS": "nan"}, "IDP_TIMEOUT_SECONDS=nan is out of range"),
    ({"SHUTDOWN_TIMEOUT_SECONDS": "inf"}, "SHUTDOWN_TIMEOUT_SECONDS=inf is out of range"),
    ({"SHUTDOWN_TIMEOUT_SECONDS": "-1"}, "SHUTDOWN_TIMEOUT_SECONDS=-1 is out of range"),
    ({"JWKS_REFRESH_SECONDS": "0.5"}, "JWKS_REFRESH_SECONDS=0.5 is out of range"),
    ({"JWKS_COOLDOWN_SECONDS": "soon"}, "JWKS_COOLDOWN_SECONDS='soon' is not a number"),
    ({"UPSTREAM_IDLE_TIMEOUT_SECONDS": "ten"}, "UPSTREAM_IDLE_TIMEOUT_SECONDS='ten' is not a"),
    ({"SSE_IDLE_TIMEOUT_SECONDS": "-3"}, "SSE_IDLE_TIMEOUT_SECONDS=-3 is out of range"),
    ({"MAX_REQUEST_BODY_BYTES": "-1"}, "MAX_REQUEST_BODY_BYTES=-1 is out of range"),
    ({"REQUEST_BODY_TIMEOUT_SECONDS": "0"}, "REQUEST_BODY_TIMEOUT_SECONDS=0 is out of range"),
    ({"CLIENT_WRITE_TIMEOUT_SECONDS": "x"}, "CLIENT_WRITE_TIMEOUT_SECONDS='x' is not a number"),
    ({"MAX_STREAMS_PER_SUBJECT": "-1"}, "MAX_STREAMS_PER_SUBJECT=-1 is out of range"),
    ({"UPSTREAM_CONNECT_TIMEOUT_SECONDS": "0"}, "UPSTREAM_CONNECT_TIMEOUT_SECONDS=0 is out of"),
    ({"MAX_HEADER_BYTES": "100"}, "MAX_HEADER_BYTES=100 is out of range"),
    # choices and flags
    ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL='verbose' is not one of debug, info, warning, error"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT='xml' is not one of"),
    ({"OIDC_ALLOW_HTTP": "maybe"}, "OIDC_ALLOW_HTTP='maybe' is not a boolean"),
    # algorithms: asymmetric only, with the accepted list as the hint
    ({"JWT_ALGORITHMS": "HS256"}, "JWT_ALGORITHMS has HS256: only asymmetric algorithms"),
    ({"JWT_ALGORITHMS": "RS256,none"}, "JWT_ALGORITHMS has none: only asymmetric"),
    ({"JWT_ALGORITHMS": "RS256 NONE"}, "JWT_ALGORITHMS has NONE"),
    ({"JWT_ALGORITHMS": "HS512,RS256"}, "JWT_ALGORITHMS has HS512"),
    ({"JWT_ALGORITHMS": " , "}, "JWT_ALGORITHMS is empty"),
    # issuer: https, or http on loopback only
    ({"OIDC_ISSUER_URL": "http://idp.example.test"}, "uses plain http off loopback"),
    ({"OIDC_ISSUER_URL": "http://localhost.evil.test"}, "uses plain http off loopback"),
    ({"OIDC_ISSUER_URL": "http://127.0.0.1.nip.io"}, "uses plain http off loopback"),
    ({"OIDC_ISSUER_URL": "http://10.0.0.1"}, "uses plain http off loopback"),
    ({"OIDC_ISSUER_URL": "https://user:pw@idp.example.test"}, "must not contain credentials"),
    ({"OIDC_ISSUER_URL": "https://idp.example.test#x"}, "must not contain a fragment"),
    ({"OIDC_ISSUER_URL": "https://idp.example.test?t=1"}, "must not contain a query"),
    ({"OIDC_ISSUER_URL": "idp.example.test"}, "must be an absolute http(s) URL"),
    ({"OIDC_ISSUER_URL": "ftp://idp.example.test"}, "must be an absolute http(s) URL"),
    ({"OIDC_ISSUER_URL": "https://idp.example.test:99999"}, "is not a valid URL"),
    # resource
    ({"RESOURCE_URL": "http://mcp.example.test/mcp"}, "RESOURCE_URL='http://mcp.example.test"),
    ({"RESOURCE_URL": "https://u:p@mcp.example.test/mcp"}, "RESOURCE_URL must not contain cred"),
    ({"RESOURCE_URL": "https://mcp.example.test/mcp#top"}, "must not contain a fragment"),
    ({"RESOURCE_URL": "https://mcp.example.test/mcp?x=1"}, "RESOURCE_URL must not contain a query"),
    ({"RESOURCE_URL": "/mcp"}, "RESOURCE_URL='/mcp' must be an absolute http(s) URL"),
    # upstream
    ({"MCP_UPSTREAM_URL": "http://u:p@127.0.0.1:9000"}, "MCP_UPSTREAM_URL must not contain cred"),
    ({"MCP_UPSTREAM_URL": "http://127.0.0.1:9000/?x=1"}, "MCP_UPSTREAM_URL must not contain a q"),
    ({"MCP_UPSTREAM_URL": "http://127.0.0.1:9000/#x"}, "must not contain a fragment"),
    ({"MCP_UPSTREAM_URL": "unix:///run/mcp.sock"}, "must be an absolute http(s) URL"),
    ({"MCP_UPSTREAM_PATH": "mcp"}, "MCP_UPSTREAM_PATH='mcp' must start with /"),
    ({"MCP_UPSTREAM_URL": "http://127.0.0.1:9000/mcp", "MCP_UPSTREAM_PATH": "/mcp"},
     "MCP_UPSTREAM_URL has a path and MCP_UPSTREAM_PATH is set: give the path once"),
    # CORS entries must be origins
    ({"CORS_ALLOW_ORIGINS": "claude.ai"}, "CORS_ALLOW_ORIGINS entry 'claude.ai' is not an origin"),
    ({"CORS_ALLOW_ORIGINS": "https://claude.ai/app"}, "entry 'https://claude.ai/app' is not"),
    ({"CORS_ALLOW_ORIGINS": "null"}, "entry 'null' is not an origin"),
    ({"CORS_ALLOW_ORIGINS": "ftp://claude.ai"}, "entry 'ftp://claude.ai' is not an origin"),
    ({"CORS_ALLOW_ORIGINS": "https://claude.ai,*.example.com"}, "entry '*.example.com' is not"),
    # CORS entries that cannot be split are refused, not a crash of load()
    ({"CORS_ALLOW_ORIGINS": "https://[::1"}, "CORS_ALLOW_ORIGINS entry 'https://[::1' is not a "
     "valid URL (no port number after a colon, or an unmatched bracket)"),
    ({"CORS_ALLOW_ORIGINS": "https://claude.ai:44x"}, "'https://claude.ai:44x' is not a valid"),
    # a header cap that cannot carry the largest accepted token
    ({"MAX_HEADER_BYTES": "10000"},
     "MAX_HEADER_BYTES=10000 cannot carry a token of JWT_MAX_TOKEN_BYTES=16384"),
    ({"MAX_HEADER_BYTES": "20000", "JWT_MAX_TOKEN_BYTES": "20000"},
     "MAX_HEADER_BYTES=20000 cannot carry"),
    # a head cap that cannot carry the largest header beside the request line
    ({"MAX_REQUEST_HEAD_BYTES": "40000"}, "MAX_REQUEST_HEAD_BYTES=40000 cannot carry one header of "
     "MAX_HEADER_BYTES=32768 beside the request line and ordinary headers: use at least 40960"),
    ({"MAX_REQUEST_HEAD_BYTES": "1000"}, "MAX_REQUEST_HEAD_BYTES=1000 is out of range"),
    ({"REQUEST_HEAD_TIMEOUT_SECONDS": "0"}, "REQUEST_HEAD_TIMEOUT_SECONDS=0 is out of range"),
    ({"KEEPALIVE_TIMEOUT_SECONDS": "-1"}, "KEEPALIVE_TIMEOUT_SECONDS=-1 is out of range"),
    ({"MAX_CONNECTIONS": "0"}, "MAX_CONNECTIONS=0 is out of range"),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), BAD_VALUES, ids=[str(o) for o, _ in BAD_VALUES]
)
def test_bad_value_is_refused_with_a_precise_problem(
    overrides: dict[str, str], expected: str
) -> None:
    problems = problems_for({**BASE, **overrides})
    assert any(expected in problem for problem in problems), problems


def test_symmetric_algorithm_hint_lists_the_accepted_ones() -> None:
    [problem] = problems_for({**BASE, "JWT_ALGORITHMS": "HS256"})
    for name in ASYMMETRIC_ALGORITHMS:
        assert name in problem


@pytest.mark.parametrize(
    "url",
    [
        "ftp://user:hunter2@idp.example.test",
        "https://user:hunter2@idp.example.test:port",
        "https://user:hunter2@idp.example.test:99999",
    ],
)
def test_problem_messages_never_echo_a_url_password(url: str) -> None:
    for name in ("OIDC_ISSUER_URL", "MCP_UPSTREAM_URL"):
        problems = problems_for({**BASE, name: url})
        assert "hunter2" not in "\n".join(problems)


# -- accepted values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "issuer",
    ["http://127.0.0.1:8080/realms/x", "http://localhost:8080", "http://[::1]:9000",
     "http://127.0.0.2"],
)
def test_http_issuer_is_accepted_on_loopback(issuer: str) -> None:
    assert loads(OIDC_ISSUER_URL=issuer).idp.issuer == issuer


@pytest.mark.parametrize("flag", ["true", "TRUE", "1", "yes", "on"])
def test_http_issuer_off_loopback_is_accepted_when_explicitly_allowed(flag: str) -> None:
    config = loads(OIDC_ISSUER_URL="http://idp.internal", OIDC_ALLOW_HTTP=flag)
    assert config.idp.issuer == config.tokens.issuer == "http://idp.internal"


def test_allow_http_does_not_relax_the_resource_url() -> None:
    problems = problems_for({**BASE, "OIDC_ALLOW_HTTP": "true",
                             "RESOURCE_URL": "http://mcp.example.test/mcp"})
    assert any("RESOURCE_URL" in p and "plain http" in p for p in problems)


def test_upstream_may_be_plain_http_on_a_private_network() -> None:
    config = loads(MCP_UPSTREAM_URL="http://mcp-server:8000")
    assert config.upstream.origin == "http://mcp-server:8000"
    assert config.upstream.path_prefix == ""


def test_upstream_path_comes_from_the_url_or_the_variable() -> None:
    from_url = loads(MCP_UPSTREAM_URL="HTTP://MCP-Server:80/api/mcp/")
    assert from_url.upstream.origin == "http://mcp-server"
    assert from_url.upstream.path_prefix == "/api/mcp"
    from_variable = loads(MCP_UPSTREAM_PATH="/api/mcp/")
    assert from_variable.upstream.origin == "http://127.0.0.1:9000"
    assert from_variable.upstream.path_prefix == "/api/mcp"


def test_audience_is_a_comma_or_space_separated_list() -> None:
    config = loads(OIDC_AUDIENCE=" api://mcp, https://mcp.example.test/mcp ,account api://mcp,")
    assert config.tokens.audiences == ("api://mcp", "https://mcp.example.test/mcp", "account")


def test_values_are_stripped() -> None:
    config = loads(OIDC_ISSUER_URL="  https://idp.example.test/realms/demo \n", PORT=" 9090 ")
    assert config.idp.issuer == "https://idp.example.test/realms/demo"
    assert config.port == 9090


def test_algorithms_and_scopes_are_parsed_as_lists() -> None:
    config = loads(JWT_ALGORITHMS="ES256, EdDSA", SCOPES_SUPPORTED="mcp:read,mcp:write mcp:read")
    assert config.tokens.algorithms == frozenset({"ES256", "EdDSA"})
    assert config.scopes == ("mcp:read", "mcp:write")


def test_cors_origins_are_normalised() -> None:
    config = loads(CORS_ALLOW_ORIGINS="HTTPS://Claude.AI:443, https://claude.com/, "
                   "http://localhost:6274")
    assert config.cors_origins == frozenset(
        {"https://claude.ai", "https://claude.com", "http://localhost:6274"}
    )
    assert not config.cors_any_origin
    assert config.warnings == ()


@pytest.mark.parametrize(
    ("raw", "canonical", "path"),
    [
        ("HTTPS://MCP.Example.TEST:443/mcp/", "https://mcp.example.test/mcp", "/mcp"),
        ("https://mcp.example.test/mcp", "https://mcp.example.test/mcp", "/mcp"),
        ("https://mcp.example.test:8443/a/b/", "https://mcp.example.test:8443/a/b", "/a/b"),
        ("https://mcp.example.test/", "https://mcp.example.test", ""),
        ("https://mcp.example.test", "https://mcp.example.test", ""),
        ("http://127.0.0.1:80/mcp", "http://127.0.0.1/mcp", "/mcp"),
        ("https://[::1]:8443/mcp/", "https://[::1]:8443/mcp", "/mcp"),
    ],
)
def test_resource_url_canonical_form(raw: str, canonical: str, path: str) -> None:
    assert canonical_resource(raw) == (canonical, path)
    config = loads(RESOURCE_URL=raw)
    assert (config.resource_url, config.resource_path) == (canonical, path)


# -- warnings ------------------------------------------------------------------------------------


def test_misspelled_variable_warns_with_the_likely_name() -> None:
    config = loads(OIDC_AUDIENSE="x")
    [warning] = config.warnings
    assert "OIDC_AUDIENSE" in warning
    assert "did you mean OIDC_AUDIENCE?" in warning


def test_unknown_own_prefix_warns_and_foreign_variables_are_ignored() -> None:
    config = loads(JWT_LEEWAY="5", HOME="/root", PATH="/bin", KUBERNETES_SERVICE_HOST="10.0.0.1")
    [warning] = config.warnings
    assert warning.startswith("JWT_LEEWAY is not a variable")


def test_misspelled_required_variable_is_named_in_the_error() -> None:
    env = {k: v for k, v in BASE.items() if k != "OIDC_AUDIENCE"}
    problems = problems_for({**env, "OIDC_AUDIENSE": "x"})
    assert any("OIDC_AUDIENSE" in problem for problem in problems)


def test_cors_wildcard_is_accepted_with_a_warning() -> None:
    config = loads(CORS_ALLOW_ORIGINS="*, https://claude.ai")
    assert config.cors_any_origin
    assert config.cors_origins == frozenset({"https://claude.ai"})
    [warning] = config.warnings
    assert warning.startswith("CORS_ALLOW_ORIGINS=*")
    assert "DNS-rebinding" in warning


# -- defaults ------------------------------------------------------------------------------------


def test_defaults() -> None:
    config = load(BASE)
    assert config.host == "0.0.0.0"  # noqa: S104 - the documented container default
    assert config.port == 8080
    assert (config.log_level, config.log_format) == ("info", "auto")
    assert config.resource_url == "https://mcp.example.test/mcp"
    assert config.resource_path == "/mcp"
    assert config.scopes == ()
    assert config.cors_origins == frozenset({"https://claude.ai", "https://claude.com"})
    assert not config.cors_any_origin
    assert config.max_header_bytes == 32768
    assert config.listener == ListenerConfig(max_head_bytes=65536, head_timeout=20.0,
                                             keepalive_timeout=75.0, max_connections=512)
    assert config.shutdown_timeout == 20.0
    assert config.warnings == ()
    assert config.idp.issuer == BASE["OIDC_ISSUER_URL"]
    assert (config.idp.timeout, config.idp.jwks_cooldown, config.idp.jwks_refresh) == (
        10.0, 30.0, 3600.0)
    tokens = config.tokens
    assert tokens.issuer == BASE["OIDC_ISSUER_URL"]
    assert tokens.audiences == ("https://mcp.example.test/mcp",)
    assert tokens.algorithms == frozenset(split_list(DEFAULT_ALGORITHMS))
    assert tokens.algorithms <= ASYMMETRIC_ALGORITHMS
    assert (tokens.leeway, tokens.max_token_bytes, tokens.cache_size) == (30, 16384, 10000)
    upstream = config.upstream
    assert (upstream.origin, upstream.path_prefix) == ("http://127.0.0.1:9000", "")
    assert (upstream.connect_timeout, upstream.response_timeout) == (10.0, 300.0)
    assert upstream.idle_timeout == 300.0
    assert upstream.sse_idle_timeout is None  # SSE streams may idle for hours
    assert upstream.max_body_bytes == 10 * 1024 * 1024
    assert (upstream.body_timeout, upstream.client_write_timeout) == (30.0, 60.0)
    assert upstream.max_streams_per_subject == 32


def test_defaults_table_parses_on_its_own() -> None:
    """Every documented default is a valid value (the table and the parser agree)."""
    env = {name: default for name, (default, _) in VARIABLES.items() if default}
    config = load({**env, **BASE})
    assert config.port == int(VARIABLES["PORT"][0])
    assert config.warnings == ()


def test_zero_idle_timeouts_mean_none() -> None:
    config = loads(UPSTREAM_IDLE_TIMEOUT_SECONDS="0", SSE_IDLE_TIMEOUT_SECONDS="0")
    assert config.upstream.idle_timeout is None
    assert config.upstream.sse_idle_timeout is None


def test_config_is_frozen() -> None:
    config = load(BASE)
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(("value", "resolved"), [
    ("auto", "uvloop"),  # the test extra installs uvloop
    ("uvloop", "uvloop"),
    ("asyncio", "asyncio"),
    ("ASYNCIO", "asyncio"),
])
def test_event_loop_choice_is_resolved(value: str, resolved: str) -> None:
    assert load({**BASE, "EVENT_LOOP": value}).event_loop == resolved


def test_event_loop_must_be_a_known_choice() -> None:
    with pytest.raises(ConfigError) as caught:
        load({**BASE, "EVENT_LOOP": "trio"})
    assert caught.value.problems == ["EVENT_LOOP='trio' is not one of auto, uvloop, asyncio"]


# -- JWT_ID_TOKEN_CHECK ----------------------------------------------------------------------------


def test_id_token_check_defaults_to_marked_and_refuses_other_values() -> None:
    assert loads().tokens.id_token_check == "marked"
    assert loads(JWT_ID_TOKEN_CHECK="Client").tokens.id_token_check == "client"
    assert problems_for({**BASE, "JWT_ID_TOKEN_CHECK": "strict"}) == [
        "JWT_ID_TOKEN_CHECK='strict' is not one of marked, client, off"]


def test_direct_mode_with_an_unpublished_static_secret_warns() -> None:
    """The relay lends the secret to no code it did not issue: in direct mode a client without
    the secret could no longer redeem its code, so the operator hears it at start-up."""
    direct = {"AUTH_SERVER_MODE": "direct", "STATIC_CLIENT_ID": "mcp-client"}
    [warning] = loads(**direct, STATIC_CLIENT_SECRET="s3cret-value").warnings
    assert warning.startswith("AUTH_SERVER_MODE=direct with STATIC_CLIENT_SECRET")
    assert "s3cret-value" not in warning
    assert loads(**direct, STATIC_CLIENT_SECRET="s3cret-value",
                 STATIC_CLIENT_CONFIDENTIAL="true").warnings == ()
    assert loads(**direct).warnings == ()


def test_id_token_check_off_warns() -> None:
    [warning] = loads(JWT_ID_TOKEN_CHECK="off").warnings
    assert warning.startswith("JWT_ID_TOKEN_CHECK=off: ID tokens")


def test_the_static_client_as_audience_without_the_client_check_warns() -> None:
    """authentik's shape: the client id is the audience, so its ID tokens carry ours too."""
    facade = {"STATIC_CLIENT_ID": "mcp-client", "STATE_SECRET": "s" * 32,
              "OIDC_AUDIENCE": "mcp-client"}
    [warning] = loads(**facade).warnings
    assert warning.startswith("OIDC_AUDIENCE includes STATIC_CLIENT_ID mcp-client")
    assert "JWT_ID_TOKEN_CHECK=client" in warning
    assert loads(**facade, JWT_ID_TOKEN_CHECK="client").warnings == ()
    # Cognito: the audience is read from client_id, which its ID tokens lack.
    assert loads(**facade, JWT_AUDIENCE_CLAIM="client_id").warnings == ()
    assert loads(STATIC_CLIENT_ID="mcp-client", STATE_SECRET="s" * 32).warnings == ()


# -- STRIP_REQUEST_HEADERS -----------------------------------------------------------------------


def test_strip_request_headers_are_lowercased_with_underscores_as_dashes() -> None:
    config = loads(STRIP_REQUEST_HEADERS="X-Tenant, x_internal_*  MCP-Param-Secret,x-tenant")
    assert config.strip_request_headers == ("x-tenant", "x-internal-*", "mcp-param-secret")
    assert load(BASE).strip_request_headers == ()


def test_every_bad_strip_request_headers_entry_is_listed() -> None:
    bad = ["*", "x-*-y", "x-foo**", "*-suffix", "x:y", "x/y", "\u00e9t\u00e9", "a*b", "-*", "_"]
    problems = problems_for({**BASE, "STRIP_REQUEST_HEADERS": ",".join(["x-fine", *bad])})
    for entry in bad:
        assert any(f"STRIP_REQUEST_HEADERS entry {entry!r}" in p for p in problems), entry
    assert not any("'x-fine'" in p for p in problems)


# -- secrets: _FILE forms, the rate-limit storage URI ---------------------------------------------

FACADE_SECRETS = {"STATIC_CLIENT_ID": "mcp-client"}
SECRET_VALUES = {
    "STATIC_CLIENT_SECRET": "client-secret-7f3a9c",
    "STATE_SECRET": "0123456789abcdef" * 4,
    "RATE_LIMIT_STORAGE_URI": "redis://:pa%2Fss%3Fwd@redis.internal:6379/2",
}


def secret_from_file(config: Config, name: str) -> str:
    return {"STATIC_CLIENT_SECRET": config.auth_server.client_secret,
            "STATE_SECRET": config.auth_server.state_secret,
            "RATE_LIMIT_STORAGE_URI": config.rate_limits.storage_uri.removeprefix("async+"),
            }[name]


@pytest.mark.parametrize("name", sorted(SECRET_VALUES))
@pytest.mark.parametrize("ending", ["", "\n", "\r\n"], ids=["bare", "lf", "crlf"])
def test_every_secret_can_come_from_a_file_less_its_trailing_newline(
    name: str, ending: str, tmp_path: Path
) -> None:
    path = tmp_path / "secret"
    path.write_bytes((SECRET_VALUES[name] + ending).encode())
    config = loads(**FACADE_SECRETS, **{f"{name}_FILE": str(path)})
    assert secret_from_file(config, name) == SECRET_VALUES[name]
    assert f"{name}_FILE" in VARIABLES
    assert f"{name}_FILE" in CHILD_ENV_FORBIDDEN


@pytest.mark.parametrize("name", sorted(SECRET_VALUES))
def test_a_secret_and_its_file_both_set_is_a_problem(name: str, tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET_VALUES[name])
    problems = problems_for({**BASE, **FACADE_SECRETS, name: SECRET_VALUES[name],
                             f"{name}_FILE": str(path)})
    assert problems == [f"{name} and {name}_FILE are both set: give the secret once"]


@pytest.mark.parametrize("name", sorted(SECRET_VALUES))
@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "cannot be read: No such file or directory"), (b"", "is empty"),
     (b"\n", "is empty"), (b"first-line\nsecond-line\n", "has more than one line"),
     (b"\xff\xfe-not-text", "is not UTF-8 text"), (b"x" * 70_000, "is larger than 65536 bytes")],
    ids=["missing", "empty", "blank", "two-lines", "binary", "huge"],
)
def test_an_unusable_secret_file_is_a_problem_naming_the_variable_not_the_content(
    name: str, content: bytes | None, problem: str, tmp_path: Path
) -> None:
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    problems = problems_for({**BASE, **FACADE_SECRETS, f"{name}_FILE": str(path)})
    assert problems == [f"{name}_FILE {path} {problem}"]
    assert "first-line" not in problems[0]


@pytest.mark.parametrize(
    "password", ["hunter2/x", "hunter2?x", "hunter2#x", "hunter2/x?y#z", "a:hunter2/x", "hunter2@x"]
)
def test_a_storage_uri_with_an_unencoded_separator_is_a_problem_that_never_shows_it(
    password: str
) -> None:
    """Such a password moves the URI's own boundaries: parsed as a port, a path, a query or a
    fragment, it ends up anywhere; the problem names the variable and the fix, nothing of it."""
    [problem] = problems_for({**BASE, "RATE_LIMIT_STORAGE_URI":
                              f"redis://:{password}@127.0.0.1:6379/0"})
    assert problem.startswith("RATE_LIMIT_STORAGE_URI ")
    assert "percent-encode / ? # @ %" in problem
    assert "hunter2" not in problem


@pytest.mark.parametrize(
    ("uri", "problem"),
    [("mongodb://x", "its scheme (mongodb://) is not one of memory, redis, rediss, redis+unix"),
     ("redis:/hunter2@h", "its scheme is not one of"),
     ("redis://redis/0", "must name a host and a port, like redis://host:6379/0"),
     ("redis://redis:6379/zero", "must end in a database number, like /0"),
     ("redis://redis:99999/0", "is not a valid URI"),
     ("redis+unix://redis:6379", "must name a socket path")],
)
def test_a_storage_uri_that_limits_or_redis_would_refuse_is_a_configuration_problem(
    uri: str, problem: str
) -> None:
    [found] = problems_for({**BASE, "RATE_LIMIT_STORAGE_URI": uri})
    assert found.startswith("RATE_LIMIT_STORAGE_URI ")
    assert problem in found
    assert "hunter2" not in found


@pytest.mark.parametrize(
    ("uri", "limits_form", "shown", "secrets"),
    [("memory://", "async+memory://", "memory://", ()),
     ("redis://redis:6379/0", "async+redis://redis:6379/0", "redis://redis:6379/0", ()),
     ("REDISS://user:p%40ss%2Fw@[::1]:6380/", "async+rediss://user:p%40ss%2Fw@[::1]:6380/",
      "rediss://***@[::1]:6380/", ("p%40ss%2Fw", "p@ss/w")),
     ("redis://redis:6379/0?password=s%3Fcret&ssl_cert_reqs=none",
      "async+redis://redis:6379/0?password=s%3Fcret&ssl_cert_reqs=none",
      "redis://redis:6379/0?password=***&ssl_cert_reqs=none", ("s?cret",)),
     ("redis+unix://:sock-pw@/run/redis.sock?db=1", "async+redis+unix://:sock-pw@/run/redis.sock?db=1",
      "redis+unix://***@/run/redis.sock?db=1", ("sock-pw",))],
)
def test_the_storage_uri_is_parsed_once_into_its_forms(
    uri: str, limits_form: str, shown: str, secrets: tuple[str, ...]
) -> None:
    limits = loads(RATE_LIMIT_STORAGE_URI=uri).rate_limits
    assert (limits.storage_uri, limits.storage_shown) == (limits_form, shown)
    assert set(limits.storage_secrets) == set(secrets)
    assert limits.shared == (not uri.startswith("memory"))


def test_the_configuration_lists_every_secret_it_holds_for_the_log_mask() -> None:
    config = loads(**FACADE_SECRETS, STATIC_CLIENT_SECRET="client-secret-7f3a9c",
                   STATE_SECRET="0123456789abcdef" * 4,
                   RATE_LIMIT_STORAGE_URI="redis://:pa%2Fss@redis:6379/0")
    assert set(config.secrets) == {"client-secret-7f3a9c", "0123456789abcdef" * 4, "pa%2Fss",
                                   "pa/ss"}
    assert loads().secrets == ()


@pytest.mark.parametrize(
    "url", ["https://user:hunter2/x@idp.example.test", "https://user:hunter2?x@idp.example.test",
            "https://user:hunter2#x@idp.example.test/realm"],
)
def test_a_url_password_with_an_unencoded_separator_is_never_echoed(url: str) -> None:
    for name in ("OIDC_ISSUER_URL", "MCP_UPSTREAM_URL", "RESOURCE_URL"):
        problems = problems_for({**BASE, name: url})
        assert "hunter2" not in "\n".join(problems), name
