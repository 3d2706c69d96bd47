"""Memory of a relay whose queue holds 100 vs 100,000 messages; prints figures.

    .venv/bin/python bench/queue_memory.py [--sizes 100 100000] [--seconds 15]

For each size, a fresh process fills a spool with that many deferred messages (all due),
starts the relay with the upstream unreachable (every attempt fails temporarily and the
message is deferred again, the worst case for the queue manager) and lets it work for a
while. It prints the process's peak RSS, how many attempts it made and how long one scan
of deferred/ takes. Bounded memory means the peak RSS does not grow with the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.spool.records import Entry, State
from relay.spool.store import Spool


def fill(spool: Spool, count: int) -> None:
    """Write ``count`` deferred messages directly (no fsync: this is set-up, not the test)."""
    body = b"From: app@contoso.com\r\nTo: a@example.com\r\nSubject: x\r\n\r\n" + b"y" * 2000
    now = time.time()
    for i in range(count):
        mid = f"{i:012X}"
        entry = Entry(id=mid, profile="system", mail_from="app@contoso.com",
                      rcpt_tos=["a@example.com"], size=len(body), received_at=now,
                      next_attempt=now - 1)
        (spool.root / "data" / f"{mid}.eml").write_bytes(body)
        meta = spool.root / State.DEFERRED / f"{mid}.json"
        meta.write_bytes(entry.to_json())
        os.utime(meta, (now - 1, now - 1))          # a deferred file's mtime is its due time


async def child(count: int, seconds: float) -> dict[str, float]:
    from relay.app import Relay
    from relay.config import parse_config
    from relay.core.log import setup_logging

    setup_logging("error")
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config({
            "server": {"listeners": [{"address": "127.0.0.1", "port": 0}]},
            "profiles": {"system": {"mailbox": "relay@contoso.com", "credential": "main",
                                    "upstream": "down"}},
            "routing": {"system_profile": "system"},
            "spool": {"directory": f"{tmp}/spool"},
            "delivery": {"retry_initial": "1s", "retry_max": "1s",
                         "mailbox_limits": {"max_sessions": 100,
                                            "messages_per_minute": 1_000_000,
                                            "recipients_per_day": 1_000_000_000}},
            # Entra and Exchange are both unreachable: attempts fail fast and defer.
            "upstreams": {"down": {"host": "127.0.0.1", "port": 9, "timeout": 2}},
            "credentials": {"main": {"tenant_id": "contoso.onmicrosoft.com", "client_id": "c",
                                     "authority": "https://127.0.0.1:9",
                                     "client_secret": {"value": "x"}}},
        }, check_secrets=False, check_files=False)
        spool = Spool(config.spool.directory)
        spool.open(on_tmpfs="warn")
        fill(spool, count)
        started = time.perf_counter()
        spool.due(time.time(), 100)
        scan = time.perf_counter() - started
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        relay = Relay(config)
        await relay.start()
        await asyncio.sleep(seconds)
        await relay.stop()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        attempts = sum(spool.read(State.DEFERRED, n).attempts for n in spool.names(State.DEFERRED))
        queued = sum(spool.count(s) for s in State)
    return {"messages": count, "scan_ms": scan * 1000, "rss_before_mib": base / 1024,
            "peak_rss_mib": peak / 1024, "attempts": attempts, "still_queued": queued}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 100_000])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child is not None:
        print(json.dumps(asyncio.run(child(ns.child, ns.seconds))))
        return
    print(f"{'queued':>9} {'scan deferred/':>15} {'RSS after fill':>15} {'peak RSS':>9} "
          f"{'attempts made':>14} {'still queued':>13}")
    for size in ns.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(size),
                              "--seconds", str(ns.seconds)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['messages']:>9} {r['scan_ms']:>12.1f} ms {r['rss_before_mib']:>11.1f} MiB "
              f"{r['peak_rss_mib']:>5.1f} MiB {r['attempts']:>14} {r['still_queued']:>13}")


if __name__ == "__main__":
    main()
