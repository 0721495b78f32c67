"""Which verifier judges a bearer token: the JWT verifier, the introspector, or (auto) by shape.

Why a module of its own: the gate asks one thing, "who is this?", and must not care how the
answer is found (TOKEN_VALIDATION). In auto mode the shape decides before any check: a JWS goes to
the JWT verifier and stays there when it fails (a forged or expired JWT is never handed to the
IdP as a second chance, nor used to make it work), anything else is introspected.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable
from typing import Protocol

from oauth_sidecar.auth.bearer import SEGMENT
from oauth_sidecar.auth.introspection import Introspector
from oauth_sidecar.auth.tokens import TokenVerifier
from oauth_sidecar.request_keys import Principal

MAX_HEADER_SEGMENT = 4096  # a JOSE header is a few hundred characters; longer is not one


class TokenCheck(Protocol):
    """What the gate needs: a cheap look-up of a token judged before, and the full check."""

    def cached(self, token: str) -> Principal | None: ...

    def verify(self, token: str) -> Awaitable[Principal]: ...

    def vouched(self, token: str) -> bool:
        """A miss that re-checks a caller admitted before (not charged to the IP's budget)."""
        ...


def looks_like_jws(token: str) -> bool:
    """Three base64url segments whose first is a JSON object naming an `alg` (RFC 7515 §7.1):
    the shape of a JWT access token, which no opaque token of an IdP has."""
    segments = token.split(".")
    if len(segments) != 3 or len(segments[0]) > MAX_HEADER_SEGMENT or not all(
        SEGMENT.fullmatch(segment) for segment in segments
    ):
        return False
    head = segments[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(header, dict) and "alg" in header


def verifier_for(mode: str, token: str) -> str:
    """"jwt" or "introspection": which verifier token_check's choice sends this token to, by
    the same rule (`check --token` names it; the gate never calls this on its hot path)."""
    if mode == "jwt" or (mode == "auto" and looks_like_jws(token)):
        return "jwt"
    return "introspection"


class ByShape:
    """auto: a JWS to the JWT verifier, anything else to the introspector."""

    def __init__(self, verifier: TokenVerifier, introspector: Introspector) -> None:
        self._jwt = verifier
        self._introspector = introspector

    def cached(self, token: str) -> Principal | None:
        # Each cache only ever holds its own kind of token, so asking both is exact.
        principal = self._jwt.cached(token)
        return principal if principal is not None else self._introspector.cached(token)

    def vouched(self, token: str) -> bool:
        return self._introspector.vouched(token)  # a JWT's entry lasts its life: never stale

    async def verify(self, token: str) -> Principal:
        if looks_like_jws(token):
            return await self._jwt.verify(token)
        return await self._introspector.verify(token)


def token_check(mode: str, verifier: TokenVerifier,
                introspector: Introspector | None) -> TokenCheck:
    """What the gate asks in this TOKEN_VALIDATION mode: in jwt and introspection mode the
    verifier itself, so the hot path pays nothing for the choice."""
    if mode == "jwt":
        return verifier
    if introspector is None:
        raise ValueError(f"TOKEN_VALIDATION={mode} needs an introspector")
    return introspector if mode == "introspection" else ByShape(verifier, introspector)
