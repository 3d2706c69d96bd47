"""An acknowledged message is on disk for good: its files and their directories are fsynced
before Queue.submit() hands back the 250.

os.fsync is wrapped to record what each call synced (the path behind the descriptor and,
for a directory, what it held). The queue is not started, so no delivery attempt can sync
anything and hide a missing fsync of the accept path.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import time
from collections.abc import Container
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay.app import Relay
from relay.core.message import Content, DeliveryResult, Outbound, new_message_id
from relay.core.reply import Reply
from relay.deliver.deliverer import Deliverer
from relay.oauth.registry import Tokens
from relay.queue import attempt, bounce, waiters
from relay.queue.scheduler import Queue
from relay.sandbox.service import Sandbox
from relay.spool import ctl as queuectl
from relay.spool import disk
from relay.spool.records import Entry, State
from relay.spool.recovery import recover
from relay.spool.store import Spool
from tests.conftest import address, build_config, wait_until

MESSAGE = b"From: app@contoso.com\r\nTo: a@example.com\r\nSubject: durable\r\n\r\nbody\r\n"


async def test_file_and_directory_are_synced_before_submit_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = build_config({"delivery": {"synchronous": None}})
    spool = Spool(tmp_path / "spool")
    spool.open(on_tmpfs="warn")
    tokens = Tokens(config)
    deliverer = Deliverer(config, tokens)
    queue = Queue(spool, deliverer, config)
    root = spool.root.resolve()

    events: list[tuple[str, str, frozenset[str]]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        held = frozenset(os.listdir(path)) if os.path.isdir(path) else frozenset()
        real_fsync(fd)
        events.append(("fsync", path, held))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    mid = new_message_id()
    try:
        reply = await queue.submit(Outbound(
            id=mid, profile="system", mail_from="app@contoso.com", rcpt_tos=["a@example.com"],
            content=Content.from_bytes(MESSAGE), mailbox="relay@contoso.com"))
        events.append(("reply", "", frozenset()))
    finally:
        monkeypatch.undo()
        await queue.spool.close()
        await deliverer.aclose()
        await tokens.aclose()

    assert reply.code == 250 and mid in reply.text
    before = [(path, held) for kind, path, held in events[:events.index(("reply", "",
                                                                          frozenset()))]]
    paths = [path for path, _ in before]

    def first(path: Path, containing: str | None = None) -> int:
        for i, (p, held) in enumerate(before):
            if p == str(path) and (containing is None or containing in held):
                return i
        raise AssertionError(f"{path} not synced before the reply"
                             + (f" while holding {containing}" if containing else "")
                             + f"; synced: {paths}")

    # The files themselves, while still in tmp/ (before the rename publishes them)...
    data_file = first(root / "tmp" / f"{mid}.eml")
    meta_file = first(root / "tmp" / f"{mid}.json")
    # ...and the directories they were renamed into, after the rename: a crash then keeps
    # the names, not only the blocks.
    data_dir = first(root / "data", containing=f"{mid}.eml")
    meta_dir = first(root / "incoming", containing=f"{mid}.json")
    assert data_file < data_dir and meta_file < meta_dir
    assert (spool.data_path(mid)).read_bytes() == MESSAGE


# --- disk trouble after the 250 ------------------------------------------------------------

async def send_to(relay: Relay, rcpts: list[str]) -> aiosmtplib.SMTPResponse:
    host, port = address(relay)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as client:
        await client.mail("app@contoso.com")
        for rcpt in rcpts:
            await client.rcpt(rcpt)
        return await client.data(MESSAGE)


def _enospc_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next metadata write (an attempt saving its outcome) fails with ENOSPC, once."""
    real = disk.write_synced
    left = [1]

    def write(path: Path, data: bytes, *, sync: bool = True) -> None:
        # Only durable writes: the quick record right after the upstream's 250 is not
        # the outcome being saved.
        if ".json." in Path(path).name and sync and left[0]:
            left[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data, sync=sync)

    monkeypatch.setattr(disk, "write_synced", write)


