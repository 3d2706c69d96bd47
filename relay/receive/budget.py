"""The memory that message data may take at once, over all connections.

Each DATA holds at most its header section and a chunk of body (relay.receive.data);
:class:`MemoryBudget` bounds the sum of those over every connection, so that memory stays
bounded whatever the number of clients sending at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

__all__ = ["MemoryBudget"]


class MemoryBudget:
    """Bytes of message data the relay holds in memory at once, over all connections.

    Each DATA takes its share before the ``354`` and gives it back when it ends; when the
    budget is spent, a new DATA waits (FIFO) for a share, and is refused with a 452 if
    none comes in time. So memory stays bounded whatever the number of connections.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def update(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    @contextlib.asynccontextmanager
    async def share(self, amount: int, *, wait: float) -> AsyncIterator[bool]:
        """Hold ``amount`` bytes of the budget; yields False if none came within ``wait``."""
        amount = min(amount, self.limit)
        got = await self._take(amount, wait)
        try:
            yield got
        finally:
            if got:
                self.used -= amount
                self._wake()

    async def _take(self, amount: int, wait: float) -> bool:
        if not self._waiters and self.used + amount <= self.limit:
            self.used += amount
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(wait):
                await waiter
        except TimeoutError:
            # Granted in the very moment the wait ran out: it is ours, keep it.
            return self._leave(entry)
        except BaseException:
            if self._leave(entry):
                self.used -= amount
                self._wake()
            raise
        return True

    def _leave(self, entry: tuple[int, asyncio.Future[None]]) -> bool:
        """Stop waiting; True if the share had been granted already."""
        if entry in self._waiters:
            self._waiters.remove(entry)
        waiter = entry[1]
        granted = waiter.done() and not waiter.cancelled()
        if not waiter.done():
            waiter.cancel()
        return granted

    def _wake(self) -> None:
        while self._waiters:
            amount, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.pop(0)
                continue
            if self.used + amount > self.limit:
                return
            self.used += amount
            self._waiters.pop(0)
            waiter.set_result(None)
