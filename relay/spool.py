"""The spool: accepted messages on disk, in directories named for their state.

Once the relay answers 250 the message is the relay's responsibility, so it must be on
disk, durably, before that answer. The layout follows Postfix: a queue is a directory,
and an operator can see (and repair) what is where with ``ls``::

    tmp/        being written; never acknowledged, discarded on start
    data/       <id>.eml: the message bytes, written once, never changed
    incoming/   <id>.json: accepted, waiting for the first delivery attempt
    active/     <id>.json: a delivery attempt is in progress
    deferred/   <id>.json: waiting; the file's modification time is the next attempt
    hold/       <id>.json: put on hold by the operator
    failed/     <id>.json: dead letters (bounced or expired), kept for inspection
    corrupt/    files the relay could not read, moved aside instead of deleted

A message's state is the directory its metadata file is in; moving between states is one
atomic rename. As in Postfix, a deferred file's modification time is its due time, so the
queue manager finds due messages by listing the directory, without opening files or
keeping the queue in memory, and every file is found by its id alone.

Durability: data and metadata are written to ``tmp/``, fsynced, renamed into place, and
the directories are fsynced before :meth:`Spool.accept` returns. Directory fsyncs of
concurrent arrivals are shared (group commit), so durability does not cap throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class State(enum.StrEnum):
    INCOMING = "incoming"
    ACTIVE = "active"
    DEFERRED = "deferred"
    HOLD = "hold"
    FAILED = "failed"


_DIRS = ("tmp", "data", "corrupt", *(s.value for s in State))


@dataclass
class Entry:
    """Everything the relay knows about one spooled message except its bytes."""

    id: str
    profile: str
    mail_from: str
    rcpt_tos: list[str]
    size: int
    received_at: float
    mail_options: list[str] = field(default_factory=list)
    client: str = ""
    user: str | None = None
    return_path: str | None = None
    mailbox: str | None = None
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str | None = None
    delivered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Entry:
        return cls(**json.loads(raw))


class SpoolError(Exception):
    """The spool cannot be used (not writable, on tmpfs when that is refused, ...)."""


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/self/mountinfo; '' if unknown)."""
    target = str(path.resolve())
    best, fstype = "", ""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        left, _, right = line.partition(" - ")
        parts = left.split()
        if len(parts) < 5 or not right:
            continue
        mount = parts[4].replace("\\040", " ")
        prefix = mount.rstrip("/") + "/"
        if (target == mount or target.startswith(prefix)) and len(mount) >= len(best):
            best, fstype = mount, right.split()[0]
    return fstype


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A spool directory; see the module docstring for its layout and guarantees."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._commit_waiters: list[asyncio.Future[None]] = []
        self._commit_wakeup: asyncio.Event | None = None
        self._committer: asyncio.Task[None] | None = None

    # --- set-up ---------------------------------------------------------------------------

    def open(self, *, on_tmpfs: str = "refuse") -> None:
        """Create the directories and check the spool can keep its promise."""
        try:
            for name in _DIRS:
                (self.root / name).mkdir(parents=True, exist_ok=True, mode=0o750)
            probe = self.root / "tmp" / f".probe-{os.getpid()}"
            _write_synced(probe, b"ok")
            probe.unlink()
        except OSError as exc:
            raise SpoolError(f"spool directory {self.root} is not usable: "
                             f"{exc.strerror or exc}") from None
        fstype = filesystem_type(self.root)
        if fstype in ("tmpfs", "ramfs"):
            text = (f"spool directory {self.root} is on {fstype}: queued mail would be lost "
                    "on reboot (use a persistent disk, StateDirectory= or a volume)")
            if on_tmpfs == "refuse":
                raise SpoolError(text + "; set spool.on_tmpfs: warn to accept the risk")
            log.warning("%s", text)

    def recover(self) -> dict[str, int]:
        """Bring the spool back to a consistent state after a stop or a crash.

        Files in tmp/ were never acknowledged and go; messages that were being delivered go
        back to incoming/ (a crash between the upstream's 250 and the spool update is the
        only case where a message is delivered twice); message data without metadata in any
        state was never acknowledged either and goes.
        """
        report = {"discarded": 0, "requeued": 0, "orphans": 0, "corrupt": 0}
        with os.scandir(self.root / "tmp") as it:
            for item in it:
                os.unlink(item.path)
                report["discarded"] += 1
        with os.scandir(self.root / State.ACTIVE) as it:
            for item in it:
                os.replace(item.path, self.root / State.INCOMING / item.name)
                report["requeued"] += 1
        for state in State:
            with os.scandir(self.root / state) as it:
                for item in it:
                    mid = self.id_from_name(item.name)
                    if mid is None or not self.data_path(mid).exists():
                        os.replace(item.path, self.root / "corrupt" / item.name)
                        report["corrupt"] += 1
                        log.error("spool: %s/%s has no message data; moved to corrupt/",
                                  state, item.name)
        with os.scandir(self.root / "data") as it:
            for item in it:
                mid = item.name[:-4] if item.name.endswith(".eml") else None
                if mid is not None and self.locate(mid) is None:
                    os.unlink(item.path)
                    report["orphans"] += 1
        for name in ("data", "corrupt", *State):
            _fsync_dir(self.root / name)
        return report

    # --- naming -------------------------------------------------------------------------

    @staticmethod
    def id_from_name(name: str) -> str | None:
        return name[:-5] or None if name.endswith(".json") else None

    def _meta_path(self, state: State, mid: str) -> Path:
        return self.root / state / f"{mid}.json"

    def data_path(self, mid: str) -> Path:
        return self.root / "data" / f"{mid}.eml"

    # --- accepting -------------------------------------------------------------------------

    def _store(self, entry: Entry, data: bytes, state: State) -> None:
        tmp = self.root / "tmp"
        _write_synced(tmp / f"{entry.id}.eml", data)
        _write_synced(tmp / f"{entry.id}.json", entry.to_json())
        os.replace(tmp / f"{entry.id}.eml", self.data_path(entry.id))
        if state is State.DEFERRED:
            os.utime(tmp / f"{entry.id}.json", (entry.next_attempt, entry.next_attempt))
        os.replace(tmp / f"{entry.id}.json", self._meta_path(state, entry.id))

    async def accept(self, entry: Entry, data: bytes, state: State = State.INCOMING) -> None:
        """Store a new message; returns only once it would survive a crash or power loss."""
        await asyncio.to_thread(self._store, entry, data, state)
        await self._group_commit()

    async def _group_commit(self) -> None:
        loop = asyncio.get_running_loop()
        if self._committer is None or self._committer.done():
            self._commit_wakeup = asyncio.Event()
            self._committer = loop.create_task(self._commit_loop())
        waiter: asyncio.Future[None] = loop.create_future()
        self._commit_waiters.append(waiter)
        assert self._commit_wakeup is not None
        self._commit_wakeup.set()
        await waiter

    async def _commit_loop(self) -> None:
        assert self._commit_wakeup is not None
        while True:
            await self._commit_wakeup.wait()
            self._commit_wakeup.clear()
            batch, self._commit_waiters = self._commit_waiters, []
            if not batch:
                continue
            try:
                await asyncio.to_thread(self._sync_dirs)
            except OSError as exc:
                for w in batch:
                    if not w.done():
                        w.set_exception(exc)
                continue
            for w in batch:
                if not w.done():
                    w.set_result(None)

    def _sync_dirs(self) -> None:
        for name in ("data", *State):
            _fsync_dir(self.root / name)

    async def close(self) -> None:
        if self._committer is not None:
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
            self._committer = None

    # --- state changes -----------------------------------------------------------------------

    def read(self, state: State, name: str) -> Entry:
        path = self.root / state / name
        entry = Entry.from_json(path.read_bytes())
        if state is State.DEFERRED:
            entry.next_attempt = path.stat().st_mtime   # the file's time is the truth
        return entry

    def read_data(self, mid: str) -> bytes:
        return self.data_path(mid).read_bytes()

    def move(self, entry: Entry, src: State, dst: State, *, rewrite: bool = True) -> None:
        """Move ``entry`` from ``src`` to ``dst``, saving its (changed) metadata atomically.

        The state changes with one rename of the existing file, then the new content
        replaces it, so there is never more than one metadata file per message. A crash
        between the two leaves the right state with the previous content, which at worst
        repeats a delivery that had just succeeded. Raises FileNotFoundError, changing
        nothing, when the message is no longer in ``src`` (an operator moved it first).
        """
        old = self._meta_path(src, entry.id)
        new = self._meta_path(dst, entry.id)
        tmp = None
        if rewrite:
            tmp = self.root / "tmp" / f"{entry.id}.json.{time.monotonic_ns()}"
            _write_synced(tmp, entry.to_json())
            if dst is State.DEFERRED:
                os.utime(tmp, (entry.next_attempt, entry.next_attempt))
        try:
            if old != new:
                os.replace(old, new)
            elif not old.exists():
                raise FileNotFoundError(f"{entry.id} is no longer in {src}")
        except FileNotFoundError:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise
        if tmp is not None:
            os.replace(tmp, new)
        elif dst is State.DEFERRED:
            os.utime(new, (entry.next_attempt, entry.next_attempt))
        _fsync_dir(new.parent)
        if old.parent != new.parent:
            _fsync_dir(old.parent)

    def set_due(self, mid: str, when: float) -> None:
        """Change when a deferred message is due (FileNotFoundError if it is not deferred)."""
        os.utime(self._meta_path(State.DEFERRED, mid), (when, when))

    def remove(self, entry_id: str, state: State) -> None:
        """Forget a message that is finished (delivered), data and metadata."""
        self._meta_path(state, entry_id).unlink(missing_ok=True)
        self.data_path(entry_id).unlink(missing_ok=True)
        _fsync_dir(self.root / state)

    def locate(self, mid: str) -> tuple[State, Path] | None:
        for state in State:
            path = self._meta_path(state, mid)
            if path.exists():
                return state, path
        return None

    # --- scanning ---------------------------------------------------------------------------

    def names(self, state: State) -> Iterator[str]:
        """Metadata file names in ``state``, streamed (no list of the whole queue in memory)."""
        with os.scandir(self.root / state) as it:
            for item in it:
                if item.name.endswith(".json"):
                    yield item.name

    def due(self, now: float, limit: int) -> tuple[list[str], float]:
        """Up to ``limit`` deferred names whose due time has come, earliest first, and the
        due time of the earliest message that is not due yet (``inf`` if none)."""
        out: list[tuple[float, str]] = []
        upcoming = float("inf")
        with os.scandir(self.root / State.DEFERRED) as it:
            for item in it:
                if not item.name.endswith(".json"):
                    continue
                try:
                    when = item.stat().st_mtime
                except FileNotFoundError:
                    continue        # picked up meanwhile
                if when <= now:
                    out.append((when, item.name))
                    if len(out) >= max(limit, 1) * 4:
                        out.sort()
                        del out[limit:]
                else:
                    upcoming = min(upcoming, when)
        out.sort()
        return [name for _, name in out[:limit]], upcoming

    def flush_deferred(self, now: float) -> int:
        """Make every deferred message due at ``now``; returns how many were changed."""
        count = 0
        with os.scandir(self.root / State.DEFERRED) as it:
            for item in it:
                try:
                    if item.name.endswith(".json") and item.stat().st_mtime > now:
                        os.utime(item.path, (now, now))
                        count += 1
                except FileNotFoundError:
                    continue        # picked up by the queue meanwhile
        return count

    def count(self, state: State) -> int:
        return sum(1 for _ in self.names(state))