@pytest.mark.parametrize("synchronous", [None, 10])
async def test_a_disk_error_while_saving_an_outcome_strands_nothing(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, synchronous: int | None) -> None:
    """ok@ is delivered, slow@ deferred, and saving the deferral fails once: the message
    must not sit in active/ (nobody scans it) nor be sent to ok@ again."""
    relay = Relay(sandbox.apply(build_config({"delivery": {
        "synchronous": synchronous, "retry_initial": "0.2s", "retry_max": "0.5s"}})))
    await relay.start()
    try:
        _enospc_once(monkeypatch)
        sandbox.exchange.fail_next("rcpt", 451, "4.4.0 try later",
                                   recipient="slow@example.com")
        reply = await send_to(relay, ["ok@example.com", "slow@example.com"])
        assert reply.code == 250                    # on disk: never a 4xx that invites a resend
        await wait_until(lambda: len(sandbox.exchange.messages) == 2)
        assert [m.rcpt_tos for m in sandbox.exchange.messages] == [
            ["ok@example.com"], ["slow@example.com"]]
        await wait_until(lambda: relay.spool.count(State.ACTIVE) == 0
                         and relay.queue.in_flight == 0)
        assert sum(relay.spool.count(s) for s in State) == 0
    finally:
        await relay.stop()


async def test_missing_data_is_set_aside_not_retried_forever(sandbox: Sandbox) -> None:
    relay = Relay(sandbox.apply(build_config({"delivery": {"synchronous": None}})))
    relay.spool.open(on_tmpfs="warn")
    entry = Entry(id="NODATA000001", profile="system", mail_from="app@contoso.com",
                  rcpt_tos=["a@example.com"], size=10, received_at=time.time())
    relay.spool.add(entry, MESSAGE)
    await relay.queue.start()           # recovery first: the message is whole then
    try:
        relay.spool.data_path(entry.id).unlink()   # gone behind the relay's back
        relay.queue.flush()
        await wait_until(lambda: (relay.spool.root / "corrupt" / f"{entry.id}.json").exists())
        assert sum(relay.spool.count(s) for s in State) == 0
        assert sandbox.exchange.messages == []
    finally:
        await relay.queue.stop(0)


