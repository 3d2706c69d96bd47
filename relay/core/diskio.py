"""The message path's disk work, on threads of its own.

- :func:`run`: ``await run(fn, *args)`` calls the blocking ``fn`` on a disk thread, with
  the caller's context (the message id of its log lines);
- :func:`configure`: how many disk threads (``spool.io_threads``), set at start.

Every step of a message through the spool (writing it as it arrives, fsyncs, renames,
reading it for delivery, removing it) is a short blocking call that must not run on the
event loop, where a slow disk would stall every client. asyncio's default executor gives
each call to whichever of its several threads is free, and those threads then take turns
with the event loop for the interpreter lock: measured with ``make bench``, that
contention cost more CPU per message than the disk work itself. One thread, kept busy,
does not contend. Slow work that is not the disk's (password hashes, a large header's
policy, delivery reports, metrics scans) stays in the default executor, so it never
holds up a message's fsync.

More threads help only where concurrent fsyncs are merged by the filesystem and each one
is slow (spinning disks, some network storage): ``spool.io_threads`` says how many.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import queue
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]


class _Threads:
    """Disk threads taking calls from one queue, each result handed straight to the
    caller's future on its loop: less work per call than asyncio's run_in_executor over a
    ThreadPoolExecutor (no second future to chain, no pool bookkeeping), which counts at
    several calls per message. Daemon threads: the process may exit with a call half done,
    which the spool's protocol survives as it survives kill -9."""

    def __init__(self, count: int) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._count = count
        for n in range(count):
            threading.Thread(target=self._serve, name=f"disk_{n}", daemon=True).start()

    def submit(self, job: _Job) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        """Let each thread finish what is queued before it, then end."""
        for _ in range(self._count):
            self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, call = job
            try:
                result = call()
            except BaseException as exc:    # handed to the caller as it is
                _hand(loop, future, None, exc)
            else:
                _hand(loop, future, result, None)
            del job, loop, future, call     # nothing kept alive until the next call


def _hand(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any,
          exc: BaseException | None) -> None:
    with contextlib.suppress(RuntimeError):     # the loop is closed: nobody waits
        loop.call_soon_threadsafe(_settle, future, result, exc)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return                              # the caller gave up (the call still happened)
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


_lock = threading.Lock()
_count = 1
_threads: _Threads | None = None


def configure(threads: int) -> None:
    """Use ``threads`` disk threads from now on; work already queued finishes where it is."""
    global _count, _threads
    with _lock:
        if threads == _count:
            return
        _count, old, _threads = threads, _threads, None
    if old is not None:
        old.stop()


def _pool() -> _Threads:
    global _threads
    with _lock:
        if _threads is None:
            _threads = _Threads(_count)
        return _threads


async def run(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on a disk thread (as :func:`asyncio.to_thread` would)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    _pool().submit((loop, future, call))
    return await future
