"""The allow-lists: who may use the MCP server, from variables and from files re-read on change.

Why here: the entries are normalised once, the same way at start-up and at each re-read of a
file (auth/allow_files.py), so an entry that admits someone at start-up admits them after a
reload too; and a sidecar with no allow-list at all refuses to start rather than admit everyone.
"""

from __future__ import annotations

import string

from oauth_sidecar.config.files import read_capped_text
from oauth_sidecar.config.model import AllowFile, PolicyConfig
from oauth_sidecar.config.reader import Reader, split_list

MAX_ALLOW_FILE_BYTES = 1 << 20  # a million characters of entries: far beyond any real list

# The allow-lists: PolicyConfig field -> the variable naming its entries (+ "_FILE").
ALLOW_LISTS = {
    "subs": "ALLOW_SUBS", "emails": "ALLOW_EMAILS", "email_domains": "ALLOW_EMAIL_DOMAINS",
    "groups": "ALLOW_GROUPS",
}

# Only A-Z: str.lower() also folds U+212A KELVIN SIGN onto "k", so an address registered with it
# would match an ASCII entry; no other case folding or Unicode normalisation is ever applied.
ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def ascii_lower(value: str) -> str:
    """Emails and domains compare case-insensitively in ASCII alone (RFC 5321 §2.4 leaves the
    local part's case to the mailbox's host; RFC 4343 folds only ASCII in domain names)."""
    # str.lower() is exact on ASCII and much faster than translate(): keep it for that case.
    return value.lower() if value.isascii() else value.translate(ASCII_LOWER)


def allow_entries(kind: str, entries: list[str], source: str) -> tuple[frozenset[str], list[str]]:
    """Normalised entries of one allow-list and the problems found in them (named by source)."""
    problems: list[str] = []
    if kind == "emails":
        entries = [ascii_lower(e) for e in entries]
        for email in entries:
            local, _, domain = email.partition("@")
            if email.count("@") != 1 or not local or not domain:
                problems.append(f"{source} entry {email!r} is not an email address")
    elif kind == "email_domains":
        entries = [ascii_lower(d).removeprefix("@") for d in entries]
        for domain in entries:
            if "@" in domain or "*" in domain or domain.startswith(".") or "." not in domain:
                problems.append(
                    f"{source} entry {domain!r} is not a domain like example.com "
                    "(matched exactly; no wildcards, no subdomains)"
                )
    return frozenset(entries), problems


def read_allow_file(path: str) -> list[str]:
    """Entries one per line (commas also separate); blank lines and `#` comments ignored.

    Raises OSError (FileTooLarge beyond MAX_ALLOW_FILE_BYTES) or UnicodeDecodeError when the
    file cannot be read.
    """
    entries: list[str] = []
    for line in read_capped_text(path, MAX_ALLOW_FILE_BYTES).splitlines():
        entries.extend(split_list(line.partition("#")[0]))
    return entries


def has_allow_list(policy: PolicyConfig) -> bool:
    return bool(policy.subs or policy.emails or policy.email_domains or policy.groups)


def _allow_list(r: Reader, kind: str) -> tuple[frozenset[str], AllowFile | None]:
    name = ALLOW_LISTS[kind]
    from_variable, problems = allow_entries(kind, list(split_list(r.raw(name))), name)
    r.problems.extend(problems)
    path = r.raw(f"{name}_FILE")
    if not path:
        return from_variable, None
    try:
        from_file, problems = allow_entries(kind, read_allow_file(path), f"{name}_FILE {path}")
    except (OSError, UnicodeDecodeError) as exc:
        r.problems.append(f"{name}_FILE cannot be read: {exc}")
        return from_variable, None
    r.problems.extend(problems)
    return from_variable | from_file, AllowFile(kind, path, from_variable)


def policy(r: Reader) -> PolicyConfig:
    """The allow-lists, the groups claim and the required scopes."""
    lists = {kind: _allow_list(r, kind) for kind in ALLOW_LISTS}
    claim = r.raw("GROUPS_CLAIM")
    # Auth0 requires namespaced custom claims (`https://example.com/roles`): a URL is one name.
    path = (claim,) if "://" in claim else tuple(claim.split("."))
    if not all(path):
        r.problems.append(f"GROUPS_CLAIM={claim!r} is not a claim name or dotted path")
    files = tuple(file for _, file in lists.values() if file is not None)
    result = PolicyConfig(
        subs=lists["subs"][0],
        emails=lists["emails"][0],
        email_domains=lists["email_domains"][0],
        groups=lists["groups"][0],
        groups_claim=path,
        allow_all_authenticated=r.flag("ALLOW_ALL_AUTHENTICATED"),
        allow_unverified_email=r.flag("INSECURE_ALLOW_UNVERIFIED_EMAIL"),
        required_scopes=split_list(r.raw("REQUIRED_SCOPES")),
        files=files,
    )
    # A configured file counts even while empty: it admits nobody until entries are added.
    file_named = any(r.raw(f"{name}_FILE") for name in ALLOW_LISTS.values())
    if not (has_allow_list(result) or file_named) and not result.allow_all_authenticated:
        r.problems.append(
            "no allow-list is set: set ALLOW_SUBS, ALLOW_EMAILS, ALLOW_EMAIL_DOMAINS or "
            "ALLOW_GROUPS (or their _FILE variants), or ALLOW_ALL_AUTHENTICATED=true to admit "
            "every valid token"
        )
    return result
