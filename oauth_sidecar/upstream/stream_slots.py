"""How many event streams one subject may hold open at once (MAX_STREAMS_PER_SUBJECT).

Why: an event stream holds a client connection, an upstream connection and a handler for as long
as it stays open, so one subject (a user, or a stolen token) opening streams without end could
take every connection the sidecar and the MCP server have. A request may only be refused before it
is forwarded: once the upstream has run a tool call, refusing its answer would make the client's
retry run it twice. So every request that *may* be answered with a stream takes a slot first, or
is refused at once: a GET (MCP's listening stream), or a POST whose Accept allows
text/event-stream (what MCP clients send with every call). The slot comes back as soon as the
answer turns out not to be a stream, or when the stream ends. Counts are kept per process: each
replica bounds its own connections.
"""

from __future__ import annotations

import functools

from multidict import CIMultiDictProxy

Owner = tuple[str, str]  # (issuer, subject)

# Streams end whenever their clients leave, so there is no reset time to announce: a short wait.
RETRY_AFTER = "5"
# The media ranges that match text/event-stream, most specific first (RFC 9110 §12.5.1).
EVENT_STREAM_RANGES = ("text/event-stream", "text/*", "*/*")


class TooManyStreams(Exception):
    """The subject already holds MAX_STREAMS_PER_SUBJECT slots."""


class Slot:
    """One place taken; release() may be called more than once (only the first counts)."""

    __slots__ = ("_owner", "_slots")

    def __init__(self, slots: StreamSlots, owner: Owner) -> None:
        self._slots: StreamSlots | None = slots
        self._owner = owner

    def release(self) -> None:
        if self._slots is not None:
            self._slots.give_back(self._owner)
            self._slots = None


class StreamSlots:
    """Slots held per subject; a subject holding none has no entry, so the map stays small."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held: dict[Owner, int] = {}

    def reserve(self, method: str, headers: CIMultiDictProxy[str], owner: Owner) -> Slot | None:
        """A slot for a request that may become a stream, None for one that cannot (or with no
        limit); raises TooManyStreams when the subject holds every slot."""
        if not self._limit or not may_become_stream(method, headers):
            return None
        held = self._held.get(owner, 0)
        if held >= self._limit:
            raise TooManyStreams
        self._held[owner] = held + 1
        return Slot(self, owner)

    def claim(self, owner: Owner) -> Slot | None:
        """Count a stream that took no slot (the upstream answered one the Accept excluded): it
        ran already, so it is relayed whatever the count, and counts against what comes next."""
        if not self._limit:
            return None
        self._held[owner] = self._held.get(owner, 0) + 1
        return Slot(self, owner)

    def give_back(self, owner: Owner) -> None:
        held = self._held[owner] - 1
        if held:
            self._held[owner] = held
        else:
            del self._held[owner]


def may_become_stream(method: str, headers: CIMultiDictProxy[str]) -> bool:
    if method == "GET":
        return True
    if method != "POST":
        return False
    accept = ",".join(headers.getall("Accept", ()))
    return not accept.strip() or accepts_event_stream(accept)  # no Accept: anything goes


@functools.lru_cache(maxsize=256)  # clients send the same few Accept values again and again
def accepts_event_stream(accept: str) -> bool:
    """Whether the most specific range matching text/event-stream has a weight above 0."""
    weights: dict[str, float] = {}
    for media_range in accept.lower().split(","):
        kind, _, parameters = media_range.partition(";")
        kind = kind.strip()
        if kind in EVENT_STREAM_RANGES and kind not in weights:
            weights[kind] = _weight(parameters)
    for kind in EVENT_STREAM_RANGES:
        if kind in weights:
            return weights[kind] > 0
    return False


def _weight(parameters: str) -> float:
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip() == "q":
            try:
                return float(value.strip())
            except ValueError:
                return 1.0  # unreadable: assume it may stream (a slot too many, never too few)
    return 1.0
