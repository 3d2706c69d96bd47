"""Upstream sessions kept open between messages, per mailbox, within Exchange's limits.

- :class:`SessionPool`: the authenticated sessions to one upstream, per mailbox: lends one
  (:meth:`~SessionPool.session`, a :class:`~relay.deliver.lease.Lease`) or delivers a
  message through one (:meth:`~SessionPool.send`), closes idle ones, and adopts new
  limits on a reload (:meth:`~SessionPool.configure`);
- ``DEFAULT_MAX_SESSIONS``, ``DEFAULT_IDLE_TIMEOUT``, ``DEFAULT_MAX_MESSAGES``,
  ``DEFAULT_CHECK_AFTER``: its limits unless told otherwise.

Opening a session to Exchange Online is expensive: TCP, STARTTLS, two EHLOs and a 2 kB
XOAUTH2 login, several round trips before the first MAIL FROM. Exchange also allows only
3 concurrent connections per mailbox and counts idle ones too, so a pool that opened
freely would trip ``432 4.3.2 ... concurrent connections limit exceeded``. Hence:

* ``max_sessions`` caps every session a mailbox owns - idle, lent out, being opened or
  being closed - and a caller over the cap waits for one to come back. A session that
  is closing still holds its slot until its connection is gone.
* A session is reused only with the very token it logged in with (one AUTH per SMTP
  session). A new token retires idle sessions of older tokens instead of reusing them.
* After anything but a clean verdict on the message the session is closed, never reused:
  its protocol state is unknown, or the upstream asked the relay to back off.
* Idle sessions are closed after ``idle_timeout`` (Exchange drops idle ones too, and they
  use up the mailbox's connections), and a session rotates after ``max_messages``.
* A session idle for more than ``check_after`` must answer RSET before it is reused. A
  reused session that broke before DATA (so no byte of the message was committed) is
  replaced and the message sent again once, on a fresh session: no message fails only
  because a pooled connection had died quietly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field

from relay.core.message import DeliveryResult, Outbound
from relay.core.reply import Reply
from relay.deliver.classify import Action, classify
from relay.deliver.failures import AuthenticationRejected, UpstreamUnavailable
from relay.deliver.lease import Lease, PooledSession
from relay.deliver.session import HasAccessToken, OnAccepted
from relay.deliver.upstream import UpstreamClient

log = logging.getLogger(__name__)

DEFAULT_MAX_SESSIONS = 3
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_MAX_MESSAGES = 100
DEFAULT_CHECK_AFTER = 2.0


@dataclass(eq=False)
class _Box:
    """One mailbox's sessions; ``count`` is what Exchange would count as connections."""

    idle: list[PooledSession] = field(default_factory=list)   # most recently used last
    count: int = 0        # idle + lent out + being opened + being closed
    retiring: int = 0     # of which being closed
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    token: HasAccessToken | None = field(default=None, repr=False)  # newest token seen


