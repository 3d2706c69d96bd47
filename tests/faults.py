"""Fault injection at the spool's system calls, and a client that keeps score.

:class:`SpoolCalls` wraps the calls through which the spool changes (or reads) its files -
``os.open``, ``os.write``, ``os.fsync`` (files and directories), ``os.replace``,
``os.rename``, ``os.unlink`` and ``os.utime`` - and counts those on paths under one
directory. The k-th of them can fail with an errno (EIO, ENOSPC) or be a *crash*: from
that call on the process is dead, so that call and every later one under the directory
raise :class:`Crash` without touching the disk, and nothing more reaches a client
(:func:`kill` then stops what is left of the relay object). What the disk holds is then
exactly what a ``kill -9`` at that instant would have left, and a fresh
:class:`relay.app.Relay` on the same spool recovers from it.

:class:`Client` sends each message over SMTP as a legacy application would: a 4xx or a
connection that breaks before the reply means "send it again", a 5xx means "give up".
It remembers every transaction's reply and queue id, so that what the upstream received can
be checked against what the relay promised (:func:`check_accounting`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtplib.protocol import SMTPProtocol

from relay.app import Relay
from relay.receive.session import RelaySMTP
from relay.sandbox.exchange import ReceivedMessage
from relay.spool.records import State
from relay.spool.store import Spool

FAULTS = ("EIO", "ENOSPC", "crash")
CLIENT_TIMEOUT = 20.0
_ERRNO = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC}
# Ids and the unique suffixes of temporary names, so that two runs' traces compare equal.
_ID = re.compile(r"\b[0-9A-F]{12}\b")
_SUFFIX = re.compile(r"\.\d+\.\d+$")
_REPLY_ID = re.compile(r"(?:queued as|delivered as|id) ([0-9A-F]{12})")
_RECEIVED_ID = re.compile(rb"^Received:.*?\bid ([0-9A-F]{12})", re.MULTILINE | re.DOTALL)
_DSN_OF = re.compile(rb"^X-Relay-Queue-Id: ([0-9A-F]{12})", re.MULTILINE)
_DSN_RCPT = re.compile(rb"^Final-Recipient: rfc822; ?(\S+)", re.MULTILINE | re.IGNORECASE)


class Crash(BaseException):
    """The process dies here: no ``except Exception`` (or ``except OSError``) catches it."""


class SpoolCalls:
    """Counts (and breaks) the system calls on files under :attr:`root`; see the module
    docstring. Calls elsewhere (the stand-ins' files, the test's own) pass straight through.
    """

    CALLS = ("open", "write", "fsync", "replace", "rename", "unlink", "utime")
    # The queue saves its pacing windows now and then, on a timer: not part of a message's
    # life, and at no fixed step of it (tests/test_fault_injection.py tests it on its own).
    PACING = ("governor.json", "tmp/governor.json")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *,
                 exclude: tuple[str, ...] = PACING) -> None:
        self.exclude = exclude      # paths (relative to the root) neither counted nor failed
        self.root = ""
        self._real_root = ""
        self.trace: list[str] = []
        self.fault: str | None = None
        self.at: int | None = None
        self.fired: str | None = None
        self.fired_recording = False     # the faulted call was part of record_delivered
        self.dead = False
        self.crashed_at: float | None = None
        self.upstream_port = 0        # the relay's connections there are cut at the crash
        self._lock = threading.Lock()
        self._recording: int | None = None
        for name in self.CALLS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))
        real_record = Spool.record_delivered

        def record_delivered(spool: Spool, *args: Any, **kw: Any) -> None:
            self._recording = threading.get_ident()
            try:
                real_record(spool, *args, **kw)
            finally:
                self._recording = None

        monkeypatch.setattr(Spool, "record_delivered", record_delivered)
        real_push = RelaySMTP.push

        async def push(session: RelaySMTP, status: Any) -> None:
            if self.dead:           # a dead process answers nobody
                if session.transport is not None:
                    session.transport.abort()
                return
            await real_push(session, status)

        monkeypatch.setattr(RelaySMTP, "push", push)
        real_write = SMTPProtocol.write

        def write(protocol: SMTPProtocol, data: bytes) -> None:
            transport = protocol.transport
            if self.dead and transport is not None and \
                    (transport.get_extra_info("peername") or ("", 0))[1] == self.upstream_port:
                transport.abort()   # nor does it say another word to the upstream
                raise Crash("upstream write after the crash")
            real_write(protocol, data)

        monkeypatch.setattr(SMTPProtocol, "write", write)

    def arm(self, root: Path, fault: str | None = None, at: int | None = None) -> None:
        """Count calls under ``root`` from now on; the ``at``-th (from 0) gets ``fault``."""
        with self._lock:
            self.root = str(root)
            self._real_root = os.path.realpath(root)
            self.trace, self.fault, self.at = [], fault, at
            self.fired, self.fired_recording, self.dead = None, False, False
            self.crashed_at = None

    def disarm(self) -> None:
        """Stop counting, and bring the process back to life (the next start)."""
        with self._lock:
            self.root = self._real_root = ""
            self.at = None
            self.dead = False

    def _where(self, name: str, args: tuple[Any, ...]) -> str | None:
        """The call's path relative to the root, or None if it is not under the root."""
        if not self.root or not args:
            return None
        target = args[0]
        if name in ("write", "fsync"):
            if not isinstance(target, int):
                return None
            try:
                path = os.readlink(f"/proc/self/fd/{target}")
            except OSError:
                return None
            path = path.removesuffix(" (deleted)")
        elif isinstance(target, int):
            return None
        else:
            path = os.fspath(target)
            if isinstance(path, bytes):
                return None
        for root in (self.root, self._real_root):
            if path == root or path.startswith(root + os.sep):
                return os.path.relpath(path, root)
        return None

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kw: Any) -> Any:
            where = self._where(name, args)
            if where is not None:
                if self.dead:
                    raise Crash(f"{name} {where} after the crash")
                if not where.startswith(self.exclude):
                    self._step(name, _SUFFIX.sub(".N", _ID.sub("ID", where)), args)
            return real(*args, **kw)
        return call

    def _step(self, name: str, where: str, args: tuple[Any, ...]) -> None:
        with self._lock:
            if self.dead:
                raise Crash(f"{name} {where} after the crash")
            k = len(self.trace)
            self.trace.append(f"{name} {where}")
            if k != self.at or self.fault is None:
                return
            self.fired = f"#{k} {name} {where}"
            self.fired_recording = self._recording == threading.get_ident()
            if self.fault == "crash":
                self.dead, self.crashed_at = True, time.time()
                raise Crash(self.fired)
            code = _ERRNO[self.fault]
        raise OSError(code, os.strerror(code), str(args[0]))


