"""``smtp-oauth-relay queue ...`` on the spool of a stopped relay, as an operator runs it.

The spool is filled with the Spool API (so each test sets up exactly the states it needs),
then the command runs in-process through ``relay.cli.main`` with a real config file.
Races with a running relay are in tests/test_spool.py (every interleaving, every crash
point) and tests/test_process.py (a real relay process).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from relay import cli
from relay.app import Relay
from relay.core.reply import Reply
from relay.sandbox.service import Sandbox
from relay.spool import ctl as queuectl
from relay.spool.records import Entry, State
from relay.spool.store import Spool
from tests.conftest import build_config, wait_until

ROOT = Path(__file__).resolve().parent.parent
MAILBOX = "relay@contoso.com"
DATA = (f"From: {MAILBOX}\r\nTo: a@example.com\r\nSubject: queued for the operator\r\n"
        "\r\nthe body\r\n").encode()

CONFIG = """\
server:
  listeners: [{{address: 127.0.0.1, port: 0}}]
http: {{port: 0}}
profiles:
  system: {{mailbox: relay@contoso.com, credential: main}}
routing: {{system_profile: system}}
credentials:
  main:
    tenant_id: contoso.onmicrosoft.com
    client_id: app
    client_secret: {{value: not-used-by-queue-commands}}
