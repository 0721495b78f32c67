"""Reading a token request (RFC 6749 §3.2, §4.1.3) before the relay acts on it.

Why a module of its own: what the relay accepts is decided here, before the IdP is contacted and
before the static client's secret can be added: a form body of bounded size, each parameter at
most once, only the grants the metadata advertises, and every client the request names.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web

from oauth_sidecar.request_body import BodyReader, BodyTooLarge
from oauth_sidecar.signin.registration import ALLOWED_GRANTS


class TokenRefused(Exception):
    """A token request refused before the IdP is contacted (RFC 6749 §5.2)."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(error)
        self.error = error
        self.description = description
        self.status = status


def client_ids(fields: Mapping[str, str], authorization: str | None) -> set[str]:
    """Every client a token request names: its client_id and its Basic user (RFC 6749 §2.3.1)."""
    named = {fields["client_id"]} if fields.get("client_id") else set()
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() == "basic":
        try:
            pair = base64.b64decode(value.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):  # the IdP refuses it; it names nobody here
            return named
        named.add(unquote_plus(pair.partition(":")[0]))
    return named


async def token_form(request: web.Request, bodies: BodyReader) -> dict[str, str]:
    """The token request's parameters, each at most once (RFC 6749 §3.2); raises TokenRefused,
    or BodyStalled / BodyBroken for a body that stops arriving or breaks off."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise TokenRefused("invalid_request",
                           "Use application/x-www-form-urlencoded (RFC 6749 §4.1.3)")
    try:
        raw = await bodies.read_small(request)
    except BodyTooLarge:
        raise TokenRefused("invalid_request", "The token request is too large", 413) from None
    try:
        form = parse_qsl(raw.decode(), keep_blank_values=True,
                         max_num_fields=100, strict_parsing=False)
    except (ValueError, UnicodeDecodeError):
        raise TokenRefused("invalid_request", "The token request is malformed") from None
    fields = dict(form)
    if len(fields) != len(form):
        raise TokenRefused("invalid_request", "A parameter is repeated")
    return fields


def relayed_grant(fields: Mapping[str, str]) -> str:
    """The grant, if it is one the metadata advertises: nothing else ever reaches the IdP, so
    the relay cannot be used to run client_credentials, password or token exchange with the
    static client's secret."""
    grant = fields.get("grant_type")
    if not grant:  # RFC 6749 §3.1: a parameter without a value counts as omitted
        raise TokenRefused("invalid_request", "grant_type is missing")
    if grant not in ALLOWED_GRANTS:  # exact: grant types are compared as strings (§5.2)
        raise TokenRefused("unsupported_grant_type",
                           "Only authorization_code and refresh_token are relayed")
    return grant
