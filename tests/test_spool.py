"""The spool's on-disk promises: durable accept, atomic state moves, crash recovery."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from relay.spool import Entry, Spool, SpoolError, State, filesystem_type


def entry(mid: str, **kw: object) -> Entry:
    return Entry(id=mid, profile="system", mail_from="a@b.c", rcpt_tos=["x@y.z"], size=5,
                 received_at=time.time(), **kw)  # type: ignore[arg-type]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.open()
    return s


async def test_accept_writes_data_and_metadata(spool: Spool) -> None:
    await spool.accept(entry("AAA"), b"hello\r\n")
    assert spool.read_data("AAA") == b"hello\r\n"
    assert spool.read(State.INCOMING, "AAA.json").rcpt_tos == ["x@y.z"]
    assert list((spool.root / "tmp").iterdir()) == []
    await spool.close()


async def test_concurrent_accepts_share_directory_fsyncs(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = spool._sync_dirs

    def counting() -> None:
        nonlocal calls
        calls += 1
        real()

    monkeypatch.setattr(spool, "_sync_dirs", counting)
    await asyncio.gather(*(spool.accept(entry(f"M{i:03d}"), b"x") for i in range(200)))
    assert spool.count(State.INCOMING) == 200
    assert calls < 200                               # group commit: batches, not one each
    await spool.close()


def test_move_and_deferred_due_time(spool: Spool) -> None:
    spool._store(entry("BBB"), b"data", State.INCOMING)
    e = spool.read(State.INCOMING, "BBB.json")
    e.attempts, e.next_attempt, e.last_reply = 1, 1_000, "451 4.3.2 busy"
    spool.move(e, State.INCOMING, State.DEFERRED)
    assert list(spool.names(State.DEFERRED)) == ["BBB.json"]
    assert (spool.root / "deferred" / "BBB.json").stat().st_mtime == 1000
    assert spool.due(now=999, limit=10) == ([], 1000)
    assert spool.due(now=1000, limit=10) == (["BBB.json"], float("inf"))
    again = spool.read(State.DEFERRED, "BBB.json")
    assert again.attempts == 1 and again.last_reply == "451 4.3.2 busy"
    assert again.next_attempt == 1000
    spool.set_due("BBB", 5)
    assert spool.read(State.DEFERRED, "BBB.json").next_attempt == 5
    assert spool.locate("BBB") == (State.DEFERRED, spool.root / "deferred" / "BBB.json")
    assert list((spool.root / "tmp").iterdir()) == []


def test_move_of_a_message_someone_else_moved_changes_nothing(spool: Spool) -> None:
    spool._store(entry("CCC"), b"data", State.INCOMING)
    e = spool.read(State.INCOMING, "CCC.json")
    spool.move(e, State.INCOMING, State.HOLD)            # an operator holds it
    with pytest.raises(FileNotFoundError):
        spool.move(e, State.INCOMING, State.DEFERRED)
    assert spool.locate("CCC") == (State.HOLD, spool.root / "hold" / "CCC.json")
    assert list((spool.root / "tmp").iterdir()) == []


def test_flush_makes_deferred_due(spool: Spool) -> None:
    for i in range(3):
        spool._store(entry(f"F{i}", next_attempt=time.time() + 3600), b"x", State.DEFERRED)
    assert spool.flush_deferred(time.time()) == 3
    assert len(spool.due(time.time() + 1, 10)[0]) == 3


def test_due_returns_earliest_first_and_bounded(spool: Spool) -> None:
    for i in range(50):
        e = entry(f"D{i:02d}", next_attempt=float(1000 + (i * 7) % 50))
        spool._store(e, b"x", State.DEFERRED)
    due, upcoming = spool.due(now=2000, limit=5)
    assert upcoming == float("inf")
    assert len(due) == 5
    times = [spool.read(State.DEFERRED, n).next_attempt for n in due]
    assert times == sorted(times) and times[0] == 1000


def test_recover_after_crash(spool: Spool) -> None:
    spool._store(entry("OK1"), b"1", State.INCOMING)
    spool._store(entry("ACT"), b"2", State.ACTIVE)
    (spool.root / "tmp" / "HALF.eml").write_bytes(b"half written")
    (spool.root / "data" / "ORPHAN.eml").write_bytes(b"never acknowledged")
    (spool.root / "deferred" / "NODATA.json").write_bytes(b"{}")
    report = spool.recover()
    assert report == {"discarded": 1, "requeued": 1, "orphans": 1, "corrupt": 1}
    assert sorted(spool.names(State.INCOMING)) == ["ACT.json", "OK1.json"]
    assert not (spool.root / "data" / "ORPHAN.eml").exists()
    assert (spool.root / "corrupt" / "NODATA.json").exists()


def test_remove_deletes_data(spool: Spool) -> None:
    spool._store(entry("GONE"), b"1", State.ACTIVE)
    spool.remove("GONE", State.ACTIVE)
    assert spool.locate("GONE") is None
    assert not spool.data_path("GONE").exists()


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
