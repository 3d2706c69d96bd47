"""The bytes of a message being received, written to the spool as they arrive.

- :class:`DataWriter`: ``tmp/<id>.eml`` of one new message; :meth:`DataWriter.write`
  appends (and with ``finish`` fsyncs), :meth:`DataWriter.discard` throws it away,
  :meth:`DataWriter.content` hands the finished file to the spool's accept
  (relay.spool.facade.AsyncSpool.accept).

A large message never sits in memory: the receiving side writes each chunk as it comes
(relay.spool.store.Spool.writer makes the writer for a message id). A small one (at most
relay.core.message.KEEP_SMALL) keeps the bytes it wrote, usually one write of the whole
message, so that its first delivery attempt need not read them back.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from relay.core.message import KEEP_SMALL, Content
from relay.spool import disk


class DataWriter:
    """The bytes of a message being received, written to ``tmp/<id>.eml`` as they arrive.

    :meth:`write` blocks: call it from a worker thread. The file is created at the first
    write. Any failure discards it (a partial message is never kept, and never left to fill
    the disk); :meth:`content` hands the finished file to the spool's accept.

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
        self._copy: list[bytes] | None = []    # None once the message is over KEEP_SMALL

    def write(self, data: bytes, *, finish: bool = False) -> None:
        """Append ``data``; with ``finish``, also fsync and close (the message is whole)."""
        with self._lock:
            if self._finished or self._discarded:
                raise ValueError("message data already finished or discarded")
            try:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                       | os.O_CLOEXEC, disk.FILE_MODE)
                disk.write_all(self._fd, data)
                self.size += len(data)
                if self._copy is not None:
                    if self.size <= KEEP_SMALL:
                        self._copy.append(data)
                    else:
                        self._copy = None
                if finish:
                    os.fsync(self._fd)
                    self._close()
                    self._finished = True
            except BaseException:
                self._discarded = True
                self._close()
                disk.unlink_quietly(self.path)
                raise
            if self._discarded:         # discarded while this write ran
                self._close()
                disk.unlink_quietly(self.path)
                raise ValueError("message data discarded")

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Throw away what was written (idempotent, never raises, never blocks)."""
        self._discarded = True
        disk.unlink_quietly(self.path)
        if self._lock.acquire(blocking=False):
            try:
                self._close()
            finally:
                self._lock.release()

    def content(self) -> Content:
        if not self._finished or self._discarded:
            raise ValueError("message data not finished")
        copy = None if self._copy is None else b"".join(self._copy)
        return Content.from_file(self.path, self.size, copy)
