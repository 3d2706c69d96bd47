"""The spool as the event loop uses it: one async face over the blocking store.

- :class:`AsyncSpool`: every call of relay.spool.store.Spool the queue makes, each run on
  a disk thread (relay.core.diskio); :meth:`AsyncSpool.accept`, which stores a new
  message durably and shares the directory fsyncs of concurrent arrivals (group commit);
  :meth:`AsyncSpool.candidates`, the scan for messages waiting in incoming/ and due in
  deferred/; and :meth:`AsyncSpool.record_delivered`, the one call kept on the event loop
  on purpose.

The queue reaches the disk only through this class: the relay's scheduling code holds no
thread hop of its own, and which call blocks (every one of the store's) is
said in one place. The blocking store stays usable on its own, by operator commands,
the metrics and tests (:attr:`AsyncSpool.store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Container

from relay.core import diskio
from relay.core.message import Content
from relay.spool import recovery
from relay.spool.records import Entry, State
from relay.spool.store import Spool


@dataclasses.dataclass(frozen=True)
class _Arrival:
    """A new message waiting for the committer (AsyncSpool.accept)."""

    entry: Entry
    content: Content
    state: State
    waiter: asyncio.Future[None]


class AsyncSpool:
    """The async face of ``store`` (see the module docstring)."""

    def __init__(self, store: Spool) -> None:
        self.store = store
        self._arrivals: list[_Arrival] = []     # waiting for the committer's next trip
        self._commit_wakeup: asyncio.Event | None = None
        self._committer: asyncio.Task[None] | None = None

    # --- accepting ----------------------------------------------------------------------

    async def accept(self, entry: Entry, content: Content | bytes,
                     state: State = State.INCOMING) -> Content:
        """Store a new message; returns only once it would survive a crash or power loss.

        ``content`` is either small bytes made by the relay (a delivery report), or the
        finished writer file of this message (Spool.writer). Returns the stored content.
        Raises OSError (disk full, ...) with nothing of the message left behind.

        The message is placed (Spool.add) and the directories synced in one trip to the
        disk thread, together with whatever else arrived meanwhile (group commit): one
        fsync of each directory for all of them. The files are in place before the sync,
        so a failed sync takes them out again: the caller answers 4xx, the client sends
        the message again, and a copy left in ``state`` would be delivered as well. The
        caller must keep the queue from taking the message until this returns.
        """
        if isinstance(content, bytes):
            content = Content(data=content)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._arrivals.append(_Arrival(entry, content, state, waiter))
        if self._committer is None or self._committer.done():
            self._commit_wakeup = asyncio.Event()
            self._committer = loop.create_task(self._commit_loop())
        assert self._commit_wakeup is not None
        self._commit_wakeup.set()
        await waiter
        return content.moved(self.store.data_path(entry.id))

    async def _commit_loop(self) -> None:
        assert self._commit_wakeup is not None
        while True:
            await self._commit_wakeup.wait()
            self._commit_wakeup.clear()
            batch, self._arrivals = self._arrivals, []
            if not batch:
                continue
            try:
                outcomes = await diskio.run(self._commit, batch)
            except Exception as exc:    # not only OSError: the waiters must never hang
                outcomes = [exc] * len(batch)
            for arrival, outcome in zip(batch, outcomes, strict=True):
                if arrival.waiter.done():
                    continue
                if outcome is None:
                    arrival.waiter.set_result(None)
                else:
                    arrival.waiter.set_exception(outcome)

    def _commit(self, batch: list[_Arrival]) -> list[Exception | None]:
        """On the disk thread: place each arrival, then sync the directories they went
        to; each arrival's outcome (None: durable), in order."""
        outcomes: list[Exception | None] = []
        for a in batch:
            try:
                self.store.add(a.entry, a.content, a.state)
            except Exception as exc:    # this one only; the others go on
                outcomes.append(exc)
            else:
                outcomes.append(None)
        placed = [a for a, outcome in zip(batch, outcomes, strict=True) if outcome is None]
        if not placed:
            return outcomes
        try:
            self.store.sync_dirs({a.state for a in placed})
        except Exception as exc:
            for a in placed:
                self.store.withdraw(a.entry.id, a.state)
            return [outcome or exc for outcome in outcomes]
        return outcomes

    async def close(self) -> None:
        if self._committer is not None:
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
            self._committer = None

    # --- starting and stopping ----------------------------------------------------------

    async def recover(self) -> dict[str, int]:
        return await diskio.run(recovery.recover, self.store)

    async def load_state(self, name: str) -> bytes | None:
        return await diskio.run(self.store.load_state, name)

    async def save_state(self, name: str, data: bytes) -> None:
        await diskio.run(self.store.save_state, name, data)

    # --- finding work -------------------------------------------------------------------

    async def candidates(self, now: float, room: int, due_limit: int,
                         skip: Container[str] = ()) -> tuple[list[str], list[str], float]:
        """Up to ``room`` incoming names; with ``due_limit``, up to that many due deferred
        names (earliest first) and when the next deferred one is due. Names in ``skip``
        (unreadable just now) are passed over. One trip to a worker thread for both."""
        return await diskio.run(self._candidates, now, room, due_limit, skip)

    def _candidates(self, now: float, room: int, due_limit: int,
                    skip: Container[str]) -> tuple[list[str], list[str], float]:
        names = (n for n in self.store.names(State.INCOMING) if n not in skip)
        incoming = [n for n, _ in zip(names, range(room), strict=False)]
        if not due_limit:
            return incoming, [], float("inf")
        due, upcoming = self.store.due(now, due_limit, skip)
        return incoming, due, upcoming

    async def flush_deferred(self, now: float) -> int:
        """Make every deferred message due at ``now``; returns how many were changed."""
        return len(await diskio.run(self.store.flush_deferred_ids, now))

    async def read(self, state: State, name: str) -> Entry:
        return await diskio.run(self.store.read, state, name)

    async def content(self, mid: str) -> Content:
        return await diskio.run(self.store.content, mid)

    async def holds(self, state: State, mid: str) -> bool:
        return await diskio.run(self.store.holds, state, mid)

    # --- state changes ------------------------------------------------------------------

    async def take(self, entry: Entry, src: State, content: Content | None = None
                   ) -> Content | None:
        """Move ``entry`` from ``src`` into active/ for its attempt, in one trip to the disk
        thread with finding its bytes: returns ``content`` if given, else the stored bytes
        (None if there are none). Raises as :meth:`move` does."""
        return await diskio.run(self._take, entry, src, content)

    def _take(self, entry: Entry, src: State, content: Content | None) -> Content | None:
        # Unsynced: a power cut that undoes the rename leaves the message in ``src``, and
        # one that keeps it leaves it in active/, which recovery returns to incoming/.
        self.store.move(entry, src, State.ACTIVE, rewrite=False, sync=False)
        if content is not None:
            return content
        try:
            return self.store.content(entry.id)
        except FileNotFoundError:
            return None

    async def move(self, entry: Entry, src: State, dst: State, *,
                   rewrite: bool = True) -> None:
        await diskio.run(self.store.move, entry, src, dst, rewrite=rewrite)

    async def set_due(self, mid: str, when: float) -> None:
        await diskio.run(self.store.set_due, mid, when)

    async def remove(self, mid: str, state: State, *, claimed: bool = False) -> None:
        await diskio.run(self.store.remove, mid, state, claimed=claimed)

    async def set_aside(self, state: State, mid: str, why: str) -> None:
        await diskio.run(self.store.set_aside, state, mid, why)

    def record_delivered(self, entry: Entry, *, complete: bool) -> None:
        """Spool.record_delivered, on the event loop itself: it must happen right after the
        upstream's 250 is read, before any other task runs, and it is a system call or two
        without an fsync (see there)."""
        self.store.record_delivered(entry, complete=complete)
