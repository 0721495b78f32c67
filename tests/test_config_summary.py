"""config_summary: the one summary of the effective configuration, shown by the start-up log line
and by `oauth-sidecar check`, with no secret and no allow-list entry in it."""

from __future__ import annotations

import json
import socket
import sys

import pytest
from conftest import AUDIENCE, RESOURCE_URL, FakeIdp, FakeUpstream, sidecar_env
from processes import run_cli
from test_main import json_lines

from oauth_sidecar.config import load
from oauth_sidecar.config_summary import MASK, SET, shown_command, summary

SECRETS = {"STATIC_CLIENT_SECRET": "client-secret-7f3a", "STATE_SECRET": "s" * 40}
REDIS_PASSWORD = "hunter2-redis"
API_KEY = "sk-live-4eC39HqLyjWDarjtT1zdp7dc"
PERSONAL = ("alice@example.com", "user-1", "example.org", "staff")
BASE = {"OIDC_ISSUER_URL": "https://idp.example.test", "OIDC_AUDIENCE": AUDIENCE,
        "RESOURCE_URL": RESOURCE_URL, "MCP_UPSTREAM_URL": "http://127.0.0.1:9"}


def test_summary_shows_secrets_as_set_and_allow_lists_as_counts() -> None:
    config = load({
        **BASE, **SECRETS, "STATIC_CLIENT_ID": "mcp-app", "ALLOW_ALL_AUTHENTICATED": "false",
        "ALLOW_EMAILS": PERSONAL[0], "ALLOW_SUBS": PERSONAL[1], "ALLOW_EMAIL_DOMAINS": PERSONAL[2],
        "ALLOW_GROUPS": PERSONAL[3], "RATE_LIMIT_STORAGE_URI": f"redis://:{REDIS_PASSWORD}@r:6379/0",
    })
    shown = summary(config)
    assert shown["static_client_id"] == "mcp-app"
    assert shown["static_client_secret"] == shown["state_secret"] == SET
    assert shown["allow"] == {"subs": 1, "emails": 1, "email_domains": 1, "groups": 1,
                              "files": [], "all_authenticated": False}
    assert shown["rate_limit_storage"] == "redis://***@r:6379/0"
    text = json.dumps(shown)
    for value in (*SECRETS.values(), REDIS_PASSWORD, *PERSONAL):
        assert value not in text


def test_unset_secrets_are_none_and_no_spawn_without_a_command() -> None:
    shown = summary(load({**BASE, "ALLOW_SUBS": "u"}))
    assert shown["static_client_secret"] is None
    assert shown["state_secret"] is None
    assert shown["auth_server_mode"] == "direct"
    assert "spawn" not in shown


def test_spawned_upstream_shows_the_masked_command_and_port() -> None:
    base = {name: value for name, value in BASE.items() if name != "MCP_UPSTREAM_URL"}
    config = load({**base, "ALLOW_SUBS": "u", "MCP_SPAWN_PORT": "9",
                   "MCP_SPAWN_CMD": f"{sys.executable} -m server --api-key {API_KEY}"})
    assert summary(config)["spawn"] == {
        "command": f"{sys.executable} -m server --api-key '{MASK}'", "port": 9}


@pytest.mark.parametrize(
    ("argv", "shown"),
    [(("server", "--api-key", API_KEY), f"server --api-key '{MASK}'"),
     (("server", "--token=abc"), f"server '--token={MASK}'"),
     (("server", "password=hunter2"), f"server 'password={MASK}'"),
     (("server", "--db=postgres://me:pw@db/x"), f"'--db=postgres://me:{MASK}@db/x'"),
     (("server", "0123456789abcdef0123456789abcdef"), f"server '{MASK}'"),
     (("server", "--key-file", "/run/secrets/key"), "server --key-file /run/secrets/key"),
     (("server", "--name", "my-server-2024"), "server --name my-server-2024"),
     (("server", "--auth", "x", "--port", "8"), f"server --auth '{MASK}' --port 8")],
    ids=["option-value", "option-equals", "name-equals", "url-password", "hex", "file-option",
         "plain", "auth-option"],
)
def test_spawn_command_is_shown_with_credentials_masked(argv: tuple[str, ...], shown: str) -> None:
    assert shown_command(argv).endswith(shown.removeprefix("server "))


@pytest.mark.slow
async def test_start_up_line_and_check_print_the_same_summary(
    idp: FakeIdp, upstream: FakeUpstream
) -> None:
    with socket.socket() as taken:  # a taken port ends `serve` right after the start-up line
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = sidecar_env(idp, upstream, HOST="127.0.0.1", PORT=str(taken.getsockname()[1]),
                          STATIC_CLIENT_ID="mcp-app", ALLOW_EMAILS=PERSONAL[0], **SECRETS)
        config = load(env)
        code, stdout, stderr = await run_cli(env=env)
        assert code == 2, stderr
        checked, out, err = await run_cli("check", "--json", env=env)
        assert checked in (0, 1), err
    starting = json_lines(stdout)[0]
    assert starting["event"] == "starting"
    logged = {name: starting[name] for name in summary(config)}
    expected = json.loads(json.dumps(summary(config)))
    assert logged == expected
    assert json.loads(out)["summary"] == expected, err
    for value in (*SECRETS.values(), PERSONAL[0]):
        assert value not in stdout + stderr + out + err
