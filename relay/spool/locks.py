"""Who may change the spool: one relay, and operator commands one at a time.

- :func:`claim_relay`, :func:`release`: the lock a relay holds on its spool for as long
  as it runs (relay.spool.store.Spool.claim), so that two relays never share one;
- :func:`operator_lock`: the lock through which ``queue`` commands take turns
  (Spool.operator_lock);
- :class:`SpoolError`: the spool cannot be used (not writable, on tmpfs when that is
  refused, claimed by another relay); :class:`SpoolBusy`: another operator command holds
  the operator lock.

Both locks are flocks, so the kernel releases them when their holder dies, even by kill -9:
a crash never leaves a spool locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from relay.core.errors import RelayError

RELAY_LOCK = "relay.lock"


class SpoolError(RelayError):
    """The spool cannot be used (not writable, on tmpfs when that is refused, ...)."""


class SpoolBusy(SpoolError):
    """Another operator command holds the spool's operator lock; try again shortly."""


def claim_relay(root: Path) -> int:
    """Become the one relay that delivers from the spool at ``root``; returns the lock's
    descriptor, to be given to :func:`release`.

    Two relays on one spool would deliver messages twice: the second one's recovery
    puts the first one's active/ messages back into incoming/ and discards its
    half-written arrivals. The claim is a flock on ``relay.lock`` (holding the pid, for
    the error message). ``queue`` commands do not claim the spool: they work beside a
    running relay.
    """
    path = root / RELAY_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise SpoolError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise SpoolError(f"another relay (pid {holder}) is using the spool {root}; "
                         "give each relay a spool of its own") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def release(fd: int) -> None:
    os.close(fd)                        # releases the flock


@contextlib.contextmanager
def operator_lock(root: Path, wait: float) -> Iterator[None]:
    """Hold the lock that makes operator commands (``queue ...``) take turns.

    It is what makes hold/ and failed/ owned states (see relay.spool's docstring): two
    operators retrying and deleting the same failed message cannot interleave. The relay
    never takes it, except for its recovery at start-up. It is a flock on the spool
    directory itself, so it needs no file of its own. Raises :class:`SpoolBusy` after
    ``wait`` seconds.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise SpoolBusy(f"another queue command is working on {root}; "
                                    "try again") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)            # releases the lock
