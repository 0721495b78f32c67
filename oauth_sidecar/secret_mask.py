"""The sidecar's own secrets masked in every log line, whatever wrote them.

Why: log.redact masks what looks like a token, but the secrets the sidecar holds (the static
client secret, STATE_SECRET, the Redis password, the upstream credential) look like nothing in
particular, and others can quote them: a spawned child printing its environment or the headers
it received, an upstream's error, a library's message. So each finished line, after rendering,
is searched for every value the sidecar knows, in each spelling a renderer or a URL gives it,
and every occurrence becomes MARK. A value the line holds transformed otherwise (base64, cut
in half by the 4 KB limit of a child's line) is not recognised.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, quote_plus

MARK = "[secret]"
# Upstream credentials remembered after a rotation: one rotated out may still be quoted (by the
# upstream, or a child's late output) for a while; rotations are rare, so a few suffice.
ROTATED_KEPT = 4

Renderer = Callable[[Any, str, Any], Any]


def spellings(secret: str) -> set[str]:
    """The value as it is, JSON-escaped (the JSON renderer), repr-escaped (the console renderer
    and exception texts), and percent- or form-encoded (URLs, form bodies)."""
    forms = {secret, json.dumps(secret)[1:-1], repr(secret)[1:-1], quote(secret, safe=""),
             quote_plus(secret, safe="")}
    return {form for form in forms if form}


class SecretMask:
    """Known secret values, replaced by MARK in text. Built once at start-up from the loaded
    configuration; the upstream credential is added again whenever its file is re-read."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._fixed = {form for secret in secrets if secret for form in spellings(secret)}
        self._rotating: deque[str] = deque(maxlen=ROTATED_KEPT)
        self._forms: tuple[str, ...] = ()
        self._compile()

    def __bool__(self) -> bool:
        return bool(self._forms)

    def add(self, secret: str) -> None:
        """A credential read while running (the upstream's, after a rotation)."""
        if secret and secret not in self._rotating:
            self._rotating.append(secret)
            self._compile()

    def _compile(self) -> None:
        forms = set(self._fixed)
        for secret in self._rotating:
            forms |= spellings(secret)
        # Longest first: a secret that contains another is masked whole, not around the other.
        self._forms = tuple(sorted(forms, key=len, reverse=True))  # one assignment: thread-safe

    def __call__(self, text: str) -> str:
        # `in` before replace: a few substring searches per line, no copy when nothing matches
        # (measured faster than one regular expression of the alternatives).
        for form in self._forms:
            if form in text:
                text = text.replace(form, MARK)
        return text

    def wrap(self, renderer: Renderer) -> Renderer:
        """The renderer, its finished line masked: whatever the event held, nothing escapes."""

        def render(logger: Any, name: str, event: Any) -> Any:
            line = renderer(logger, name, event)
            return self(line) if isinstance(line, str) else line

        return render