spool: {{directory: {spool}}}
"""


class Queue:
    """A spool directory and a config file pointing at it; ``run`` is the CLI."""

    def __init__(self, directory: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.spool = Spool(directory / "spool")
        self.spool.open(on_tmpfs="warn")
        self.config = directory / "config.yaml"
        self.config.write_text(CONFIG.format(spool=self.spool.root))
        self._capsys = capsys

    def add(self, mid: str, state: State, **kw: Any) -> Entry:
        e = Entry(id=mid, profile="system", mail_from=MAILBOX,
                  rcpt_tos=kw.pop("rcpt_tos", ["a@example.com"]), size=len(DATA),
                  received_at=kw.pop("received_at", time.time() - 60), **kw)
        self.spool.add(e, DATA, state)
        return e

    def run(self, *args: str) -> tuple[int, str, str]:
        """Exit code, stdout, stderr of ``queue ARGS``."""
        self._capsys.readouterr()
        code = cli.main(["queue", *args, "--config", str(self.config)])
        out, err = self._capsys.readouterr()
        return code, out, err

    def json(self, *args: str, code: int = 0) -> Any:
        got, out, err = self.run(*args, "--json")
        assert got == code, (got, out, err)
        return json.loads(out)

    def where(self, mid: str) -> str | None:
        found = self.spool.locate(mid)
        return str(found[0]) if found else None

    def due(self, mid: str) -> float:
        return (self.spool.root / "deferred" / f"{mid}.json").stat().st_mtime


@pytest.fixture
def q(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Queue:
    return Queue(tmp_path, capsys)


def test_list_and_show_json(q: Queue) -> None:
    later = time.time() + 3600
    q.add("INC1", State.INCOMING)
    q.add("DEF1", State.DEFERRED, attempts=2, next_attempt=later, last_reply=Reply(451, "4.4.1 x"))
    q.add("HLD1", State.HOLD)
    q.add("FAI1", State.FAILED, attempts=5, failed={"a@example.com": Reply(550, "5.1.1 unknown")})

    rows = {r["id"]: r for r in q.json("list")}
    assert {m: r["state"] for m, r in rows.items()} == {
        "INC1": "incoming", "DEF1": "deferred", "HLD1": "hold", "FAI1": "failed"}
    assert rows["DEF1"]["attempts"] == 2 and rows["DEF1"]["last_reply"] == "451 4.4.1 x"
    assert rows["DEF1"]["next_attempt"] == dt.datetime.fromtimestamp(    # the file's mtime
        later, dt.UTC).isoformat(timespec="seconds")
    assert rows["INC1"]["next_attempt"] is None

    info = q.json("show", "FAI1")
    assert info["state"] == "failed" and info["failed"] == {"a@example.com": "550 5.1.1 unknown"}
    assert info["headers"].endswith("Subject: queued for the operator")
    assert "the body" not in info["headers"]



# 2025-06-01 12:00:00 UTC: arrival times the expected output can spell out.
NOON = 1748779200.0


def _three(q: Queue) -> None:
    """Three messages, written to the spool in another order than they arrived."""
    q.add("C3", State.FAILED, received_at=NOON + 70, attempts=5,
          rcpt_tos=["a@example.com", "c@example.com"], delivered=["c@example.com"],
          failed={"a@example.com": Reply(550, "5.1.1 unknown")})
    q.add("B2", State.INCOMING, received_at=NOON + 5)
    q.add("A1", State.DEFERRED, received_at=NOON, attempts=2, next_attempt=NOON + 3600,
          rcpt_tos=["a@example.com", "b@example.com", "d@example.com"],
          delivered=["b@example.com"], last_reply=Reply(451, "4.4.1 try later"),
          client="192.0.2.7", user="alice")


def test_json_output_is_what_scripts_have_always_read(q: Queue) -> None:
    _three(q)
    assert sorted(q.json("list"), key=lambda r: r["id"]) == [
        {"id": "A1", "state": "deferred", "profile": "system", "from": MAILBOX,
         "recipients": ["a@example.com", "b@example.com", "d@example.com"], "size": 90,
         "received": "2025-06-01T12:00:00+00:00", "attempts": 2,
         "next_attempt": "2025-06-01T13:00:00+00:00", "last_reply": "451 4.4.1 try later"},
        {"id": "B2", "state": "incoming", "profile": "system", "from": MAILBOX,
         "recipients": ["a@example.com"], "size": 90, "received": "2025-06-01T12:00:05+00:00",
         "attempts": 0, "next_attempt": None, "last_reply": None},
        {"id": "C3", "state": "failed", "profile": "system", "from": MAILBOX,
         "recipients": ["a@example.com", "c@example.com"], "size": 90,
         "received": "2025-06-01T12:01:10+00:00", "attempts": 5, "next_attempt": None,
         "last_reply": None},
    ]
    assert q.json("show", "A1") == {
        "id": "A1", "state": "deferred", "profile": "system", "from": MAILBOX,
        "recipients": ["a@example.com", "b@example.com", "d@example.com"], "size": 90,
        "received": "2025-06-01T12:00:00+00:00", "attempts": 2,
        "next_attempt": "2025-06-01T13:00:00+00:00", "last_reply": "451 4.4.1 try later",
        "delivered": ["b@example.com"], "failed": {}, "client": "192.0.2.7", "user": "alice",
        "original_sender": None, "original_from": None,
        "headers": "From: relay@contoso.com\r\nTo: a@example.com\r\n"
                   "Subject: queued for the operator"}
    assert q.json("hold", "B2") == {"action": "hold", "done": ["B2"], "skipped": []}


def test_list_reads_like_mailq(q: Queue) -> None:
    """A header, a message per block in arrival order, the reason in parentheses above the
    recipients it applies to (delivered ones left out), a total; as postqueue -p."""
    _three(q)
    code, out, err = q.run("list")
    assert (code, err) == (0, "")
    pad = " " * 51
    assert out.splitlines() == [
        "-Queue ID-   --Size-- ---Arrival (UTC)--- -State-- -Sender/Recipient-------",
        f"A1                 90 2025-06-01 12:00:00 deferred {MAILBOX}",
        "(451 4.4.1 try later)",
        f"{pad}a@example.com",
        f"{pad}d@example.com",
        "",
        f"B2                 90 2025-06-01 12:00:05 incoming {MAILBOX}",
        f"{pad}a@example.com",
        "",
        f"C3                 90 2025-06-01 12:01:10 failed   {MAILBOX}",
        "(550 5.1.1 unknown)",
        f"{pad}a@example.com",
        "",
        "-- 1 KiB in 3 messages.",
    ]


def test_an_empty_queue_says_so(q: Queue) -> None:
    assert q.run("list") == (0, "The queue is empty.\n", "")


def test_show_reads_as_text(q: Queue) -> None:
    _three(q)
    code, out, err = q.run("show", "A1", "C3")
    assert (code, err) == (0, "")
    assert out.split("\n") == [
        "id:            A1",
        "state:         deferred",
        "profile:       system",
        f"from:          {MAILBOX}",
        "size:          90 bytes",
        "received:      2025-06-01 12:00:00 UTC",
        "attempts:      2",
        "next attempt:  2025-06-01 13:00:00 UTC",
        "last reply:    451 4.4.1 try later",
        "client:        192.0.2.7",
        "user:          alice",
        "recipients:    a@example.com",
        "               b@example.com (delivered)",
        "               d@example.com",
        "headers:",
        f"    From: {MAILBOX}",
        "    To: a@example.com",
        "    Subject: queued for the operator",
        "",
        "id:            C3",
        "state:         failed",
        "profile:       system",
        f"from:          {MAILBOX}",
        "size:          90 bytes",
        "received:      2025-06-01 12:01:10 UTC",
        "attempts:      5",
        "last reply:    -",
        "client:        -",
        "user:          -",
        "recipients:    a@example.com (failed: 550 5.1.1 unknown)",
        "               c@example.com (delivered)",
        "headers:",
        f"    From: {MAILBOX}",
        "    To: a@example.com",
        "    Subject: queued for the operator",
        "",
    ]


def test_show_names_the_sender_a_message_had_before_it_was_sent_as_the_mailbox(
        q: Queue) -> None:
    q.add("R1", State.DEFERRED, return_path="backup@db1.local",
          original_from="root (Cron Daemon)")
    q.add("N1", State.DEFERRED, return_path="<>")
    info = q.json("show", "R1")
    assert (info["from"], info["original_sender"], info["original_from"]) == (
        MAILBOX, "backup@db1.local", "root (Cron Daemon)")
    code, out, _ = q.run("show", "R1", "N1")
    assert code == 0
    r1, n1 = out.split("\n\n")
    # The column widens for the longer names, for this message only.
    assert r1.splitlines()[3:7] == [
        f"from:             {MAILBOX}",
        "original sender:  backup@db1.local",
        "original from:    root (Cron Daemon)",
        "size:             90 bytes"]
    assert n1.splitlines()[3:6] == [
        f"from:             {MAILBOX}", "original sender:  <>", "size:             90 bytes"]


def test_ids_are_not_case_sensitive(q: Queue) -> None:
    """Typed from a log line or a bounce, in whatever case: the message is found, and
    named as the queue has it."""
    q.add("4F2A9C01B3D7", State.DEFERRED)
    q.add("MixedCase1", State.HOLD)
    assert q.run("hold", "4f2a9c01b3d7") == (0, "4F2A9C01B3D7: on hold\n", "")
    assert q.json("release", "4f2A9c01b3d7")["done"] == ["4F2A9C01B3D7"]
    assert q.json("show", "mixedcase1")["id"] == "MixedCase1"
    assert q.run("delete", "MIXEDCASE1") == (0, "MixedCase1: deleted\n", "")
    assert q.run("hold", "4f2a9c01b3d8") == (
        1, "", "error: no message 4f2a9c01b3d8 in the queue\n")


def test_hold_and_release(q: Queue) -> None:
    q.add("HR1", State.DEFERRED, attempts=3, next_attempt=time.time() + 3600)
    code, out, err = q.run("hold", "HR1")
    assert (code, out, err) == (0, "HR1: on hold\n", "")
    assert q.where("HR1") == "hold"
    # Held as it was: the relay's record of the attempts is kept.
    assert q.spool.read(State.HOLD, "HR1.json").attempts == 3

    before = time.time()
    assert q.json("release", "HR1") == {"action": "release", "done": ["HR1"], "skipped": []}
    assert q.where("HR1") == "deferred"
    assert before - 1 <= q.due("HR1") <= time.time()                   # due now
    assert q.spool.due(time.time(), 10)[0] == ["HR1.json"]

    assert q.json("hold", "HR1") == {"action": "hold", "done": ["HR1"], "skipped": []}
    assert q.where("HR1") == "hold"


def test_retry_of_a_failed_message_tries_the_failed_recipients_again(q: Queue) -> None:
    q.add("RF1", State.FAILED, rcpt_tos=["a@example.com", "b@example.com"], attempts=4,
          delivered=["a@example.com"], failed={"b@example.com": Reply(550, "5.1.1 unknown")})
    assert q.json("retry", "RF1") == {"action": "retry", "done": ["RF1"], "skipped": []}
    assert q.where("RF1") == "deferred"
    e = q.spool.read(State.DEFERRED, "RF1.json")
    assert e.failed == {} and e.delivered == ["a@example.com"]
    assert e.next_attempt <= time.time()
    assert e.received_at > time.time() - 5                # a fresh lifetime
    assert list((q.spool.root / "tmp").iterdir()) == []


async def test_a_retried_dead_letter_is_delivered_by_the_next_relay(
        sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    q = Queue(sandbox.directory, capsys)            # the sandbox relay's spool directory
    q.add("DEAD1", State.FAILED, rcpt_tos=["a@example.com", "b@example.com"], attempts=4,
          delivered=["a@example.com"], failed={"b@example.com": Reply(550, "5.1.1 unknown")})
    code, out, err = await asyncio.to_thread(q.run, "retry", "DEAD1")
    assert (code, out) == (0, "DEAD1: will be retried now\n"), err

    relay = Relay(sandbox.apply(build_config({"delivery": {"synchronous": None}})))
    await relay.start()
    try:
        await wait_until(lambda: len(sandbox.exchange.messages) == 1)
        await wait_until(lambda: sum(relay.spool.count(s) for s in State) == 0)
    finally:
        await relay.stop()
    [msg] = sandbox.exchange.messages
    assert msg.rcpt_tos == ["b@example.com"]          # not the one already delivered
    assert b"Subject: queued for the operator" in msg.data
    assert not q.spool.data_path("DEAD1").exists()


def test_retry_and_flush_make_deferred_messages_due(q: Queue) -> None:
    later = time.time() + 3600
    for mid in ("FL1", "FL2", "FL3"):
        q.add(mid, State.DEFERRED, next_attempt=later)
    q.add("FL4", State.INCOMING)

    code, out, _ = q.run("retry", "FL1", "FL4")
    assert code == 0
    assert out.splitlines() == ["FL1: will be retried now",
                                "FL4 is already waiting for its first attempt"]
    assert q.due("FL1") <= time.time() < q.due("FL2")

    flushed = q.json("flush")
    assert flushed["action"] == "flush" and flushed["skipped"] == []
    assert sorted(flushed["done"]) == ["FL2", "FL3"]      # FL1 was due already
    assert sorted(q.spool.due(time.time(), 10)[0]) == ["FL1.json", "FL2.json", "FL3.json"]
    code, out, _ = q.run("flush")
    assert (code, out) == (0, "0 deferred message(s) due now\n")


def test_delete_removes_data_and_leaves_active_messages_alone(q: Queue) -> None:
    q.add("DEL1", State.HOLD)
    q.add("DEL2", State.FAILED)
    q.add("ACT1", State.ACTIVE)
    code, out, err = q.run("delete", "DEL1")
    assert (code, out, err) == (0, "DEL1: deleted\n", "")
    assert q.where("DEL1") is None and not q.spool.data_path("DEL1").exists()

    report = q.json("delete", "DEL2", "ACT1", code=1)
    assert report["action"] == "delete" and report["done"] == ["DEL2"]
    [skipped] = report["skipped"]
    assert skipped["id"] == "ACT1" and not skipped["temporary"]
    assert "being delivered right now" in skipped["reason"]
    assert q.where("ACT1") == "active" and q.spool.read_data("ACT1") == DATA


def test_mistakes_are_one_line_each_and_exit_1(q: Queue) -> None:
    q.add("OK1", State.DEFERRED)
    code, out, err = q.run("hold", "OK1", "NOSUCH", "ALSONOT")
    assert code == 1
    assert out == "OK1: on hold\n"
    assert err.splitlines() == ["error: no message NOSUCH in the queue",
                                "error: no message ALSONOT in the queue"]
    code, _, err = q.run("release", "NOSUCH")
    assert code == 1 and err == "error: no message NOSUCH in the queue\n"
    code, _, err = q.run("hold", "OK1")                             # already held
    assert code == 1 and "OK1 is in hold; this command works on incoming, deferred" in err


def test_a_message_the_relay_takes_meanwhile_is_a_temporary_failure(
        q: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    q.add("RACE1", State.DEFERRED)
    real_move = Spool.move

    def relay_first(self: Spool, e: Entry, src: State, dst: State, **kw: Any) -> None:
        if src is State.DEFERRED and dst is not State.ACTIVE:
            # Between the command's look and its rename, the relay starts an attempt.
            real_move(self, self.read(src, f"{e.id}.json"), src, State.ACTIVE, rewrite=False)
        real_move(self, e, src, dst, **kw)

    monkeypatch.setattr(Spool, "move", relay_first)
    code, out, err = q.run("hold", "RACE1")
    assert (code, out) == (75, "")                                  # EX_TEMPFAIL
    assert err == ("error: RACE1 changed while the command ran (was in deferred, now in "
                   "active); try again\n")
    assert q.where("RACE1") == "active" and q.spool.read_data("RACE1") == DATA

    q.add("RACE2", State.DEFERRED)
    report = q.json("hold", "RACE2", code=75)
    assert report["done"] == [] and report["skipped"][0]["temporary"] is True


def test_an_unexpected_os_error_is_one_line_not_a_traceback(
        q: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    q.add("PERM1", State.HOLD)

    def denied(self: Spool, mid: str, state: State) -> None:
        path = self.root / state / f"{mid}.json"
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Spool, "remove", denied)
    code, out, err = q.run("delete", "PERM1")
    assert code == 1 and out == ""
    assert err == f"error: PERM1: Permission denied ({q.spool.root}/hold/PERM1.json)\n"


def test_a_second_operator_waits_for_the_lock_and_kill_9_releases_it(
        q: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock is across processes, and a command killed while holding it leaves none."""
    monkeypatch.setattr(queuectl, "LOCK_WAIT", 0.2)
    q.add("LCK1", State.HOLD)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom pathlib import Path\nfrom relay.spool.store import Spool\n"
         "with Spool(Path(sys.argv[1])).operator_lock():\n"
         "    print('locked', flush=True)\n    time.sleep(60)\n", str(q.spool.root)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        code, _, err = q.run("delete", "LCK1")
        assert code == 75 and "another queue command is working on" in err
        assert q.where("LCK1") == "hold"
    finally:
        holder.kill()                                               # SIGKILL
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
    code, out, _ = q.run("delete", "LCK1")
    assert (code, out) == (0, "LCK1: deleted\n")
    assert os.listdir(q.spool.root / "data") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: checks what root's commands write")
