"""An acknowledged message is on disk for good: its files and their directories are fsynced
before Queue.submit() hands back the 250.

os.fsync is wrapped to record what each call synced (the path behind the descriptor and,
for a directory, what it held). The queue is not started, so no delivery attempt can sync
anything and hide a missing fsync of the accept path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay.deliver import Deliverer
from relay.message import Outbound, new_message_id
from relay.queue import Queue
from relay.spool import Spool
from relay.tokens import Tokens
from tests.conftest import build_config

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
            data=MESSAGE, mailbox="relay@contoso.com"))
        events.append(("reply", "", frozenset()))
    finally:
        monkeypatch.undo()
        await spool.close()
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
