"""Microbenchmark: the product's RateLimiter, in process, µs per admitted request.

    .venv/bin/python bench/ratelimit_micro.py [--repeats 5] [--redis] [--json]

What a request pays the per-subject budget, as the gate pays it (`admit(PER_SUBJECT, iss,
sub)`), with the storage the product builds from RATE_LIMIT_STORAGE_URI (memory, or with
--redis a redis-server this script starts on a free loopback port). Cases, each never refused:

- one subject that has already spent H units of its window (H = 0, 1,000, 10,000, 100,000,
  at a limit of 1,000,000 a minute): a budget's cost must not grow with the subject's rate;
- 10,000 distinct subjects, one request each in turn (the storage's cost of many keys).

Each figure is the best of --repeats passes of a batch (the minimum is the cost, the rest is
noise). Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oauth_sidecar.auth.ratelimit import PER_SUBJECT, RateLimiter
from oauth_sidecar.config import RateLimitConfig

LIMIT = 1_000_000  # a minute: high enough that no case is ever refused
BATCH = 2000  # requests timed per pass
SPENT = (0, 1_000, 10_000, 100_000)
SUBJECTS = 10_000
ISSUER = "https://idp.example.test/realms/bench"


def _config(storage_uri: str) -> RateLimitConfig:
    return RateLimitConfig(per_subject_rpm=LIMIT, unauthenticated_rpm=0,
                           storage_uri=storage_uri, fail_open=False)


async def _best(limiter: RateLimiter, subjects: list[str], repeats: int) -> float:
    """Best µs per admit over `repeats` passes, cycling through `subjects`."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(BATCH):
            await limiter.admit(PER_SUBJECT, ISSUER, subjects[i % len(subjects)])
        best = min(best, (time.perf_counter() - started) / BATCH * 1e6)
    return best


async def measure(storage_uri: str, repeats: int) -> dict[str, float]:
    results: dict[str, float] = {}
    for spent in SPENT:
        limiter = RateLimiter(_config(storage_uri))
        async with limiter.running():
            subject = f"heavy-{spent}"
            for _ in range(spent):  # fill the window first, untimed
                await limiter.admit(PER_SUBJECT, ISSUER, subject)
            results[f"one subject, {spent:,} spent"] = await _best(limiter, [subject], repeats)
    limiter = RateLimiter(_config(storage_uri))
    async with limiter.running():
        subjects = [f"user-{i}" for i in range(SUBJECTS)]
        for subject in subjects:  # every key exists: the cost of many keys, not of creating them
            await limiter.admit(PER_SUBJECT, ISSUER, subject)
        results[f"{SUBJECTS:,} subjects in turn"] = await _best(limiter, subjects, repeats)
    return results


@contextlib.asynccontextmanager
async def redis_server() -> AsyncIterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--redis needs redis-server (Debian: apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        process = await asyncio.create_subprocess_exec(
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", workdir,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            for _ in range(100):  # bounded: 5 s
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                await asyncio.sleep(0.05)
            yield f"async+redis://127.0.0.1:{port}"
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), timeout=5)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--redis", action="store_true", help="also a local redis-server")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {"memory": await measure("async+memory://", args.repeats)}
    if args.redis:
        async with redis_server() as uri:
            report["redis"] = await measure(uri, args.repeats)
    if args.json:
        print(json.dumps(report))
        return
    for storage, cases in report.items():
        for case, micros in cases.items():
            print(f"{storage:7} {case:32} {micros:9.1f} µs/request")


if __name__ == "__main__":
    asyncio.run(main())
