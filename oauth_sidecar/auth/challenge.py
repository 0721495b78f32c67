"""What a refused client is told: the `WWW-Authenticate` challenge of a 401 or a 403 (RFC 6750
§3, RFC 9728 §5.1) and the sentence of a policy refusal.

Why a module of its own: the gate sends these and `oauth-sidecar check` shows them; built in one
place from the configuration, the doctor's copy is the one the sidecar sends. Built once at
start-up, so the hot path only picks a string (only a token error's code and sentence vary).
"""

from __future__ import annotations

from oauth_sidecar.auth.bearer import TokenError
from oauth_sidecar.auth.policy import Denied
from oauth_sidecar.auth.resource_metadata import metadata_url
from oauth_sidecar.config import Config

# The 403 sentences name the class of refusal, never the allow-lists.
INSUFFICIENT_SCOPE_DESCRIPTION = "The token lacks a required scope"
ACCESS_DENIED_DESCRIPTION = "This account may not use this server"


class Challenges:
    """The challenges for one configuration."""

    def __init__(self, config: Config) -> None:
        url = self._url = metadata_url(config)
        self._required = config.policy.required_scopes
        self._tail = f'resource_metadata="{url}"'
        if config.advertised_scopes:
            self._tail += f', scope="{" ".join(config.advertised_scopes)}"'
        self.no_credentials = f"Bearer {self._tail}"
        # RFC 6750 §3.1 / MCP step-up: name every scope the request needs.
        required = " ".join(config.policy.required_scopes)
        self.insufficient_scope = (
            f'Bearer error="insufficient_scope", scope="{required}", resource_metadata="{url}"'
        )

    def scopes_needed(self, scopes: tuple[str, ...]) -> str:
        """insufficient_scope for a call that needs these scopes besides REQUIRED_SCOPES (a
        tool's TOOL_SCOPES): every scope the call needs, never offline_access (MCP 2026-07-28)."""
        needed = [s for s in dict.fromkeys((*self._required, *scopes)) if s != "offline_access"]
        return (f'Bearer error="insufficient_scope", scope="{" ".join(needed)}", '
                f'resource_metadata="{self._url}"')

    def for_error(self, error: TokenError) -> str:
        """The challenge of a refused credential; "" for a 503, which is the sidecar's trouble
        (the IdP's keys are not loaded), not a credential the client could change."""
        if error.status == 503:
            return ""
        if error.error is None:  # RFC 6750 §3.1: no error code when no credentials were sent
            return self.no_credentials
        return (
            f'Bearer error="{error.error}", error_description="{error.description}", {self._tail}'
        )

    def for_denial(self, denied: Denied) -> str:
        """A missing scope may be stepped up; an allow-list refusal has nothing to offer."""
        return self.insufficient_scope if denied.scope_missing else ""
