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
from typing import Protocol

from oauth_sidecar.auth.bearer import SEGMENT
from oauth_sidecar.auth.introspection import Introspector
from oauth_sidecar.auth.tokens import TokenVerifier
from oauth_sidecar.request_keys import Principal

MAX_HEADER_SEGMENT = 4096  # a JOSE header is a few hundred characters; longer is not one


class TokenCheck(Protocol):
    """What the gate needs: a cheap look-up of a token judged before, and the full check."""

    def cached(self, token: str) -> Principal | None: ...

    async def verify(self, token: str) -> Principal: ...


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
    """"jwt" or "introspection": which verifier TOKEN_VALIDATION sends this token to (the one
    rule for the gate and for `check --token`, so the doctor names the verifier the gate uses)."""
    if mode == "jwt" or (mode == "auto" and looks_like_jws(token)):
        return "jwt"
    return "introspection"


class AccessTokens:
    """The TOKEN_VALIDATION mode's verifier behind one interface."""

    def __init__(self, mode: str, verifier: TokenVerifier,
                 introspector: Introspector | None) -> None:
        if mode != "jwt" and introspector is None:
            raise ValueError(f"TOKEN_VALIDATION={mode} needs an introspector")
        self.mode = mode
        self._jwt = verifier
        self._introspector = introspector

    def cached(self, token: str) -> Principal | None:
        introspector = self._introspector
        if self.mode == "jwt" or introspector is None:
            return self._jwt.cached(token)
        if self.mode == "introspection":
            return introspector.cached(token)
        # auto: each cache only ever holds its own kind of token, so asking both is exact.
        principal = self._jwt.cached(token)
        return principal if principal is not None else introspector.cached(token)

    async def verify(self, token: str) -> Principal:
        introspector = self._introspector
        if introspector is None or verifier_for(self.mode, token) == "jwt":
            return await self._jwt.verify(token)
        return await introspector.verify(token)
