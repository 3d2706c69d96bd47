"""Soak: thousands of messages through the relay process while everything around it fails.

    make soak
    .venv/bin/python bench/soak.py [--messages 3000] [--clients 8] [--kills 5]
                                   [--max-time 240] [--disk auto|tmpfs|inject|none] [--seed N]

The relay runs as its own process (``python -m relay run``) against the fake Entra ID and
Exchange Online of tests/relayproc.py, on loopback only. Client threads play applications
(a 4xx or a lost connection: send again; a 5xx: give up), and one recipient in ten is
refused for good, so a DSN goes back to the sender. Meanwhile a chaos thread takes turns at:

* upstream faults: 4xx replies at connect, MAIL, RCPT and DATA, connections dropped at
  every stage, every session cut at once;
* Entra faults: the signing key rolled over (the upstream refuses every token the relay
  has) while the token endpoint answers 500;
* a full disk: the spool is on a small tmpfs (as root) that is filled up for a moment,
  or else ENOSPC is injected into the relay's spool writes (``--disk inject``);
* ``kill -9`` of the relay and a restart, in the first 60 % of the run only, so that the last
  process carries enough load for its memory and file descriptors to be compared.

At the end (faults off, deferred mail flushed) every message that got a 250 must be
accounted for: delivered to each of its recipients, or named in a DSN; nothing answered
4xx may be delivered; a message may be delivered twice only because of a kill (at most
max_sessions per kill: the README's window); the spool is empty; and the last relay
process's RSS and open descriptors are back near their level after warm-up. Figures are
printed; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.sandbox.exchange import FakeExchange, ReceivedMessage
from tests.relayproc import Harness, RelayProcess, make_message, wait_for

NOBODY = "nobody@example.com"          # refused for good: the message is reported in a DSN
MAX_SESSIONS = 3
TMPFS_SIZE = "48m"
QUEUE_ID = re.compile(r"(?:queued as|id) ([0-9A-F]{12})")
RECEIVED_ID = re.compile(rb"^Received:.*?\bid ([0-9A-F]{12})", re.MULTILINE | re.DOTALL)
DSN_OF = re.compile(rb"^X-Relay-Queue-Id: ([0-9A-F]{12})", re.MULTILINE)
UNRECORDED = re.compile(r"\[([0-9A-F]{12})\] cannot record the delivery at once")
DSN_RCPT = re.compile(rb"^Final-Recipient: rfc822; ?(\S+)", re.MULTILINE | re.IGNORECASE)
# Loaded by the relay process (through PYTHONPATH) for --disk inject: while the flag file
# exists, every write to a file under the spool fails as on a full disk.
SITECUSTOMIZE = textwrap.dedent('''
    import errno, os
    _flag, _spool = os.environ.get("SOAK_DISK_FULL"), os.environ.get("SOAK_SPOOL")
    if _flag and _spool:
        _write = os.write
        def write(fd, data):
            if os.path.exists(_flag):
                try:
                    path = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    path = ""
                if path.startswith(_spool + "/"):
                    raise OSError(errno.ENOSPC, "No space left on device")
            return _write(fd, data)
        os.write = write
''')


# --- the applications ---------------------------------------------------------------------

@dataclass
class Tx:
    """One attempt to hand a message over, and the reply (0: the connection broke before
    it, -1: no connection at all)."""

    tag: str
    code: int
    qid: str | None
    text: str = ""


@dataclass
class Apps:
    """Client threads sending ``total`` numbered messages to 127.0.0.1:``port``."""

    port: int
    total: int
    rng: random.Random
    rcpts: dict[str, list[str]] = field(default_factory=dict)
    txs: list[Tx] = field(default_factory=list)
    acked: dict[str, str] = field(default_factory=dict)     # tag -> queue id of the 250
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    go: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    _next: int = 0

    def plan(self) -> None:
        for i in range(self.total):
            roll = self.rng.random()
            ok = f"app{i % 7}-{i}@example.com"
            self.rcpts[f"soak-{i}"] = ([ok, NOBODY] if roll < 0.05 else [NOBODY] if roll < 0.1
                                       else [ok])

    def _take(self) -> str | None:
        with self.lock:
            if self._next >= self.total:
                return None
            self._next += 1
            return f"soak-{self._next - 1}"

    def worker(self) -> None:
        while not self.stop.is_set():
            self.go.wait()
            tag = self._take()
            if tag is None:
                return
            while not self.stop.is_set():
                tx = self._send(tag)
                with self.lock:
                    self.txs.append(tx)
                    if tx.code == 250 and tx.qid:
                        self.acked[tag] = tx.qid
                    elif tx.code >= 500:
                        self.refused.append(f"{tag}: {tx.code} {tx.text}")
                if tx.code == 250 or tx.code >= 500:
                    break
                time.sleep(0.2)          # 4xx or no reply: the application tries again

    def _send(self, tag: str) -> Tx:
        rcpts = self.rcpts[tag]
        try:
            with smtplib.SMTP("127.0.0.1", self.port, local_hostname="app.test",
                              timeout=30) as client:
                client.ehlo()
                code, text = client.mail("app@contoso.com")
                for rcpt in rcpts:
                    if code == 250:
                        code, text = client.rcpt(rcpt)
                if code == 250:
                    body = f"soak message {tag}\r\n" * self.rng.randint(1, 200)
                    code, text = client.data(make_message(tag, to=rcpts, body=body))
        except smtplib.SMTPResponseException as exc:   # a reply, and not a 250
            code, text = exc.smtp_code, exc.smtp_error
        except ConnectionRefusedError:
            return Tx(tag, -1, None)      # the relay is down (killed, restarting)
        except (OSError, smtplib.SMTPException):
            return Tx(tag, 0, None)
        reply = text.decode(errors="replace")
        m = QUEUE_ID.search(reply)
        return Tx(tag, code, m.group(1) if m else None, reply)

    @property
    def done(self) -> int:
        with self.lock:
            return len(self.acked) + len(self.refused)


# --- the disk ------------------------------------------------------------------------------

class Disk:
    """Where the spool lives, and how it is made full for a moment."""

    def __init__(self, mode: str, work: Path) -> None:
        self.work = work
        self.mount: Path | None = None
        self.flag = work / "disk-full"
        self.mode = mode
        if mode in ("auto", "tmpfs"):
            mount = work / "tmpfs"
            mount.mkdir()
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755",
                                   "tmpfs", str(mount)], capture_output=True, check=False)
            if done.returncode == 0:
                self.mount, self.mode = mount, "tmpfs"
            elif mode == "tmpfs":
                raise SystemExit(f"cannot mount a tmpfs (run as root): {done.stderr.decode()}")
            else:
                self.mode = "inject"
        self.spool = (self.mount or work) / "spool"
        if self.mode == "inject":
            site = work / "site"
            site.mkdir()
            (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
            os.environ["SOAK_DISK_FULL"] = str(self.flag)
            os.environ["SOAK_SPOOL"] = str(self.spool.resolve())

    def full(self, seconds: float) -> None:
        if self.mode == "tmpfs":
            assert self.mount is not None
            ballast = self.mount / "ballast"
            fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for size in (1 << 20, 1 << 12):
                    with contextlib.suppress(OSError):
                        while True:
                            os.write(fd, b"\0" * size)
            finally:
                os.close(fd)
            time.sleep(seconds)
            ballast.unlink()
        elif self.mode == "inject":
            self.flag.touch()
            time.sleep(seconds)
            self.flag.unlink()

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.flag.unlink()
        if self.mount is not None:
            subprocess.run(["umount", "-l", str(self.mount)], check=False)


# --- chaos -----------------------------------------------------------------------------------

@dataclass
class Chaos:
    """Takes turns at breaking the upstream, Entra ID and the disk (the main loop kills)."""

    h: Harness
    disk: Disk
    rng: random.Random
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    active: threading.Event = field(default_factory=threading.Event)
    busy: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        self.active.set()
        while not self.stop.wait(self.rng.uniform(0.05, 0.5)):
            self.active.wait()
            with self.busy:
                if self.active.is_set() and not self.stop.is_set():
                    self.one()

    def pause(self) -> None:
        """No new fault from now on, and the one under way (a full disk) is over."""
        self.active.clear()
        with self.busy:
            pass

    def one(self) -> None:
        kind = self.rng.choices(["upstream", "entra", "disk"], [6, 1, 2])[0]
        if kind == "upstream":
            self.upstream()
        elif kind == "entra":
            self.entra()
        elif self.disk.mode != "none":
            self.counts["disk full"] += 1
            self.disk.full(self.rng.uniform(0.2, 1.5))

    def upstream(self) -> None:
        fake = self.h.exchange.current
        assert fake is not None
        for _ in range(self.rng.randint(1, 4)):
            roll = self.rng.random()
            if roll < 0.4:
                stage = self.rng.choice(["connect", "mail", "rcpt", "data"])
                code, text = self.rng.choice([
                    (451, "4.3.0 Temporary server error. Please try again later"),
                    (421, "4.3.2 Service not available, closing transmission channel"),
                    (452, "4.3.1 Insufficient system resources")])
                self.h.exchange.later(fake.fail_next, stage, code, text)
                self.counts[f"upstream {code}"] += 1
            elif roll < 0.45:
                # A refusal for good of whatever message comes next (a DSN too: that one
                # is kept in failed/, never reported on in turn).
                stage, code, text = self.rng.choice([
                    ("mail", 550, "5.1.8 Sender address rejected"),
                    ("rcpt", 550, "5.1.1 RESOLVER.ADR.RecipNotFound; not found"),
                    ("data", 554, "5.6.0 Message content rejected")])
                self.h.exchange.later(fake.fail_next, stage, code, text)
                self.counts[f"upstream {code}"] += 1
            elif roll < 0.9:
                stage = self.rng.choice(["connect", "ehlo", "auth", "mail", "rcpt", "data"])
                self.h.exchange.later(fake.drop_next, stage)
                self.counts["upstream drop"] += 1
            else:
                self.h.exchange.later(lambda f=fake: asyncio_task(f.disconnect_all()))
                self.counts["upstream cut all"] += 1

    def entra(self) -> None:
        entra = self.h.fakes.entra
        entra.fail_next(500, count=self.rng.randint(1, 3), retry_after=0)
        entra.revoke_all()
        self.counts["entra outage"] += 1


_RUNNING: set[asyncio.Future[None]] = set()


def asyncio_task(coro: Coroutine[object, object, None]) -> None:
    """Start ``coro`` on the running loop (the fakes' loop, from ExchangeThread.later)."""
    task = asyncio.ensure_future(coro)
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)


