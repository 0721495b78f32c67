"""A real redis-server for tests: a child process on loopback that a test can stop, hang
(SIGSTOP) and start again on the same port. Not a test module; the `redis_server` fixture in
conftest.py gives each test its own."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from processes import stop_process

REDIS_START_TIMEOUT = 10.0  # seconds for a fresh redis-server to answer PING


@dataclass
class RedisServer:
    """A redis-server child on loopback that a test can stop and start again on the same port."""

    port: int
    workdir: Path
    process: asyncio.subprocess.Process | None = None
    starts: int = 0
    password: str = ""
    """requirepass: clients must AUTH with it (it goes percent-encoded into uri)."""

    @property
    def uri(self) -> str:
        user_info = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{user_info}127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail(
                "redis-server is not installed (apt-get install redis-server): the Redis "
                "rate-limit tests need a real one, and CI installs it", pytrace=False,
            )
        self.starts += 1
        logfile = self.workdir / f"redis-{self.starts}.log"
        self.process = await asyncio.create_subprocess_exec(
            executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(logfile),
            *(("--requirepass", self.password) if self.password else ()),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while not await self._answers_ping():
            if self.process.returncode is not None or time.monotonic() > deadline:
                log = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
                await self.stop()
                pytest.fail(f"redis-server on 127.0.0.1:{self.port} did not start:\n{log}")
            await asyncio.sleep(0.02)

    async def _answers_ping(self) -> bool:
        try:
            async with asyncio.timeout(1.0):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    if self.password:
                        secret = self.password.encode()
                        writer.write(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret))
                        if await reader.readline() != b"+OK\r\n":
                            return False
                    writer.write(b"PING\r\n")
                    await writer.drain()
                    answer = await reader.readline()
                finally:
                    writer.close()
                    await writer.wait_closed()
        except (OSError, TimeoutError):
            return False
        return answer == b"+PONG\r\n"

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, but nothing answers (a hung Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)

    async def stop(self) -> None:
        self.resume()  # a stopped process would sit on SIGTERM until the SIGKILL deadline
        process, self.process = self.process, None
        if process is not None:
            await stop_process(process)