def test_root_acts_as_the_spool_owner(capsys: pytest.CaptureFixture[str]) -> None:
    """`queue` run as root (sudo) must not leave root-owned files the relay cannot read."""
    import shutil
    import tempfile

    nobody = 65534
    base = Path(tempfile.mkdtemp(prefix="relay-owner-", dir="/tmp"))
    try:
        base.chmod(0o755)
        queue = Queue(base, capsys)
        queue.add("OWNED0000001", State.FAILED, failed={"a@example.com": Reply(550, "5.1.1 no")})
        for path in [queue.spool.root, *queue.spool.root.rglob("*")]:
            os.chown(path, nobody, nobody)
        queue.config.chmod(0o644)
        # In a child: the command drops root for good, and this test process must not.
        proc = subprocess.run([sys.executable, "-m", "relay", "queue", "retry", "OWNED0000001",
                               "--config", str(queue.config)], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
        assert proc.returncode == 0, proc.stderr
        meta = queue.spool.root / "deferred" / "OWNED0000001.json"
        assert meta.stat().st_uid == nobody
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_sandbox_queue_needs_no_config(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`make run`'s queue, looked at from another terminal: --sandbox is the spool in the
    sandbox directory, whatever --config says (the default /etc file need not exist)."""
    def queue(*args: str) -> tuple[int, str, str]:
        code = cli.main(["queue", *args, "--sandbox", "--sandbox-dir", str(tmp_path / "sb"),
                         "--config", str(tmp_path / "no-such-config.yaml")])
        return (code, *capsys.readouterr())

    assert queue("list") == (
        78, "", f"error: no spool at {tmp_path / 'sb' / 'spool'} (--sandbox-dir; "
                "`make run` or `run --sandbox` makes it)\n")
    q = Queue(tmp_path / "sb", capsys)
    q.add("SB1", State.DEFERRED, received_at=NOON)
    code, out, err = queue("list")
    assert (code, err) == (0, "")
    assert out.splitlines()[1] == f"SB1                90 2025-06-01 12:00:00 deferred {MAILBOX}"
    assert queue("hold", "sb1") == (0, "SB1: on hold\n", "")
