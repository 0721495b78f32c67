"""ALLOW_*_FILE: allow-lists read from files at start-up and re-read when they change.

The sidecar is the production app on loopback; files are changed the ways operators change them:
an editor's rename over the file, a Kubernetes ConfigMap's symlink swap, a deletion, a typo.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import FakeIdp, FakeUpstream, SidecarFactory, bearer, sidecar_env, wait_until
from structlog.testing import capture_logs

from oauth_sidecar.app import ALLOW_FILES
from oauth_sidecar.config import ConfigError, load

Client = TestClient[web.Request, web.Application]
ALICE = {"sub": "alice-sub", "email": "alice@example.com", "email_verified": True,
         "groups": ["mcp-users"]}
BOB = {"sub": "bob-sub", "email": "Bob@Example.com", "email_verified": True, "groups": ["staff"]}
POLL_WAIT = 10.0  # seconds: the watcher polls every 2 s


def write(path: Path, text: str) -> None:
    """Replace the file the way editors and `kubectl cp` do: a new inode renamed over it."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


async def status(client: Client, idp: FakeIdp, claims: dict[str, Any]) -> int:
    async with client.post("/mcp", data=b"{}", headers=bearer(idp.mint(claims=claims))) as reply:
        return reply.status


async def alice_and_bob(client: Client, idp: FakeIdp) -> tuple[int, int]:
    """The statuses Alice's and Bob's requests get: who the lists admit right now."""
    return await status(client, idp, ALICE), await status(client, idp, BOB)


async def start_with(make_sidecar: SidecarFactory, **files: Path) -> Client:
    extra = {name: str(path) for name, path in files.items()}
    return await make_sidecar(ALLOW_ALL_AUTHENTICATED="false", **extra)


# --- start-up ------------------------------------------------------------------------------


