"""What a relay's start does to its spool after a stop or a crash.

- :func:`recover`: bring the spool back to a consistent state, and say what it did
  (``{"discarded": n, "requeued": n, "orphans": n, "corrupt": n}``).

The spool's protocol (relay.spool's package docstring) is built so that a crash between
any two of its system calls leaves a state this resolves deterministically: files in tmp/
were never acknowledged and go; messages that were being delivered go back to incoming/
(with what their attempt recorded, so delivered recipients are not sent again); message
data without metadata in any state was never acknowledged either, or its delete was
interrupted, and goes; metadata without data cannot be delivered and is set aside.
"""

from __future__ import annotations

import contextlib
import os

from relay.spool import disk
from relay.spool.records import State
from relay.spool.store import Spool

# How long start-up waits for an operator's queue command to finish.
RECOVERY_LOCK_WAIT = 60.0


def recover(spool: Spool) -> dict[str, int]:
    """Bring ``spool`` back to a consistent state after a stop or a crash.

    Files in tmp/ were never acknowledged and go; messages that were being delivered go
    back to incoming/ (a crash between the upstream's 250 and the spool update is the only
    case where a message is delivered twice); message data without metadata in any state
    was never acknowledged either and goes.
    """
    # Under the operator lock: a `queue release` moving a message between two states
    # while the orphan scan looks for it would make its data look orphaned.
    with spool.operator_lock(wait=RECOVERY_LOCK_WAIT):
        return _recover(spool)


def _recover(spool: Spool) -> dict[str, int]:
    root = spool.root
    report = {"discarded": 0, "requeued": 0, "orphans": 0, "corrupt": 0}
    with os.scandir(root / "tmp") as it:
        for item in it:
            with contextlib.suppress(FileNotFoundError):   # a CLI's probe file
                os.unlink(item.path)
                report["discarded"] += 1
    with os.scandir(root / State.ACTIVE) as it:
        for item in it:
            os.replace(item.path, root / State.INCOMING / item.name)
            report["requeued"] += 1
    for state in State:
        with os.scandir(root / state) as it:
            for item in it:
                mid = spool.id_from_name(item.name)
                if mid is None or not spool.data_path(mid).exists():
                    spool.set_aside_file(state, item.name, "has no message data")
                    report["corrupt"] += 1
    with os.scandir(root / "data") as it:
        for item in it:
            mid = item.name[:-4] if item.name.endswith(".eml") else None
            if mid is not None and spool.locate(mid) is None:
                os.unlink(item.path)
                report["orphans"] += 1
    for name in ("data", "corrupt", *State):
        disk.fsync_dir(root / name)
    return report
