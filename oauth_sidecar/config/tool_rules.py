"""Tool rules: which tools, prompts and resources an admitted caller may use, what scopes a tool
needs, and per-tool rate limits (TOOLS_ALLOW, TOOLS_DENY, TOOL_SCOPES, TOOL_RATE_LIMITS,
TOOL_POLICY_FILE, AUDIT_LOG_ARGUMENTS).

Why here: the rule file is parsed by the same function at start-up and at every re-read
(mcp/rule_files.py), so a file that starts the sidecar also reloads, and a bad edit is refused
with the same line-precise messages. The file is TOML (the standard library reads it): a list of
`[[rule]]` tables, each naming whom it applies to and the globs it allows or denies.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from typing import TypeVar

from oauth_sidecar.config.allow_lists import allow_entries
from oauth_sidecar.config.files import read_capped_text
from oauth_sidecar.config.model import KINDS, ToolRule, ToolRulesConfig
from oauth_sidecar.config.reader import Reader, split_list

MAX_RULE_FILE_BYTES = 1 << 20
MAX_GLOB_CHARS = 512
# Who a rule applies to: the allow-lists' claims, matched the same way (auth/policy.py).
WHO_KEYS = {"subs": "subs", "emails": "emails", "email_domains": "email_domains",
            "groups": "groups"}
RULE_KEYS = frozenset({*WHO_KEYS, "everyone", "name",
                       *(f"{verb}_{kind}" for verb in ("allow", "deny") for kind in KINDS)})
# Printable, no control characters: a glob is shown in logs and `check` output.
GLOB_TEXT = re.compile(r"[^\x00-\x1f\x7f]+")
RULE_HEADER = re.compile(r"""^\s*\[\[\s*(?:rule|"rule"|'rule')\s*\]\]""")
T = TypeVar("T", tuple[str, ...], int)


def tool_rules(r: Reader) -> ToolRulesConfig:
    allow = _globs(r, "TOOLS_ALLOW")
    deny = _globs(r, "TOOLS_DENY")
    scopes = tuple(_pairs(r, "TOOL_SCOPES", _scope_list))
    limits = tuple(_pairs(r, "TOOL_RATE_LIMITS", _per_minute))
    path = r.raw("TOOL_POLICY_FILE")
    rules: tuple[ToolRule, ...] = ()
    if path:
        try:
            rules, problems = parse_rule_file(read_capped_text(path, MAX_RULE_FILE_BYTES), path)
        except (OSError, UnicodeDecodeError) as exc:
            r.problems.append(f"TOOL_POLICY_FILE cannot be read: {exc}")
        else:
            r.problems.extend(problems)
    return ToolRulesConfig(allow=allow, deny=deny, scopes=scopes, rate_limits=limits, file=path,
                           file_rules=rules, audit_arguments=r.flag("AUDIT_LOG_ARGUMENTS"))


def glob_problem(glob: object) -> str | None:
    """Why this is not a usable glob (None: it is one)."""
    if not isinstance(glob, str):
        return "is not a string"
    if not glob:
        return "is empty"
    if len(glob) > MAX_GLOB_CHARS:
        return f"is longer than {MAX_GLOB_CHARS} characters"
    if not GLOB_TEXT.fullmatch(glob):
        return "holds a control character"
    return None


def _globs(r: Reader, name: str) -> tuple[str, ...]:
    globs = split_list(r.raw(name))
    for glob in globs:
        problem = glob_problem(glob)
        if problem:
            r.problems.append(f"{name} entry {glob!r} {problem}")
    return globs


def _scope_list(value: str) -> tuple[str, ...] | str:
    scopes = tuple(value.split())
    if not scopes:
        return "names no scope"
    if any('"' in scope or "\\" in scope for scope in scopes):
        return "has a scope with a quote or a backslash (it could not be named in a challenge)"
    return scopes


def _per_minute(value: str) -> int | str:
    if not value.isdigit() or not 1 <= int(value) <= 1_000_000:
        return "is not a number of calls per minute from 1 to 1000000"
    return int(value)


def _pairs(r: Reader, name: str, parse: Callable[[str], T | str]) -> list[tuple[str, T]]:
    """`glob=value` pairs, comma-separated; each problem named with its pair."""
    pairs: list[tuple[str, T]] = []
    # Commas only: a pair's value may hold spaces (TOOL_SCOPES: "write_*=mcp:write files:rw").
    for item in (part.strip() for part in r.raw(name).split(",")):
        if not item:
            continue
        glob, equals, text = item.partition("=")
        glob, text = glob.strip(), text.strip()
        problem = glob_problem(glob) if equals else "has no `=`"
        if problem is None:
            value = parse(text)
            if not isinstance(value, str):  # a str is what is wrong with it
                pairs.append((glob, value))
                continue
            problem = value
        r.problems.append(f"{name} entry {item!r} {problem} (expected glob=value)")
    return pairs


def parse_rule_file(text: str, source: str) -> tuple[tuple[ToolRule, ...], list[str]]:
    """The rules of a TOOL_POLICY_FILE and every problem in it, each with its line."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return (), [f"TOOL_POLICY_FILE {source}: not valid TOML: {exc}"]
    lines = text.splitlines()
    headers = [number for number, line in enumerate(lines, 1) if RULE_HEADER.match(line)]
    problems = [f"TOOL_POLICY_FILE {source}: line {_top_line(lines, key)}: unknown top-level "
                f"key {key!r} (expected [[rule]] tables)" for key in document if key != "rule"]
    tables = document.get("rule", [])
    if not isinstance(tables, list) or len(headers) != len(tables):
        # An inline `rule = [...]` has no line per rule, and every message names one.
        return (), [*problems, f"TOOL_POLICY_FILE {source}: line {_top_line(lines, 'rule')}: "
                               "write each rule as a [[rule]] table"]
    rules = []
    for index, table in enumerate(tables):
        line = headers[index]
        end = headers[index + 1] if index + 1 < len(headers) else len(lines) + 1
        rule, found = _rule(table, line, lines[line:end - 1], line)
        problems += [f"TOOL_POLICY_FILE {source}: {problem}" for problem in found]
        if rule is not None:
            rules.append(rule)
    return tuple(rules), problems


