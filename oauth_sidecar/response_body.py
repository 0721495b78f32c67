"""Reading a whole response body of a peer (the IdP, its token endpoint, a probed upstream) under
a size cap.

Why one reader: the IdP's documents, the token relay's answer and the doctor's probes are all
read whole, and a peer that answers with an endless or huge body must not grow our memory
without bound. The rule is the request side's too (request_body.py): at most `limit` bytes are
accepted, one more is too large, and a Content-Length that already says so is refused before a
byte is read.
"""

from __future__ import annotations

import aiohttp

CHUNK_BYTES = 65536  # aiohttp's own read size: no extra copies below it


class ResponseTooLarge(Exception):
    """The body is longer than `limit` bytes. `head` holds what was read before the cap was
    passed (at most `limit` bytes; empty when Content-Length announced the size)."""

    def __init__(self, limit: int, head: bytes) -> None:
        super().__init__(f"body larger than {limit} bytes")
        self.limit = limit
        self.head = head


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body if it is at most `limit` bytes; raises ResponseTooLarge otherwise (the
    rest is left unread: the caller's context manager closes the connection)."""
    if (response.content_length or 0) > limit:
        raise ResponseTooLarge(limit, b"")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            chunks.append(chunk)
            raise ResponseTooLarge(limit, b"".join(chunks)[:limit])
        chunks.append(chunk)
    return b"".join(chunks)