def test_file_entries_are_united_with_the_variable(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    listed = tmp_path / "emails"
    listed.write_text(
        "# who may use the MCP server\n\nAlice@Example.com  # team lead\ncarol@example.com, "
        "dave@example.com\n", encoding="utf-8")
    config = load(sidecar_env(idp, upstream, ALLOW_ALL_AUTHENTICATED="false",
                              ALLOW_EMAILS="erin@example.com", ALLOW_EMAILS_FILE=str(listed)))
    assert config.policy.emails == {
        "alice@example.com", "carol@example.com", "dave@example.com", "erin@example.com"}
    assert [(f.kind, f.path) for f in config.policy.files] == [("emails", str(listed))]


@pytest.mark.parametrize(("variable", "content", "problem"), [
    ("ALLOW_EMAILS_FILE", "alice@example.com\nnot-an-email\n",
     "entry 'not-an-email' is not an email address"),
    ("ALLOW_EMAIL_DOMAINS_FILE", "example.com\n*.example.org\n",
     "entry '*.example.org' is not a domain like example.com (matched exactly; no wildcards, "
     "no subdomains)"),
])
def test_a_bad_entry_in_a_file_stops_start_up_naming_the_file(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path, variable: str,
    *, content: str, problem: str,
) -> None:
    listed = tmp_path / "list"
    listed.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load(sidecar_env(idp, upstream, ALLOW_ALL_AUTHENTICATED="false",
                         **{variable: str(listed)}))
    assert caught.value.problems == [f"{variable} {listed} {problem}"]


def test_a_file_larger_than_the_cap_stops_start_up(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    listed = tmp_path / "groups"
    listed.write_bytes(b"admins\n" * 200_000)  # 1.4 MB: more than any real list
    with pytest.raises(ConfigError) as caught:
        load(sidecar_env(idp, upstream, ALLOW_ALL_AUTHENTICATED="false",
                         ALLOW_GROUPS_FILE=str(listed)))
    assert caught.value.problems == ["ALLOW_GROUPS_FILE cannot be read: larger than 1048576 bytes"]


def test_a_missing_file_stops_start_up_with_every_other_problem(
    idp: FakeIdp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(sidecar_env(idp, upstream, ALLOW_ALL_AUTHENTICATED="false", PORT="nope",
                         ALLOW_GROUPS_FILE=str(tmp_path / "absent")))
    problems = caught.value.problems
    assert any(p.startswith("ALLOW_GROUPS_FILE cannot be read: ") and "absent" in p
               for p in problems), problems
    assert any(p.startswith("PORT=") for p in problems), problems
    # The missing file is not also reported as "no allow-list is set".
    assert len(problems) == 2, problems


async def test_an_empty_file_admits_nobody_even_with_allow_all_authenticated(
    make_sidecar: SidecarFactory, idp: FakeIdp, tmp_path: Path
) -> None:
    listed = tmp_path / "subs"
    listed.write_text("# nobody yet\n", encoding="utf-8")
    client = await make_sidecar(ALLOW_ALL_AUTHENTICATED="true", ALLOW_SUBS_FILE=str(listed))
    assert await status(client, idp, ALICE) == 403


# --- reloading -----------------------------------------------------------------------------


async def test_an_edit_applies_without_a_restart(
    make_sidecar: SidecarFactory, idp: FakeIdp, tmp_path: Path
) -> None:
    """The real polling loop: add Bob, remove Alice, each seen within a few polls."""
    listed = tmp_path / "emails"
    listed.write_text("alice@example.com\n", encoding="utf-8")
    client = await start_with(make_sidecar, ALLOW_EMAILS_FILE=listed)
    assert await alice_and_bob(client, idp) == (200, 403)

    with capture_logs() as logs:
        write(listed, "alice@example.com\nbob@example.com\n")
        await wait_until(lambda: any(e["event"] == "allow_list_reloaded" for e in logs),
                         within=POLL_WAIT)
    assert await status(client, idp, BOB) == 200
    reloaded = [e for e in logs if e["event"] == "allow_list_reloaded"]
    assert [(e["list"], e["entries"], e["added"], e["removed"]) for e in reloaded] == [
        ("emails", 2, 1, 0)]
    assert "bob@example.com" not in repr(logs)  # counts only: entries are personal data

    with capture_logs() as logs:
        write(listed, "bob@example.com\n")
        await wait_until(lambda: any(e["event"] == "allow_list_reloaded" for e in logs),
                         within=POLL_WAIT)
    assert await alice_and_bob(client, idp) == (403, 200)


async def test_a_configmap_symlink_swap_is_noticed(
    make_sidecar: SidecarFactory, idp: FakeIdp, tmp_path: Path
) -> None:
    """kubelet writes a new timestamped directory and atomically repoints `..data` to it."""
    first, second = tmp_path / "..2026_11_23_1", tmp_path / "..2026_11_23_2"
    first.mkdir()
    second.mkdir()
    (first / "groups").write_text("mcp-users\n", encoding="utf-8")
    (second / "groups").write_text("mcp-users\nstaff\n", encoding="utf-8")
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "groups").symlink_to("..data/groups")
    client = await start_with(make_sidecar, ALLOW_GROUPS_FILE=tmp_path / "groups")
    assert await status(client, idp, BOB) == 403

    (tmp_path / "..data_tmp").symlink_to(second.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    await client.app[ALLOW_FILES].check()
    assert await alice_and_bob(client, idp) == (200, 200)


async def test_a_bad_edit_keeps_the_last_good_list_and_is_reported_once(
    make_sidecar: SidecarFactory, idp: FakeIdp, tmp_path: Path
) -> None:
    listed = tmp_path / "emails"
    listed.write_text("alice@example.com\n", encoding="utf-8")
    client = await start_with(make_sidecar, ALLOW_EMAILS_FILE=listed)
    watcher = client.app[ALLOW_FILES]
    with capture_logs() as logs:
        write(listed, "bob@example.com\nbob@\n")  # a typo: nothing of this version applies
        await watcher.check()
        await watcher.check()
    assert [(e["event"], e["problems"]) for e in logs] == [
        ("allow_list_invalid", [f"{listed} entry 'bob@' is not an email address"])]
    assert await alice_and_bob(client, idp) == (200, 403)

    write(listed, "bob@example.com\n")  # fixed: applies
    await watcher.check()
    assert await alice_and_bob(client, idp) == (403, 200)


async def test_a_deleted_file_keeps_the_last_good_list_until_it_returns(
    make_sidecar: SidecarFactory, idp: FakeIdp, tmp_path: Path
) -> None:
    listed = tmp_path / "subs"
    listed.write_text("alice-sub\n", encoding="utf-8")
    client = await start_with(make_sidecar, ALLOW_SUBS_FILE=listed)
    watcher = client.app[ALLOW_FILES]
    listed.unlink()
    with capture_logs() as logs:
        await watcher.check()
    assert [e["event"] for e in logs] == ["allow_list_unreadable"]
    assert await status(client, idp, ALICE) == 200

    listed.write_text("bob-sub\n", encoding="utf-8")
    await watcher.check()
    assert await alice_and_bob(client, idp) == (403, 200)


async def test_variable_entries_survive_every_reload(
    make_sidecar: SidecarFactory, idp: FakeIdp, tmp_path: Path
) -> None:
    listed = tmp_path / "domains"
    listed.write_text("example.org\n", encoding="utf-8")
    client = await make_sidecar(ALLOW_ALL_AUTHENTICATED="false", ALLOW_SUBS="alice-sub",
                                ALLOW_EMAIL_DOMAINS_FILE=str(listed))
    write(listed, "example.com\n")
    await client.app[ALLOW_FILES].check()
    write(listed, "")
    await client.app[ALLOW_FILES].check()
    # The file is empty now; ALLOW_SUBS still admits Alice, and Bob's domain is gone again.
    assert await alice_and_bob(client, idp) == (200, 403)
