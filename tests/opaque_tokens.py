"""Opaque tokens from the tests' real provider, as introspection tests need them.

Not a test module. The provider (tests/real_idp.py, started with access_token_format="opaque")
issues opaque reference tokens; these helpers obtain them the way a client would:
`opaque_client_credentials_token` (client_credentials for an RFC 8707 resource),
`authorization_code_tokens` (authorization_code + PKCE through the provider's --auto-login, with
offline_access, so a refresh token comes too; `opaque_refresh_token` keeps just that) and
`refresh` (the refresh_token grant). `is_jws` says whether a string parses as a compact JWS, the
line between the JWT verifier and introspection.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
from oauth_flow import HeadlessBrowser
from real_idp import RealIdp, RealIdpError, client_credentials_token, discover, token_request

REDIRECT_URI = "http://127.0.0.1/callback"  # provider.mjs --redirect-uri default; never contacted
OFFLINE_SCOPE = "openid offline_access mcp:read"


def is_jws(token: str) -> bool:
    """Whether `token` parses as a compact JWS (a JWT access token), opaque tokens do not."""
    try:
        jwt.get_unverified_header(token)
    except jwt.DecodeError:
        return False
    return True


@dataclass(frozen=True)
class TokenSet:
    """A token endpoint's answer (RFC 6749 §5.1); `raw` keeps every member it had."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    scope: str | None
    expires_in: int | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, body: dict[str, Any]) -> TokenSet:
        refresh_token = body.get("refresh_token")
        scope = body.get("scope")
        expires_in = body.get("expires_in")
        return cls(
            access_token=body["access_token"],
            refresh_token=refresh_token if isinstance(refresh_token, str) else None,
            scope=scope if isinstance(scope, str) else None,
            expires_in=expires_in if isinstance(expires_in, int) else None,
            raw=body,
        )


def _require_opaque(idp: RealIdp, token: str) -> str:
    if is_jws(token):
        raise RealIdpError(f"the provider issued a JWT, not an opaque token (format "
                           f"{idp.access_token_format!r}; start it with access_token_format="
                           "'opaque')")
    return token


async def opaque_client_credentials_token(
    idp: RealIdp, resource: str, scope: str = "mcp:read"
) -> str:
    """An opaque access token for `resource`, issued to the provider's main client (its
    introspection answer names sub = client_id = that client, unless client_credentials_sub)."""
    return _require_opaque(idp, await client_credentials_token(idp, resource, scope))


def _pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def authorization_code_tokens(
    idp: RealIdp, resource: str, scope: str = OFFLINE_SCOPE, redirect_uri: str = REDIRECT_URI
) -> TokenSet:
    """The tokens of one authorization_code + PKCE flow of the main client for `resource`.

    The provider must run with auto_login (the account becomes `sub`). With offline_access in
    `scope` the provider asks for prompt=consent (its rule for offline_access) and a refresh
    token comes back; the access token's format is the provider's access_token_format.
    """
    metadata = await discover(idp)
    verifier, challenge = _pkce_pair()
    state = secrets.token_urlsafe(16)
    query = urlencode({
        "response_type": "code", "client_id": idp.client_id, "redirect_uri": redirect_uri,
        "scope": scope, "resource": resource, "state": state, "prompt": "consent",
        "code_challenge": challenge, "code_challenge_method": "S256",
    })
    browser = HeadlessBrowser(redirect_uri)
    result = await browser.authorize(f"{metadata['authorization_endpoint']}?{query}")
    if result.state != state:
        raise RealIdpError(f"authorization response state {result.state!r} is not ours")
    body = await token_request(idp, {
        "grant_type": "authorization_code", "code": result.code, "redirect_uri": redirect_uri,
        "code_verifier": verifier, "resource": resource,
    }, "authorization_code token request")
    return TokenSet.of(body)


async def opaque_refresh_token(idp: RealIdp, resource: str) -> str:
    """A real refresh token (offline_access granted) of the main client for `resource`."""
    tokens = await authorization_code_tokens(idp, resource)
    if tokens.refresh_token is None:
        raise RealIdpError(f"no refresh token in the token response: {sorted(tokens.raw)}")
    return tokens.refresh_token


async def refresh(idp: RealIdp, refresh_token: str, resource: str) -> TokenSet:
    """The refresh_token grant (RFC 6749 §6) of the main client, for `resource` (RFC 8707)."""
    body = await token_request(idp, {
        "grant_type": "refresh_token", "refresh_token": refresh_token, "resource": resource,
    }, "refresh_token token request")
    return TokenSet.of(body)
