"""aiosmtpd's idle timer, moved forward without a new timer for every command.

- :class:`LazyIdleTimer`: mixed into the session before aiosmtpd's ``SMTP``; its
  ``_reset_timeout`` only moves a deadline when the timer already set fires before it.

aiosmtpd resets its idle timer for every command (and the session for every chunk of
DATA): each reset cancels one timer handle and makes another, which the event loop's heap
keeps until it is cleaned out. Here a timer that would fire before the new deadline is
kept, and when it fires it looks at the deadline: not reached yet, it is set again for
the rest; reached, the session times out as aiosmtpd's own would
(``_timeout_cb``). So a client sending commands makes at most one timer per idle period.
aiosmtpd's attributes used here are checked by tests/test_library_contract.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class LazyIdleTimer:
    """See the module docstring; ``loop``, ``_timeout_handle``, ``_timeout_duration`` and
    ``_timeout_cb`` are aiosmtpd's."""

    loop: asyncio.AbstractEventLoop
    _timeout_handle: asyncio.TimerHandle | None
    _timeout_duration: float
    _timeout_cb: Callable[[], None]         # (annotated only: the session's, then aiosmtpd's)
    _idle_deadline: float = 0.0

    def _reset_timeout(self, duration: float | None = None) -> None:
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled() and handle.when() <= deadline:
            return                          # it fires first, and looks at the deadline then
        if handle is not None:
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._idle_timer_fired)

    def _idle_timer_fired(self) -> None:
        if self.loop.time() < self._idle_deadline:
            self._timeout_handle = self.loop.call_at(self._idle_deadline,
                                                     self._idle_timer_fired)
            return
        self._timeout_cb()