def permanent_refusal(fake: FakeExchange) -> None:
    fake.fail_next("rcpt", 550, "5.1.1 RESOLVER.ADR.RecipNotFound; not found", count=10**9,
                   recipient=NOBODY)


def only_permanent(fake: FakeExchange) -> None:
    fake._faults[:] = [f for f in fake._faults if f.recipient == NOBODY]


# --- the relay process ----------------------------------------------------------------------

def rss_and_fds(pid: int) -> tuple[float, int]:
    """Resident memory (MiB) and open file descriptors of ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert m is not None
    return int(m.group(1)) / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def spool_busy(spool: Path) -> list[str]:
    return [f"{s}/{p.name}" for s in ("incoming", "active", "deferred")
            for p in (spool / s).iterdir()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(h: Harness) -> RelayProcess:
    """Start the relay, again if it could not start (its disk was full just then)."""
    for _ in range(10):
        try:
            return h.start(timeout=30)
        except AssertionError:
            time.sleep(1)
    raise SystemExit("the relay does not start; see its log above")


# --- accounting --------------------------------------------------------------------------------

@dataclass
class Seen:
    deliveries: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    reports: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    tags: dict[str, set[str]] = field(default_factory=lambda: collections.defaultdict(set))

    @classmethod
    def of(cls, messages: list[ReceivedMessage]) -> Seen:
        seen = cls()
        for msg in messages:
            dsn = DSN_OF.search(msg.data)
            if dsn is not None:
                for rcpt in DSN_RCPT.findall(msg.data):
                    seen.reports[(dsn.group(1).decode(), rcpt.decode().lower())] += 1
                continue
            head = msg.data.split(b"\r\n\r\n", 1)[0]
            m = RECEIVED_ID.search(head)
            tag = re.search(rb"^Subject: (\S+)", head, re.MULTILINE)
            if m is None or tag is None:
                continue
            qid = m.group(1).decode()
            seen.tags[tag.group(1).decode()].add(qid)
            for rcpt in msg.rcpt_tos:
                seen.deliveries[(qid, rcpt.lower())] += 1
        return seen


def account(apps: Apps, seen: Seen, unrecorded: frozenset[str] | set[str] = frozenset(),
            kept: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset()
            ) -> dict[str, int]:
    """The figures. A recipient of an acknowledged message is accounted for if it was
    delivered, or named in a DSN the upstream took or (refused in turn) ``kept`` in failed/.
    ``unrecorded``: queue ids whose partial delivery the relay could not write down at once
    (the disk was full), which a kill may then repeat."""
    delivered = bounced = lost = 0
    for tag, qid in apps.acked.items():
        reported = [(qid, r.lower()) in seen.reports or (qid, r.lower()) in kept
                    for r in apps.rcpts[tag]]
        fine = all(ok or seen.deliveries[(qid, r.lower())]
                   for r, ok in zip(apps.rcpts[tag], reported, strict=True))
        lost += not fine
        delivered += fine and not any(reported)
        bounced += fine and any(reported)
    told_4xx = {tx.qid for tx in apps.txs if 400 <= tx.code < 500 and tx.qid}
    return {
        "acknowledged": len(apps.acked), "delivered": delivered, "bounced": bounced,
        "lost": lost,
        "delivered although answered 4xx": sum(
            1 for qid, _ in (*seen.deliveries, *seen.reports) if qid in told_4xx),
        "duplicates": sum(n - 1 for (qid, _), n in seen.deliveries.items()
                          if n > 1 and qid not in unrecorded),
        "duplicates of a partial delivery a full disk kept from being recorded": sum(
            n - 1 for (qid, _), n in seen.deliveries.items() if n > 1 and qid in unrecorded),
        "repeated reports": sum(n - 1 for n in seen.reports.values() if n > 1),
        "sent again by the client after no reply, both copies delivered": sum(
            1 for qids in seen.tags.values() if len(qids) > 1),
    }


# --- the run -----------------------------------------------------------------------------------

def main(ns: argparse.Namespace) -> int:
    rng = random.Random(ns.seed)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="relay-soak-"))
    disk = Disk(ns.disk, work)
    port = free_port()
    h = Harness(work / "h", {
        "server": {"listeners": [{"address": "127.0.0.1", "port": port}],
                   "max_connections": 100, "max_connections_per_client": 100},
        "spool": {"directory": str(disk.spool), "on_tmpfs": "warn"},
        "delivery": {"retry_initial": "0.5s", "retry_max": "2s", "shutdown_timeout": "5s",
                     "mailbox_limits": {"max_sessions": MAX_SESSIONS,
                                        "messages_per_minute": 100_000,
                                        "recipients_per_day": 10**7,
                                        "throttle_cooldown": "2s"}}})
    problems: list[str] = []
    apps = Apps(port, ns.messages, rng)
    chaos = Chaos(h, disk, rng)
    threads: list[threading.Thread] = []
    try:
        assert h.exchange.current is not None
        h.exchange.later(permanent_refusal, h.exchange.current)
        apps.plan()
        proc = start(h)
        fresh = rss_and_fds(proc.pid)
        threads = [threading.Thread(target=apps.worker, daemon=True) for _ in range(ns.clients)]
        for t in threads:
            t.start()
        apps.go.set()
        chaos_thread = threading.Thread(target=chaos.run, daemon=True)
        chaos_thread.start()
        kill_at = [int(ns.messages * 0.6 * (i + 1) / (ns.kills + 1)) for i in range(ns.kills)]
        baseline: tuple[float, int] | None = None
        warm = int(ns.messages * 0.6) + min(200, ns.messages // 10)
        deadline = started + ns.max_time
        while apps.done < ns.messages and time.monotonic() < deadline:
            time.sleep(0.05)
            if kill_at and apps.done >= kill_at[0]:
                kill_at.pop(0)
                proc.kill()
                chaos.counts["kill -9"] += 1
                proc = start(h)
                fresh = rss_and_fds(proc.pid)
            elif baseline is None and not kill_at and apps.done >= warm:
                baseline = measure_idle(proc, apps, chaos, disk.spool)
        if apps.done < ns.messages:
            problems.append(f"only {apps.done} of {ns.messages} messages handed over within "
                            f"--max-time {ns.max_time} s")
        apps.stop.set()
        apps.go.set()
        chaos.stop.set()
        chaos.active.set()
        chaos_thread.join(10)
        for t in threads:
            t.join(35)
        # The faults end; whatever is deferred is retried now.
        h.exchange.later(only_permanent, h.exchange.current)
        h.fakes.entra.clear_failures()
        settle_until = time.monotonic() + 120
        while (spool_busy(disk.spool) or not delivered_all(apps, h, disk.spool)) \
                and time.monotonic() < settle_until:
            proc.usr1()
            time.sleep(1)
        if spool_busy(disk.spool):
            problems.append(f"the queue did not empty: {spool_busy(disk.spool)[:5]}")
        time.sleep(1)
        after = rss_and_fds(proc.pid)
        if baseline is None:
            problems.append("no baseline: the run ended before the last process warmed up")
            baseline = after
        unrecorded = {m.group(1) for p in h.processes for m in UNRECORDED.finditer(p.log)}
        figures = account(apps, Seen.of(h.exchange.messages), unrecorded,
                          kept_reports(disk.spool))
        problems += check(apps, figures, chaos, baseline, after, disk.spool, proc)
        proc.terminate()
        if proc.wait(30) != 0:
            problems.append("the relay did not stop cleanly on SIGTERM")
        report(ns, apps, figures, chaos, disk, (fresh, baseline, after),
               time.monotonic() - started)
    finally:
        apps.stop.set()
        apps.go.set()
        chaos.stop.set()
        for i, proc in enumerate(h.processes):
            proc.close()
            if ns.keep:
                (work / f"relay-{i}.log").write_text(proc.log)
        h.fakes.close()
        disk.close()
        if ns.keep:
            dump(work, apps, Seen.of(h.exchange.messages))
            print(f"kept {work} (relay-N.log: each process's log; outcome.txt)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for problem in problems:
        print(f"FAILED: {problem}")
    print("soak: OK" if not problems else f"soak: {len(problems)} problem(s)")
    return 1 if problems else 0


def dump(work: Path, apps: Apps, seen: Seen) -> None:
    """What each transaction was told, and what went twice, for a look after the run."""
    lines = [f"{tx.tag} {tx.code} {tx.qid} {tx.text}" for tx in apps.txs]
    lines += [f"twice: {qid} to {rcpt} {n} times" for (qid, rcpt), n in
              (*seen.deliveries.items(), *seen.reports.items()) if n > 1]
    (work / "outcome.txt").write_text("\n".join(lines) + "\n")


def delivered_all(apps: Apps, h: Harness, spool: Path) -> bool:
    figures = account(apps, Seen.of(h.exchange.messages), kept=kept_reports(spool))
    return figures["lost"] == 0


def kept_reports(spool: Path) -> set[tuple[str, str]]:
    """(queue id, recipient) named in DSNs that the upstream refused, kept in failed/."""
    kept = set()
    for meta in (spool / "failed").iterdir():
        with contextlib.suppress(FileNotFoundError):
            data = (spool / "data" / f"{meta.stem}.eml").read_bytes()
            dsn = DSN_OF.search(data)
            if dsn is not None:
                kept |= {(dsn.group(1).decode(), r.decode().lower())
                         for r in DSN_RCPT.findall(data)}
    return kept


def measure_idle(proc: RelayProcess, apps: Apps, chaos: Chaos, spool: Path
                 ) -> tuple[float, int]:
    """RSS and descriptors of the warmed-up relay with nothing to do (clients and faults
    paused, queue empty), as they are measured again at the end."""
    apps.go.clear()
    chaos.pause()
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not spool_busy(spool), 60, "an empty queue", interval=0.2)
    time.sleep(1)
    measured = rss_and_fds(proc.pid)
    chaos.active.set()
    apps.go.set()
    return measured


def check(apps: Apps, figures: dict[str, int], chaos: Chaos, before: tuple[float, int],
          after: tuple[float, int], spool: Path, proc: RelayProcess) -> list[str]:
    problems = []
    if apps.refused:
        problems.append(f"{len(apps.refused)} message(s) refused with 5xx, e.g. "
                        f"{apps.refused[:3]}")
    if figures["lost"]:
        problems.append(f"{figures['lost']} acknowledged message(s) neither delivered nor "
                        "reported")
    if figures["delivered although answered 4xx"]:
        problems.append("messages answered 4xx were delivered")
    if figures["duplicates"] > chaos.counts["kill -9"] * MAX_SESSIONS:
        problems.append(f"{figures['duplicates']} duplicates from {chaos.counts['kill -9']} "
                        f"kills: more than {MAX_SESSIONS} per kill")
    leftovers = [f"tmp/{p.name}" for p in (spool / "tmp").iterdir()] + [
        f"corrupt/{p.name}" for p in (spool / "corrupt").iterdir()]
    if leftovers:
        problems.append(f"left in the spool: {leftovers[:5]}")
    rss_before, fds_before = before
    rss_after, fds_after = after
    if rss_after > rss_before * 1.25 + 16:
        problems.append(f"RSS grew from {rss_before:.0f} to {rss_after:.0f} MiB")
    if fds_after > fds_before + MAX_SESSIONS + 2:
        problems.append(f"open descriptors grew from {fds_before} to {fds_after}")
    if not proc.alive:
        problems.append("the relay died")
    return problems


def report(ns: argparse.Namespace, apps: Apps, figures: dict[str, int], chaos: Chaos,
           disk: Disk, levels: tuple[tuple[float, int], ...], elapsed: float) -> None:
    """``levels``: RSS and fds of the last relay process when it started, after its warm-up
    and at the end."""
    fresh, before, after = levels
    replies = collections.Counter(
        "250" if tx.code == 250 else "without a reply" if tx.code == 0
        else "connection refused" if tx.code < 0 else f"{tx.code // 100}xx"
        for tx in apps.txs)
    print(f"messages            {ns.messages} from {ns.clients} clients "
          f"({sum(NOBODY in r for r in apps.rcpts.values())} with a recipient refused "
          "for good)")
    print(f"transactions        {len(apps.txs)}: " + ", ".join(
        f"{n} {k}" for k, n in sorted(replies.items())))
    for key, value in figures.items():
        print(f"{key:<20}{value}" if len(key) < 20 else f"{key}: {value}")
    print(f"kills               {chaos.counts['kill -9']}")
    print("faults              " + ", ".join(
        f"{n} {k}" for k, n in sorted(chaos.counts.items()) if k != "kill -9")
          + f" (disk: {disk.mode})")
    print(f"relay RSS           {fresh[0]:.1f} MiB at start, {before[0]:.1f} MiB after "
          f"warm-up, {after[0]:.1f} MiB at the end (last process)")
    print(f"relay open fds      {fresh[1]} at start, {before[1]} after warm-up, {after[1]} at "
          "the end")
    print(f"elapsed             {elapsed:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--max-time", type=float, default=240.0,
                        help="seconds of sending at most (then the run settles and checks)")
    parser.add_argument("--disk", choices=["auto", "tmpfs", "inject", "none"], default="auto",
                        help="how the disk becomes full: a small tmpfs (root), ENOSPC "
                             "injected into the relay's spool writes, or not at all")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory: the relay's logs, every reply")
    ns = parser.parse_args()
    if ns.seed is None:
        ns.seed = random.randrange(1 << 30)
    print(f"seed {ns.seed}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main(ns))
