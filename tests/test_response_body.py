"""read_capped (oauth_sidecar.response_body), against a real aiohttp server on loopback that
answers with a known length or chunked: at most `limit` bytes are accepted, one more is too
large, and an announced length over the cap is refused before its body is read."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from oauth_sidecar.response_body import ResponseTooLarge, read_capped

LIMIT = 100_000  # more than one read chunk, so the cap is crossed mid-stream
TIMEOUT = aiohttp.ClientTimeout(total=10)  # every request in this file is bounded


async def sized(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * int(request.match_info["size"]))


async def chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    left = int(request.match_info["size"])
    while left:
        piece = min(left, 7_000)
        await response.write(b"y" * piece)
        left -= piece
    await response.write_eof()
    return response


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_get("/sized/{size}", sized)
    app.router.add_get("/chunked/{size}", chunked)
    started = TestServer(app, host="127.0.0.1")
    await started.start_server()
    try:
        yield started
    finally:
        await started.close()


async def fetch(server: TestServer, path: str, limit: int = LIMIT) -> bytes:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, \
            session.get(server.make_url(path)) as response:
        return await read_capped(response, limit)


@pytest.mark.parametrize("kind", ["sized", "chunked"])
@pytest.mark.parametrize("size", [0, 1, LIMIT - 1, LIMIT])
async def test_a_body_within_the_limit_is_read_whole(
    server: TestServer, kind: str, size: int
) -> None:
    body = await fetch(server, f"/{kind}/{size}")
    assert len(body) == size


@pytest.mark.parametrize("kind", ["sized", "chunked"])
@pytest.mark.parametrize("size", [LIMIT + 1, 3 * LIMIT])
async def test_a_body_over_the_limit_raises_with_the_limit(
    server: TestServer, kind: str, size: int
) -> None:
    with pytest.raises(ResponseTooLarge) as too_large:
        await fetch(server, f"/{kind}/{size}")
    assert too_large.value.limit == LIMIT
    assert len(too_large.value.head) <= LIMIT


async def test_an_announced_length_over_the_limit_is_refused_before_reading(
    server: TestServer,
) -> None:
    with pytest.raises(ResponseTooLarge) as too_large:
        await fetch(server, f"/sized/{LIMIT + 1}")
    assert too_large.value.head == b""  # nothing was read


async def test_a_chunked_body_over_the_limit_keeps_what_was_read_up_to_the_limit(
    server: TestServer,
) -> None:
    with pytest.raises(ResponseTooLarge) as too_large:
        await fetch(server, f"/chunked/{3 * LIMIT}")
    assert too_large.value.head == b"y" * LIMIT
