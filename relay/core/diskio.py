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
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_lock = threading.Lock()
_threads = 1
_executor: ThreadPoolExecutor | None = None


def configure(threads: int) -> None:
    """Use ``threads`` disk threads from now on; work already queued finishes where it is."""
    global _threads, _executor
    with _lock:
        if threads == _threads:
            return
        _threads, old, _executor = threads, _executor, None
    if old is not None:
        old.shutdown(wait=False)


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=_threads, thread_name_prefix="disk")
        return _executor


async def run(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on a disk thread (as :func:`asyncio.to_thread` would)."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool(), call)
