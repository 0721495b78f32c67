"""The verified-token cache, bounded in bytes as well as in entries.

Why: a cache hit costs a lookup instead of a signature check (about 1 µs against 100), but what
an entry holds is chosen by whoever holds a token: an Entra token with 200 groups, its claims
parsed whole, held about 22 KB, so 10,000 of them took 215 MiB. Here an entry is keyed by the
token's SHA-256 (never the token), holds only what a hit needs (the caller keeps the claims the
policy and the forwarded identity read), and its bytes are counted as it goes in; past
TOKEN_CACHE_SIZE entries or MAX_CACHE_BYTES the oldest go first. Tokens the policy refused when
they were verified are kept too (otherwise each retry of a refused caller costs a full
verification and a unit of its IP's budget), but on a shelf of their own, a quarter of the
entries and bytes, so a flood of them can never push out the entries of callers who are let in.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable
from itertools import compress
from typing import Generic, TypeVar

V = TypeVar("V")

# With what hits need kept, an ordinary token's entry takes under 1 KB, so the default 10,000
# entries fit several times over; 16 MiB only binds when the kept claims are large (forwarded
# Entra groups: about 800 tokens), and stays a small part of a 256 MiB container.
MAX_CACHE_BYTES = 16 << 20
REFUSED_SHARE = 4  # refused tokens get 1/4 of the entries and bytes; admitted ones the rest
# What an entry costs beyond the values it keeps: the digest, the table slot and links, the
# tuple, the Principal and its expiry. About 450 bytes by tracemalloc, which also sees the table
# grow in steps; tests/test_token_cache.py checks the count never falls below what it sees.
ENTRY_OVERHEAD = 500
CONTAINERS = frozenset({dict, list, tuple})  # what JSON parses into that holds other values
TEXT = frozenset({str})


def footprint(value: object) -> int:
    """Bytes a value built of JSON types (dict, list, str, numbers, True, None) takes in CPython,
    its members included. Without recursion, as a claim may nest as deep as the parser allowed,
    and member by member in C (map, compress): 200 groups take about 10 µs."""
    total, pending = sys.getsizeof(value), [value]
    while pending:
        item = pending.pop()
        members: Iterable[object]
        if type(item) is dict:
            members = [*item.keys(), *item.values()]
        elif type(item) in CONTAINERS:
            members = item  # type: ignore[assignment]
        else:
            continue
        types = list(map(type, members))
        if TEXT.issuperset(types):  # most claims: lists of names (sys.getsizeof is 6x slower)
            total += sum(map(str.__sizeof__, members))
            continue
        total += sum(map(sys.getsizeof, members))
        pending.extend(compress(members, map(CONTAINERS.__contains__, types)))
    return total


class _Shelf(Generic[V]):
    """Digests in insertion order, each with its cost, their values in the cache's one table;
    the oldest go first past either bound."""

    def __init__(self, values: dict[bytes, V], max_entries: int, max_bytes: int) -> None:
        self.values = values
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # Ordered: evicting the oldest of a plain dict scans the slots its deletions left
        # (quadratic under a flood); OrderedDict.popitem is O(1).
        self.costs: OrderedDict[bytes, int] = OrderedDict()
        self.used = 0

    def put(self, digest: bytes, value: V, cost: int) -> None:
        self.drop(digest)
        if self.max_entries == 0 or cost > self.max_bytes:
            return
        while self.costs and (len(self.costs) >= self.max_entries
                              or self.used + cost > self.max_bytes):
            oldest, oldest_cost = self.costs.popitem(last=False)
            del self.values[oldest]
            self.used -= oldest_cost
        self.costs[digest] = cost
        self.values[digest] = value
        self.used += cost

    def drop(self, digest: bytes) -> None:
        cost = self.costs.pop(digest, None)
        if cost is not None:
            del self.values[digest]
            self.used -= cost


class TokenCache(Generic[V]):
    """Values by token digest, on an admitted and a refused shelf (see the module docstring)."""

    def __init__(self, max_entries: int, max_bytes: int = MAX_CACHE_BYTES) -> None:
        values: dict[bytes, V] = {}
        self.get: Callable[[bytes], V | None] = values.get  # a hit: one lookup, in C
        refused_entries = max_entries // REFUSED_SHARE
        refused_bytes = max_bytes // REFUSED_SHARE
        self._admitted = _Shelf(values, max_entries - refused_entries, max_bytes - refused_bytes)
        self._refused = _Shelf(values, refused_entries, refused_bytes)

    def put(self, digest: bytes, value: V, cost: int, *, admitted: bool) -> None:
        """Keep a value that `cost` bytes hold; on the shelf of its verdict (from the other one
        if the verdict changed since)."""
        shelf, other = (self._admitted, self._refused) if admitted else (
            self._refused, self._admitted)
        other.drop(digest)
        shelf.put(digest, value, cost)

    def drop(self, digest: bytes) -> None:
        self._admitted.drop(digest)
        self._refused.drop(digest)

    @property
    def bytes(self) -> int:
        """What the entries cost, as counted when they went in."""
        return self._admitted.used + self._refused.used

    def __len__(self) -> int:
        return len(self._admitted.values)
