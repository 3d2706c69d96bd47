"""The spool: accepted messages on disk, in directories named for their state.

Once the relay answers 250 the message is the relay's responsibility, so it must be on
disk, durably, before that answer. The layout follows Postfix: a queue is a directory,
and an operator can see (and repair) what is where with ``ls``::

    tmp/        being written; never acknowledged, discarded on start
    data/       <id>.eml: the message bytes, written once, never changed
    incoming/   <id>.json: accepted, waiting for the first delivery attempt
    active/     <id>.json: a delivery attempt is in progress
    deferred/   <due>-<id>.json: waiting until <due> (epoch seconds) for the next attempt
    hold/       <id>.json: put on hold by the operator
    failed/     <id>.json: dead letters (bounced or expired), kept for inspection
    corrupt/    files the relay could not read, moved aside instead of deleted

A message's state is the directory its metadata file is in; moving between states is one
atomic rename. The due time is part of a deferred file's name so that the queue manager
finds due messages by listing names, without opening files or keeping the queue in memory.

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
        for path in (self.root / "tmp").iterdir():
            path.unlink(missing_ok=True)
            report["discarded"] += 1
        for path in (self.root / State.ACTIVE).iterdir():
            os.replace(path, self.root / State.INCOMING / path.name)
            report["requeued"] += 1
        known: dict[str, Path] = {}
        for state in State:
            for path in (self.root / state).iterdir():
                mid = self.id_from_name(path.name)
                if mid is None or not (self.root / "data" / f"{mid}.eml").exists():
                    os.replace(path, self.root / "corrupt" / path.name)
                    report["corrupt"] += 1
                    log.error("spool: %s/%s has no message data; moved to corrupt/",
                              state, path.name)
                    continue
                # A crash inside move() can leave the old and the new metadata file; the
                # newer one is the truth.
                if (other := known.get(mid)) is not None:
                    older = min(other, path, key=lambda p: p.stat().st_mtime_ns)
                    older.unlink()
                    path = other if older is path else path
                known[mid] = path
        for path in (self.root / "data").iterdir():
            if path.suffix == ".eml" and path.stem not in known:
                path.unlink(missing_ok=True)
                report["orphans"] += 1
        for name in ("data", "corrupt", *State):
            _fsync_dir(self.root / name)
        return report

    # --- naming -------------------------------------------------------------------------

    @staticmethod
    def id_from_name(name: str) -> str | None:
        if not name.endswith(".json"):
            return None
        stem = name[:-5]
        return stem.rsplit("-", 1)[-1] or None

    def _meta_path(self, state: State, entry: Entry) -> Path:
        if state is State.DEFERRED:
            return self.root / state / f"{int(entry.next_attempt):010d}-{entry.id}.json"
        return self.root / state / f"{entry.id}.json"

    def data_path(self, mid: str) -> Path:
        return self.root / "data" / f"{mid}.eml"

    # --- accepting -------------------------------------------------------------------------

    def _store(self, entry: Entry, data: bytes, state: State) -> None:
        tmp = self.root / "tmp"
        _write_synced(tmp / f"{entry.id}.eml", data)
        _write_synced(tmp / f"{entry.id}.json", entry.to_json())
        os.replace(tmp / f"{entry.id}.eml", self.data_path(entry.id))
        os.replace(tmp / f"{entry.id}.json", self._meta_path(state, entry))

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
        return Entry.from_json((self.root / state / name).read_bytes())

    def read_data(self, mid: str) -> bytes:
        return self.data_path(mid).read_bytes()

    def move(self, entry: Entry, src: State, dst: State, *, rewrite: bool = True) -> None:
        """Move ``entry`` from ``src`` to ``dst``, saving its (changed) metadata atomically."""
        old = self._find(src, entry.id)
        if old is None:
            # Someone else (an operator's `queue hold` or `delete`) moved it first.
            raise FileNotFoundError(f"{entry.id} is no longer in {src}")
        new = self._meta_path(dst, entry)
        if rewrite:
            tmp = self.root / "tmp" / f"{entry.id}.json.{time.monotonic_ns()}"
            _write_synced(tmp, entry.to_json())
            os.replace(tmp, new)
            if old != new:
                old.unlink(missing_ok=True)
        else:
            os.replace(old, new)
        _fsync_dir(new.parent)
        if old.parent != new.parent:
            _fsync_dir(old.parent)

    def remove(self, entry_id: str, state: State) -> None:
        """Forget a message that is finished (delivered), data and metadata."""
        path = self._find(state, entry_id)
        if path is not None:
            path.unlink(missing_ok=True)
        self.data_path(entry_id).unlink(missing_ok=True)
        _fsync_dir(self.root / state)

    def _find(self, state: State, mid: str) -> Path | None:
        if state is not State.DEFERRED:
            path = self.root / state / f"{mid}.json"
            return path if path.exists() else None
        for path in (self.root / state).glob(f"*-{mid}.json"):
            return path
        return None

    def locate(self, mid: str) -> tuple[State, Path] | None:
        for state in State:
            path = self._find(state, mid)
            if path is not None:
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
        out: list[str] = []
        upcoming = float("inf")
        for name in self.names(State.DEFERRED):
            due_s, _, _ = name.partition("-")
            if not due_s.isdigit():
                continue
            if int(due_s) <= now:
                out.append(name)
                if len(out) >= limit * 4:
                    out.sort()
                    del out[limit:]
            else:
                upcoming = min(upcoming, float(due_s))
        out.sort()
        return out[:limit], upcoming

    def flush_deferred(self, now: float) -> int:
        """Make every deferred message due at ``now``; returns how many were changed."""
        count = 0
        for name in list(self.names(State.DEFERRED)):
            due, _, rest = name.partition("-")
            if due.isdigit() and int(due) > now:
                try:
                    os.replace(self.root / State.DEFERRED / name,
                               self.root / State.DEFERRED / f"{int(now):010d}-{rest}")
                except FileNotFoundError:
                    continue  # picked up by the queue meanwhile
                count += 1
        if count:
            _fsync_dir(self.root / State.DEFERRED)
        return count

    def count(self, state: State) -> int:
        return sum(1 for _ in self.names(state))
