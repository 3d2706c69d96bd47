"""The spool's on-disk promises: durable accept, atomic state moves, crash recovery, and
the state-change protocol under concurrent operations and crashes at every step."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest

from relay.core.reply import Reply
from relay.spool import ctl as queuectl
from relay.spool import disk
from relay.spool.disk import filesystem_type
from relay.spool.facade import AsyncSpool
from relay.spool.locks import SpoolBusy, SpoolError
from relay.spool.records import Entry, State
from relay.spool.recovery import recover
from relay.spool.store import Spool


def entry(mid: str, **kw: object) -> Entry:
    return Entry(id=mid, profile="system", mail_from="a@b.c", rcpt_tos=["x@y.z"], size=5,
                 received_at=time.time(), **kw)  # type: ignore[arg-type]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.open()
    return s


# A metadata file as every version so far writes it (keys in this order, no spaces): it
# reads as it is, and is written back byte for byte, so relays and queue commands of
# older and newer versions can work on the same spool.
RECORD = (
    b'{"id":"4F2A9C01B3D7","profile":"system","mail_from":"app@contoso.com",'
    b'"rcpt_tos":["a@example.com","b@example.com"],"size":1234,'
    b'"received_at":1700000000.5,"mail_options":["BODY=8BITMIME"],"client":"127.0.0.1",'
    b'"user":"alice","return_path":"bounce@app.example.com","mailbox":"relay@contoso.com",'
    b'"attempts":2,"next_attempt":1700000100.0,"last_reply":"451 4.3.2 busy",'
    b'"delivered":["a@example.com"],"failed":{"c@example.com":"550 5.1.1 unknown"}}')


def test_the_record_format_is_the_same_for_every_version() -> None:
    e = Entry.from_json(RECORD, "4F2A9C01B3D7.json")
    assert (e.mail_options, e.return_path, e.failed, e.last_reply) == (
        ["BODY=8BITMIME"], "bounce@app.example.com",
        {"c@example.com": Reply(550, "5.1.1 unknown")}, Reply(451, "4.3.2 busy"))
    assert e.original_from is None
    assert e.to_json() == RECORD


# The keys added since come after the others, and only when they hold something: a
# record without them is the one above, byte for byte, and older versions, which ignore
# keys they do not know, read this one too.
LATER_RECORD = RECORD[:-1] + b',"original_from":"billing@contoso.com, ann@example.com"}'


def test_keys_added_since_come_last_and_only_when_set() -> None:
    e = Entry.from_json(LATER_RECORD, "4F2A9C01B3D7.json")
    assert e.original_from == "billing@contoso.com, ann@example.com"
    assert e.to_json() == LATER_RECORD
    e.original_from = None
    assert e.to_json() == RECORD
    with pytest.raises(ValueError, match="is not usable"):
        Entry.from_json(LATER_RECORD.replace(b"ann@", b"ann\\r\\n@"))


@pytest.mark.parametrize("field", [b'"last_reply":451', b'"last_reply":["451 busy"]',
                                   b'"last_reply":{"code":451,"text":"busy"}'])
def test_a_reply_that_is_not_its_one_line_text_is_refused(field: bytes) -> None:
    with pytest.raises(ValueError):
        Entry.from_json(RECORD.replace(b'"last_reply":"451 4.3.2 busy"', field))


async def test_accept_writes_data_and_metadata(spool: Spool) -> None:
    files = AsyncSpool(spool)
    await files.accept(entry("AAA"), b"hello\r\n")
    assert spool.read_data("AAA") == b"hello\r\n"
    assert spool.read(State.INCOMING, "AAA.json").rcpt_tos == ["x@y.z"]
    assert list((spool.root / "tmp").iterdir()) == []
    await files.close()


async def test_concurrent_accepts_share_directory_fsyncs(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[set[State]] = []
    real = spool.sync_dirs

    def counting(states: Collection[State]) -> None:
        calls.append(set(states))
        real(states)

    monkeypatch.setattr(spool, "sync_dirs", counting)
    files = AsyncSpool(spool)
    await asyncio.gather(*(files.accept(entry(f"M{i:03d}"), b"x") for i in range(200)))
    assert spool.count(State.INCOMING) == 200
    assert len(calls) < 200                          # group commit: batches, not one each
    # Only where the arrivals went (with data/): not every state's directory each time.
    assert all(states == {State.INCOMING} for states in calls)
    await files.close()


async def test_the_take_into_active_is_not_synced_and_the_removal_is(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The take before an attempt is a rename without fsyncs (recovery returns active/ to
    incoming/, whichever side of it a power cut leaves); a delivered message's removal,
    whose claim record_delivered already unlinked, removes its data and syncs active/."""
    files = AsyncSpool(spool)
    e = entry("T001")
    await files.accept(e, b"x")
    events: list[str] = []
    real_fsync, real_unlink = disk.fsync_dir, os.unlink

    def fsync_dir(path: Path) -> None:
        events.append(f"fsync {Path(path).name}")
        real_fsync(path)

    def unlink(path: Any, *a: Any, **kw: Any) -> None:
        events.append(f"unlink {Path(path).parent.name}")
        real_unlink(path, *a, **kw)

    monkeypatch.setattr(disk, "fsync_dir", fsync_dir)
    monkeypatch.setattr(os, "unlink", unlink)
    await files.take(e, State.INCOMING)
    assert events == [] and spool.holds(State.ACTIVE, e.id)
    files.record_delivered(e, complete=True)
    await files.remove(e.id, State.ACTIVE, claimed=True)
    assert events == ["unlink active", "unlink data", "fsync active"]
    assert not any((spool.root / "data").iterdir())
    await files.close()