def _top_line(lines: list[str], key: str) -> int:
    """The first line assigning `key` or opening a table of that name (1 if none is found)."""
    name = re.escape(key)
    pattern = re.compile(rf"""^\s*(?:{name}\s*=|\[+\s*["']?{name}["']?\s*[].])""")
    return next((number for number, line in enumerate(lines, 1) if pattern.match(line)), 1)


def _key_line(body: list[str], first: int, key: str) -> int:
    """The line of `key = ...` within a rule (its header's line if not found)."""
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for offset, line in enumerate(body, 1):
        if pattern.match(line):
            return first + offset
    return first


def _rule(table: object, line: int, body: list[str], first: int
          ) -> tuple[ToolRule | None, list[str]]:
    where = f"rule at line {line}"
    if not isinstance(table, dict):
        return None, [f"{where} is not a table"]
    problems = [f"line {_key_line(body, first, key)}: unknown key {key!r} in {where} (known: "
                f"{', '.join(sorted(RULE_KEYS))})" for key in table if key not in RULE_KEYS]
    name = table.get("name", "")
    if not isinstance(name, str):
        problems.append(f"line {_key_line(body, first, 'name')}: `name` must be a string")
        name = ""
    everyone = table.get("everyone", False)
    if not isinstance(everyone, bool):
        problems.append(f"line {_key_line(body, first, 'everyone')}: `everyone` must be true "
                        "or false")
        everyone = False
    who = _who(table, body, first, problems)
    if everyone and any(who.values()):
        problems.append(f"{where}: `everyone = true` and a list of whom it applies to: choose one")
    if not everyone and not any(who.values()):
        problems.append(f"{where} applies to nobody: name subs, emails, email_domains or "
                        "groups, or set everyone = true")
    allow, deny = _grants(table, "allow", body, first, problems), _grants(
        table, "deny", body, first, problems)
    if not (allow or deny):
        problems.append(f"{where} grants and denies nothing: add allow_tools, deny_tools, "
                        "allow_prompts, deny_prompts, allow_resources or deny_resources")
    if problems:
        return None, problems
    return ToolRule(line=line, name=name, everyone=everyone, allow=allow, deny=deny,
                    **who), []


def _who(table: dict[str, object], body: list[str], first: int, problems: list[str]
         ) -> dict[str, frozenset[str]]:
    """Whom a rule applies to, normalised as the allow-lists are."""
    who: dict[str, frozenset[str]] = {}
    for key, kind in WHO_KEYS.items():
        if key in table:
            entries = _strings(table[key], key, body, first, problems)
            where = f"line {_key_line(body, first, key)}:"
            normalised, found = allow_entries(kind, entries, where)
            problems += found
            who[kind] = normalised
    return who


def _grants(table: dict[str, object], verb: str, body: list[str], first: int,
            problems: list[str]) -> dict[str, tuple[str, ...]]:
    """kind -> globs of a rule's allow_* (or deny_*) keys."""
    grants: dict[str, tuple[str, ...]] = {}
    for kind in KINDS:
        key = f"{verb}_{kind}"
        if key not in table:
            continue
        globs = _strings(table[key], key, body, first, problems)
        for glob in globs:
            problem = glob_problem(glob)
            if problem:
                problems.append(f"line {_key_line(body, first, key)}: {key} entry {glob!r} "
                                f"{problem}")
        grants[kind] = tuple(globs)
    return grants


def _strings(value: object, key: str, body: list[str], first: int, problems: list[str]
             ) -> list[str]:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    problems.append(f"line {_key_line(body, first, key)}: `{key}` must be a list of strings, "
                    f'like {key} = ["a", "b"]')
    return []