def carry_token(old: Relay, new: Relay) -> None:
    """Give a restarted relay the token its predecessor had (still valid at the fake Entra
    ID), so that a restart costs milliseconds rather than a token request; the spool is
    what these tests are about."""
    for name in new.config.credentials:
        before, after = old.tokens.provider(name), new.tokens.provider(name)
        after._token, after._refresh_at = before._token, before._refresh_at


async def kill(relay: Relay) -> None:
    """What is left of a relay whose process died: stopped without another word to a
    client or another change on disk (every spool call raises :class:`Crash` now)."""
    for session in list(relay.receiver._sessions):
        if session.transport is not None:
            session.transport.abort()
    steps: list[Callable[[], Any]] = [
        lambda: relay.receiver.stop(), lambda: relay.queue.stop(0), relay.queue.spool.close,
        relay.deliverer.aclose, relay.tokens.aclose]
    for step in steps:
        with contextlib.suppress(Crash, Exception):
            await step()
    if relay.http is not None:
        with contextlib.suppress(Crash, Exception):
            await relay.http.stop()
    with contextlib.suppress(Crash, Exception):
        await relay.metrics.close()
    relay.spool.unclaim()           # the kernel releases a dead process's lock


# --- the client --------------------------------------------------------------------------------

@dataclass
class Transaction:
    """One attempt of the client to hand a message over, and what it was told."""

    tag: str
    code: int                 # 0: the connection broke before a reply
    text: str
    mid: str | None           # the relay's queue id, when the reply names it


@dataclass
class Client:
    """An application sending through the relay at ``address`` (see the module docstring)."""

    address: tuple[str, int]
    sender: str = "app@contoso.com"
    transactions: list[Transaction] = field(default_factory=list)

    async def send(self, tag: str, rcpts: list[str]) -> Transaction:
        host, port = self.address
        body = (f"From: {self.sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: {tag}\r\n\r\n"
                f"message {tag}\r\n").encode()
        try:
            async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False,
                                       timeout=CLIENT_TIMEOUT) as smtp:
                await smtp.mail(self.sender)
                for rcpt in rcpts:
                    await smtp.rcpt(rcpt)
                response = await smtp.data(body)
                code, text = response.code, response.message
        except aiosmtplib.SMTPResponseException as exc:
            code, text = exc.code, exc.message
        except (aiosmtplib.SMTPException, OSError):
            code, text = 0, "connection lost"
        m = _REPLY_ID.search(text)
        done = Transaction(tag, code, text, m.group(1) if m else None)
        self.transactions.append(done)
        return done

    def settled(self, tag: str) -> bool:
        """Whether the application is done with ``tag``: handed over (250) or refused (5xx)."""
        return any(t.tag == tag and (t.code == 250 or t.code >= 500)
                   for t in self.transactions)


# --- what the upstream received ----------------------------------------------------------------

