"""The credential's outer form: exactly one `Authorization: Bearer` header, and a compact JWS
parsed strictly, before any key or claim is looked at.

Why a module of its own: what a request's credentials are and whether they are even a JWT are
decided before the verifier's checks (tokens.py) and by the doctor the same way; pyjwt tolerates
duplicate JSON keys, padding and other slack that this parser refuses. TokenError, the one
refusal every credential check raises, lives here because this is where refusals start.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from typing import Any

# RFC 6750 §2.1 b64token; a JWT uses only base64url characters and dots (RFC 7515 §7.1).
B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


class TokenError(Exception):
    """Why a request's credentials were refused.

    `reason` is a stable code for logs; `description` is a fixed, safe sentence for the client;
    `error` is the RFC 6750 error code (None for "no credentials", RFC 6750 §3.1).
    """

    def __init__(
        self, reason: str, description: str, *, error: str | None = "invalid_token",
        status: int = 401,
    ) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description
        self.error = error
        self.status = status


def invalid(reason: str, description: str) -> TokenError:
    """An RFC 6750 invalid_token refusal (401)."""
    return TokenError(reason, description)


def bearer_token(authorization: Sequence[str], query_keys: Sequence[str], max_bytes: int) -> str:
    """The token from exactly one `Authorization: Bearer` header (RFC 6750 §2.1 only)."""
    if "access_token" in query_keys:
        raise TokenError(
            "token_in_query", "Tokens in the query string are not accepted",
            error="invalid_request", status=400,
        )
    if not authorization:
        raise TokenError("missing", "No bearer token", error=None)
    if len(authorization) > 1:
        raise TokenError(
            "duplicate_authorization", "More than one Authorization header",
            error="invalid_request", status=400,
        )
    scheme, _, token = authorization[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise TokenError("not_bearer", "Only Bearer credentials are accepted", error=None)
    token = token.strip(" ")
    if not token:
        raise invalid("empty_token", "The bearer token is empty")
    if len(token) > max_bytes:
        raise invalid("token_too_large", "The bearer token is too large")
    if not B64TOKEN.fullmatch(token):
        raise invalid("malformed", "The bearer token is malformed")
    return token


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member name")
    return result


def _json_segment(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise invalid("malformed", f"The token {what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise invalid("malformed", f"The token {what} is not a JSON object")
    return value


def parse_strict(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload of a compact JWS, refusing anything pyjwt would let slide."""
    segments = token.split(".")
    if len(segments) == 5:
        raise invalid("encrypted", "Encrypted tokens (JWE) are not accepted")
    if len(segments) != 3 or not all(SEGMENT.fullmatch(s) for s in segments):
        raise invalid("malformed", "The bearer token is not a signed JWT")
    return _json_segment(segments[0], "header"), _json_segment(segments[1], "payload")
