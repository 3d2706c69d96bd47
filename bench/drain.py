"""A backlog drained at Exchange Online's per-mailbox limits, against the least time they allow.

    .venv/bin/python bench/drain.py [--mailboxes 4] [--per-minute 100] [--backlog 200]

The fake Exchange enforces the limits (a fourth session of a mailbox, or a message beyond
``--per-minute`` in any 60 s, gets 432 4.3.2); the relay is set to the same limits
(``delivery.mailbox_limits``). ``--backlog`` messages per mailbox are put in the spool,
all due, before the relay starts. No pacing can beat the limit: after the first
``--per-minute`` messages of a mailbox, each further one must wait until one sent a
minute earlier leaves the window. So the least time is the time the first window took
(upstream speed) plus one minute per further window; the figure is how close the relay
gets, with how many refusals (432s) and bounces on the way.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.spool.records import Entry, State  # noqa: E402
from relay.spool.store import Spool  # noqa: E402
from tests.relayproc import Harness  # noqa: E402


def fill(spool_dir: Path, mailboxes: int, backlog: int) -> None:
    """``backlog`` due messages per mailbox, written directly (set-up, not the test)."""
    spool = Spool(spool_dir)
    spool.open(on_tmpfs="warn")
    now = time.time()
    for box in range(mailboxes):
        mailbox = f"box{box}@contoso.com"
        for i in range(backlog):
            mid = f"B{box:02d}{i:09d}"
            body = (f"From: {mailbox}\r\nTo: r{i}@example.com\r\nSubject: drain {box} {i}\r\n"
                    f"\r\n").encode() + b"x" * 2000
            entry = Entry(id=mid, profile=f"box{box}", mail_from=mailbox,
                          rcpt_tos=[f"r{i}@example.com"], size=len(body), received_at=now,
                          mailbox=mailbox, next_attempt=now - 1)
            (spool.root / "data" / f"{mid}.eml").write_bytes(body)
            meta = spool.root / State.DEFERRED / f"{mid}.json"
            meta.write_bytes(entry.to_json())
            os.utime(meta, (now - 1, now - 1))      # a deferred file's mtime is its due time


def run(ns: argparse.Namespace) -> dict[str, Any]:
    expected = ns.mailboxes * ns.backlog
    with tempfile.TemporaryDirectory(prefix="drain-") as tmp:
        directory = Path(tmp)
        profiles = {f"box{b}": {"mailbox": f"box{b}@contoso.com", "credential": "main",
                                "upstream": "exchange"} for b in range(ns.mailboxes)}
        h = Harness(directory, {
            "profiles": profiles,
            "delivery": {"mailbox_limits": {"max_sessions": 3,
                                            "messages_per_minute": ns.per_minute},
                         "retry_initial": "5s", "retry_max": "10s"},
            "http": {"enabled": False}})
        try:
            exchange = h.exchange.current
            assert exchange is not None
            h.exchange.later(exchange.enforce_limits, 3, ns.per_minute)
            fill(h.spool, ns.mailboxes, ns.backlog)
            h.start()
            deadline = time.monotonic() + 60 * (math.ceil(ns.backlog / ns.per_minute) + 3)
            while len(h.exchange.messages) < expected:
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {len(h.exchange.messages)} of {expected} "
                                     "delivered in time")
                time.sleep(0.05)
            arrivals: dict[str, list[float]] = {}
            for m in h.exchange.messages:
                arrivals.setdefault(m.mailbox.lower(), []).append(m.received_at)
            failed = len(h.spool_files("failed"))
            refusals = exchange.limit_refusals
        finally:
            with contextlib.redirect_stdout(io.StringIO()):     # the relay's log tail
                h.close()
    start = min(t for times in arrivals.values() for t in times)
    end = max(t for times in arrivals.values() for t in times)
    first_window = max(sorted(times)[min(ns.per_minute, len(times)) - 1]
                       for times in arrivals.values()) - start
    windows = math.ceil(ns.backlog / ns.per_minute)
    least = first_window + 60.0 * (windows - 1)
    return {"delivered": expected, "seconds": end - start, "least": least,
            "first_window": first_window, "refusals": refusals, "bounced": failed,
            "extra": len(h.exchange.messages) - expected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=4)
    parser.add_argument("--per-minute", type=int, default=100)
    parser.add_argument("--backlog", type=int, default=200, help="messages per mailbox")
    ns = parser.parse_args()
    r = run(ns)
    print(f"# drain: {ns.mailboxes} mailboxes x {ns.backlog} messages at {ns.per_minute}/min "
          "and 3 sessions each, enforced by the fake Exchange")
    print(f"drained in {r['seconds']:.1f} s; least the limits allow {r['least']:.1f} s "
          f"(first window {r['first_window']:.1f} s + 60 s per further window): "
          f"{r['seconds'] / r['least']:.3f}x")
    print(f"432 refusals {r['refusals']}, bounced {r['bounced']}, "
          f"other messages (reports) {r['extra']}")


if __name__ == "__main__":
    main()
