"""The queue manager's dispatcher: which spooled message gets a delivery attempt, and when.

- :class:`Queue`: :meth:`Queue.submit` spools a new message (and, for a client that
  waits, tries it at once); :meth:`Queue.start` recovers the spool and starts the
  dispatcher, :meth:`Queue.stop` drains it; :meth:`Queue.flush` makes every deferred
  message due (SIGUSR1); :meth:`Queue.dispatch_once` is one pass of the dispatcher,
  :meth:`Queue.wake` asks for one; ``in_flight``, ``running``, ``failed`` for the probes.

Like Postfix's qmgr it keeps only a bounded *window* of messages in memory (those being
delivered); everything else waits on disk in incoming/ or deferred/, so the queue can grow
to any length without the relay growing with it. Due deferred messages come from a small
buffer refilled by one scan of deferred/ per window of messages, not per finished
attempt; new and due deferred mail take turns for free slots, so neither starves the
other. The per-mailbox governor (relay.queue.governor) paces attempts to Exchange
Online's limits: a message is counted against its mailbox when it is let through, and
mail over the minute's or the day's limit waits in deferred/, each message until its own
place in the window frees, instead of being refused; mail waiting only for one of the
mailbox's sessions waits in the session pool. A message just accepted is handed to the
dispatcher in memory, with a copy of its bytes if it is small (relay.core.message.Content):
its first attempt neither rescans incoming/ nor reads back what was just written; when
the disk is scanned instead is relay.queue.waiting's. Each attempt is relay.queue.attempt's; the
spool is reached only through relay.spool.facade.AsyncSpool. Every time the queue decides
on comes from one injected clock (``clock``, wall-clock seconds, as the spool's files keep
them), so a test can drive the dispatcher pass by pass at any time it likes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from relay.config import Config
from relay.core.events import NO_HOOKS, Hooks
from relay.core.message import Content, Outbound
from relay.core.reply import Reply
from relay.deliver.deliverer import Deliverer
from relay.queue import attempt
from relay.queue.attempt import Attempt, Context
from relay.queue.bounce import Bouncer
from relay.queue.governor import Admission, Governor
from relay.queue.pacing import GovernorFile, governor_limits, mailbox_of, special_limits
from relay.queue.waiters import Outcome, Waiter, wait_for_answer
from relay.queue.waiting import IDLE_POLL, Waiting
from relay.spool.facade import AsyncSpool
from relay.spool.records import Entry, State
from relay.spool.store import Spool

log = logging.getLogger(__name__)



class Queue:
    """Schedules delivery attempts for the messages in a spool.

    ``clock`` gives every time the queue decides on (due times, lifetimes, pacing);
    ``timer`` only measures how long attempts take, for the log and the latency metric.
    """

    def __init__(self, spool: Spool, deliverer: Deliverer, config: Config, *,
                 clock: Callable[[], float] = time.time,
                 timer: Callable[[], float] = time.monotonic,
                 hooks: Hooks = NO_HOOKS) -> None:
        self.spool = AsyncSpool(spool)
        self._waiting = Waiting(self.spool)
        self.deliverer = deliverer
        self.config = config
        self.governor = Governor(governor_limits(config), special_limits(config))
        self._clock = clock
        self._pacing = GovernorFile(self.governor, self.spool, clock)
        self._bouncer = Bouncer(config, self._accept_report, clock)
        self._context = Context(
            spool=self.spool, deliverer=deliverer, governor=self.governor,
            bouncer=self._bouncer, config=config, hooks=hooks, clock=clock, timer=timer,
            deferred_until=self._waiting.deferred_until, rescan=self.wake,
            stopping=lambda: self._stopping)
        self._active: dict[str, asyncio.Task[Outcome]] = {}
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._flushing: asyncio.Future[None] | None = None
        self._retry_turn = False    # whether a due retry goes before new mail next
        # Messages being spooled (their accept has not returned): not to be taken yet,
        # since an accept that fails withdraws its files again.
        self._accepting: set[str] = set()

    def update(self, config: Config) -> None:
        self.config = config
        self._context.config = config
        self._bouncer.config = config
        self.governor.update(governor_limits(config), special_limits(config))
        self.wake()

    def wake(self) -> None:
        """Have the dispatcher look for work now, on disk too: for messages placed in
        incoming/ by someone else than :meth:`submit` (an operator command, a test)."""
        self._waiting.rescan()
        self._wakeup.set()

    # --- accepting ----------------------------------------------------------------------------

    async def submit(self, msg: Outbound, *, wait: float | None = None) -> Reply:
        """Spool ``msg`` durably, then answer. With ``wait``, try it first for that long."""
        profile = self.config.profiles.get(msg.profile)
        mailbox = msg.mailbox or (profile.mailbox if profile else None)
        entry = Entry(**(msg.envelope() | {"mailbox": mailbox}), size=msg.content.size,
                      received_at=self._clock())
        content = await self._accept(entry, msg.content)
        queued = Reply(250, f"2.0.0 Ok: queued as {msg.id}")
        if not wait or not self._claim(entry):
            self._hand_over(entry, content)
            return queued
        # The client waits for the attempt's answer (relay.queue.waiters); when the wait
        # runs out first, the attempt goes on and the queue owns the message.
        waiter: Waiter = asyncio.get_running_loop().create_future()
        task = self._start(entry, State.INCOMING, content, waiter)
        answered = await wait_for_answer(waiter, task, wait, msg.id)
        return queued if answered is None else answered

    async def _accept(self, entry: Entry, content: Content | bytes) -> Content:
        """Spool a new message, which the dispatcher leaves alone until it is accepted."""
        self._accepting.add(entry.id)
        try:
            return await self.spool.accept(entry, content)
        finally:
            self._accepting.discard(entry.id)

    async def _accept_report(self, entry: Entry, dsn: bytes) -> None:
        """Spool a delivery report (relay.queue.bounce), and have it picked up."""
        self._hand_over(entry, await self._accept(entry, dsn))

    def _hand_over(self, entry: Entry, content: Content) -> None:
        """Give the dispatcher a message just accepted into incoming/, in memory."""
        self._waiting.hand_over(entry, content, self.config.delivery.window)
        self._wakeup.set()

    def _claim(self, entry: Entry) -> bool:
        """Reserve a window slot for ``entry`` if it may go now (no await: atomic on the loop)."""
        if self._stopping or entry.id in self._active:
            return False
        if len(self._active) >= self.config.delivery.window:
            return False
        mailbox = mailbox_of(entry, self.config)
        if mailbox is None:
            return True                   # unknown profile: the attempt will defer it
        # As for the dispatcher: a busy session slot is waited for in the pool, so a
        # client that asked to wait does wait, under load too.
        now = self._clock()
        return self.governor.ready_at(mailbox, len(entry.pending), now, sessions=False) <= now

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        report = await self.spool.recover()
        if any(report.values()):
            log.info("spool recovered: %s", ", ".join(f"{k} {v}" for k, v in report.items()))
        await self._pacing.load()
        self._dispatcher = asyncio.create_task(self._dispatch_loop())

    async def stop(self, grace: float) -> None:
        """Stop starting attempts, let running ones finish within ``grace`` seconds, keep the rest.

        Attempts still running at the deadline are cancelled; their messages stay in active/
        and go back to the queue when the relay starts again.
        """
        self._stopping = True
        self.wake()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        running = list(self._active.values())
        if running:
            log.info("waiting up to %.0f s for %d delivery attempt(s)", grace, len(running))
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
                log.warning("%d attempt(s) interrupted; they stay queued", len(pending))
        await self._pacing.save(force=True)
        await self.spool.close()

    def flush(self) -> None:
        """Retry every deferred message now (SIGUSR1)."""
        async def run() -> None:
            n = await self.spool.flush_deferred(self._clock())
            log.info("flush: %d deferred message(s) due now", n)
            self._waiting.deferred_until(0.0)
            self.wake()                         # released by an operator, perhaps

        self._flushing = asyncio.ensure_future(run())

    @property
    def in_flight(self) -> int:
        return len(self._active)

    @property
    def running(self) -> bool:
        """Started (the spool is recovered) and not stopping: attempts are being made."""
        return (self._dispatcher is not None and not self._dispatcher.done()
                and not self._stopping)

    @property
    def failed(self) -> bool:
        """The dispatcher ended although nobody stopped it: mail would pile up unsent."""
        return (self._dispatcher is not None and self._dispatcher.done()
                and not self._stopping)

    # --- dispatching --------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            try:
                next_due = await self.dispatch_once()
                await self._pacing.save()
            except Exception:
                log.exception("queue scan failed; retrying")
                next_due = self._clock() + 5
            timeout = min(IDLE_POLL, max(0.05, next_due - self._clock()))
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as the event fires, and stop() would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    async def dispatch_once(self) -> float:
        """One pass of the dispatcher: start attempts for waiting messages while the
        window has room, at the clock's ``now``.

        Returns when the dispatcher should look again (the earliest pacing delay seen).
        The dispatcher runs this whenever it is woken; a test may call it itself, with
        the dispatcher not started.
        """
        now = self._clock()
        next_due = now + IDLE_POLL
        room = self.config.delivery.window - len(self._active)
        if room <= 0 or self._stopping:
            return next_due
        # Due deferred messages come from a buffer, refilled by one scan of deferred/ that
        # takes up to a window's worth: draining a backlog costs one scan per window of
        # messages, not one per finished attempt. New mail comes from the hand-over, and
        # from incoming/ when a scan is due (relay.queue.waiting).
        waiting = self._waiting
        arrivals = await waiting.gather(now, room, self.config.delivery.window)
        next_due = min(next_due, waiting.next_scan)
        ahead: dict[str, int] = {}      # per mailbox: paced so far in this pass
        window = self.config.delivery.window
        # New and due deferred mail take turns, so that neither a flood of new mail nor a
        # backlog of retries starves the other. Taken one by one, so that a name that
        # starts nothing (held, paced, no longer due) leaves its slot to the next one.
        # The turn carries over from one pass to the next: with one free slot per pass, a
        # pass that always began with new mail would never get to a retry.
        while (arrivals or waiting.due) and len(self._active) < window:
            retry = bool(waiting.due) and (self._retry_turn or not arrivals)
            self._retry_turn = not retry
            state, name = ((State.DEFERRED, waiting.due.popleft()) if retry
                           else (State.INCOMING, arrivals.popleft()))
            known = None if retry else waiting.known(name)
            try:
                due_at = await self._consider(state, name, now, ahead, known)
            except Exception as exc:
                # One message's trouble (a bug, a record the schema let through) stays that
                # message's: the others due after it are still started.
                log.exception("spool: cannot start %s/%s; passing it over", state, name)
                due_at = self._pass_over(name, now, exc)
            next_due = min(next_due, due_at)
        return next_due

    async def _consider(self, state: State, name: str, now: float,
                        waiting: dict[str, int],
                        known: tuple[Entry, Content] | None = None) -> float:
        """Start an attempt for one candidate if it may go now; returns when it is due
        otherwise (``inf`` if there is nothing to wait for). ``known``: the record and
        bytes of a message just handed over, which need not be read from disk."""
        mid = Spool.id_from_name(name)
        if mid is None or mid in self._active or mid in self._accepting:
            return math.inf     # (an accepted message wakes the dispatcher again)
        if known is not None:
            return await self._go_or_wait(state, *known, now, waiting)
        try:
            entry = await self.spool.read(state, name)
        except FileNotFoundError:
            return math.inf     # taken meanwhile (a waiting client's attempt, an operator)
        except (ValueError, TypeError) as exc:
            # Unreadable for good (damaged, or written by another version): set it aside
            # for an operator rather than trip over it on every scan.
            try:
                await self.spool.set_aside(state, mid, f"cannot be parsed ({exc})")
            except OSError as error:
                return self._pass_over(name, now, error)
            return math.inf
        except OSError as exc:
            return self._pass_over(name, now, exc)
        if state is State.DEFERRED and entry.next_attempt > now:
            # Deferred again since the scan that listed it (its attempt was in flight then).
            self._waiting.deferred_until(entry.next_attempt)
            return entry.next_attempt
        return await self._go_or_wait(state, entry, None, now, waiting)

    async def _go_or_wait(self, state: State, entry: Entry, content: Content | None,
                          now: float, waiting: dict[str, int]) -> float:
        """Start ``entry``'s attempt, or, when its mailbox's limits say so, move it to
        deferred/ until its place in the window frees (see :meth:`_consider`)."""
        mailbox = mailbox_of(entry, self.config)
        if mailbox is not None:
            # A busy session slot is not a reason to go back to disk: the attempt waits
            # for one in the session pool (relay.deliver.pool), first come first served,
            # and the window bounds how many wait. Only the minute's and the day's
            # windows, and a pause, send it back.
            ready = self.governor.ready_at(mailbox, len(entry.pending), now, sessions=False)
            if ready > now:
                # Paced: wait on disk, each until its own place in the window is free
                # (the n-th waiting one until the n-th send of the last minute leaves it).
                ahead = waiting.get(mailbox, 0)
                waiting[mailbox] = ahead + 1
                entry.next_attempt = self.governor.ready_at(
                    mailbox, len(entry.pending), now, sessions=False, ahead=ahead)
                try:
                    if state is State.DEFERRED:
                        await self.spool.set_due(entry.id, entry.next_attempt)
                    else:
                        await self.spool.move(entry, state, State.DEFERRED, rewrite=False)
                except FileNotFoundError:
                    return math.inf               # held or deleted by an operator
                self._waiting.deferred_until(entry.next_attempt)
                return entry.next_attempt
        if entry.id in self._active:
            return math.inf     # a synchronous submit claimed it while the file was read
        self._start(entry, state, content)
        return math.inf

    def _start(self, entry: Entry, state: State, content: Content | None = None,
               waiter: Waiter | None = None) -> asyncio.Task[Outcome]:
        """Start the attempt of a message the governor said may go now; it is counted
        against its mailbox's limits at once (before any await), not when it is sent."""
        mailbox = mailbox_of(entry, self.config)
        admission = None if mailbox is None else self.governor.admit(
            mailbox, len(entry.pending), self._clock())
        task = self._active[entry.id] = asyncio.create_task(
            self._run(entry, state, content, waiter, admission))
        return task

    async def _run(self, entry: Entry, state: State, content: Content | None,
                   waiter: Waiter | None, admission: Admission | None) -> Outcome:
        try:
            return await Attempt(self._context, entry, state, waiter, admission,
                                 content).run()
        finally:
            if self._active.get(entry.id) is asyncio.current_task():
                del self._active[entry.id]
            self._wakeup.set()              # a slot is free

    def _pass_over(self, name: str, now: float, exc: Exception) -> float:
        """A file that cannot be read just now (relay.queue.waiting): when to look again."""
        self._waiting.pass_over(name, now, exc)
        # (relay.queue.attempt's pause after a refusal, looked up now: tests shorten it.)
        return now + attempt.BACKOFF_MIN_KEEP
