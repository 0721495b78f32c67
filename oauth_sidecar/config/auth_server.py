"""The authorization-server section: direct or facade, the static client, the redirect allow-list,
the key that seals the relay's state, and what the relay changes toward the IdP (`resource`,
scope prefix).

Why checked together: these settings only make sense as a set (a facade needs a client, a
published secret needs a secret, a shared deployment needs a shared key), and a redirect entry
that could never be used must stop the start, not fail a sign-in later.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

from oauth_sidecar.config.model import AuthServerConfig, ClientDocumentsConfig
from oauth_sidecar.config.reader import Reader, split_list
from oauth_sidecar.config.redirect_uris import (
    RedirectUriRefused,
    parse_redirect_uri,
    shown_redirect_uri,
)
from oauth_sidecar.config.urls import is_dns_name
from oauth_sidecar.config.variables import RESOURCE_PARAMETER_CHOICES

MIN_STATE_SECRET = 32  # characters: at least 128 bits of a random hex or base64 key

# A facade's start-up warning without STATE_SECRET; the doctor words it for shared Redis.
UNSHARED_SEALING_WARNING = (
    "STATE_SECRET is not set: sign-ins are sealed with a random per-process key, so with "
    "several replicas a sign-in started on one fails on another, and the refresh tokens of "
    "Client ID Metadata Document clients (sealed with that key) stop working at every restart; "
    "set the same STATE_SECRET everywhere"
)


def redirect_uris(r: Reader) -> frozenset[str]:
    """ALLOWED_REDIRECT_URIS, each entry held to the rule registration and sign-in apply."""
    uris = []
    for uri in split_list(r.raw("ALLOWED_REDIRECT_URIS")):
        try:
            parse_redirect_uri(uri)
        except RedirectUriRefused as refused:
            r.problems.append(f"ALLOWED_REDIRECT_URIS entry {shown_redirect_uri(uri)!r} "
                              f"{refused.reason}")
        else:
            uris.append(uri)
    return frozenset(uris)


MAX_CA_FILE_BYTES = 1 << 20  # a bundle of a few hundred certificates at most
ON_WORDS, OFF_WORDS = ("on", "true", "1", "yes"), ("off", "false", "0", "no")


def cimd_hosts(r: Reader, name: str) -> frozenset[str]:
    """A comma list of bare lowercase DNS names: compared exactly with a client id URL's host,
    so anything else (a URL, a port, a wildcard, an upper-case letter) could never match."""
    hosts = []
    entries = split_list(r.raw(name))
    if name == "CIMD_TRUSTED_HOSTS" and entries == ("none",):  # blank means the default list
        return frozenset()
    for host in entries:
        if "/" in host or ":" in host:
            r.problems.append(f"{name} entry {host!r} is not a bare host name: give only the "
                              "host, e.g. claude.ai (no scheme, port or path)")
        elif host != host.lower():
            r.problems.append(f"{name} entry {host!r} must be lowercase ({host.lower()})")
        elif not is_dns_name(host):
            r.problems.append(f"{name} entry {host!r} is not a DNS host name (no wildcards, "
                              "IP addresses or trailing dot; each entry matches one host exactly)")
        else:
            hosts.append(host)
    return frozenset(hosts)


def cimd_ca_file(r: Reader) -> str:
    """CIMD_CA_FILE, checked now: a file that cannot be read or holds no certificate would
    otherwise fail every sign-in of a client whose document it was meant to let through."""
    path = r.raw("CIMD_CA_FILE")
    if not path:
        return ""
    try:
        with open(path, "rb") as file:
            pem = file.read(MAX_CA_FILE_BYTES + 1)
    except OSError as exc:
        r.problems.append(f"CIMD_CA_FILE {path} cannot be read: {exc.strerror or exc}")
        return ""
    if len(pem) > MAX_CA_FILE_BYTES:
        r.problems.append(f"CIMD_CA_FILE {path} is larger than {MAX_CA_FILE_BYTES} bytes")
        return ""
    try:
        ssl.create_default_context(cadata=pem.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError):
        r.problems.append(f"CIMD_CA_FILE {path} holds no PEM certificate")
        return ""
    return path


def client_documents(r: Reader) -> ClientDocumentsConfig:
    """The CIMD_* variables: Client ID Metadata Documents in facade mode."""
    switch = r.raw("CIMD").lower()
    if switch not in ON_WORDS + OFF_WORDS:
        r.problems.append(f"CIMD={switch!r} is not on or off")
    return ClientDocumentsConfig(
        enabled=switch in ON_WORDS,
        allowed_hosts=cimd_hosts(r, "CIMD_ALLOWED_HOSTS"),
        trusted_hosts=cimd_hosts(r, "CIMD_TRUSTED_HOSTS"),
        allow_private_addresses=r.flag("CIMD_ALLOW_PRIVATE_ADDRESSES"),
        ca_file=cimd_ca_file(r),
    )


def scope_prefix(r: Reader) -> str:
    """IDP_SCOPE_PREFIX: the API's identifier at the IdP, which scopes are appended to, so it
    must be an identifier (api://... or https://...) and end with the separator `/`."""
    prefix = r.raw("IDP_SCOPE_PREFIX")
    if not prefix:
        return ""
    parts = urlsplit(prefix)
    if (
        parts.scheme.lower() not in ("api", "https") or not prefix.lower().startswith(
            ("api://", "https://")) or not parts.netloc or not prefix.endswith("/")
        or parts.query or parts.fragment or any(c.isspace() for c in prefix)
    ):
        r.problems.append(
            f"IDP_SCOPE_PREFIX={prefix!r} must be an api:// or https:// identifier ending with "
            "/, e.g. api://<API app id>/ (the API's Application ID URI and a slash)")
        return ""
    return prefix


def idp_request(r: Reader, facade: bool) -> tuple[bool, str]:
    """IDP_RESOURCE_PARAMETER and IDP_SCOPE_PREFIX: what the facade's relay changes in the
    requests it sends the IdP. In direct mode clients talk to the IdP themselves, so nothing
    the sidecar could change: a setting that would silently do nothing stops the start."""
    choice = r.choice("IDP_RESOURCE_PARAMETER", RESOURCE_PARAMETER_CHOICES)
    prefix = scope_prefix(r)
    if not facade:
        for name, value in (("IDP_RESOURCE_PARAMETER", "omit" if choice == "omit" else ""),
                            ("IDP_SCOPE_PREFIX", prefix)):
            if value:
                r.problems.append(
                    f"{name}={value} applies to the facade's relay only: in direct mode "
                    "clients send their requests to the IdP themselves; set "
                    "AUTH_SERVER_MODE=facade (with STATIC_CLIENT_ID) or unset it")
    return choice != "omit", prefix


def auth_server(r: Reader) -> AuthServerConfig:
    client_id, secret = r.raw("STATIC_CLIENT_ID"), r.secret("STATIC_CLIENT_SECRET")
    mode = r.raw("AUTH_SERVER_MODE").lower() or ("facade" if client_id else "direct")
    if mode not in ("direct", "facade"):
        r.problems.append(f"AUTH_SERVER_MODE={mode!r} is not direct or facade")
    if mode == "facade" and not client_id:
        r.problems.append(
            "AUTH_SERVER_MODE=facade needs STATIC_CLIENT_ID: the relay signs users in with one "
            "client registered at the IdP with the callback <RESOURCE_URL origin>/oauth/callback"
        )
    if secret and not client_id:
        r.problems.append("STATIC_CLIENT_SECRET is set without STATIC_CLIENT_ID")
    publish = r.flag("STATIC_CLIENT_CONFIDENTIAL")
    if publish and not secret:
        r.problems.append("STATIC_CLIENT_CONFIDENTIAL=true needs STATIC_CLIENT_SECRET")
    uris = redirect_uris(r)
    state_secret = r.secret("STATE_SECRET")
    if state_secret and len(state_secret) < MIN_STATE_SECRET:
        r.problems.append(
            f"STATE_SECRET is shorter than {MIN_STATE_SECRET} characters "
            "(use e.g. `openssl rand -hex 32`)"
        )
    send_resource, prefix = idp_request(r, mode == "facade")
    return AuthServerConfig(
        facade=mode == "facade", client_id=client_id, client_secret=secret,
        publish_secret=publish, redirect_uris=uris,
        allow_loopback_redirects=r.flag("ALLOW_LOOPBACK_REDIRECTS"), state_secret=state_secret,
        client_documents=client_documents(r),
        send_resource=send_resource, scope_prefix=prefix,
    )
