"""Peak memory of the relay with many large messages in flight at once; prints figures.

    .venv/bin/python bench/memory.py [--messages 20] [--size-mb 30]

Two processes are measured in the same run, against the same fake Exchange (STARTTLS,
XOAUTH2) and with the same clients: the relay (``python -m relay run``), which streams
DATA to its spool and delivers from disk, and bench/bare_relay.py, the least relay
aiosmtpd and aiosmtplib make, which holds each message in memory as those libraries do.
All messages are sent at once, each on its own connection; the figure is each process's
peak resident memory (VmHWM) against its resident memory before the load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiosmtplib
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.relayproc import CLIENT_ID, MAILBOX, TENANT, Harness  # noqa: E402


def status(pid: int, key: str) -> float:
    """A VmRSS/VmHWM figure of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def fetch_token(h: Harness) -> str:
    session = requests.Session()
    session.trust_env = False           # REQUESTS_CA_BUNDLE must not replace the fake's CA
    reply = session.post(
        f"{h.fakes.entra.url}/{TENANT}/oauth2/v2.0/token", timeout=10,
        verify=str(h.fakes.pki.ca_file),
        data={"grant_type": "client_credentials", "client_id": CLIENT_ID,
              "client_secret": h.fakes.client_secret,
              "scope": "https://outlook.office365.com/.default"})
    reply.raise_for_status()
    return str(reply.json()["access_token"])


def start_bare(h: Harness, directory: Path) -> tuple[subprocess.Popen[str], int]:
    token_file = directory / "token"
    token_file.write_text(fetch_token(h))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "bare_relay.py"),
         "--upstream-port", str(h.exchange.port), "--ca-file", str(h.fakes.pki.ca_file),
         "--token-file", str(token_file), "--mailbox", MAILBOX],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, int(line.rsplit(":", 1)[1])


async def load(port: int, messages: int, data: bytes) -> float:
    """Send every message at once, each on its own connection; seconds until all 250s."""
    async def one(i: int) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                                   timeout=600) as smtp:
            await smtp.sendmail(MAILBOX, [f"r{i}@example.com"], data)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(messages)))
    return time.perf_counter() - started


def measure(name: str, pid: int, port: int, h: Harness, messages: int, data: bytes
            ) -> dict[str, float]:
    before = status(pid, "VmRSS")
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], status(pid, "VmRSS"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    delivered_before = len(h.exchange.messages)
    accepted = asyncio.run(load(port, messages, data))
    deadline = time.monotonic() + 600
    while len(h.exchange.messages) < delivered_before + messages:
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}: not everything was delivered within 10 minutes")
        time.sleep(0.05)
    delivered = time.perf_counter()
    done.set()
    sampler.join()
    hwm = status(pid, "VmHWM")
    return {"before": before, "peak": max(peak[0], hwm), "after": status(pid, "VmRSS"),
            "accepted_s": accepted, "delivered_at": delivered}


def main(messages: int, size_mb: int) -> None:
    line = b"x" * 998 + b"\r\n"
    body = line * (size_mb * 1024 * 1024 // len(line))
    data = (f"From: {MAILBOX}\r\nTo: a@example.com\r\nSubject: big\r\n\r\n".encode()
            + body)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        h = Harness(directory, {"logging": {"level": "info"},
                                "server": {"max_message_size": "40MiB"}})
        try:
            relay = h.start()
            results["relay (streams to disk)"] = measure(
                "relay", relay.pid, relay.port, h, messages, data)
            relay.terminate()
            relay.wait()
            bare, port = start_bare(h, directory)
            try:
                results["aiosmtpd + aiosmtplib, in memory"] = measure(
                    "bare", bare.pid, port, h, messages, data)
            finally:
                bare.terminate()
                bare.wait(10)
        finally:
            with contextlib.redirect_stdout(io.StringIO()):     # the relay's log tail
                h.close()
    print(f"{messages} messages of {len(data) / 1e6:.1f} MB at once, each on its own "
          "connection, through STARTTLS + XOAUTH2")
    print(f"{'':34} {'RSS before':>11} {'peak':>9} {'after':>9} {'per message':>12}"
          f" {'all 250s in':>12}")
    for name, r in results.items():
        per = (r["peak"] - r["before"]) / messages
        print(f"{name:34} {r['before']:8.0f} MiB {r['peak']:5.0f} MiB {r['after']:5.0f} MiB "
              f"{per:8.1f} MiB {r['accepted_s']:10.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--size-mb", type=int, default=30)
    ns = parser.parse_args()
    main(ns.messages, ns.size_mb)