class SessionPool:
    """Authenticated sessions to one upstream (one :class:`UpstreamClient`), per mailbox."""

    def __init__(self, client: UpstreamClient, *, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 max_messages: int = DEFAULT_MAX_MESSAGES,
                 check_after: float = DEFAULT_CHECK_AFTER) -> None:
        if max_sessions < 1 or max_messages < 1:
            raise ValueError("max_sessions and max_messages must be at least 1")
        self.client = client
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        self.check_after = check_after
        self._boxes: dict[str, _Box] = {}
        self._numbers = itertools.count(1)
        self._closing: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        total = sum(b.count for b in self._boxes.values())
        return f"SessionPool({self.client.where}, open={total})"

    # --- observation ------------------------------------------------------------------------

    def open_sessions(self, mailbox: str) -> int:
        """Sessions the mailbox holds (idle, lent out, opening or closing)."""
        box = self._boxes.get(mailbox.lower())
        return box.count if box else 0

    def idle_sessions(self, mailbox: str) -> int:
        box = self._boxes.get(mailbox.lower())
        return len(box.idle) if box else 0

    # --- configuration ----------------------------------------------------------------------

    def configure(self, *, max_sessions: int | None = None,
                  idle_timeout: float | None = None) -> None:
        """New limits (config reload). Idle sessions over a lowered cap close now; lent-out
        ones close when they come back."""
        if max_sessions is not None:
            if max_sessions < 1:
                raise ValueError("max_sessions must be at least 1")
            self.max_sessions = max_sessions
        for key, box in list(self._boxes.items()):
            while box.idle and box.count - box.retiring > self.max_sessions:
                self._retire(key, box, box.idle.pop(0), "over the lowered session limit")
            self._notify(box)
        if idle_timeout is not None and idle_timeout != self.idle_timeout:
            self.idle_timeout = idle_timeout
            if self._reaper is not None:   # it may be sleeping towards a later deadline
                self._reaper.cancel()
                self._reaper = None
                self._start_reaper()

    # --- lending ----------------------------------------------------------------------------

    def session(self, mailbox: str, token: HasAccessToken, *,
                fresh: bool = False) -> contextlib.AbstractAsyncContextManager[Lease]:
        """Lend a session logged in as ``mailbox`` with ``token``: an idle one if it is
        fit, else a new one. ``fresh`` insists on a new connection.

        Entering raises :class:`UpstreamUnavailable` (4xx reply inside) or
        :class:`AuthenticationRejected`, as :meth:`UpstreamSession.open` does. An exception
        inside the block drops the session.
        """
        return _Loan(self, mailbox, token, fresh)

    async def send(self, msg: Outbound, mailbox: str, token: HasAccessToken, *,
                   require_all_recipients: bool = True,
                   on_accepted: OnAccepted | None = None) -> DeliveryResult:
        """Deliver ``msg`` as ``mailbox`` through a pooled session.

        Same contract as :meth:`UpstreamClient.send`: raises :class:`AuthenticationRejected`
        when a login is refused; everything else, infrastructure failures included (as
        4xx), is the returned result. ``on_accepted``: see :meth:`UpstreamSession.send_one`.
        """
        started = time.monotonic()
        fresh = False
        while True:
            try:
                async with self.session(mailbox, token, fresh=fresh) as lease:
                    result = await lease.send_one(
                        msg, require_all_recipients=require_all_recipients,
                        on_accepted=on_accepted)
            except UpstreamUnavailable as exc:
                result = DeliveryResult(exc.reply)
            except AuthenticationRejected as exc:
                self.client.log_delivery(msg, mailbox, exc.reply, started, "login refused")
                raise
            else:
                if lease.reused and lease.lost_before_data:
                    log.debug("upstream %s: reused session %d for %s broke at %s (%s); "
                              "sending again on a fresh session", self.client.where,
                              lease.number, mailbox, lease.session.stage, result.reply)
                    fresh = True
                    continue
            break
        note = f"{len(result.refused)} refused" if result.refused else ""
        self.client.log_delivery(msg, mailbox, result.reply, started, note)
        return result

    async def _acquire(self, key: str, box: _Box, mailbox: str, token: HasAccessToken,
                       fresh: bool) -> tuple[PooledSession, bool]:
        box.token = token
        for stale in [c for c in box.idle if not c.session.authenticated_as(mailbox, token)]:
            box.idle.remove(stale)
            self._retire(key, box, stale, "the token changed" if stale.session.is_open
                         else "closed by the upstream")
        conn = await self._reserve(key, box)
        try:
            if conn is not None:
                why = self._why_not_reuse(conn, mailbox, token, fresh)
                if why is None and time.monotonic() - conn.last_used >= self.check_after \
                        and not await conn.session.check():
                    why = "it did not answer RSET"
                if why is None:
                    log.debug("upstream %s: reusing session %d for %s (message %d on it, "
                              "idle %.1f s)", self.client.where, conn.number, mailbox,
                              conn.messages + 1, time.monotonic() - conn.last_used)
                    return conn, True
                log.debug("upstream %s: not reusing session %d for %s: %s; opening a new "
                          "one in its place", self.client.where, conn.number, mailbox, why)
                await conn.session.close()
            session = self.client.session()
            number = next(self._numbers)
            log.debug("upstream %s: opening session %d for %s (%d of %d)", self.client.where,
                      number, mailbox, box.count, self.max_sessions)
            await session.open(mailbox, token)
            return PooledSession(session, number, last_used=time.monotonic()), False
        except BaseException:
            if conn is not None:
                conn.session.abort()
            self._release_slot(key, box)
            raise

    async def _reserve(self, key: str, box: _Box) -> PooledSession | None:
        """Take an idle session (returned) or a free slot (None); wait while at the cap."""
        while True:
            if self._closed:
                self._forget_if_empty(key, box)
                raise UpstreamUnavailable(Reply(
                    451, f"4.4.0 Sessions with upstream {self.client.where} are being closed "
                         "(shutdown or configuration reload); try again later"))
            if box.idle:
                return box.idle.pop()
            if box.count < self.max_sessions:
                box.count += 1
                return None
            waiter = asyncio.get_running_loop().create_future()
            box.waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                box.waiters.remove(waiter)
                self._forget_if_empty(key, box)
                raise
            box.waiters.remove(waiter)

    def _why_not_reuse(self, conn: PooledSession, mailbox: str, token: HasAccessToken,
                       fresh: bool) -> str | None:
        if fresh:
            return "a fresh session was asked for"
        if not conn.session.is_open:
            return "the upstream closed it"
        if not conn.session.authenticated_as(mailbox, token):
            return "the token changed"
        if time.monotonic() - conn.last_used >= self.idle_timeout:
            return "idle timeout"
        return None

    # --- returning ----------------------------------------------------------------------------

    async def _release(self, key: str, box: _Box, mailbox: str, lease: Lease) -> None:
        conn = lease.conn
        conn.last_used = time.monotonic()
        if lease.result is not None \
                and classify(lease.result.reply).action is Action.THROTTLE:
            # Exchange counts idle connections: give all of this mailbox's back.
            for idle in list(box.idle):
                box.idle.remove(idle)
                self._retire(key, box, idle, "the upstream asked to throttle")
        why = lease.unfit()
        if why is None:
            if self._closed:
                why = "the pool is closed"
            elif conn.messages >= self.max_messages:
                why = f"{conn.messages} messages sent on it"
            elif box.token is not None and not conn.session.authenticated_as(mailbox,
                                                                               box.token):
                why = "the token changed"
            elif box.count > self.max_sessions:
                why = "over the session limit"
        if why is None:
            box.idle.append(conn)
            self._notify(box)
            self._start_reaper()
            return
        log.debug("upstream %s: closing session %d for %s: %s", self.client.where,
                  conn.number, mailbox, why)
        try:
            await conn.session.close()
        finally:
            self._release_slot(key, box)

    def _release_slot(self, key: str, box: _Box) -> None:
        box.count -= 1
        self._notify(box)
        self._forget_if_empty(key, box)

    def _forget_if_empty(self, key: str, box: _Box) -> None:
        """Bounded memory: nothing is kept for a mailbox without sessions or callers."""
        if box.count <= 0 and not box.waiters and not box.idle \
                and self._boxes.get(key) is box:
            del self._boxes[key]

    @staticmethod
    def _notify(box: _Box) -> None:
        for waiter in box.waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _retire(self, key: str, box: _Box, conn: PooledSession, why: str) -> None:
        """Close an idle session in the background; its slot is freed once it is closed."""
        log.debug("upstream %s: closing idle session %d for %s: %s", self.client.where,
                  conn.number, key, why)
        box.retiring += 1
        task = asyncio.get_running_loop().create_task(self._close_conn(key, box, conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_conn(self, key: str, box: _Box, conn: PooledSession) -> None:
        try:
            await conn.session.close()
        finally:
            box.retiring -= 1
            self._release_slot(key, box)

    # --- idle timeout -------------------------------------------------------------------------

    def _start_reaper(self) -> None:
        if self._closed:
            return
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(
                self._reap_loop(), name=f"session-reaper-{self.client.where}")

    async def _reap_loop(self) -> None:
        """Close sessions idle for ``idle_timeout``; sleeps until the next one is due.

        A session that becomes idle later is due later too, so the reaper never needs
        waking early; a plain sleep also keeps cancellation reliable (Python 3.11's
        ``wait_for`` can swallow a cancel that races with its wake-up).
        """
        while True:
            now = time.monotonic()
            next_due: float | None = None
            for key, box in list(self._boxes.items()):
                for conn in list(box.idle):
                    due = conn.last_used + self.idle_timeout
                    if due <= now:
                        box.idle.remove(conn)
                        self._retire(key, box, conn, "idle timeout")
                    elif next_due is None or due < next_due:
                        next_due = due
            if next_due is None:        # nothing idle: the next release starts a new one
                if self._reaper is asyncio.current_task():
                    self._reaper = None
                return
            await asyncio.sleep(next_due - now)

    # --- shutdown -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every idle session now and every lent-out one when it comes back;
        waiting callers get a 4xx. For shutdown, and for a reload that replaced the
        upstream."""
        self._closed = True
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            await asyncio.wait([reaper])
        for key, box in list(self._boxes.items()):
            idle, box.idle = box.idle, []
            for conn in idle:
                self._retire(key, box, conn, "the pool is closing")
            self._notify(box)
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _Loan:
    """:meth:`SessionPool.session` as an async context: a class of its own rather than an
    @asynccontextmanager generator, whose set-up and tear-down were 3 % of the relay's CPU
    at one loan per message."""

    __slots__ = ("_box", "_fresh", "_key", "_lease", "_mailbox", "_pool", "_token")

    def __init__(self, pool: SessionPool, mailbox: str, token: HasAccessToken,
                 fresh: bool) -> None:
        self._pool, self._mailbox, self._token, self._fresh = pool, mailbox, token, fresh

    async def __aenter__(self) -> Lease:
        pool = self._pool
        self._key = key = self._mailbox.lower()
        self._box = box = pool._boxes.setdefault(key, _Box())
        conn, reused = await pool._acquire(key, box, self._mailbox, self._token, self._fresh)
        self._lease = Lease(conn, reused)
        return self._lease

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:            # whatever it was, cancellation too: drop it
            self._lease.conn.session.abort()
            self._pool._release_slot(self._key, self._box)
            return
        await self._pool._release(self._key, self._box, self._mailbox, self._lease)