@dataclass
class Upstream:
    """What the upstream accepted: deliveries per (queue id, recipient), and delivery
    reports per (id of the message reported on, recipient named)."""

    deliveries: Counter[tuple[str, str]] = field(default_factory=Counter)
    reports: Counter[tuple[str, str]] = field(default_factory=Counter)
    unknown: list[bytes] = field(default_factory=list)

    @property
    def ids(self) -> set[str]:
        return {mid for mid, _ in (*self.deliveries, *self.reports)}

    @classmethod
    def of(cls, messages: list[ReceivedMessage]) -> Upstream:
        seen = cls()
        for msg in messages:
            head = msg.data.split(b"\r\n\r\n", 1)[0]
            dsn = _DSN_OF.search(msg.data)
            if dsn is not None:
                for rcpt in _DSN_RCPT.findall(msg.data):
                    seen.reports[(dsn.group(1).decode(), rcpt.decode().lower())] += 1
                continue
            received = _RECEIVED_ID.search(head)
            if received is None:
                seen.unknown.append(head)
                continue
            for rcpt in msg.rcpt_tos:
                seen.deliveries[(received.group(1).decode(), rcpt.lower())] += 1
        return seen


def check_accounting(client: Client, upstream: Upstream, *, crashed: bool,
                     in_flight: set[str]) -> list[str]:
    """What the upstream got against what the client was told; the problems found.

    Nothing answered 4xx or 5xx is delivered or reported on; a message whose transaction
    broke before the reply may have been delivered (at most once per recipient), as SMTP
    allows. Nothing goes to a recipient twice, with two exceptions after a crash: the
    messages ``in_flight`` (their data had gone to the upstream, and the spool had not
    recorded its 250 when the crash came: the window the README names) may be delivered
    once more, and a delivery report may be repeated when the crash came after it was
    spooled and before the failure was recorded (the queue repeats a report rather than
    risk losing one). ``in_flight`` holds queue ids, and for reports the id of the message
    reported on.
    """
    problems: list[str] = []
    replied = {t.mid: t for t in client.transactions if t.mid is not None and t.code}
    rcpts_of: dict[str, list[str]] = {}
    for mid, rcpt in (*upstream.deliveries, *upstream.reports):
        rcpts_of.setdefault(mid, []).append(rcpt)
    if upstream.unknown:
        problems.append(f"upstream got mail the relay did not stamp: {upstream.unknown[:1]}")
    for mid, t in replied.items():
        if t.code != 250 and mid in rcpts_of:
            problems.append(f"{t.tag} {mid} was answered {t.code} but delivered or "
                            f"reported on: {sorted(rcpts_of[mid])}")
    unreplied = sum(1 for t in client.transactions if t.code == 0)
    stray = {mid for mid in rcpts_of if mid not in replied}
    if len(stray) > unreplied:
        problems.append(f"{len(stray)} message(s) delivered that no client was told "
                        f"about, but only {unreplied} transaction(s) went unanswered")
    for what, seen, again in (("delivered", upstream.deliveries, 0),
                              ("reported", upstream.reports, int(crashed))):
        for (mid, rcpt), n in seen.items():
            if n > 1 + again + (mid in in_flight):
                problems.append(f"{mid} {what} to {rcpt} {n} times")
    return problems


def expected_for(client: Client, rcpts: dict[str, list[str]], upstream: Upstream,
                 deliverable: Callable[[str], bool]) -> list[str]:
    """Every 250 accounted for: each recipient delivered, or reported on."""
    problems = []
    for t in client.transactions:
        if t.code != 250:
            continue
        if t.mid is None:
            problems.append(f"{t.tag}: a 250 without a queue id: {t.text}")
            continue
        for rcpt in rcpts[t.tag]:
            seen = (upstream.deliveries if deliverable(rcpt) else upstream.reports)[
                (t.mid, rcpt)]
            if seen == 0:
                what = "delivered" if deliverable(rcpt) else "reported in a DSN"
                problems.append(f"{t.tag} {t.mid} answered 250 but never {what} to {rcpt}")
    return problems


def spool_leftovers(root: Path, *, running: bool = False) -> list[str]:
    """Files that must not be in a settled spool: anything in tmp/, corrupt/, active/,
    incoming/, deferred/ or hold/, and data that no failed/ message owns. ``running``:
    the relay runs, and may be saving its pacing windows (through tmp/) just now."""
    out = []
    for name in ("tmp", "corrupt", State.ACTIVE, State.INCOMING, State.DEFERRED, State.HOLD):
        out += [f"{name}/{p.name}" for p in sorted((root / name).iterdir())
                if not (running and name == "tmp" and p.name.startswith("governor.json."))]
    kept = {p.name.removesuffix(".json") for p in (root / State.FAILED).iterdir()}
    out += [f"data/{p.name}" for p in sorted((root / "data").iterdir())
            if p.name.removesuffix(".eml") not in kept]
    return out
