"""The effective configuration summarised once: the start-up log line and `oauth-sidecar check`
both show this dictionary, so what an operator reads about the sidecar's settings is the same in
either place and nothing secret or personal is in it.

Why one module: two summaries drift apart (one showed allow-list entries, the other only their
counts; one masked the spawn command, the other left its arguments out). Secrets appear only as
"(set)"; allow-lists only as counts and files, because their entries are personal data; the
spawn command with its credential-looking values masked (MASK below).
"""

from __future__ import annotations

import re
import shlex

from oauth_sidecar.config import Config

# The spawn command is shown with its credentials masked. An argument value is masked when its
# option names a credential (--api-key VALUE, --token=VALUE, password=VALUE; not a *-file, *-path
# or *-dir option, which names a place), when it is a URL's password, or when it looks like one
# by itself: 20 or more characters mixing upper case, lower case and digits (API keys, JWTs,
# base64), or 32 or more hex digits. Masking a harmless value costs a little readability;
# printing a key puts it in a terminal's scroll-back and a CI log.
MASK = "***"
CREDENTIAL_NAME = re.compile(
    r"(?i)key|token|secret|passw|passphrase|pwd|credential|cookie|bearer|private"
    r"|(?:^|[-_.])auth(?:orization)?(?:$|[-_.])")
PLACE_NAME = re.compile(r"(?i)(?:file|path|dir)$")
URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]+@")
HEX_SECRET = re.compile(r"[0-9a-fA-F]{32,}")
SET = "(set)"  # a secret is configured; its value is never shown


def _names_credential(option: str) -> bool:
    name = option.lstrip("-")
    return bool(CREDENTIAL_NAME.search(name)) and not PLACE_NAME.search(name)


def _looks_secret(value: str) -> bool:
    if HEX_SECRET.fullmatch(value):
        return True
    return len(value) >= 20 and not any(c.isspace() for c in value) and (
        not value.startswith(("/", "./", "../", "~"))) and any(c.isupper() for c in value) and (
        any(c.islower() for c in value)) and any(c.isdigit() for c in value)


def shown_command(argv: tuple[str, ...]) -> str:
    """argv as a shell line, every credential-looking value masked (the rule is at MASK)."""
    words: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("-"):
            words.append(MASK)
            hide_next = False
            continue
        name, equals, value = arg.partition("=")
        if equals and value and (_names_credential(name) or _looks_secret(value)):
            words.append(f"{name}={MASK}")
        elif _looks_secret(arg):
            words.append(MASK)
        else:
            words.append(URL_PASSWORD.sub(rf"\g<1>{MASK}@", arg))
        hide_next = arg.startswith("-") and not equals and _names_credential(arg)
    return shlex.join(words)


def summary(config: Config) -> dict[str, object]:
    """What is in force, as log fields: nothing secret, no allow-list entry."""
    policy, auth, limits = config.policy, config.auth_server, config.rate_limits
    tokens = config.tokens
    shown: dict[str, object] = {
        "issuer": config.idp.issuer, "audiences": list(tokens.audiences),
        "audience_claim": tokens.audience_claim, "resource": config.resource_url,
        "upstream": config.upstream.origin, "upstream_path": config.upstream.path_prefix or None,
        "upstream_bearer_file": config.upstream_bearer_file or None,
        "listen": f"{config.host}:{config.port}",
        "auth_server_mode": "facade" if auth.facade else "direct",
        "static_client_id": auth.client_id or None,
        "static_client_secret": SET if auth.client_secret else None,
        "state_secret": SET if auth.state_secret else None,
        "allow": {
            "subs": len(policy.subs), "emails": len(policy.emails),
            "email_domains": len(policy.email_domains), "groups": len(policy.groups),
            "files": [file.path for file in policy.files],
            "all_authenticated": policy.allow_all_authenticated,
        },
        "groups_claim": ".".join(policy.groups_claim),
        "required_scopes": list(policy.required_scopes),
        "advertised_scopes": list(config.advertised_scopes),
        "algorithms": sorted(tokens.algorithms), "leeway_seconds": tokens.leeway,
        "rate_limit_rpm": limits.per_subject_rpm, "rate_limit_storage": limits.storage_shown,
        "cors_origins": sorted(config.cors_origins), "event_loop": config.event_loop,
        "metrics": f"{config.metrics.host}:{config.metrics.port}" if config.metrics else None,
    }
    shown["token_validation"] = tokens.validation
    introspection = tokens.introspection
    if introspection is not None:
        shown["introspection"] = {
            "endpoint": introspection.endpoint or "(from the IdP metadata)",
            "client_id": introspection.client_id,
            "client_secret": SET if introspection.client_secret else None,
            "auth_method": introspection.auth_method or "(from the IdP metadata)",
            "cache_seconds": introspection.cache_seconds,
            "negative_cache_seconds": introspection.negative_cache_seconds,
            "require_exp": introspection.require_exp,
            "max_concurrency": introspection.max_concurrency,
            "timeout_seconds": introspection.timeout,
        }
    if auth.facade:  # what the relay changes toward the IdP (Entra: omit, api://<app id>/)
        shown["idp_resource_parameter"] = "pass" if auth.send_resource else "omit"
        shown["idp_scope_prefix"] = auth.scope_prefix or None
    spawn = config.spawn
    if spawn is not None and spawn.stdio:
        shown["spawn"] = {"command": shown_command(spawn.argv), "transport": "stdio",
                          "scope": spawn.scope, "max_processes": spawn.max_processes,
                          "max_per_subject": spawn.max_per_subject,
                          "idle_seconds": spawn.idle_seconds}
    elif spawn is not None:
        shown["spawn"] = {"command": shown_command(spawn.argv), "port": spawn.port}
    tools = config.tool_rules
    if tools.configured:  # counts and labels: a rule's subs, emails and groups are personal
        shown["tool_rules"] = {
            "allow_globs": len(tools.allow), "deny_globs": len(tools.deny),
            "scope_pairs": len(tools.scopes), "rate_limit_pairs": len(tools.rate_limits),
            "file": tools.file or None, "rules": [rule.label for rule in tools.file_rules],
        }
    return shown
