"""Which address is the client's: the peer, or what a trusted proxy says in X-Forwarded-For.

Why: per-IP limits and the X-Forwarded-For we send upstream must not be decided by the caller.
By default nothing is trusted and the TCP peer is the client; behind a load balancer, its
addresses go in TRUSTED_PROXIES and the rightmost untrusted hop of X-Forwarded-For is the client
(the leftmost entries are whatever the caller wrote).
"""

from __future__ import annotations

import ipaddress

from multidict import CIMultiDictProxy

from oauth_sidecar.config import IPNetwork


def forwarded_chain(headers: CIMultiDictProxy[str]) -> str | None:
    """All X-Forwarded-For lines as one list (RFC 9110 §5.3): some proxies add a line of their
    own after the caller's instead of appending to it, so reading only the first is spoofable."""
    lines = headers.getall("X-Forwarded-For", [])
    return ", ".join(lines) if lines else None


class ClientAddress:
    def __init__(self, trusted: tuple[IPNetwork, ...]) -> None:
        self._trusted = trusted

    def _is_trusted(self, address: str) -> bool:
        if not self._trusted:
            return False
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)

    def client(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client's address as we believe it."""
        peer = peer or ""
        if not forwarded_for or not self._is_trusted(peer):
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer

    def forwarded_for(self, peer: str | None, forwarded_for: str | None) -> str:
        """X-Forwarded-For for the upstream: a trusted proxy's chain kept, a caller's dropped."""
        peer = peer or ""
        if forwarded_for and self._is_trusted(peer):
            return f"{forwarded_for}, {peer}"
        return peer
