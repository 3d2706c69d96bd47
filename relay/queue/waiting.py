"""What waits for the dispatcher's next pass, and when to look on disk for more.

- :class:`Waiting`: messages just accepted, handed over in memory with their bytes
  (:meth:`Waiting.hand_over`); the buffer of due names from the last scan of deferred/;
  spool files passed over for a while (:meth:`Waiting.pass_over`); when incoming/ and
  deferred/ must be scanned next. :meth:`Waiting.gather` makes one pass's candidates
  with at most one trip to the disk thread.

The disk is the truth and memory only a shortcut: a message handed over is in incoming/
already, so losing the hand-over (a restart, a full buffer) only means a scan finds it.
Scans cost a trip to the disk thread and a directory listing, so they are made when
something may be on disk that memory does not hold (at start, after a flush or an
operator's change, when the hand-over was full, after a failed take) and at the idle
poll, not for every message. Everything here is bounded: the hand-over and the due
buffer by the queue's window, the files passed over by ``UNREADABLE_MAX``.
"""

from __future__ import annotations

import collections
import logging

from relay.core.message import Content
from relay.spool.facade import AsyncSpool
from relay.spool.records import Entry
from relay.spool.store import Spool

log = logging.getLogger(__name__)

# How long the dispatcher sleeps at most when nothing wakes it (new mail, a finished attempt).
IDLE_POLL = 10.0
# A spool file that cannot be read is passed over this long; at most this many are.
UNREADABLE_PAUSE = 60.0
UNREADABLE_MAX = 10_000


class Waiting:
    """The dispatcher's view of what waits (see the module docstring)."""

    def __init__(self, spool: AsyncSpool) -> None:
        self.spool = spool
        # Messages accepted since the last pass, by id, in arrival order.
        self.fresh: dict[str, tuple[Entry, Content]] = {}
        self.due: collections.deque[str] = collections.deque()   # due deferred/ names
        # Names that could not be read, and until when they are passed over.
        self.unreadable: dict[str, float] = {}
        # When deferred/ must be scanned next: the earliest due time seen there (or set by
        # a deferral since), at most IDLE_POLL away, so that a long deferred queue is not
        # rescanned for every finished attempt.
        self.next_deferred_scan = 0.0
        # When incoming/ must be scanned next (see the module docstring).
        self.next_incoming_scan = 0.0

    def hand_over(self, entry: Entry, content: Content, limit: int) -> None:
        """A message just accepted into incoming/; kept in memory if fewer than ``limit``
        are, else left to the next scan."""
        if len(self.fresh) < limit:
            self.fresh[entry.id] = (entry, content)
        else:
            self.rescan()

    def rescan(self) -> None:
        """Something may be in incoming/ that the hand-over does not hold."""
        self.next_incoming_scan = 0.0

    def deferred_until(self, when: float) -> None:
        self.next_deferred_scan = min(self.next_deferred_scan, when)

    def known(self, name: str) -> tuple[Entry, Content] | None:
        """The record and bytes of ``name`` if it was handed over (taken out of memory)."""
        mid = Spool.id_from_name(name)
        return None if mid is None else self.fresh.pop(mid, None)

    async def gather(self, now: float, room: int, limit: int) -> collections.deque[str]:
        """New mail for one pass, in arrival order: the hand-over first, then what a scan
        of incoming/ found (if one is due); refills the due buffer from deferred/ (up to
        ``limit`` names) when it is empty and a scan is due."""
        scan_deferred = not self.due and now >= self.next_deferred_scan
        scan_incoming = now >= self.next_incoming_scan
        for name, until in list(self.unreadable.items()):
            if until <= now:
                del self.unreadable[name]
        incoming: list[str] = []
        if scan_incoming or scan_deferred:
            incoming, due, upcoming = await self.spool.candidates(
                now, room if scan_incoming else 0, limit if scan_deferred else 0,
                frozenset(self.unreadable))
            if scan_incoming:
                # As many as asked for: more may be waiting, look again next pass.
                self.next_incoming_scan = now if len(incoming) >= room else now + IDLE_POLL
            if scan_deferred:
                self.due.extend(due)
                # A full buffer means more may be due: scan again as soon as it is used up.
                self.next_deferred_scan = now if len(due) >= limit else min(
                    upcoming, now + IDLE_POLL)
        arrivals = collections.deque(f"{mid}.json" for mid in self.fresh)
        arrivals.extend(n for n in incoming if Spool.id_from_name(n) not in self.fresh)
        return arrivals

    @property
    def next_scan(self) -> float:
        return min(self.next_deferred_scan, self.next_incoming_scan)

    def pass_over(self, name: str, now: float, exc: Exception) -> None:
        """A spool file that cannot be read (or set aside) just now, for permissions or a
        disk error: passed over for a while, so that it neither keeps the messages due
        after it waiting nor is asked again in a loop."""
        log.error("spool: cannot read %s (%s); trying again in %.0f s", name,
                  getattr(exc, "strerror", None) or exc, UNREADABLE_PAUSE)
        if len(self.unreadable) < UNREADABLE_MAX:
            self.unreadable[name] = now + UNREADABLE_PAUSE
        else:
            # So many that they cannot all be remembered: scan less often instead.
            self.next_deferred_scan = max(self.next_deferred_scan, now + UNREADABLE_PAUSE)
