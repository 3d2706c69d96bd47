"""Cost of AUTH PLAIN/LOGIN password checks: a first login, a repeated one, a wrong one.

    .venv/bin/python bench/auth.py [--logins 200] [--concurrency 20]

The hash is deliberately slow (scrypt, ln=14) so that a stolen config does not give the
passwords away; the verifier caches a successful check, so a legacy app that logs in for
every message pays that cost once, not per message. Wrong passwords are never cached:
each one costs a full scrypt, which is what slows down guessing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.core.passhash import hash_password
from relay.receive.passwords import PasswordVerifier

PASSWORD = b"correct horse battery staple"


async def timed(verifier: PasswordVerifier, password: bytes, n: int,
                concurrency: int) -> tuple[list[float], float, bool]:
    """Per-check latencies (s), the wall time for all n, and whether every check agreed."""
    gate = asyncio.Semaphore(concurrency)
    results: list[bool] = []

    async def one() -> float:
        async with gate:
            started = time.perf_counter()
            results.append(await verifier.verify("app", password))
            return time.perf_counter() - started

    started = time.perf_counter()
    latencies = await asyncio.gather(*(one() for _ in range(n)))
    return list(latencies), time.perf_counter() - started, len(set(results)) == 1


def report(label: str, latencies: list[float], wall: float) -> None:
    ms = sorted(x * 1000 for x in latencies)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    print(f"{label:<28} n={len(ms):<5} median {statistics.median(ms):8.3f} ms   "
          f"p95 {p95:8.3f} ms   {len(ms) / wall:10.0f} checks/s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()

    verifier = PasswordVerifier({"app": hash_password(PASSWORD.decode())})
    first, wall, _ = await timed(verifier, PASSWORD, 1, 1)
    report("first login (scrypt)", first, wall)
    cached, wall, agreed = await timed(verifier, PASSWORD, args.logins, args.concurrency)
    assert agreed
    report("repeated login (cached)", cached, wall)
    wrong, wall, agreed = await timed(verifier, b"wrong", max(4, args.logins // 20),
                                      args.concurrency)
    assert agreed
    report("wrong password (scrypt)", wrong, wall)


if __name__ == "__main__":
    asyncio.run(main())
