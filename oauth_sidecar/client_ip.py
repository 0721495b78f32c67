"""Which address is the client's: the peer, or what a trusted proxy says in X-Forwarded-For.

Why: per-IP limits and the X-Forwarded-For we send upstream must not be decided by the caller.
By default nothing is trusted and the TCP peer is the client; behind a load balancer, its
addresses go in TRUSTED_PROXIES and the rightmost untrusted hop of X-Forwarded-For is the client
(the leftmost entries are whatever the caller wrote). The answer is a rate-limit key, kept for a
minute per distinct value: it is always an address in its short canonical form, never a hop's
text, so a caller cannot make the sidecar keep kilobytes per key or spell one address many ways.
"""

from __future__ import annotations

import ipaddress
import re

from multidict import CIMultiDictProxy

from oauth_sidecar.config import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPV6_BUDGET_PREFIX = 64  # bits of an IPv6 client address that name one budget
# The longest address text: an IPv6 address with an embedded IPv4 one (45 characters) in
# brackets, with a port; anything longer is not an address and is not parsed at all.
MAX_HOP_LENGTH = len("[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535")
PORT = re.compile(r"[0-9]{1,5}")
# `1.2.3.4:5678` and `[2001:db8::1]:5678` (Azure Application Gateway appends the client's port;
# RFC 7239 §6 writes nodes so): the address counts, the port does not.
V4_WITH_PORT = re.compile(r"([0-9.]+):([0-9]{1,5})")
V6_IN_BRACKETS = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?")


def forwarded_chain(headers: CIMultiDictProxy[str]) -> str | None:
    """All X-Forwarded-For lines as one list (RFC 9110 §5.3): some proxies add a line of their
    own after the caller's instead of appending to it, so reading only the first is spoofable."""
    lines = headers.getall("X-Forwarded-For", [])
    return ", ".join(lines) if lines else None


def parse_address(text: str) -> IPAddress | None:
    """A peer or hop as an address, with a port (see V4_WITH_PORT) or an IPv6 zone (`%eth0`,
    meaningless off the host) dropped; None for anything else: a name, `unknown`, junk."""
    text = text.strip()
    if len(text) > MAX_HOP_LENGTH:
        return None
    if match := V4_WITH_PORT.fullmatch(text) or V6_IN_BRACKETS.fullmatch(text):
        text = match[1]
    try:
        return ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None


def canonical(address: IPAddress) -> str:
    """The key form: compressed, and an IPv4-mapped IPv6 address (a dual-stack socket's view of
    an IPv4 client) as the IPv4 address it is, so one client has one budget."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def budget_key(client: str) -> str:
    """What a per-address budget counts under: an IPv4 address, or the /64 an IPv6 address is
    in. One host or site is given a whole /64 (RFC 6177, RFC 7421), so counting single IPv6
    addresses would hand a client 2^64 budgets, and each new address a key in memory."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:  # no address (a Unix socket's peer): its own key
        return client
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_BUDGET_PREFIX), strict=False))
    return client


class ClientAddress:
    def __init__(self, trusted: tuple[IPNetwork, ...]) -> None:
        self._trusted = trusted

    def _is_trusted(self, address: IPAddress | None) -> bool:
        return address is not None and any(address in network for network in self._trusted)

    def client(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client's address as we believe it, in canonical form (the peer's own text only
        when it is no address, e.g. a Unix socket's).

        Hops are read right to left while they are trusted proxies. A hop that is no address
        ends the walk: what it and everything left of it say cannot be checked, so the client is
        the nearest trusted proxy, the one that passed it on (the peer, when it is the first)."""
        peer = peer or ""
        client = parse_address(peer)
        if client is None:
            return peer
        if not forwarded_for or not self._is_trusted(client):
            return canonical(client)
        for hop in reversed(forwarded_for.split(",")):
            if not hop.strip():
                continue
            address = parse_address(hop)
            if address is None:
                break
            client = address
            if not self._is_trusted(address):
                break
        return canonical(client)

    def forwarded_for(self, peer: str | None, forwarded_for: str | None) -> str:
        """X-Forwarded-For for the upstream: a trusted proxy's chain kept, a caller's dropped."""
        peer = peer or ""
        if forwarded_for and self._is_trusted(parse_address(peer)):
            return f"{forwarded_for}, {peer}"
        return peer
