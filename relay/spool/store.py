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

Durability: a new message's bytes are written to ``tmp/`` as they arrive from the client
(:class:`DataWriter`, so a large message never sits in memory), its metadata follows; both
are fsynced, renamed into place, and the directories are fsynced before
:meth:`Spool.accept` returns. Directory fsyncs of concurrent arrivals are shared (group
commit), so durability does not cap throughput. Whatever fails on the way (a full disk,
a client that goes away) removes its own files from tmp/ at once: nothing is left to fill
the disk until the next start. A directory sync that fails takes the placed files out
again: the client is told 4xx and sends the message again, so no copy may stay behind.

Every metadata file read back is validated (:meth:`Entry.from_json`): a file that another
version wrote, a disk error or an operator's editor damaged is refused as a whole, so the
queue sets it aside in corrupt/ instead of tripping over it later.

State changes. The relay and ``queue`` commands run by an operator (other processes) work
on the same spool at once, so the protocol keeps one invariant: at every instant, for
every message, exactly one ``<state>/<id>.json`` exists, and its data exists with it.

* A state change is one ``rename(src/<id>.json, dst/<id>.json)``. The rename is also the
  lock: of two processes moving the same message, the second one's rename fails with
  ENOENT, changing nothing, and that party reports it (operator) or moves on (relay).
* Nothing is written to a message's name after that rename: a second step (say, new
  content renamed over ``dst/<id>.json``) could recreate the file in a directory that the
  other process has already moved the message out of, leaving it in two states.
* New content is therefore written *before* the move, by the one party that owns the
  source state: to ``tmp/``, fsynced, given its due time as mtime when it is going to
  deferred/, and renamed over ``src/<id>.json`` in place. (One exception, for a full
  disk: the record of an upstream's 250 is written over the file in active/ itself, see
  :meth:`Spool.record_delivered`.) active/ is owned by the relay's
  queue (operator commands leave it alone); hold/ and failed/ by operator commands, which
  serialize among themselves with :meth:`Spool.operator_lock`. In the shared states,
  incoming/ and deferred/, content is never rewritten; only the mtime changes (``utime``
  is atomic and fails, too, if the file has gone).
* Deleting a message starts by unlinking its metadata (the claim: it fails if the message
  was taken meanwhile); only then its data is unlinked.

A crash (kill -9, power loss) between any two of these system calls leaves a state that
:meth:`Spool.recover` resolves deterministically: a temporary file in tmp/ is discarded; a
rewritten file still in its source state stays there (from active/ it goes back to
incoming/ with the attempt's outcome recorded, so delivered recipients are not sent
again); data whose metadata was unlinked is an orphan and goes, completing the delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import json
import logging
import math
import mmap
import os
import re
import threading
import time
from collections.abc import Container, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import TypeAdapter

from relay.core.errors import RelayError
from relay.core.message import Content

log = logging.getLogger(__name__)


class State(enum.StrEnum):
    INCOMING = "incoming"
    ACTIVE = "active"
    DEFERRED = "deferred"
    HOLD = "hold"
    FAILED = "failed"


_DIRS = ("tmp", "data", "corrupt", *(s.value for s in State))
RELAY_LOCK = "relay.lock"   # see Spool.claim
RECOVERY_LOCK_WAIT = 60.0   # how long start-up waits for an operator's queue command

# States whose files only one party changes (see the module docstring), so that their
# content can be rewritten in place before a move. incoming/ and deferred/ are shared.
_OWNED = frozenset({State.ACTIVE, State.HOLD, State.FAILED})
# Spool directories are private to the relay's user and group: messages are personal data.
_DIR_MODE = 0o750
_FILE_MODE = 0o640
# A message id as the relay makes them (relay.core.message.new_message_id), with room for ids
# of other versions; nothing that could name another directory.
_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
    def from_json(cls, raw: bytes, name: str | None = None) -> Entry:
        """Parse and validate a metadata file; ValueError (with the reason) if it is not one.

        Types are checked by a schema (a string where a list belongs, ``"attempts": "x"``),
        then what the types cannot say: the id is the file's, there is a recipient, times
        are real numbers, addresses hold no control characters. Unknown keys are ignored,
        so a file written by a newer version is still read.
        """
        entry = _ENTRY.validate_json(raw)
        problem = entry._problem(name)
        if problem is not None:
            raise ValueError(problem)
        return entry

    def _problem(self, name: str | None) -> str | None:
        if not _ID.match(self.id):
            return f"id {self.id[:80]!r} is not a message id"
        if name is not None and name != f"{self.id}.json":
            return f"id {self.id!r} does not match the file name {name!r}"
        if not self.rcpt_tos:
            return "no recipients"
        if not self.profile:
            return "no profile"
        for address in (self.mail_from, *self.rcpt_tos, *self.delivered, *self.failed,
                        self.return_path or "", self.mailbox or ""):
            if _CONTROL.search(address) or len(address) > 1000:
                return f"address {address[:80]!r} is not usable"
        if min(self.size, self.attempts) < 0:
            return "negative size or attempts"
        if not all(math.isfinite(t) for t in (self.received_at, self.next_attempt)):
            return "a time is not a finite number"
        return None


