"""What a redirect URI may be: the one rule for the allow-list at start-up, for registration and
sign-in at run time, and for the demo's provider.

Why one rule: a URI the start-up check accepts but the run-time check refuses (or the other way
round) is either a configured callback that never works or a callback nobody approved. Every
place that decides parses through parse_redirect_uri.
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

from oauth_sidecar.config.urls import SCHEME, UNSPLITTABLE, is_loopback_host, shown_url

MAX_REDIRECT_URI = 2048  # characters; real callbacks are far shorter
# Schemes that are never an app's callback: script, inline content, local files, transport.
NEVER_REDIRECT_SCHEMES = frozenset({
    "javascript", "vbscript", "data", "blob", "file", "filesystem", "about",
    "ftp", "ws", "wss", "mailto", "tel", "urn", "view-source", "chrome", "jar",
})  # fmt: skip
SHOWN_CHARACTERS = 80  # of an over-long URI in a message: enough to recognise it

NOT_ABSOLUTE = ("is not an absolute http(s) URL (or a native app's private-use scheme) without "
                "fragment or credentials")


class RedirectUriRefused(ValueError):
    """A value that cannot be a redirect URI; reason completes a sentence about it and never
    quotes its credentials."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_redirect_uri(uri: object) -> SplitResult:
    """The parts of uri if it can be a redirect URI at all; raises RedirectUriRefused.

    Accepted: a string of at most MAX_REDIRECT_URI characters that splits with a valid port, has
    no fragment (RFC 6749 §3.1.2) and no credentials, and is https, http on a loopback host
    (RFC 8252 §7.3), or a native app's private-use scheme (RFC 8252 §7.1: cursor://...; PKCE
    protects the code from another app claiming the scheme). Whether it is *allowed* is the
    allow-list's business.
    """
    if not isinstance(uri, str):
        raise RedirectUriRefused("is not a string")
    if len(uri) > MAX_REDIRECT_URI:
        raise RedirectUriRefused(f"is longer than {MAX_REDIRECT_URI} characters")
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:  # its text may quote a piece of a password
        raise RedirectUriRefused(UNSPLITTABLE) from None
    hidden = bool(parts.fragment or parts.username or parts.password)
    if parts.scheme in ("http", "https"):
        if hidden or not parts.hostname:
            raise RedirectUriRefused(NOT_ABSOLUTE)
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise RedirectUriRefused("must use https")
    elif not SCHEME.fullmatch(parts.scheme) or parts.scheme in NEVER_REDIRECT_SCHEMES:
        raise RedirectUriRefused(NOT_ABSOLUTE)
    elif hidden:
        raise RedirectUriRefused("must have no fragment or credentials")
    return parts


def is_loopback_redirect(parts: SplitResult) -> bool:
    """http on a loopback host, any port and path (RFC 8252 §7.3 native apps)."""
    return parts.scheme == "http" and is_loopback_host(parts.hostname)


def shown_redirect_uri(uri: str) -> str:
    """uri as a message may quote it: no user-info, and an over-long one cut short."""
    shown = shown_url(uri)
    if len(shown) > SHOWN_CHARACTERS:
        return f"{shown[:SHOWN_CHARACTERS]}..."
    return shown
