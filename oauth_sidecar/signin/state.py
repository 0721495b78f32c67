"""The sign-in relay's sealed values (state and code) and the PKCE check.

Why a module of its own: the relay's state travels through the browser and the IdP, and its
codes through the client, so each value is sealed (encrypted and authenticated), carries its own
expiry and a redemption id, and opens only as the kind it was sealed as; the PKCE comparison
(RFC 7636 §4.6) belongs beside the challenge the seal carries. The relay (authserver.py) only
seals, opens and compares.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

STATE_TTL = 600  # seconds a user has to sign in at the IdP
NONCE_BYTES = 12  # AES-GCM's standard nonce, random per value (NIST SP 800-38D §8.2.2)
MAX_SEALED = 8192  # characters of a sealed state or code: real ones are well under 1 KB
# RFC 7636 §4.1, §4.2: a verifier, and so a challenge, is 43-128 unreserved characters.
PKCE_VALUE = re.compile(r"[A-Za-z0-9._~-]{43,128}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StateCodec:
    """Expiring relay values under authenticated encryption (AES-256-GCM): the client's own
    values travel through the browser and the IdP, so they must be tamper-proof; and a sealed
    code holds the IdP's code, which with a public static client would buy a token at the IdP
    directly, past our PKCE and single-use checks, so it must be unreadable too.

    Each sealed value gets a random `id`, so it can be redeemed once (redemptions.py)."""

    def __init__(self, secret: bytes) -> None:
        self._aead = AESGCM(hashlib.sha256(b"oauth_sidecar relay seal\0" + secret).digest())

    def seal(self, values: Mapping[str, Any], ttl: int | None = None) -> str:
        """values sealed until `ttl` seconds from now (STATE_TTL by default)."""
        lifetime = STATE_TTL if ttl is None else ttl
        sealed = {**values, "id": secrets.token_urlsafe(16), "exp": int(time.time()) + lifetime}
        nonce = secrets.token_bytes(NONCE_BYTES)
        return f"{_b64(nonce)}.{_b64(self._aead.encrypt(nonce, json.dumps(sealed).encode(), None))}"

    def open(self, state: str | None) -> dict[str, Any] | None:
        if not state or state.count(".") != 1 or len(state) > MAX_SEALED:
            return None
        nonce, box = state.split(".")
        try:
            values = json.loads(self._aead.decrypt(_unb64(nonce), _unb64(box), None))
        except (InvalidTag, ValueError):  # forged, tampered, another key; or not base64 at all
            return None
        if not isinstance(values, dict) or not isinstance(values.get("exp"), int):
            return None
        return values if values["exp"] >= time.time() else None


# What a sealed value must carry besides its kind: the redemption id, the client's redirect_uri,
# the client it was issued to and its PKCE challenge; a code also the IdP's code.
STATE_FIELDS = ("id", "r", "cid", "pc")
CODE_FIELDS = ("id", "r", "cid", "pc", "c")


def unsealed(
    codec: StateCodec, value: str | None, kind: str, names: tuple[str, ...]
) -> dict[str, Any] | None:
    """A value sealed as `kind` with every field in names a string; None for anything else
    (a state presented as a code, a value sealed before these fields existed, a forgery)."""
    values = codec.open(value)
    if values is None or values.get("kind") != kind:
        return None
    return values if all(isinstance(values.get(name), str) for name in names) else None


def pkce_matches(verifier: str | None, challenge: str) -> bool:
    """RFC 7636 §4.6: BASE64URL(SHA256(verifier)) == challenge, in constant time."""
    if verifier is None or not PKCE_VALUE.fullmatch(verifier):
        return False
    computed = _b64(hashlib.sha256(verifier.encode("ascii")).digest())
    return hmac.compare_digest(computed.encode(), challenge.encode())