_ENTRY = TypeAdapter(Entry)


class SpoolError(RelayError):
    """The spool cannot be used (not writable, on tmpfs when that is refused, ...)."""


class SpoolBusy(SpoolError):
    """Another operator command holds the spool's operator lock; try again shortly."""


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


def _tighten(path: Path) -> None:
    """No access for others, and no group write, to a directory of ours (an older version, a
    umask or a volume may have made it more open); a directory someone else owns is left as
    it is (the check below still says whether the relay can use it)."""
    st = path.stat()
    if st.st_uid == os.geteuid() and st.st_mode & 0o7777 & ~_DIR_MODE:
        os.chmod(path, st.st_mode & _DIR_MODE)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_synced(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Create ``path`` with ``data`` (fsynced unless ``sync`` is False); on any failure the
    partial file is removed, so a full disk leaves nothing behind to keep it full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
    try:
        _write_all(fd, data)
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def _overwrite(path: Path, data: bytes) -> bool:
    """Write ``data`` over the file at ``path`` in place; False (nothing done) unless that
    is as safe as the rename it stands in for, against the process dying at any moment.

    It is when it takes one write into the file's first page, within blocks the file has:
    no new disk space is needed, and a single-page write into the page cache is whole or
    not done at all when the process is killed. Whitespace pads ``data`` to the old length
    (JSON allows it), so nothing of the old content is left after it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        data = data.ljust(st.st_size)
        if len(data) > min(mmap.PAGESIZE, st.st_blocks * 512):
            return False
        return os.pwrite(fd, data, 0) == len(data)
    finally:
        os.close(fd)


def _unlink_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


class DataWriter:
    """The bytes of a message being received, written to ``tmp/<id>.eml`` as they arrive.

    :meth:`write` blocks: call it from a worker thread. The file is created at the first
    write. Any failure discards it (a partial message is never kept, and never left to fill
    the disk); :meth:`content` hands the finished file to :meth:`Spool.accept`.

    :meth:`discard` may come from the event loop while a write is still running in its
    thread (the client went away): it removes the file at once and leaves closing the
    descriptor to that write, so a descriptor is never closed under a thread using it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._fd: int | None = None
        self._finished = False
        self._discarded = False
        self._lock = threading.Lock()

    def write(self, data: bytes, *, finish: bool = False) -> None:
        """Append ``data``; with ``finish``, also fsync and close (the message is whole)."""
        with self._lock:
            if self._finished or self._discarded:
                raise ValueError("message data already finished or discarded")
            try:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                       | os.O_CLOEXEC, _FILE_MODE)
                _write_all(self._fd, data)
                self.size += len(data)
                if finish:
                    os.fsync(self._fd)
                    self._close()
                    self._finished = True
            except BaseException:
                self._discarded = True
                self._close()
                _unlink_quietly(self.path)
                raise
            if self._discarded:         # discarded while this write ran
                self._close()
                _unlink_quietly(self.path)
                raise ValueError("message data discarded")

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Throw away what was written (idempotent, never raises, never blocks)."""
        self._discarded = True
        _unlink_quietly(self.path)
        if self._lock.acquire(blocking=False):
            try:
                self._close()
            finally:
                self._lock.release()

    def content(self) -> Content:
        if not self._finished or self._discarded:
            raise ValueError("message data not finished")
        return Content.from_file(self.path, self.size)


class Spool:
    """A spool directory; see the module docstring for its layout and guarantees."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._claim_fd: int | None = None
        self._commit_waiters: list[asyncio.Future[None]] = []
        self._commit_wakeup: asyncio.Event | None = None
        self._committer: asyncio.Task[None] | None = None

    # --- set-up ---------------------------------------------------------------------------

    def open(self, *, on_tmpfs: str = "refuse") -> None:
        """Create the directories and check the spool can keep its promise."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
            for path in (self.root, *(self.root / name for name in _DIRS)):
                path.mkdir(exist_ok=True, mode=_DIR_MODE)
                _tighten(path)
            probe = self.root / "tmp" / f".probe-{os.getpid()}"
            _write_synced(probe, b"ok")
            probe.unlink(missing_ok=True)   # a relay starting meanwhile clears tmp/
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

    def claim(self) -> None:
        """Become the one relay that delivers from this spool, until :meth:`unclaim`.

        Two relays on one spool would deliver messages twice: the second one's recovery
        puts the first one's active/ messages back into incoming/ and discards its
        half-written arrivals. The claim is a flock on ``relay.lock`` (holding the pid, for
        the error message), so the kernel releases it when the relay dies, even by kill -9.
        ``queue`` commands do not claim the spool: they work beside a running relay.
        """
        path = self.root / RELAY_LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise SpoolError(f"cannot open {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise SpoolError(f"another relay (pid {holder}) is using the spool {self.root}; "
                             "give each relay a spool of its own") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._claim_fd = fd

    def unclaim(self) -> None:
        if self._claim_fd is not None:
            os.close(self._claim_fd)    # releases the flock
            self._claim_fd = None

    def save_state(self, name: str, data: bytes) -> None:
        """Keep a small file of the relay's own next to the queue (e.g. the governor's
        windows): written to tmp/, fsynced and renamed, so it is whole or absent."""
        tmp = self.root / "tmp" / f"{name}.{os.getpid()}.{time.monotonic_ns()}"
        _write_synced(tmp, data)
        try:
            os.replace(tmp, self.root / name)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def load_state(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def recover(self) -> dict[str, int]:
        """Bring the spool back to a consistent state after a stop or a crash.

        Files in tmp/ were never acknowledged and go; messages that were being delivered go
        back to incoming/ (a crash between the upstream's 250 and the spool update is the
        only case where a message is delivered twice); message data without metadata in any
        state was never acknowledged either and goes.
        """
        # Under the operator lock: a `queue release` moving a message between two states
        # while the orphan scan looks for it would make its data look orphaned.
        with self.operator_lock(wait=RECOVERY_LOCK_WAIT):
            return self._recover()

    def _recover(self) -> dict[str, int]:
        report = {"discarded": 0, "requeued": 0, "orphans": 0, "corrupt": 0}
        with os.scandir(self.root / "tmp") as it:
            for item in it:
                with contextlib.suppress(FileNotFoundError):   # a CLI's probe file
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
                        self._set_aside(state, item.name, "has no message data")
                        report["corrupt"] += 1
        with os.scandir(self.root / "data") as it:
            for item in it:
                mid = item.name[:-4] if item.name.endswith(".eml") else None
                if mid is not None and self.locate(mid) is None:
                    os.unlink(item.path)
                    report["orphans"] += 1
        for name in ("data", "corrupt", *State):
            _fsync_dir(self.root / name)
        return report

    def set_aside(self, state: State, mid: str, why: str) -> None:
        """Move a message to corrupt/, metadata and (if there is any) data, for an operator
        to look at: the queue never touches corrupt/, and recovery does not mistake the
        data for an orphan."""
        # Data first: a crash in between leaves metadata without data, which recovery sets
        # aside as well; the other order would leave data that recovery deletes.
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.data_path(mid), self.root / "corrupt" / f"{mid}.eml")
        self._set_aside(state, self._meta_path(state, mid).name, why)
        for name in ("corrupt", "data", state):
            _fsync_dir(self.root / name)

    def _set_aside(self, state: State, name: str, why: str) -> None:
        os.replace(self.root / state / name, self.root / "corrupt" / name)
        log.error("spool: %s/%s %s; moved to corrupt/", state, name, why)

    # --- naming -------------------------------------------------------------------------

    @staticmethod
    def id_from_name(name: str) -> str | None:
        return name[:-5] or None if name.endswith(".json") else None

    def _meta_path(self, state: State, mid: str) -> Path:
        return self.root / state / f"{mid}.json"

    def data_path(self, mid: str) -> Path:
        return self.root / "data" / f"{mid}.eml"

    # --- accepting -------------------------------------------------------------------------

    def writer(self, mid: str) -> DataWriter:
        """Where the bytes of new message ``mid`` go while they arrive (see :meth:`accept`)."""
        return DataWriter(self.root / "tmp" / f"{mid}.eml")

    def _store(self, entry: Entry, content: Content | bytes, state: State) -> None:
        """Data, then metadata, into place; on any failure nothing of the message remains."""
        if isinstance(content, bytes):
            content = Content(data=content)
        tmp = self.root / "tmp"
        staged = tmp / f"{entry.id}.eml"
        meta = tmp / f"{entry.id}.json"
        data = self.data_path(entry.id)
        placed = False
        try:
            if content.path is None:
                _write_synced(staged, content.in_memory or b"")
            elif content.path != staged:
                raise ValueError(f"{content.path} is not this spool's new message {entry.id}")
            _write_synced(meta, entry.to_json())
            if state is State.DEFERRED:
                os.utime(meta, (entry.next_attempt, entry.next_attempt))
            os.replace(staged, data)
            placed = True
            os.replace(meta, self._meta_path(state, entry.id))
        except BaseException:
            _unlink_quietly(staged, meta, *([data] if placed else []))
            raise

    async def accept(self, entry: Entry, content: Content | bytes,
                     state: State = State.INCOMING) -> Content:
        """Store a new message; returns only once it would survive a crash or power loss.

        ``content`` is either small bytes made by the relay (a delivery report), or the
        finished :meth:`writer` file of this message. Returns the stored content. Raises
        OSError (disk full, ...) with nothing of the message left behind.

        The files are in place before the directories are synced, so a failed sync must
        take them out again: the caller answers 4xx, the client sends the message again,
        and a copy left in ``state`` would be delivered as well. The caller must keep the
        queue from taking the message until this returns (or the withdrawal could fail).
        """
        if isinstance(content, bytes):
            content = Content(data=content)
        await asyncio.to_thread(self._store, entry, content, state)
        try:
            await self._group_commit()
        except OSError:
            await asyncio.to_thread(self._withdraw, entry.id, state)
            raise
        return Content.from_file(self.data_path(entry.id), content.size)

    def _withdraw(self, mid: str, state: State) -> None:
        """Take back a message whose accept failed after its files were placed."""
        try:
            os.unlink(self._meta_path(state, mid))
        except OSError as exc:
            log.error("spool: %s could not be withdrawn after a failed accept (%s); it may "
                      "be delivered although its client was told to try again", mid,
                      exc.strerror or exc)
            return
        _unlink_quietly(self.data_path(mid))

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
        entry = Entry.from_json(path.read_bytes(), name)
        if state is State.DEFERRED:
            entry.next_attempt = path.stat().st_mtime   # the file's time is the truth
        return entry

    def read_data(self, mid: str) -> bytes:
        return self.data_path(mid).read_bytes()

    def content(self, mid: str) -> Content:
        """The stored bytes of ``mid`` (FileNotFoundError if there are none)."""
        path = self.data_path(mid)
        return Content.from_file(path, path.stat().st_size)

    def move(self, entry: Entry, src: State, dst: State, *, rewrite: bool = True) -> None:
        """Move ``entry`` from ``src`` to ``dst`` with one rename (see the module docstring).

        With ``rewrite``, ``entry`` becomes the file's content first, replacing the file in
        ``src``; only the party that owns ``src`` may do that (the relay for active/,
        operator commands under :meth:`operator_lock` for hold/ and failed/), so it is
        refused for incoming/ and deferred/. Going to deferred/, the file gets
        ``entry.next_attempt`` as its mtime before it appears there, so nobody ever sees it
        there with a wrong due time. Raises FileNotFoundError, changing nothing, when the
        message is no longer in ``src`` (another process moved or deleted it first).
        """
        if rewrite and src not in _OWNED:
            raise ValueError(f"metadata in {src}/ is shared and never rewritten in place")
        old = self._meta_path(src, entry.id)
        new = self._meta_path(dst, entry.id)
        due = (entry.next_attempt, entry.next_attempt)
        if rewrite:
            tmp = self.root / "tmp" / f"{entry.id}.json.{os.getpid()}.{time.monotonic_ns()}"
            _write_synced(tmp, entry.to_json())
            try:
                if dst is State.DEFERRED:
                    os.utime(tmp, due)
                if not old.exists():
                    # Not racy: nobody but the caller changes an owned state's files.
                    # Checked so that a caller's mistake cannot create a second metadata
                    # file.
                    raise FileNotFoundError(f"{entry.id} is no longer in {src}")
                # Raises FileNotFoundError if a relay starting meanwhile cleared tmp/; then
                # the message is as it was.
                os.replace(tmp, old)
            except BaseException:
                _unlink_quietly(tmp)
                raise
        elif dst is State.DEFERRED:
            os.utime(old, due)          # FileNotFoundError if it has gone: nothing changed
        if old != new:
            os.rename(old, new)         # the state change, and the only one
        _fsync_dir(new.parent)
        if old.parent != new.parent:
            _fsync_dir(old.parent)

    def record_delivered(self, entry: Entry, *, complete: bool) -> None:
        """Write down, right after the upstream's 250, what it accepted: the one step between
        that reply and a crash that decides whether recipients get the message twice.

        Called on the event loop, before anything else happens, so it is kept to a system
        call or two and skips the fsync (a killed process loses nothing the kernel holds;
        only a power cut in the next moments could bring the old file back). ``complete``:
        every recipient is done, so the metadata in active/ goes (the data follows in
        :meth:`remove`, which tolerates this); else ``entry`` replaces it, listing the
        recipients delivered so far. The caller settles the message properly afterwards.

        On a full disk the new file cannot be written, and the outcome cannot be saved
        until space frees up, which may take a while: then the record is written over the
        file in place instead (:func:`_overwrite`), where the file's own blocks hold it.
        """
        path = self._meta_path(State.ACTIVE, entry.id)
        if complete:
            os.unlink(path)
            return
        data = entry.to_json()
        tmp = self.root / "tmp" / f"{entry.id}.json.{os.getpid()}.{time.monotonic_ns()}"
        try:
            _write_synced(tmp, data, sync=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not _overwrite(path, data):
                raise
            return
        try:
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def set_due(self, mid: str, when: float) -> None:
        """Change when a deferred message is due (FileNotFoundError if it is not deferred)."""
        os.utime(self._meta_path(State.DEFERRED, mid), (when, when))

    def remove(self, entry_id: str, state: State, *, claimed: bool = False) -> None:
        """Forget a message (delivered, or deleted by an operator): metadata, then data.

        Unlinking the metadata is the claim: if the message has left ``state`` meanwhile
        (the relay took a deferred message into active/ just as an operator deleted it),
        it raises FileNotFoundError and the data is left alone. A crash between the two
        unlinks leaves orphaned data, which :meth:`recover` removes. ``claimed``: the
        metadata may already be gone because the caller removed it itself
        (:meth:`record_delivered`).

        Once the metadata is gone the message is gone: a data file that cannot be unlinked
        (a disk error) is logged and left to :meth:`recover`, not raised, since the caller
        has nothing left to retry and would only mistake it for a failed delivery.
        """
        try:
            os.unlink(self._meta_path(state, entry_id))
        except OSError:
            if not claimed:         # else the caller unlinked it already: this only checks
                raise
        try:
            os.unlink(self.data_path(entry_id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("spool: cannot remove the data of %s (%s); the next start removes it",
                      entry_id, exc.strerror or exc)
        # data/ needs no fsync of its own: data that comes back after a crash has no
        # metadata, and recovery removes it.
        _fsync_dir(self.root / state)

    @contextlib.contextmanager
    def operator_lock(self, wait: float = 10.0) -> Iterator[None]:
        """Hold the lock that makes operator commands (``queue ...``) take turns.

        It is what makes hold/ and failed/ owned states (see the module docstring): two
        operators retrying and deleting the same failed message cannot interleave. The
        relay never takes it. It is a flock on the spool directory itself, so it needs no
        file of its own and the kernel releases it when a command dies, even by kill -9.
        Raises :class:`SpoolBusy` after ``wait`` seconds.
        """
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise SpoolBusy(f"another queue command is working on {self.root}; "
                                        "try again") from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)            # releases the lock

    def holds(self, state: State, mid: str) -> bool:
        """Whether ``mid``'s metadata is in ``state`` right now."""
        return self._meta_path(state, mid).exists()

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

    def due(self, now: float, limit: int,
            skip: Container[str] = ()) -> tuple[list[str], float]:
        """Up to ``limit`` deferred names whose due time has come, earliest first, and the
        due time of the earliest message that is not due yet (``inf`` if none). Names in
        ``skip`` are passed over."""
        out: list[tuple[float, str]] = []
        upcoming = float("inf")
        with os.scandir(self.root / State.DEFERRED) as it:
            for item in it:
                if not item.name.endswith(".json") or item.name in skip:
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
        return len(self.flush_deferred_ids(now))

    def flush_deferred_ids(self, now: float) -> list[str]:
        """Make every deferred message due at ``now``; returns the ids of those changed."""
        changed: list[str] = []
        with os.scandir(self.root / State.DEFERRED) as it:
            for item in it:
                mid = self.id_from_name(item.name)
                try:
                    if mid is not None and item.stat().st_mtime > now:
                        os.utime(item.path, (now, now))
                        changed.append(mid)
                except FileNotFoundError:
                    continue        # picked up by the queue meanwhile
        return changed

    def count(self, state: State) -> int:
        return sum(1 for _ in self.names(state))
