"""Throughput and latency of the relay against the local stand-ins; prints figures.

    .venv/bin/python bench/throughput.py [--messages 2000] [--concurrency 20] [--size 20000]

Everything runs in one process on loopback (relay, fake Entra ID, fake Exchange Online).
"accepted" is what the application sees: each 250 comes only after the message is fsynced
to the spool. "delivered" is when the last message reached the fake Exchange, through at
most 3 reused upstream sessions for the one mailbox (Exchange's limit); the per-minute and
per-day mailbox limits are lifted so that the relay, not the pacing, is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.app import Relay
from relay.config import parse_config
from relay.core.log import setup_logging
from relay.sandbox.service import Sandbox


async def main(messages: int, concurrency: int, size: int) -> None:
    setup_logging("warning")
    body = b"".join(b"x" * 76 + b"\r\n" for _ in range(max(1, size // 78)))
    data = b"From: app@contoso.com\r\nTo: a@example.com\r\nSubject: bench\r\n\r\n" + body
    with tempfile.TemporaryDirectory() as tmp:
        async with Sandbox(Path(tmp)) as sandbox:
            sandbox.exchange.maildir = None          # measure the relay, not disk writes
            config = sandbox.apply(parse_config({
                "server": {"listeners": [{"address": "127.0.0.1", "port": 0}],
                           "max_connections": concurrency + 10,
                           # every client is 127.0.0.1
                           "max_connections_per_client": concurrency + 10},
                "spool": {"directory": f"{tmp}/spool"},
                "delivery": {"mailbox_limits": {"messages_per_minute": 10**9,
                                                "recipients_per_day": 10**9}},
                "profiles": {"system": {"mailbox": "relay@contoso.com", "credential": "main"}},
                "routing": {"system_profile": "system"},
                "credentials": {"main": {"tenant_id": "t", "client_id": "c",
                                         "client_secret": {"value": "x"}}},
            }, check_secrets=False, check_files=False))
            relay = Relay(config)
            await relay.start()
            host, port = relay.listening[0]
            latencies: list[float] = []
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(messages):
                queue.put_nowait(i)

            async def client() -> None:
                async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as smtp:
                    while not queue.empty():
                        i = queue.get_nowait()
                        t0 = time.perf_counter()
                        await smtp.sendmail("app@contoso.com", [f"r{i}@example.com"], data)
                        latencies.append(time.perf_counter() - t0)

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            while len(sandbox.exchange.messages) < messages:  # noqa: ASYNC110 - polling a fake
                await asyncio.sleep(0.01)
            drained = time.perf_counter() - started
            sessions = sandbox.exchange.sessions
            await relay.stop()
            delivered = len(sandbox.exchange.messages)
            tokens = sandbox.entra.token_requests

    latencies.sort()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"messages            {messages} x {len(data)} bytes, {concurrency} concurrent clients")
    print(f"delivered           {delivered}")
    print(f"accepted in         {elapsed:.2f} s ({messages / elapsed:.1f} messages/s, durable)")
    print(f"delivered in        {drained:.2f} s ({messages / drained:.1f} messages/s)")
    print(f"accept latency p50  {statistics.median(latencies) * 1000:.1f} ms")
    print(f"accept latency p95  {latencies[int(len(latencies) * 0.95) - 1] * 1000:.1f} ms")
    print(f"accept latency max  {latencies[-1] * 1000:.1f} ms")
    print(f"token requests      {tokens}")
    print(f"upstream sessions   {sessions}")
    print(f"peak RSS            {rss_mb:.0f} MiB (whole process, stand-ins included)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size", type=int, default=20000, help="approximate body bytes")
    ns = parser.parse_args()
    asyncio.run(main(ns.messages, ns.concurrency, ns.size))
