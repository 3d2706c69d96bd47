"""The spool's directories and its protocol of moves, as blocking calls.

- :class:`Spool`: one spool directory (its layout and invariants: relay.spool's package
  docstring). Setting up (:meth:`Spool.open`, :meth:`Spool.claim`); adding a new message
  (:meth:`Spool.writer`, :meth:`Spool.add`, :meth:`Spool.sync_dirs`,
  :meth:`Spool.withdraw`); reading (:meth:`Spool.read`, :meth:`Spool.content`); state
  changes (:meth:`Spool.move`, :meth:`Spool.set_due`, :meth:`Spool.record_delivered`,
  :meth:`Spool.remove`, :meth:`Spool.set_aside`); scanning (:meth:`Spool.names`,
  :meth:`Spool.due`, :meth:`Spool.flush_deferred_ids`); the operator lock; small state files
  of the relay's own (:meth:`Spool.save_state`).

Every method is a few system calls, for a worker thread or an operator command: the event
loop goes through relay.spool.facade.AsyncSpool. Recovery after a crash is
relay.spool.recovery, the locks and SpoolError relay.spool.locks, and the system calls
themselves (each safe against a full disk and a crash) relay.spool.disk, called through
that module so that a test can break them for the whole spool.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Collection, Container, Iterator
from pathlib import Path

from relay.core.message import Content
from relay.spool import disk, locks
from relay.spool.locks import SpoolError
from relay.spool.records import Entry, State
from relay.spool.writer import DataWriter

log = logging.getLogger(__name__)

DIRS = ("tmp", "data", "corrupt", *(s.value for s in State))

# States whose files only one party changes (see the package docstring), so that their
# content can be rewritten in place before a move. incoming/ and deferred/ are shared.
_OWNED = frozenset({State.ACTIVE, State.HOLD, State.FAILED})


class Spool:
    """A spool directory; see the package docstring for its layout and guarantees."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._claim_fd: int | None = None
        self._base = os.fspath(root)    # for names built as text (see _meta)

    # --- set-up ---------------------------------------------------------------------------

    def open(self, *, on_tmpfs: str = "refuse") -> None:
        """Create the directories and check the spool can keep its promise.

        A refusal leaves the filesystem as it found it: the filesystem is judged before
        anything is created (where the spool would be), and directories made before a
        later step failed are removed again; directories that were there stay.
        """
        fstype = disk.filesystem_type(self.root)
        if fstype in ("tmpfs", "ramfs"):
            text = (f"spool directory {self.root} is on {fstype}: queued mail would be lost "
                    "on reboot (use a persistent disk, StateDirectory= or a volume)")
            if on_tmpfs == "refuse":
                raise SpoolError(text + "; set spool.on_tmpfs: warn to accept the risk")
            log.warning("%s", text)
        created: list[Path] = []
        own = [self.root, *(self.root / name for name in DIRS)]
        try:
            parents = [p for p in self.root.parents if not p.exists()]
            for path in (*reversed(parents), *own):
                with contextlib.suppress(FileExistsError):      # there already
                    # Parents as `mkdir -p` makes them; the spool's own for the relay only.
                    path.mkdir(mode=0o777 if path in parents else disk.DIR_MODE)
                    created.append(path)
            for path in own:
                disk.tighten(path)
            probe = self.root / "tmp" / f".probe-{os.getpid()}"
            disk.write_synced(probe, b"ok")
            probe.unlink(missing_ok=True)   # a relay starting meanwhile clears tmp/
        except OSError as exc:
            for path in reversed(created):
                with contextlib.suppress(OSError):
                    path.rmdir()            # only if still empty: never another's files
            raise SpoolError(f"spool directory {self.root} is not usable: "
                             f"{exc.strerror or exc}") from None

    def claim(self) -> None:
        """Become the one relay that delivers from this spool, until :meth:`unclaim`
        (relay.spool.locks.claim_relay: SpoolError if another relay has it)."""
        self._claim_fd = locks.claim_relay(self.root)

    def unclaim(self) -> None:
        if self._claim_fd is not None:
            locks.release(self._claim_fd)
            self._claim_fd = None

    def operator_lock(self, wait: float = 10.0) -> contextlib.AbstractContextManager[None]:
        """The lock through which operator commands take turns (relay.spool.locks)."""
        return locks.operator_lock(self.root, wait)

    def save_state(self, name: str, data: bytes) -> None:
        """Keep a small file of the relay's own next to the queue (e.g. the governor's
        windows): written to tmp/, fsynced and renamed, so it is whole or absent."""
        tmp = self._scratch(name)
        disk.write_synced(tmp, data)
        try:
            os.replace(tmp, self.root / name)
        except BaseException:
            disk.unlink_quietly(tmp)
            raise

    def load_state(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def set_aside(self, state: State, mid: str, why: str) -> None:
        """Move a message to corrupt/, metadata and (if there is any) data, for an operator
        to look at: the queue never touches corrupt/, and recovery does not mistake the
        data for an orphan."""
        # Data first: a crash in between leaves metadata without data, which recovery sets
        # aside as well; the other order would leave data that recovery deletes.
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.data_path(mid), self.root / "corrupt" / f"{mid}.eml")
        self.set_aside_file(state, self.meta_path(state, mid).name, why)
        for name in ("corrupt", "data", state):
            disk.fsync_dir(self._dir(name))

    def set_aside_file(self, state: State, name: str, why: str) -> None:
        """Move one file of ``state`` to corrupt/ (and say so), as it is."""
        os.replace(self._dir(f"{state}/{name}"), self._dir(f"corrupt/{name}"))
        log.error("spool: %s/%s %s; moved to corrupt/", state, name, why)

    # --- naming -------------------------------------------------------------------------

    @staticmethod
    def id_from_name(name: str) -> str | None:
        return name[:-5] or None if name.endswith(".json") else None

    def meta_path(self, state: State, mid: str) -> Path:
        return Path(self._meta(state, mid))

    def data_path(self, mid: str) -> Path:
        return Path(self._data(mid))

    # The layout as text (a Path per name cost 4 % of the relay's CPU in make bench).
    def _dir(self, name: str) -> str:
        return f"{self._base}/{name}"

    def _meta(self, state: State, mid: str) -> str:
        return f"{self._base}/{state.value}/{mid}.json"

    def _data(self, mid: str) -> str:
        return f"{self._base}/data/{mid}.eml"

    def _scratch(self, name: str) -> str:     # a new file in tmp/, unique per writer
        return self._dir(f"tmp/{name}.{os.getpid()}.{time.monotonic_ns()}")

    # --- accepting -------------------------------------------------------------------------

    def writer(self, mid: str) -> DataWriter:
        """Where the bytes of new message ``mid`` go while they arrive (see :meth:`add`)."""
        return DataWriter(Path(self._dir(f"tmp/{mid}.eml")))

    def add(self, entry: Entry, content: Content | bytes,
            state: State = State.INCOMING) -> None:
        """Place a new message in ``state``: data, then metadata, each fsynced and renamed
        into place; on any failure nothing of the message remains.

        ``content`` is either small bytes made by the relay (a delivery report), or the
        finished :meth:`writer` file of this message. The message survives a crash only
        once the directories are synced too (:meth:`sync_dirs`), which AsyncSpool.accept
        does, sharing one sync among concurrent arrivals; until then the queue must leave
        the message alone, since a failed sync withdraws it again (:meth:`withdraw`).
        """
        if isinstance(content, bytes):
            content = Content(data=content)
        staged = self._dir(f"tmp/{entry.id}.eml")
        meta = self._dir(f"tmp/{entry.id}.json")
        data = self._data(entry.id)
        placed = False
        try:
            if content.path is None:
                disk.write_synced(staged, content.in_memory or b"")
            elif os.fspath(content.path) != staged:
                raise ValueError(f"{content.path} is not this spool's new message {entry.id}")
            disk.write_synced(meta, entry.to_json())
            if state is State.DEFERRED:
                os.utime(meta, (entry.next_attempt, entry.next_attempt))
            os.replace(staged, data)
            placed = True
            os.replace(meta, self._meta(state, entry.id))
        except BaseException:
            disk.unlink_quietly(staged, meta, *([data] if placed else []))
            raise

    def withdraw(self, mid: str, state: State) -> None:
        """Take back a message whose accept failed after its files were placed."""
        try:
            os.unlink(self.meta_path(state, mid))
        except OSError as exc:
            log.error("spool: %s could not be withdrawn after a failed accept (%s); it may "
                      "be delivered although its client was told to try again", mid,
                      exc.strerror or exc)
            return
        disk.unlink_quietly(self.data_path(mid))

    def sync_dirs(self, states: Collection[State] = tuple(State)) -> None:
        """Make the names of every message added so far to ``states`` durable (see
        :meth:`add`): data/ and those directories, the only ones an add changes."""
        for name in ("data", *states):
            disk.fsync_dir(self._dir(name))

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

    def move(self, entry: Entry, src: State, dst: State, *, rewrite: bool = True,
             sync: bool = True) -> None:
        """Move ``entry`` from ``src`` to ``dst`` with one rename (see the package docstring).

        With ``rewrite``, ``entry`` becomes the file's content first, replacing the file in
        ``src``; only the party that owns ``src`` may do that (the relay for active/,
        operator commands under :meth:`operator_lock` for hold/ and failed/), so it is
        refused for incoming/ and deferred/. Going to deferred/, the file gets
        ``entry.next_attempt`` as its mtime before it appears there, so nobody ever sees it
        there with a wrong due time. Raises FileNotFoundError, changing nothing, when the
        message is no longer in ``src`` (another process moved or deleted it first).

        ``sync=False`` leaves the directories unsynced, for a move whose loss in a power
        cut does no harm (the take into active/, which recovery returns to incoming/).
        """
        if rewrite and src not in _OWNED:
            raise ValueError(f"metadata in {src}/ is shared and never rewritten in place")
        old = self._meta(src, entry.id)
        new = self._meta(dst, entry.id)
        due = (entry.next_attempt, entry.next_attempt)
        if rewrite:
            tmp = self._scratch(f"{entry.id}.json")
            disk.write_synced(tmp, entry.to_json())
            try:
                if dst is State.DEFERRED:
                    os.utime(tmp, due)
                if not os.path.exists(old):
                    # Not racy: nobody but the caller changes an owned state's files.
                    # Checked so that a caller's mistake cannot create a second metadata
                    # file.
                    raise FileNotFoundError(f"{entry.id} is no longer in {src}")
                # Raises FileNotFoundError if a relay starting meanwhile cleared tmp/; then
                # the message is as it was.
                os.replace(tmp, old)
            except BaseException:
                disk.unlink_quietly(tmp)
                raise
        elif dst is State.DEFERRED:
            os.utime(old, due)          # FileNotFoundError if it has gone: nothing changed
        if old != new:
            os.rename(old, new)         # the state change, and the only one
        if sync:
            disk.fsync_dir(self._dir(dst))
            if src is not dst:
                disk.fsync_dir(self._dir(src))

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
        file in place instead (relay.spool.disk.overwrite), where the file's own blocks hold it.
        """
        path = self._meta(State.ACTIVE, entry.id)
        if complete:
            os.unlink(path)
            return
        data = entry.to_json()
        tmp = self._scratch(f"{entry.id}.json")
        try:
            disk.write_synced(tmp, data, sync=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not disk.overwrite(path, data):
                raise
            return
        try:
            os.replace(tmp, path)
        except BaseException:
            disk.unlink_quietly(tmp)
            raise

    def set_due(self, mid: str, when: float) -> None:
        """Change when a deferred message is due (FileNotFoundError if it is not deferred)."""
        os.utime(self.meta_path(State.DEFERRED, mid), (when, when))

    def remove(self, entry_id: str, state: State, *, claimed: bool = False) -> None:
        """Forget a message (delivered, or deleted by an operator): metadata, then data.

        Unlinking the metadata is the claim: if the message has left ``state`` meanwhile
        (the relay took a deferred message into active/ just as an operator deleted it),
        it raises FileNotFoundError and the data is left alone. A crash between the two
        unlinks leaves orphaned data, which recovery (relay.spool.recovery) removes.
        ``claimed``: the caller has removed the metadata itself (:meth:`record_delivered`).

        Once the metadata is gone the message is gone: a data file that cannot be unlinked
        (a disk error) is logged and left to recovery, not raised, since the caller
        has nothing left to retry and would only mistake it for a failed delivery.
        """
        if not claimed:
            os.unlink(self._meta(state, entry_id))
        try:
            os.unlink(self._data(entry_id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("spool: cannot remove the data of %s (%s); the next start removes it",
                      entry_id, exc.strerror or exc)
        # data/ needs no fsync of its own: data that comes back after a crash has no
        # metadata, and recovery removes it.
        disk.fsync_dir(self._dir(state))

    def holds(self, state: State, mid: str) -> bool:
        """Whether ``mid``'s metadata is in ``state`` right now."""
        return self.meta_path(state, mid).exists()

    def locate(self, mid: str) -> tuple[State, Path] | None:
        return next(((state, path) for state in State
                     if (path := self.meta_path(state, mid)).exists()), None)

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
