"""A client connection's deadlines: one per line, one for the whole session.

- :class:`Clocks`: the line deadline (a line, once begun, must be complete within
  ``line_timeout`` whatever the pace of its bytes: Postfix's per-record deadline, Exim's
  ``smtp_receive_timeout``) and the session deadline (``session_timeout`` in all), both
  paused while the relay itself is working (:meth:`Clocks.pause`), since that time is
  not the client's.

The idle timer (silence, any byte resets it) is aiosmtpd's own; the session resets it
around these. Without the line and session deadlines a client that trickles a byte now and
then would hold a connection slot for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Clocks:
    """The deadlines of one connection; ``expire(what)`` ends it ("line timeout", ...)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, line_timeout: float,
                 session_timeout: float, expire: Callable[[str], None],
                 alive: Callable[[], bool]) -> None:
        self._loop = loop
        self._line_timeout = line_timeout
        self._session_timeout = session_timeout
        self._expire = expire
        self._alive = alive
        # When the line now arriving began (loop time), or None after a complete line.
        self._line_started: float | None = None
        self._line_handle: asyncio.TimerHandle | None = None
        self._session_handle: asyncio.TimerHandle | None = None
        self._session_started = 0.0
        # Time spent with the clocks paused, and when the current pause began.
        self._paused_total = 0.0
        self._paused_at: float | None = None
        self.paused = False
        # The session deadline passed while the relay was working: close after its reply.
        self.expired = False

    def start(self) -> None:
        """The session's budget starts (once: STARTTLS gives no new one)."""
        self._session_started = self._loop.time()
        self._session_handle = self._loop.call_later(self._session_timeout,
                                                     self._session_deadline)

    def new_stream(self) -> None:
        """STARTTLS: aiosmtpd drops unread plaintext, so no line is in progress any more."""
        self._line_started = None

    def close(self) -> None:
        for handle in (self._line_handle, self._session_handle):
            if handle is not None:
                handle.cancel()

    # --- lines ---------------------------------------------------------------------------

    def track(self, data: bytes) -> None:
        """Note when the line being received began, and arm the line deadline for it."""
        if not data:
            return
        if data.endswith(b"\n"):
            self._line_started = None
        elif self._line_started is None or b"\n" in data:
            self._line_started = self._loop.time()
            if self._line_handle is None:
                self._line_handle = self._loop.call_later(self._line_timeout,
                                                          self._line_deadline)

    def _line_deadline(self) -> None:
        # One timer per session, re-armed for the line now in progress rather than
        # cancelled and created for every line of a large DATA.
        self._line_handle = None
        if self._line_started is None or not self._alive():
            return
        remaining = self._line_started + self._line_timeout - self._loop.time()
        if self.paused or remaining > 0:
            delay = self._line_timeout if self.paused else remaining
            self._line_handle = self._loop.call_later(delay, self._line_deadline)
            return
        self._expire("line timeout")

    # --- the session ---------------------------------------------------------------------

    def _session_left(self) -> float:
        """Seconds of the session budget left; time the clocks were paused is free."""
        now = self._loop.time()
        paused = self._paused_total
        if self._paused_at is not None:
            paused += now - self._paused_at
        return self._session_started + self._session_timeout + paused - now

    def _session_deadline(self) -> None:
        self._session_handle = None
        if not self._alive() or self.paused:
            return                                  # resume() re-arms it
        left = self._session_left()
        if left > 0:
            self._session_handle = self._loop.call_later(left, self._session_deadline)
            return
        self._expire("session timeout")

    # --- the relay's working time --------------------------------------------------------

    def pause(self) -> None:
        """Stop the clocks while the relay, not the client, is the one working."""
        self.paused = True
        self._paused_at = self._loop.time()

    def resume(self, *, reply_first: bool) -> None:
        """Restart them. ``reply_first``: the relay was handing a message over, so if the
        session deadline passed meanwhile, the reply to it still goes out before the 421
        (:attr:`expired`); otherwise (work in the middle of DATA) it takes effect now."""
        now = self._loop.time()
        if self._paused_at is not None:
            self._paused_total += now - self._paused_at
            self._paused_at = None
        self.paused = False
        if self._line_started is not None:
            # A line the client began while waiting for the relay gets a full budget.
            self._line_started = now
        if not self._alive():
            return
        if self._session_handle is None and not self.expired:
            left = self._session_left()
            if left > 0 or not reply_first:
                self._session_handle = self._loop.call_later(max(0.0, left),
                                                             self._session_deadline)
            else:
                # Due at the very moment the hand-over began: the reply to the message
                # comes first (cutting it off would make the client send it again),
                # then the session closes.
                self.expired = True