def test_recovery_and_queue_commands_take_turns(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`queue release` moving a message while a starting relay looks for the owner of
    each data file would make the data look orphaned: recovery holds the operator lock."""
    root = tmp_path / "spool"
    relay_spool, operator = Spool(root), Spool(root)
    relay_spool.open(on_tmpfs="warn")
    entry = Entry(id="RACE00000001", profile="system", mail_from="a@contoso.com",
                  rcpt_tos=["r@example.com"], size=5, received_at=0.0)
    relay_spool.add(entry, MESSAGE)
    queuectl.hold(operator, entry.id)
    monkeypatch.setattr(queuectl, "LOCK_WAIT", 0.05)
    real = Spool.meta_path
    tried: list[str] = []

    def meta_path(self: Spool, state: State, mid: str) -> Path:
        # In the middle of recovery's orphan scan, an operator releases the message.
        if self is relay_spool and state is State.HOLD and not tried:
            try:
                queuectl.release(operator, entry.id)
                tried.append("released")
            except queuectl.QueueCommandError as exc:
                assert exc.temporary
                tried.append("busy")
        return real(self, state, mid)

    monkeypatch.setattr(Spool, "meta_path", meta_path)
    recover(relay_spool)
    assert tried == ["busy"]
    assert relay_spool.data_path(entry.id).exists()
    monkeypatch.setattr(Spool, "meta_path", real)
    assert queuectl.release(operator, entry.id).endswith("released")
    assert relay_spool.locate(entry.id) is not None


async def test_dispatcher_and_a_waiting_client_never_both_run_a_message(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatcher reads an incoming/ file (slowly) while a synchronous submit claims
    the same message: one attempt only, and it stays tracked (stop() waits for it)."""
    relay = Relay(sandbox.apply(build_config({"delivery": {"synchronous": 10}})))
    await relay.start()
    loop = asyncio.get_running_loop()
    queue = relay.queue
    real_add, real_read = Spool.add, Spool.read

    def add(self: Spool, entry: Entry, data: bytes, state: State = State.INCOMING) -> None:
        real_add(self, entry, data, state)
        loop.call_soon_threadsafe(queue.wake)           # the dispatcher looks right now

    def read(self: Spool, state: State, name: str) -> Entry:
        entry = real_read(self, state, name)
        if state is State.INCOMING:
            time.sleep(0.3)                              # ...and is slow to read the file
        return entry

    monkeypatch.setattr(Spool, "add", add)
    monkeypatch.setattr(Spool, "read", read)
    real_deliver = relay.deliverer.deliver
    running: list[str] = []
    release = asyncio.Event()

    async def held_deliver(msg: Outbound, **kw: object) -> object:
        running.append(msg.id)
        await release.wait()
        return await real_deliver(msg, **kw)              # type: ignore[arg-type]

    monkeypatch.setattr(relay.deliverer, "deliver", held_deliver)
    try:
        client = asyncio.create_task(send_to(relay, ["ok@example.com"]))
        await wait_until(lambda: len(running) == 1)
        await asyncio.sleep(0.5)                         # the dispatcher's read is done
        assert len(running) == 1
        assert queue.in_flight == 1
        release.set()
        reply = await client
        assert reply.code == 250 and "delivered" in reply.message
        assert len(sandbox.exchange.messages) == 1
    finally:
        release.set()
        await relay.stop()


# --- the queue alone, with a deliverer that answers as told --------------------------------

class ScriptedDeliverer:
    """Answers every attempt with ``reply`` after ``delay``; records what it was given."""

    def __init__(self, reply: Reply | None = None, delay: float = 0.0) -> None:
        self.reply, self.delay = reply or Reply(250, "2.0.0 Ok"), delay
        self.calls: list[tuple[str, list[str]]] = []

    async def deliver(self, msg: Outbound, **_: object) -> DeliveryResult:
        self.calls.append((msg.id, list(msg.rcpt_tos)))
        await asyncio.sleep(self.delay)
        if self.reply.ok:
            return DeliveryResult(self.reply, list(msg.rcpt_tos))
        return DeliveryResult(self.reply)


def scripted_queue(tmp_path: Path, deliverer: ScriptedDeliverer,
                   **delivery: object) -> tuple[Queue, Spool]:
    config = build_config({"delivery": {"synchronous": None, "retry_initial": "0.2s",
                                        "retry_max": "0.5s", **delivery}})
    spool = Spool(tmp_path / "spool")
    spool.open(on_tmpfs="warn")
    return Queue(spool, deliverer, config), spool  # type: ignore[arg-type]


def count_scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the limit of every scan of deferred/ (Spool.due) from now on."""
    scans: list[int] = []
    real_due = Spool.due

    def due(self: Spool, now: float, limit: int,
            skip: Container[str] = ()) -> tuple[list[str], float]:
        scans.append(limit)
        return real_due(self, now, limit, skip)

    monkeypatch.setattr(Spool, "due", due)
    return scans


def outbound() -> Outbound:
    return Outbound(id=new_message_id(), profile="system", mail_from="app@contoso.com",
                    rcpt_tos=["a@example.com"], content=Content.from_bytes(MESSAGE),
                    mailbox="relay@contoso.com")


async def test_a_backlog_costs_one_scan_per_window_not_per_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deliverer = ScriptedDeliverer(delay=0.02)
    queue, spool = scripted_queue(tmp_path, deliverer, window=4, mailbox_limits={
        "messages_per_minute": 10_000, "max_sessions": 100})
    for _ in range(40):
        _deferred(spool, time.time() - 10)
    scans = count_scans(monkeypatch)
    await queue.start()
    try:
        await wait_until(lambda: len(deliverer.calls) == 40)
    finally:
        await queue.stop(1)
    assert len(scans) <= 40 // 4 + 2          # not one per finished attempt
    assert set(scans) == {4}


async def test_an_answered_client_is_not_held_by_a_disk_that_refuses_the_update(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waiters, "SETTLE_WAIT", 0.2)
    queue, _ = scripted_queue(tmp_path, ScriptedDeliverer(Reply(550, "5.1.1 User unknown")))
    await queue.start()

    def read_only(*_: object, **__: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    try:
        monkeypatch.setattr(Spool, "remove", read_only)
        reply = await asyncio.wait_for(queue.submit(outbound(), wait=5), 3)
        assert reply.code == 550
    finally:
        monkeypatch.undo()
        await queue.stop(0.1)


@pytest.mark.parametrize("holds_fails", [False, True])
async def test_a_take_that_failed_after_its_rename_is_still_delivered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, holds_fails: bool) -> None:
    """The take's rename into active/ happened and reading the message's bytes in the
    same step failed (EIO): the message is in active/, which nobody scans, so the attempt
    must go on; also when asking where the message is fails at first (EIO from stat)."""
    monkeypatch.setattr(attempt, "BACKOFF_MIN_KEEP", 0.05)
    deliverer = ScriptedDeliverer()
    queue, spool = scripted_queue(tmp_path, deliverer)
    if holds_fails:
        real_holds = Spool.holds
        calls: list[int] = []

        def holds(self: Spool, state: State, mid: str) -> bool:
            calls.append(1)
            if len(calls) == 1:
                raise OSError(errno.EIO, "Input/output error")
            return real_holds(self, state, mid)

        monkeypatch.setattr(Spool, "holds", holds)
    real_content = Spool.content
    failed: list[str] = []

    def content(self: Spool, mid: str) -> Content:
        if not failed:
            assert self.meta_path(State.ACTIVE, mid).exists()     # renamed already
            failed.append(mid)
            raise OSError(errno.EIO, "Input/output error")
        return real_content(self, mid)

    monkeypatch.setattr(Spool, "content", content)
    entry = _entry()
    spool.add(entry, MESSAGE)       # found by a scan, so its bytes are read from disk
    await queue.start()
    try:
        await wait_until(lambda: len(deliverer.calls) == 1
                         and sum(spool.count(s) for s in State) == 0)
        assert failed == [entry.id]
    finally:
        await queue.stop(1)


async def test_a_report_that_cannot_be_built_is_filed_not_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Building a report is deterministic: if it fails once it fails every time, and a
    retry would offer the message to Exchange again only to be refused again. The failure
    is filed in failed/ (for an operator, with the traceback in the log) at once."""
    deliverer = ScriptedDeliverer(Reply(550, "5.1.1 User unknown"))
    queue, spool = scripted_queue(tmp_path, deliverer)

    def build_dsn(**kw: object) -> bytes:
        raise RuntimeError("bug")

    monkeypatch.setattr(bounce, "build_dsn", build_dsn)
    await queue.start()
    try:
        msg = outbound()
        await queue.submit(msg)
        await wait_until(lambda: spool.holds(State.FAILED, msg.id))
        assert len(deliverer.calls) == 1
        failed = spool.read(State.FAILED, f"{msg.id}.json")
        assert failed.failed == {"a@example.com": Reply.parse("550 5.1.1 User unknown")}
        assert [s for s in State if s is not State.FAILED and spool.count(s)] == []
        assert "cannot build the delivery report" in caplog.text
    finally:
        await queue.stop(1)


async def test_a_disk_that_keeps_refusing_is_not_asked_in_a_tight_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    queue, _ = scripted_queue(tmp_path, ScriptedDeliverer())
    real = Spool.move
    refused: list[str] = []

    def move(self: Spool, entry: Entry, src: State, dst: State, **kw: bool) -> None:
        if dst is State.ACTIVE:
            refused.append(entry.id)
            raise OSError(errno.EROFS, "Read-only file system")
        real(self, entry, src, dst, **kw)

    monkeypatch.setattr(Spool, "move", move)
    await queue.start()
    try:
        await queue.submit(outbound())
        await wait_until(lambda: refused)
        await asyncio.sleep(0.5)
        assert len(refused) <= 2                # about one try a second, not thousands
    finally:
        await queue.stop(1)


def _entry(**kw: Any) -> Entry:
    return Entry(id=new_message_id(), profile="system", mail_from="app@contoso.com",
                 rcpt_tos=["a@example.com"], size=len(MESSAGE), received_at=time.time(),
                 mailbox="relay@contoso.com", **kw)


def _deferred(spool: Spool, due: float) -> Entry:
    entry = _entry(next_attempt=due, attempts=1)
    spool.add(entry, MESSAGE, State.DEFERRED)
    return entry


def _unparsable(spool: Spool) -> Entry:
    """A deferred message whose metadata is damaged, due before everything else."""
    entry = _deferred(spool, 1.0)
    meta = spool.meta_path(State.DEFERRED, entry.id)
    meta.write_text("{not json")
    os.utime(meta, (1, 1))
    return entry


async def test_buffered_names_are_checked_when_their_turn_comes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The buffer of due names is a hint, not the truth: a name that was deferred again
    since (its backoff must hold), held or deleted is skipped, and does not keep a
    later name from using the free slot."""
    deliverer = ScriptedDeliverer()
    queue, spool = scripted_queue(tmp_path, deliverer, window=1)
    later = _deferred(spool, time.time() + 3600)      # deferred again meanwhile
    due = _deferred(spool, time.time() - 1)
    # What the scan of deferred/ listed as due, in that order; one has been deleted since.
    listed = ["GONE00000001.json", f"{later.id}.json", f"{due.id}.json"]
    monkeypatch.setattr(Spool, "due", lambda *_, **__: (listed, math.inf))
    try:
        await queue.dispatch_once()
        await wait_until(lambda: queue.in_flight == 0)
        assert deliverer.calls == [(due.id, ["a@example.com"])]
        assert spool.holds(State.DEFERRED, later.id)
    finally:
        await queue.stop(1)


async def test_an_unparsable_deferred_file_is_set_aside_not_rescanned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deliverer = ScriptedDeliverer()
    queue, spool = scripted_queue(tmp_path, deliverer, window=2)
    bad = [_unparsable(spool) for _ in range(2)]
    good = _deferred(spool, time.time() - 5)
    scans = count_scans(monkeypatch)
    await queue.start()
    try:
        await wait_until(lambda: deliverer.calls == [(good.id, ["a@example.com"])])
        await asyncio.sleep(0.3)
        assert len(scans) <= 4                   # no rescan every 50 ms
        assert all((spool.root / "corrupt" / f"{e.id}.json").exists() for e in bad)
    finally:
        await queue.stop(1)
    # Set aside whole: the next start's recovery must not take the data for an orphan.
    recover(Spool(spool.root))
    assert all((spool.root / "corrupt" / f"{e.id}.eml").read_bytes() == MESSAGE for e in bad)


async def test_unreadable_files_do_not_hold_up_the_mail_due_after_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files the relay may not read (written by root with `sudo ... queue retry`, say)
    are the earliest due: they are passed over, and the rest is delivered."""
    deliverer = ScriptedDeliverer()
    queue, spool = scripted_queue(tmp_path, deliverer, window=2)
    locked = {f"{_deferred(spool, time.time() - 100).id}.json" for _ in range(2)}
    good = _deferred(spool, time.time() - 5)
    real_read = Spool.read

    def read(self: Spool, state: State, name: str) -> Entry:
        if name in locked:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_read(self, state, name)

    monkeypatch.setattr(Spool, "read", read)
    await queue.start()
    try:
        await wait_until(lambda: deliverer.calls == [(good.id, ["a@example.com"])])
        assert all(spool.holds(State.DEFERRED, n[:-5]) for n in locked)  # left alone
    finally:
        await queue.stop(1)


async def test_new_mail_and_retries_take_turns(tmp_path: Path) -> None:
    deliverer = ScriptedDeliverer()
    queue, spool = scripted_queue(tmp_path, deliverer, window=2)
    retries = [_deferred(spool, time.time() - 5) for _ in range(3)]
    for _ in range(3):
        spool.add(_entry(), MESSAGE)
    try:
        await queue.dispatch_once()             # one pass, a window of two
        assert queue.in_flight == 2
        await wait_until(lambda: queue.in_flight == 0)
        started = {mid for mid, _ in deliverer.calls}
        assert len(started) == 2
        assert len(started & {e.id for e in retries}) == 1
    finally:
        await queue.stop(1)


def test_a_crash_while_setting_aside_loses_nothing(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from relay.ops.gauges import scan_spool

    spool = Spool(tmp_path / "spool")
    spool.open(on_tmpfs="warn")
    entry = _deferred(spool, time.time())

    def crash(*_: object) -> None:
        raise KeyboardInterrupt     # the process dies between moving the data and the rest

    monkeypatch.setattr(Spool, "set_aside_file", crash)
    with pytest.raises(KeyboardInterrupt):
        spool.set_aside(State.DEFERRED, entry.id, "test")
    monkeypatch.undo()
    recover(Spool(spool.root))      # the next start
    corrupt = spool.root / "corrupt"
    assert (corrupt / f"{entry.id}.eml").read_bytes() == MESSAGE
    assert (corrupt / f"{entry.id}.json").exists()
    assert scan_spool(spool).counts["corrupt"] == 1     # one message, not its two files


async def test_with_one_free_slot_retries_still_get_their_turn(tmp_path: Path) -> None:
    deliverer = ScriptedDeliverer()
    queue, spool = scripted_queue(tmp_path, deliverer, window=1)
    retry = _deferred(spool, time.time() - 5)
    for _ in range(3):
        spool.add(_entry(), MESSAGE)
    try:
        for _ in range(2):          # two passes, one slot each: new mail cannot take both
            await queue.dispatch_once()
            await wait_until(lambda: queue.in_flight == 0)
        assert retry.id in [mid for mid, _ in deliverer.calls]
    finally:
        await queue.stop(1)


async def test_a_file_that_cannot_be_set_aside_is_passed_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deliverer = ScriptedDeliverer()
    queue, spool = scripted_queue(tmp_path, deliverer, window=1)
    _unparsable(spool)
    good = _deferred(spool, time.time() - 5)

    def refuse(*_: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Spool, "set_aside", refuse)
    await queue.start()
    try:
        await wait_until(lambda: deliverer.calls == [(good.id, ["a@example.com"])])
    finally:
        await queue.stop(1)


async def test_the_queue_leaves_a_message_alone_until_its_accept_is_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message's files are in incoming/ before the directories are synced; a failed sync
    takes them out again (its client is told 4xx and sends it again). The dispatcher,
    looking at incoming/ in between, must not have taken it for delivery."""
    deliverer = ScriptedDeliverer()
    queue, spool = scripted_queue(tmp_path, deliverer)
    await queue.start()
    loop = asyncio.get_running_loop()
    real_sync = Spool.sync_dirs

    def sync_dirs(self: Spool, states: object = ()) -> None:
        loop.call_soon_threadsafe(queue.wake)          # the dispatcher looks now...
        time.sleep(0.3)
        raise OSError(errno.EIO, "Input/output error")  # ...and the sync fails

    monkeypatch.setattr(Spool, "sync_dirs", sync_dirs)
    try:
        with pytest.raises(OSError):
            await queue.submit(outbound())
        monkeypatch.setattr(Spool, "sync_dirs", real_sync)
        await asyncio.sleep(0.3)
        assert deliverer.calls == []
        assert sum(spool.count(s) for s in State) == 0
    finally:
        await queue.stop(1)


async def test_a_retry_whose_take_failed_is_tried_again_soon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only after the dispatcher's idle poll (10 s): it is due now."""
    monkeypatch.setattr(attempt, "BACKOFF_MIN_KEEP", 0.05)
    deliverer = ScriptedDeliverer()
    queue, spool = scripted_queue(tmp_path, deliverer)
    _deferred(spool, time.time() - 1)
    real = Spool.move
    refused: list[str] = []

    def move(self: Spool, entry: Entry, src: State, dst: State, **kw: bool) -> None:
        if dst is State.ACTIVE and not refused:
            refused.append(entry.id)
            raise OSError(errno.EIO, "Input/output error")
        real(self, entry, src, dst, **kw)

    monkeypatch.setattr(Spool, "move", move)
    await queue.start()
    try:
        await wait_until(lambda: deliverer.calls, within=3)
        assert refused
    finally:
        await queue.stop(1)


async def test_a_deferral_whose_directory_sync_failed_is_retried_on_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rename into deferred/ happened, the fsync after it failed: the attempt breaks
    down, finds the message gone from active/, and must still see it retried when due
    (0.2 s here), not after the dispatcher's idle poll (10 s)."""
    deliverer = ScriptedDeliverer(Reply(451, "4.4.0 try later"))
    queue, spool = scripted_queue(tmp_path, deliverer)
    real_fsync = disk.fsync_dir
    failed: list[Path] = []

    def fsync_dir(path: Path) -> None:
        if Path(path).name == "deferred" and deliverer.calls and not failed:
            failed.append(path)
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(path)

    monkeypatch.setattr(disk, "fsync_dir", fsync_dir)
    await queue.start()
    try:
        await queue.submit(outbound())
        await wait_until(lambda: failed)
        deliverer.reply = Reply(250, "2.0.0 Ok")
        await wait_until(lambda: len(deliverer.calls) == 2, within=3)
        await wait_until(lambda: sum(spool.count(s) for s in State) == 0)
    finally:
        await queue.stop(1)


class PartialDeliverer:
    """The upstream takes ok@ and refuses bad@ for good, and says so through
    ``on_accepted`` the moment its 250 arrives, as UpstreamSession does."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def deliver(self, msg: Outbound, *, on_accepted: Any = None,
                      **_: object) -> DeliveryResult:
        self.calls.append(list(msg.rcpt_tos))
        accepted = [r for r in msg.rcpt_tos if r != "bad@example.com"]
        refused = {r: Reply(550, "5.1.1 User unknown") for r in msg.rcpt_tos
                   if r not in accepted}
        if accepted and on_accepted is not None:
            on_accepted(accepted)
        return DeliveryResult(Reply(250, "2.0.0 Ok"), accepted, refused)


async def test_a_partial_delivery_is_recorded_on_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Delivered to one recipient while the disk is full: the record of it must reach
    active/ all the same, or a crash before space frees up (the outcome cannot be saved
    meanwhile) sends the message to that recipient again."""
    deliverer = PartialDeliverer()
    queue, spool = scripted_queue(tmp_path, deliverer)  # type: ignore[arg-type]
    msg = outbound()
    msg.rcpt_tos = ["ok@example.com", "bad@example.com"]
    await queue.submit(msg)                 # spooled; no attempt before start()
    real_write, root = os.write, str(spool.root.resolve()) + "/"

    def write(fd: int, data: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(root):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    await queue.start()
    try:
        await wait_until(lambda: deliverer.calls)
        await asyncio.sleep(0.2)            # the outcome cannot be saved: it stays in active/
        meta = spool.root / "active" / f"{msg.id}.json"
        assert Entry.from_json(meta.read_bytes(), meta.name).delivered == ["ok@example.com"]
    finally:
        monkeypatch.setattr(os, "write", real_write)
        await queue.stop(2)
    assert deliverer.calls[1:] in ([], [["bad@example.com"]])


class ReadingDeliverer(ScriptedDeliverer):
    """Reads every message's bytes, as the real delivery step does."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(delay=delay)
        self.data: dict[str, bytes] = {}

    async def deliver(self, msg: Outbound, **kw: object) -> DeliveryResult:
        self.data[msg.id] = await msg.content.read_all()
        return await super().deliver(msg, **kw)


def count_disk_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every look the queue takes at the spool for a message's record or bytes,
    and every listing of incoming/, from now on."""
    seen: list[str] = []
    for name in ("read", "content", "read_data"):
        real = getattr(Spool, name)

        def spy(self: Spool, *args: Any, _real: Any = real, _name: str = name) -> Any:
            seen.append(_name)
            return _real(self, *args)
        monkeypatch.setattr(Spool, name, spy)
    real_names = Spool.names

    def names(self: Spool, state: State) -> Any:
        if state is State.INCOMING:
            seen.append("scan of incoming/")
        return real_names(self, state)
    monkeypatch.setattr(Spool, "names", names)
    real_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.suffix == ".eml":
            seen.append(f"read {self.name}")
        return real_bytes(self)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    return seen


async def test_new_mail_goes_out_without_reading_back_what_was_just_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Handed over in memory: no scan of incoming/, no re-read of its record or bytes."""
    deliverer = ReadingDeliverer()
    queue, spool = scripted_queue(tmp_path, deliverer)
    await queue.start()
    try:
        await asyncio.sleep(0.1)        # the first pass after start scans incoming/
        seen = count_disk_reads(monkeypatch)
        sent = [outbound() for _ in range(20)]
        await asyncio.gather(*(queue.submit(m) for m in sent))
        await wait_until(lambda: len(deliverer.data) == 20)
        await wait_until(lambda: queue.in_flight == 0)
        assert seen == []
        assert all(deliverer.data[m.id] == MESSAGE for m in sent)
        assert sum(spool.count(s) for s in State) == 0
    finally:
        await queue.stop(1)


async def test_mail_beyond_the_hand_over_is_found_on_disk(tmp_path: Path) -> None:
    """More new mail than the window holds in memory: the rest is found by a scan, at once
    (not at the idle poll), and every message goes out once."""
    deliverer = ReadingDeliverer(delay=0.05)
    queue, spool = scripted_queue(tmp_path, deliverer, window=2)
    await queue.start()
    try:
        sent = [outbound() for _ in range(12)]
        started = time.monotonic()
        await asyncio.gather(*(queue.submit(m) for m in sent))
        await wait_until(lambda: len(deliverer.data) == 12)
        assert time.monotonic() - started < 5       # far less than the 10 s idle poll
        assert sorted(mid for mid, _ in deliverer.calls) == sorted(m.id for m in sent)
        assert all(deliverer.data[m.id] == MESSAGE for m in sent)
        await wait_until(lambda: queue.in_flight == 0)
        assert sum(spool.count(s) for s in State) == 0
    finally:
        await queue.stop(1)
