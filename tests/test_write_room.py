"""write_room.cannot_wait on a real loopback transport whose peer stops reading."""

from __future__ import annotations

import asyncio
import socket

from oauth_sidecar.write_room import LOW_WATER_BYTES, cannot_wait


async def test_a_write_can_wait_only_once_the_transport_holds_more_than_its_low_water_mark(
) -> None:
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer)  # never reads: our socket buffers fill, then the transport's

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    peer = await asyncio.wait_for(accepted, 5)
    try:
        transport = writer.transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # fill the kernel's part soon
        assert cannot_wait(transport, LOW_WATER_BYTES)
        assert not cannot_wait(transport, LOW_WATER_BYTES + 1)
        assert not cannot_wait(None, 0)
        for _ in range(1000):  # bounded: the kernel takes a few MiB at most before it stops
            if transport.get_write_buffer_size() > LOW_WATER_BYTES:
                break
            writer.write(b"x" * 4096)
            await asyncio.sleep(0)
        assert transport.get_write_buffer_size() > LOW_WATER_BYTES
        assert not cannot_wait(transport, 0)
    finally:
        writer.transport.abort()
        peer.transport.abort()
        server.close()
        await server.wait_closed()