async def test_an_arrival_that_cannot_be_placed_fails_alone(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrivals placed and synced in one trip: one whose files cannot be written is
    refused on its own, and the others of its batch are durable all the same."""
    real_add = spool.add

    def add(e: Entry, content: Any, state: State = State.INCOMING) -> None:
        if e.id == "BAD":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_add(e, content, state)

    monkeypatch.setattr(spool, "add", add)
    files = AsyncSpool(spool)
    results = await asyncio.gather(*(files.accept(entry(mid), b"x")
                                     for mid in ("G01", "BAD", "G02")),
                                   return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["Content", "OSError", "Content"]
    assert set(spool.names(State.INCOMING)) == {"G01.json", "G02.json"}
    await files.close()


async def test_a_sync_that_breaks_down_answers_every_waiting_accept(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only a disk error: whatever the sync raises, no arrival waits for ever, and
    none stays in the spool (its client is told to send it again)."""
    def broken(states: Collection[State]) -> None:
        raise RuntimeError("not a disk error")

    monkeypatch.setattr(spool, "sync_dirs", broken)
    files = AsyncSpool(spool)
    results = await asyncio.wait_for(asyncio.gather(
        *(files.accept(entry(f"B{i:03d}"), b"x") for i in range(5)),
        return_exceptions=True), 10)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert spool.count(State.INCOMING) == 0
    await files.close()


def test_move_and_deferred_due_time(spool: Spool) -> None:
    spool.add(entry("BBB"), b"data", State.INCOMING)
    e = spool.read(State.INCOMING, "BBB.json")
    spool.move(e, State.INCOMING, State.ACTIVE, rewrite=False)      # an attempt starts
    e.attempts, e.next_attempt, e.last_reply = 1, 1_000, Reply(451, "4.3.2 busy")
    spool.move(e, State.ACTIVE, State.DEFERRED)                     # ... and is deferred
    assert list(spool.names(State.DEFERRED)) == ["BBB.json"]
    assert (spool.root / "deferred" / "BBB.json").stat().st_mtime == 1000
    assert spool.due(now=999, limit=10) == ([], 1000)
    assert spool.due(now=1000, limit=10) == (["BBB.json"], float("inf"))
    again = spool.read(State.DEFERRED, "BBB.json")
    assert again.attempts == 1 and again.last_reply == Reply(451, "4.3.2 busy")
    assert again.next_attempt == 1000
    spool.set_due("BBB", 5)
    assert spool.read(State.DEFERRED, "BBB.json").next_attempt == 5
    assert spool.locate("BBB") == (State.DEFERRED, spool.root / "deferred" / "BBB.json")
    assert list((spool.root / "tmp").iterdir()) == []


def test_move_of_a_message_someone_else_moved_changes_nothing(spool: Spool) -> None:
    spool.add(entry("CCC"), b"data", State.INCOMING)
    e = spool.read(State.INCOMING, "CCC.json")
    spool.move(e, State.INCOMING, State.HOLD, rewrite=False)     # an operator holds it
    with pytest.raises(FileNotFoundError):
        spool.move(e, State.INCOMING, State.DEFERRED, rewrite=False)
    with pytest.raises(FileNotFoundError):
        spool.move(e, State.INCOMING, State.ACTIVE, rewrite=False)
    assert spool.locate("CCC") == (State.HOLD, spool.root / "hold" / "CCC.json")
    assert list((spool.root / "tmp").iterdir()) == []


def test_flush_makes_deferred_due(spool: Spool) -> None:
    for i in range(3):
        spool.add(entry(f"F{i}", next_attempt=time.time() + 3600), b"x", State.DEFERRED)
    assert len(spool.flush_deferred_ids(time.time())) == 3
    assert len(spool.due(time.time() + 1, 10)[0]) == 3


def test_due_returns_earliest_first_and_bounded(spool: Spool) -> None:
    for i in range(50):
        e = entry(f"D{i:02d}", next_attempt=float(1000 + (i * 7) % 50))
        spool.add(e, b"x", State.DEFERRED)
    due, upcoming = spool.due(now=2000, limit=5)
    assert upcoming == float("inf")
    assert len(due) == 5
    times = [spool.read(State.DEFERRED, n).next_attempt for n in due]
    assert times == sorted(times) and times[0] == 1000


def test_recover_after_crash(spool: Spool) -> None:
    spool.add(entry("OK1"), b"1", State.INCOMING)
    spool.add(entry("ACT"), b"2", State.ACTIVE)
    (spool.root / "tmp" / "HALF.eml").write_bytes(b"half written")
    (spool.root / "data" / "ORPHAN.eml").write_bytes(b"never acknowledged")
    (spool.root / "deferred" / "NODATA.json").write_bytes(b"{}")
    report = recover(spool)
    assert report == {"discarded": 1, "requeued": 1, "orphans": 1, "corrupt": 1}
    assert sorted(spool.names(State.INCOMING)) == ["ACT.json", "OK1.json"]
    assert not (spool.root / "data" / "ORPHAN.eml").exists()
    assert (spool.root / "corrupt" / "NODATA.json").exists()


def test_remove_deletes_data(spool: Spool) -> None:
    spool.add(entry("GONE"), b"1", State.ACTIVE)
    spool.remove("GONE", State.ACTIVE)
    assert spool.locate("GONE") is None
    assert not spool.data_path("GONE").exists()


def _eio(*_: object) -> None:
    raise OSError(errno.EIO, "Input/output error")


async def test_an_accept_whose_directory_sync_fails_leaves_nothing_behind(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files are renamed into place before the directories are synced. If the sync
    fails the client is told 4xx and sends the message again: the first copy must go, or
    it would be delivered as well."""
    monkeypatch.setattr(disk, "fsync_dir", _eio)
    files = AsyncSpool(spool)
    with pytest.raises(OSError):
        await files.accept(entry("SYNC"), b"data")
    monkeypatch.undo()
    assert spool.locate("SYNC") is None
    assert not spool.data_path("SYNC").exists()
    assert list((spool.root / "tmp").iterdir()) == []
    await files.close()


def test_a_delivery_record_on_a_full_disk_is_written_in_place(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """No space for a new file: the record goes over the file in active/ itself, where its
    own blocks hold it, as long as one page write does it (else the error stands)."""
    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    few, many = entry("FEW"), entry("MANY")
    few.rcpt_tos = ["a@b.c", "d@e.f"]
    many.rcpt_tos = [f"recipient-{i}@example.com" for i in range(200)]
    for e in (few, many):
        spool.add(e, b"data", State.ACTIVE)
    monkeypatch.setattr(disk, "write_synced", full)
    few.delivered = ["a@b.c"]
    spool.record_delivered(few, complete=False)
    assert spool.read(State.ACTIVE, "FEW.json").delivered == ["a@b.c"]
    many.delivered = many.rcpt_tos[:150]
    with pytest.raises(OSError, match="No space"):
        spool.record_delivered(many, complete=False)
    assert spool.read(State.ACTIVE, "MANY.json").delivered == []     # untouched
    assert list((spool.root / "tmp").iterdir()) == []


@pytest.mark.parametrize("failing", [".json", ".eml"])
def test_removing_a_recorded_delivery_goes_on_past_a_disk_error(
        spool: Spool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        failing: str) -> None:
    """record_delivered has unlinked the metadata (the message is done): an error from
    unlinking it again (.json) or its data (.eml) must not make the delivered message look
    like a failed attempt. Data left behind goes at the next start."""
    spool.add(entry("DONE"), b"1", State.ACTIVE)
    spool.record_delivered(entry("DONE"), complete=True)
    real_unlink = os.unlink

    def unlink(path: Any, *args: Any, **kw: Any) -> None:
        if os.fspath(path).endswith(failing):
            _eio()
        real_unlink(path, *args, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    spool.remove("DONE", State.ACTIVE, claimed=True)
    monkeypatch.undo()
    assert spool.locate("DONE") is None
    if failing == ".eml":
        assert "cannot remove the data of DONE" in caplog.text
        assert recover(spool)["orphans"] == 1
    assert not spool.data_path("DONE").exists()


def test_unwritable_spool_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises(SpoolError, match="not usable"):
        Spool(target / "spool").open()


@pytest.mark.skipif(filesystem_type(Path("/dev/shm")) != "tmpfs", reason="no tmpfs at /dev/shm")
def test_tmpfs_is_refused_or_warned(caplog: pytest.LogCaptureFixture) -> None:
    root = Path("/dev/shm") / f"relay-spool-test-{os.getpid()}"
    try:
        with pytest.raises(SpoolError, match="tmpfs"):
            Spool(root).open()
        Spool(root).open(on_tmpfs="warn")
        assert "tmpfs" in caplog.text
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(filesystem_type(Path("/dev/shm")) != "tmpfs", reason="no tmpfs at /dev/shm")
def test_a_refused_spool_leaves_no_directory_it_created() -> None:
    """Refused on tmpfs: nothing created (not the spool, nor the parents it would have
    made); a directory that was there already stays, with only what it held."""
    base = Path("/dev/shm") / f"relay-spool-refused-{os.getpid()}"
    try:
        with pytest.raises(SpoolError, match="tmpfs"):
            Spool(base / "state" / "spool").open()
        assert not base.exists()
        (base / "spool" / "hold").mkdir(parents=True)        # the operator's own
        with pytest.raises(SpoolError, match="tmpfs"):
            Spool(base / "spool").open()
        assert sorted(p.name for p in (base / "spool").iterdir()) == ["hold"]
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_an_unusable_spool_leaves_no_directory_it_created(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write probe fails (a full disk): the directories made for it go again."""
    def full(path: Path, data: bytes, **kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk, "write_synced", full)
    (tmp_path / "spool").mkdir()
    with pytest.raises(SpoolError, match="No space left on device"):
        Spool(tmp_path / "spool").open()
    assert list((tmp_path / "spool").iterdir()) == []


# --- the state-change protocol: interleavings with another process, and crashes ----------------
#
# Each change the spool makes to a name in it (rename, replace, unlink, utime) is a step.
# Running another process's whole operation before each step of an operation, and crashing
# before each step, covers every point where a concurrent queue command, the relay's queue
# or kill -9 can come in, deterministically.

class Crash(BaseException):
    """kill -9 here: the operation stops before the step (no except clause catches it)."""


class Steps:
    """Instruments os.rename/replace/unlink/utime (pathlib uses them too) under ``root``.

    ``before(n)`` runs before step n of the operation under test; whatever it does itself
    (the other process's operation) runs straight through, uncounted. ``check()`` runs after
    every call, the other operation's included: it is the invariant that must always hold.
    """

    CALLS = ("rename", "replace", "unlink", "utime")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        self.root = str(root)
        self.count = 0
        self.before: Callable[[int], None] | None = None
        self.check: Callable[[], None] | None = None
        self._inside = False
        for name in self.CALLS:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: Any, *args: Any, **kw: Any) -> Any:
            if not os.fspath(path).startswith(self.root):
                return real(path, *args, **kw)
            if not self._inside:
                n, self.count = self.count, self.count + 1
                if self.before is not None:
                    self._inside = True
                    try:
                        self.before(n)
                    finally:
                        self._inside = False
            try:
                return real(path, *args, **kw)
            finally:
                if self.check is not None:
                    self.check()
        return call

    def reset(self) -> None:
        self.count, self.before, self.check = 0, None, None


def places(spool: Spool, mid: str) -> list[str]:
    return [str(s) for s in State if (spool.root / s / f"{mid}.json").exists()]


def in_one_place(spool: Spool, mid: str, *, may_go: bool = False) -> None:
    """The invariant: the message is in exactly one state, with its data (or deleted)."""
    where = places(spool, mid)
    assert len(where) == 1 or (may_go and not where), f"{mid} is in {where or 'no state'}"
    if where:
        assert spool.data_path(mid).exists(), f"{mid} is in {where[0]}/ without its data"


def relay_takes(spool: Spool, mid: str) -> None:
    """What the relay's dispatcher does with a waiting message: read it, claim it for an
    attempt by moving it to active/. Losing the race to someone else is fine."""
    for state in (State.INCOMING, State.DEFERRED):
        with contextlib.suppress(FileNotFoundError):
            e = spool.read(state, f"{mid}.json")
            spool.move(e, state, State.ACTIVE, rewrite=False)
            return


def relay_defers(spool: Spool, mid: str) -> None:
    """What the relay does after a failed attempt: record it and defer (due at once)."""
    e = spool.read(State.ACTIVE, f"{mid}.json")
    e.attempts, e.last_reply, e.next_attempt = 1, Reply(451, "4.4.1 try later"), time.time() - 1
    spool.move(e, State.ACTIVE, State.DEFERRED)


def relay_bounces(spool: Spool, mid: str) -> None:
    e = spool.read(State.ACTIVE, f"{mid}.json")
    e.attempts, e.failed = 1, {"x@y.z": "550 5.1.1 no such user"}
    spool.move(e, State.ACTIVE, State.FAILED)


def relay_paces(spool: Spool, mid: str) -> None:
    e = spool.read(State.INCOMING, f"{mid}.json")
    e.next_attempt = time.time() + 60
    spool.move(e, State.INCOMING, State.DEFERRED, rewrite=False)


def operator(action: str) -> Callable[[Spool, str], None]:
    """``queue ACTION ID`` as the CLI runs it; a refusal (the message moved) is fine."""
    def run(spool: Spool, mid: str) -> None:
        with contextlib.suppress(queuectl.QueueCommandError):
            getattr(queuectl, action)(spool, mid)
    return run


def failed_entry(mid: str) -> Entry:
    return entry(mid, attempts=3, failed={"x@y.z": Reply(550, "5.1.1 no such user")})


Setup = tuple[State, Callable[[str], Entry]]

# name: (where the message starts, the operation under test, the other process's operation,
#        whether the message may end up deleted)
RACES: dict[str, tuple[Setup, Callable[[Spool, str], None], Callable[[Spool, str], None],
                       bool]] = {
    # An operator releases a held message; the relay's dispatcher sees it in deferred/.
    "release-vs-dispatcher": ((State.HOLD, entry), operator("release"), relay_takes, False),
    # The relay defers after an attempt; an operator holds the message.
    "defer-vs-hold": ((State.ACTIVE, entry), relay_defers, operator("hold"), False),
    # An operator deletes a deferred message; the relay takes it for an attempt.
    "delete-vs-dispatcher": ((State.DEFERRED, entry), operator("delete"), relay_takes, True),
    # An operator holds a message; the relay takes it for an attempt.
    "hold-vs-dispatcher": ((State.INCOMING, entry), operator("hold"), relay_takes, False),
    # Two operators: one retries a dead letter, the other deletes it.
    "retry-vs-delete": ((State.FAILED, failed_entry), operator("retry"), operator("delete"),
                        True),
}


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Steps:
    # A second operator command waits for the first one's lock; here it runs *inside* the
    # first one, so it must give up quickly instead of waiting for it.
    monkeypatch.setattr(queuectl, "LOCK_WAIT", 0.05, raising=False)
    return Steps(monkeypatch, tmp_path)


def fresh(tmp_path: Path, name: str, setup: Setup, mid: str = "RACE") -> Spool:
    s = Spool(tmp_path / name)
    s.open(on_tmpfs="warn")
    state, make = setup
    s.add(make(mid), b"Subject: race\r\n\r\nbody\r\n", state)
    return s


@pytest.mark.parametrize("race", list(RACES))
def test_a_concurrent_operation_at_any_step_leaves_the_message_in_one_state(
        steps: Steps, tmp_path: Path, race: str) -> None:
    setup, first, second, may_go = RACES[race]
    probe = fresh(tmp_path, f"{race}-probe", setup)
    steps.reset()
    first(probe, "RACE")
    n = steps.count
    assert n >= 1, "the operation changed nothing: this test would prove nothing"
    steps.reset()
    # Before step k of the first operation, for every k; then one after the other.
    for k in range(n + 1):
        spool = fresh(tmp_path, f"{race}-{k}", setup)
        steps.reset()
        steps.check = lambda s=spool: in_one_place(s, "RACE", may_go=may_go)

        def interleave(step: int, spool: Spool = spool, k: int = k) -> None:
            if step == k:
                second(spool, "RACE")

        steps.before = interleave
        first(spool, "RACE")
        if k == n:
            second(spool, "RACE")
        steps.reset()
        in_one_place(spool, "RACE", may_go=may_go)
        assert list((spool.root / "tmp").iterdir()) == [], f"step {k}: tmp/ not cleaned up"
        where = places(spool, "RACE")
        if where and where[0] in ("deferred", "hold") and setup[0] is State.ACTIVE:
            # The attempt's outcome survived, whoever moved the message last.
            assert spool.read(State(where[0]), "RACE.json").attempts == 1, (k, where)


def test_an_operator_delete_never_removes_the_data_of_a_message_being_delivered(
        steps: Steps, tmp_path: Path) -> None:
    spool = fresh(tmp_path, "spool", (State.DEFERRED, entry))
    steps.reset()
    taken: list[int] = []

    def the_relay_takes_it(step: int) -> None:     # between the command's check and act
        relay_takes(spool, "RACE")
        taken.append(step)

    steps.before = the_relay_takes_it
    with pytest.raises(queuectl.QueueCommandError, match="changed while") as err:
        queuectl.delete(spool, "RACE")
    assert taken == [0]
    assert err.value.temporary
    assert places(spool, "RACE") == ["active"]
    assert spool.read_data("RACE").startswith(b"Subject: race")


# Operations and the states the message may be in once the relay has recovered from a
# crash before any of their steps: the state before, or the state after (for active/, the
# state before is incoming/: recovery requeues what was being delivered).
CRASHES: dict[str, tuple[Setup, Callable[[Spool, str], None], set[str]]] = {
    "relay takes": ((State.DEFERRED, entry), relay_takes, {"deferred", "incoming"}),
    "relay paces": ((State.INCOMING, entry), relay_paces, {"incoming", "deferred"}),
    "relay defers": ((State.ACTIVE, entry), relay_defers, {"incoming", "deferred"}),
    "relay bounces": ((State.ACTIVE, entry), relay_bounces, {"incoming", "failed"}),
    "relay delivered": ((State.ACTIVE, entry), lambda s, m: s.remove(m, State.ACTIVE),
                        {"incoming", "gone"}),
    "queue hold": ((State.DEFERRED, entry), operator("hold"), {"deferred", "hold"}),
    "queue release": ((State.HOLD, entry), operator("release"), {"hold", "deferred"}),
    "queue retry": ((State.FAILED, failed_entry), operator("retry"), {"failed", "deferred"}),
    "queue delete": ((State.HOLD, entry), operator("delete"), {"hold", "gone"}),
}


@pytest.mark.parametrize("operation", list(CRASHES))
def test_a_crash_at_any_step_is_resolved_by_recovery(
        steps: Steps, tmp_path: Path, operation: str) -> None:
    setup, run, allowed = CRASHES[operation]
    probe = fresh(tmp_path, f"{operation}-probe", setup)
    steps.reset()
    run(probe, "RACE")
    n = steps.count
    steps.reset()
    seen: set[str] = set()
    for k in range(n):
        spool = fresh(tmp_path, f"{operation}-{k}", setup)
        steps.reset()

        def crash(step: int, k: int = k) -> None:
            if step == k:
                raise Crash

        steps.before = crash
        with pytest.raises(Crash):
            run(spool, "RACE")
        steps.reset()
        recover(spool)                                   # the relay starts again
        where = places(spool, "RACE")
        state = where[0] if where else "gone"
        assert state in allowed, f"crash before step {k}: {operation} left it in {where}"
        in_one_place(spool, "RACE", may_go="gone" in allowed)
        if state == "gone":
            assert not spool.data_path("RACE").exists()
        if operation == "queue retry" and state == "deferred":
            assert spool.read(State.DEFERRED, "RACE.json").failed == {}
        assert list((spool.root / "tmp").iterdir()) == []
        assert list((spool.root / "corrupt").iterdir()) == []
        seen.add(state)
    # Crashing before the last step still leaves the message where it was; the state after
    # is reached only by the step itself, so both outcomes are exercised above.
    assert seen, "no step was crashed"


def test_content_of_shared_states_is_never_rewritten(spool: Spool) -> None:
    spool.add(entry("SHR"), b"data", State.DEFERRED)
    e = spool.read(State.DEFERRED, "SHR.json")
    e.attempts = 7
    with pytest.raises(ValueError, match="shared"):
        spool.move(e, State.DEFERRED, State.HOLD)
    assert spool.read(State.DEFERRED, "SHR.json").attempts == 0


def test_operator_lock_excludes_a_second_holder(spool: Spool) -> None:
    with spool.operator_lock():
        started = time.monotonic()
        with pytest.raises(SpoolBusy), spool.operator_lock(wait=0.1):
            pass
        assert time.monotonic() - started < 2
    with spool.operator_lock(wait=0):                     # released on exit
        pass


def test_a_message_discarded_during_a_write_is_gone_and_its_descriptor_closed(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client goes away while its last bytes are written in a worker thread: the file
    goes at once, and the descriptor is closed by the write, never under it."""
    import threading

    writer = spool.writer("GONE00000001")
    writer.write(b"Subject: x\r\n")
    entered, release = threading.Event(), threading.Event()
    real = disk.write_all

    def slow(fd: int, data: bytes) -> None:
        entered.set()
        release.wait(5)
        real(fd, data)

    monkeypatch.setattr(disk, "write_all", slow)
    errors: list[BaseException] = []

    def last_write() -> None:
        try:
            writer.write(b"body\r\n", finish=True)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=last_write)
    thread.start()
    assert entered.wait(5)
    fd = writer._fd
    writer.discard()                            # from "the event loop", mid-write
    assert not writer.path.exists() and writer._fd == fd   # not closed under the write
    release.set()
    thread.join(5)
    assert [type(e) for e in errors] == [ValueError]
    assert writer._fd is None                   # closed by the write itself
    assert list((spool.root / "tmp").iterdir()) == []


def test_a_small_message_keeps_its_bytes_for_its_first_attempt(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to KEEP_SMALL, what the writer wrote is kept with the content, so the delivery
    that follows need not read it back; above, nothing is kept (memory stays bounded)."""
    from relay.core import diskio
    from relay.core.message import KEEP_SMALL

    small, large = spool.writer("SMALL"), spool.writer("LARGE")
    small.write(b"Subject: x\r\n\r\n")
    small.write(b"body\r\n", finish=True)
    large.write(b"x" * KEEP_SMALL)
    large.write(b"y\r\n", finish=True)

    async def no_disk(*_: object, **__: object) -> None:
        raise AssertionError("read from disk")

    monkeypatch.setattr(diskio, "run", no_disk)
    assert asyncio.run(small.content().read_all()) == b"Subject: x\r\n\r\nbody\r\n"
    with pytest.raises(AssertionError, match="read from disk"):
        asyncio.run(large.content().read_all())
