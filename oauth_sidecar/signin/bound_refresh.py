"""Refresh tokens of Client ID Metadata Document clients, bound to the client they were issued to.

Why: every document client signs in through the one static client the sidecar holds at the IdP,
so to the IdP all of them are that client, and any of them holding another's refresh token could
redeem it. The relay hands a document client its refresh token sealed together with the client's
id (state.py: encrypted and authenticated), and opens it at refresh only for that same client.
Registered clients (the static client) get the IdP's token as it is: they are one client anyway.
"""

from __future__ import annotations

import json
from typing import Any

import structlog

from oauth_sidecar.signin.state import MAX_SEALED, StateCodec, unsealed
from oauth_sidecar.signin.token_request import TokenRefused

log = structlog.get_logger("oauth_sidecar.bound_refresh")

REFRESH_KIND = "refresh"
REFRESH_FIELDS = ("id", "t", "cid")
# The seal outlives any refresh token an IdP issues to a public client in practice; the IdP's
# own expiry and rotation still apply to the token inside.
REFRESH_TTL = 400 * 86400


def seal_answer(states: StateCodec, body: bytes, client_id: str) -> bytes:
    """A token endpoint's JSON answer with its refresh_token sealed for `client_id` (dropped,
    and logged, if it is too long to seal: the client signs in again when its access token
    expires); any other answer (an error, not JSON) as it came."""
    try:
        answer: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    if not isinstance(answer, dict) or not isinstance(answer.get("refresh_token"), str):
        return body
    sealed = states.seal(
        {"kind": REFRESH_KIND, "t": answer["refresh_token"], "cid": client_id}, ttl=REFRESH_TTL)
    if len(sealed) > MAX_SEALED:  # it could never be opened: never hand out one unbound
        log.warning("refresh_token_too_long", length=len(answer["refresh_token"]))
        del answer["refresh_token"]
    else:
        answer["refresh_token"] = sealed
    return json.dumps(answer).encode()


def open_for(states: StateCodec, fields: dict[str, str], client_id: str) -> None:
    """Put the IdP's refresh token back in a refresh request of `client_id`; TokenRefused when
    the token was not sealed here for that very client."""
    sealed = unsealed(states, fields.get("refresh_token"), REFRESH_KIND, REFRESH_FIELDS)
    if sealed is None or sealed["cid"] != client_id:
        raise TokenRefused("invalid_grant", "The refresh token is invalid or was issued to "
                           "another client")
    fields["refresh_token"] = sealed["t"]
