"""The libraries' floor: the least relay aiosmtpd and aiosmtplib make, for comparisons.

    python bench/bare_relay.py --upstream-port N --ca-file CA --token-file FILE [...]

aiosmtpd in (no AUTH; the whole message collected in memory, as aiosmtpd does), the
message and its directory fsynced before the 250, and aiosmtplib out over a few reused
STARTTLS + XOAUTH2 sessions with one token read from a file. No routing, policy, queue,
retries or metrics: what is left is what the chosen libraries cost (on the event loop the
relay runs on: uvloop where it is installed). The benchmarks run it
beside the relay, in the same run, so that every figure has its baseline next to it.
It prints ``listening on 127.0.0.1:PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import signal
import ssl
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session


class Upstream:
    """A few authenticated sessions, each used by one message at a time."""

    def __init__(self, port: int, ca_file: str, token: str, mailbox: str,
                 sessions: int) -> None:
        self.port, self.token, self.mailbox = port, token, mailbox
        self.tls = ssl.create_default_context(cafile=ca_file)
        self.idle: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        self.slots = asyncio.Semaphore(sessions)

    async def _open(self) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=True,
                               tls_context=self.tls, local_hostname="bare.test")
        await smtp.connect()
        await smtp.ehlo()               # again, after STARTTLS (RFC 3207)
        payload = base64.b64encode(
            f"user={self.mailbox}\x01auth=Bearer {self.token}\x01\x01".encode())
        reply = await smtp.execute_command(b"AUTH", b"XOAUTH2")
        if reply.code == 334:
            reply = await smtp.execute_command(payload)
        if reply.code != 235:
            raise RuntimeError(f"login refused: {reply}")
        return smtp

    async def send(self, sender: str, rcpts: list[str], data: bytes) -> None:
        async with self.slots:
            smtp = self.idle.get_nowait() if not self.idle.empty() else await self._open()
            await smtp.sendmail(self.mailbox, rcpts, data)
            self.idle.put_nowait(smtp)


class Handler:
    def __init__(self, upstream: Upstream, spool: Path) -> None:
        self.upstream, self.spool = upstream, spool
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        path = self.spool / f"{id(envelope)}-{os.urandom(4).hex()}.eml"
        await asyncio.to_thread(_write_synced, path, data, self.spool)
        task = asyncio.create_task(self._deliver(path, envelope.mail_from or "",
                                                 list(envelope.rcpt_tos), data))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return "250 2.0.0 Ok: queued"

    async def _deliver(self, path: Path, sender: str, rcpts: list[str], data: bytes) -> None:
        try:
            await self.upstream.send(sender, rcpts, data)
        except Exception:
            traceback.print_exc()       # a benchmark must not wait for what never comes
            raise
        # missing_ok: the spool directory goes when the floor is stopped, and a delivery
        # that finishes just then must not print a traceback over the benchmark's table.
        await asyncio.to_thread(path.unlink, True)


def _write_synced(path: Path, data: bytes, directory: Path) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def main(ns: Any, token: str) -> None:
    upstream = Upstream(ns.upstream_port, ns.ca_file, token, ns.mailbox, ns.sessions)
    with tempfile.TemporaryDirectory(prefix="bare-relay-") as spool:
        handler = Handler(upstream, Path(spool))
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, data_size_limit=ns.max_size, enable_SMTPUTF8=True,
                         hostname="bare.test"), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        print(f"listening on 127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--mailbox", default="relay@contoso.com")
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--max-size", type=int, default=40 * 1024 * 1024)
    args = parser.parse_args()
    # The event loop the relay takes (server.event_loop: auto: uvloop where installed), so
    # that the two compare like for like; not imported from the relay, whose modules would
    # count in this process's memory.
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(args, Path(args.token_file).read_text().strip()))
