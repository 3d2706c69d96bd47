"""The queue manager: takes spooled messages through delivery attempts until each
recipient is delivered or bounced.

Like Postfix's qmgr it keeps only a bounded *window* of messages in memory (those being
delivered); everything else waits on disk in incoming/ or deferred/, so the queue can grow
to any length without the relay growing with it. Per recipient, the upstream's reply is
classified (relay.deliver.classify): delivered recipients are done, permanently refused ones are
reported to the sender in a DSN, the rest retry with exponential backoff and jitter until
the message's lifetime runs out. The per-mailbox governor paces attempts to Exchange
Online's limits; mail over a limit waits in the queue instead of being refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Container
from dataclasses import dataclass

from relay.accept.headers import RawMessage
from relay.config import Config
from relay.core.events import NO_HOOKS, Hooks
from relay.core.log import message_context
from relay.core.message import Content, DeliveryResult, Outbound, new_message_id
from relay.core.reply import Reply
from relay.deliver.classify import Action, classify
from relay.deliver.deliverer import Deliverer
from relay.queue.dsn import build_dsn, is_auto_reply
from relay.queue.governor import Governor, Limits
from relay.spool.store import Entry, Spool, State

log = logging.getLogger(__name__)

# How long the dispatcher sleeps at most when nothing wakes it (new mail, a finished attempt).
_IDLE_POLL = 10.0
# Failed recipients named in an attempt's log line; a message may have hundreds.
_LOGGED_FAILURES = 5
# The governor's windows are saved in the spool this often (when they changed) and at stop:
# a crash forgets at most this much of a mailbox's day, and Exchange's own quota reply
# still pauses the mailbox should that matter.
GOVERNOR_FILE = "governor.json"
_GOVERNOR_SAVE_EVERY = 30.0
# First pause before saving a message's state again after the disk refused it.
BACKOFF_MIN_KEEP = 1.0
# How long an answered synchronous client waits for the spool to agree with its answer.
_SETTLE_WAIT = 5.0
# A spool file that cannot be read is passed over this long; at most this many are.
_UNREADABLE_PAUSE = 60.0
_UNREADABLE_MAX = 10_000


@dataclass(frozen=True)
class _AttemptReport:
    """What one attempt did, gathered for its log line and counters."""

    entry: Entry
    mailbox: str | None
    pending: list[str]
    accepted: set[str]
    still: list[str]
    result: DeliveryResult
    duration: float
    reason: str | None


@dataclass(frozen=True)
class Outcome:
    """What one attempt did to a message (for a client waiting in synchronous mode)."""

    state: str                     # "delivered" | "partial" | "deferred" | "failed"
    reply: Reply


def governor_limits(config: Config) -> Limits:
    lim = config.delivery.mailbox_limits
    return Limits(max_sessions=lim.max_sessions, messages_per_minute=lim.messages_per_minute,
                  recipients_per_day=lim.recipients_per_day,
                  throttle_cooldown=lim.throttle_cooldown)


class Queue:
    """Schedules delivery attempts for the messages in a :class:`Spool`."""

    def __init__(self, spool: Spool, deliverer: Deliverer, config: Config, *,
                 clock: Callable[[], float] = time.time, hooks: Hooks = NO_HOOKS) -> None:
        self.spool = spool
        self.deliverer = deliverer
        self.config = config
        self._hooks = hooks
        self.governor = Governor(governor_limits(config))
        self._clock = clock
        self._active: dict[str, asyncio.Task[Outcome]] = {}
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._flushing: asyncio.Future[None] | None = None
        # When deferred/ must be scanned next: the earliest due time seen there (or set by
        # a deferral since), at most _IDLE_POLL away. Finished attempts wake the dispatcher,
        # but only incoming/ and the buffer of due names are looked at then, so a long
        # deferred queue is not rescanned for every message.
        self._next_deferred_scan = 0.0
        self._due: collections.deque[str] = collections.deque()  # due deferred/ names
        # Deferred names that could not be read, and until when they are passed over.
        self._unreadable: dict[str, float] = {}
        self._retry_turn = False    # whether a due retry goes before new mail next
        # Messages being spooled (Spool.accept has not returned): not to be taken yet, since
        # an accept that fails withdraws its files again.
        self._accepting: set[str] = set()
        self._governor_saved = (0, 0.0)        # (governor.changes, monotonic time) saved

    def update(self, config: Config) -> None:
        self.config = config
        self.governor.update(governor_limits(config))
        self._wakeup.set()

    # --- accepting ----------------------------------------------------------------------------

    async def submit(self, msg: Outbound, *, wait: float | None = None) -> Reply:
        """Spool ``msg`` durably, then answer. With ``wait``, try it first for that long."""
        profile = self.config.profiles.get(msg.profile)
        entry = Entry(id=msg.id, profile=msg.profile, mail_from=msg.mail_from,
                      rcpt_tos=list(msg.rcpt_tos), size=msg.content.size,
                      received_at=self._clock(), mail_options=list(msg.mail_options),
                      client=msg.client, user=msg.user, return_path=msg.return_path,
                      mailbox=msg.mailbox or (profile.mailbox if profile else None))
        await self._accept(entry, msg.content)
        queued = Reply(250, f"2.0.0 Ok: queued as {msg.id}")
        if not wait or not self._claim(entry):
            self._wakeup.set()
            return queued
        # The one source of truth for "the client is still waiting": this future is not
        # done. The attempt answers through it (set_result); when the wait ends without an
        # answer it is cancelled here, and from then on the client has been told 250 and
        # the attempt must report failures by DSN like any asynchronous one. Both sides
        # check and complete it without an await in between, so they cannot both win.
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        task = self._active[entry.id] = asyncio.create_task(
            self._run_attempt(entry, State.INCOMING, waiter=waiter))
        try:
            await asyncio.wait((waiter, task), timeout=wait,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when this coroutine is cancelled: nobody is left to hear a 5xx.
            if not waiter.done():
                waiter.cancel()
        if not waiter.cancelled():
            # Answered: the attempt only finishes its spool update (a refused message is
            # being removed). Wait for that, so that the reply goes out once the spool
            # agrees with it (asyncio.wait never cancels the task, even if this is) -
            # but not for ever: a disk that refuses the update must not hang the client.
            await asyncio.wait((task,), timeout=_SETTLE_WAIT)
            return waiter.result()
        if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
            # A bug, not a verdict: the message is safe in the spool, so it is queued.
            log.error("attempt for %s crashed before answering: %r", msg.id, exc)
        return queued                     # the attempt goes on; the queue owns the message

    async def _accept(self, entry: Entry, content: Content | bytes) -> None:
        """Spool a new message, which the dispatcher leaves alone until it is accepted."""
        self._accepting.add(entry.id)
        try:
            await self.spool.accept(entry, content)
        finally:
            self._accepting.discard(entry.id)

    def _claim(self, entry: Entry) -> bool:
        """Reserve a window slot for ``entry`` if it may go now (no await: atomic on the loop)."""
        if self._stopping or entry.id in self._active:
            return False
        if len(self._active) >= self.config.delivery.window:
            return False
        mailbox = self._mailbox(entry)
        if mailbox is None:
            return True                   # unknown profile: the attempt will defer it
        return self.governor.ready_at(mailbox, len(self._pending(entry)),
                                      self._clock()) <= self._clock()

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        report = await asyncio.to_thread(self.spool.recover)
        if any(report.values()):
            log.info("spool recovered: %s", ", ".join(f"{k} {v}" for k, v in report.items()))
        await self._load_governor()
        self._dispatcher = asyncio.create_task(self._dispatch_loop())

    async def _load_governor(self) -> None:
        raw = await asyncio.to_thread(self.spool.load_state, GOVERNOR_FILE)
        if raw is None:
            return
        try:
            data = json.loads(raw)
        except ValueError:
            log.warning("%s in the spool is not valid JSON; pacing starts afresh",
                        GOVERNOR_FILE)
            return
        n = self.governor.restore(data, self._clock())
        log.debug("pacing state of %d mailbox(es) restored", n)
        self._governor_saved = (self.governor.changes, time.monotonic())

    async def _save_governor(self, *, force: bool = False) -> None:
        """Save the governor's windows when they changed (at most every 30 s unless forced)."""
        changes, saved_at = self._governor_saved
        if self.governor.changes == changes:
            return
        if not force and time.monotonic() - saved_at < _GOVERNOR_SAVE_EVERY:
            return
        self._governor_saved = (self.governor.changes, time.monotonic())
        data = json.dumps(self.governor.export(self._clock())).encode()
        try:
            await asyncio.to_thread(self.spool.save_state, GOVERNOR_FILE, data)
        except OSError as exc:
            log.warning("cannot save the pacing state: %s", exc.strerror or exc)

    async def stop(self, grace: float) -> None:
        """Stop starting attempts, let running ones finish within ``grace`` seconds, keep the rest.

        Attempts still running at the deadline are cancelled; their messages stay in active/
        and go back to the queue when the relay starts again.
        """
        self._stopping = True
        self._wakeup.set()
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
        await self._save_governor(force=True)
        await self.spool.close()

    def flush(self) -> None:
        """Retry every deferred message now (SIGUSR1)."""
        async def run() -> None:
            n = await asyncio.to_thread(self.spool.flush_deferred, self._clock())
            log.info("flush: %d deferred message(s) due now", n)
            self._deferred_until(0.0)
            self._wakeup.set()

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
                next_due = await self._fill()
                await self._save_governor()
            except Exception:
                log.exception("queue scan failed; retrying")
                next_due = self._clock() + 5
            timeout = min(_IDLE_POLL, max(0.05, next_due - self._clock()))
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as the event fires, and stop() would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    async def _fill(self) -> float:
        """Start attempts for waiting messages while the window has room.

        Returns when the dispatcher should look again (the earliest pacing delay seen).
        """
        now = self._clock()
        next_due = now + _IDLE_POLL
        room = self.config.delivery.window - len(self._active)
        if room <= 0 or self._stopping:
            return next_due
        # Due deferred messages come from a buffer, refilled by one scan of deferred/ that
        # takes up to a window's worth: draining a backlog costs one scan per window of
        # messages, not one per finished attempt. (Bounded: at most `window` names.)
        limit = self.config.delivery.window
        scan_deferred = not self._due and now >= self._next_deferred_scan
        for name, until in list(self._unreadable.items()):
            if until <= now:
                del self._unreadable[name]
        incoming, due, upcoming = await asyncio.to_thread(
            self._candidates, now, room, limit if scan_deferred else 0,
            frozenset(self._unreadable))
        if scan_deferred:
            self._due.extend(due)
            # A full buffer means more may be due: scan again as soon as it is used up.
            self._next_deferred_scan = now if len(due) >= limit else min(
                upcoming, now + _IDLE_POLL)
        next_due = min(next_due, self._next_deferred_scan)
        stagger: dict[str, int] = {}
        window = self.config.delivery.window
        # New and due deferred mail take turns, so that neither a flood of new mail nor a
        # backlog of retries starves the other. Taken one by one, so that a name that
        # starts nothing (held, paced, no longer due) leaves its slot to the next one.
        # The turn carries over from one pass to the next: with one free slot per pass, a
        # pass that always began with new mail would never get to a retry.
        arrivals = collections.deque(incoming)
        while (arrivals or self._due) and len(self._active) < window:
            retry = bool(self._due) and (self._retry_turn or not arrivals)
            self._retry_turn = not retry
            state, name = ((State.DEFERRED, self._due.popleft()) if retry
                           else (State.INCOMING, arrivals.popleft()))
            try:
                due_at = await self._consider(state, name, now, stagger)
            except Exception as exc:
                # One message's trouble (a bug, a record the schema let through) stays that
                # message's: the others due after it are still started.
                log.exception("spool: cannot start %s/%s; passing it over", state, name)
                due_at = self._pass_over(name, now, exc)
            next_due = min(next_due, due_at)
        return next_due

    async def _consider(self, state: State, name: str, now: float,
                        stagger: dict[str, int]) -> float:
        """Start an attempt for one candidate if it may go now; returns when it is due
        otherwise (``inf`` if there is nothing to wait for)."""
        mid = self.spool.id_from_name(name)
        if mid is None or mid in self._active or mid in self._accepting:
            return math.inf     # (an accepted message wakes the dispatcher again)
        try:
            entry = await asyncio.to_thread(self.spool.read, state, name)
        except FileNotFoundError:
            return math.inf     # taken meanwhile (a waiting client's attempt, an operator)
        except (ValueError, TypeError) as exc:
            # Unreadable for good (damaged, or written by another version): set it aside
            # for an operator rather than trip over it on every scan.
            try:
                await asyncio.to_thread(self.spool.set_aside, state, mid,
                                        f"cannot be parsed ({exc})")
            except OSError as error:
                return self._pass_over(name, now, error)
            return math.inf
        except OSError as exc:
            return self._pass_over(name, now, exc)
        if state is State.DEFERRED and entry.next_attempt > now:
            # Deferred again since the scan that listed it (its attempt was in flight then).
            self._deferred_until(entry.next_attempt)
            return entry.next_attempt
        mailbox = self._mailbox(entry)
        if mailbox is not None:
            ready = self.governor.ready_at(mailbox, len(self._pending(entry)), now)
            if ready > now:
                # Paced: wait on disk, spread out so they do not all wake at once.
                n = stagger[mailbox] = stagger.get(mailbox, 0) + 1
                entry.next_attempt = ready + (n - 1) * self._spacing()
                try:
                    if state is State.DEFERRED:
                        await asyncio.to_thread(self.spool.set_due, entry.id,
                                                entry.next_attempt)
                    else:
                        await asyncio.to_thread(self.spool.move, entry, state,
                                                State.DEFERRED, rewrite=False)
                except FileNotFoundError:
                    return math.inf               # held or deleted by an operator
                self._deferred_until(entry.next_attempt)
                return entry.next_attempt
        if entry.id in self._active:
            return math.inf     # a synchronous submit claimed it while the file was read
        self._active[entry.id] = asyncio.create_task(self._run_attempt(entry, state))
        return math.inf

    def _pass_over(self, name: str, now: float, exc: Exception) -> float:
        """A spool file that cannot be read (or set aside) just now, for permissions or a
        disk error: passed over for a while, so that it neither keeps the messages due
        after it waiting nor is asked again in a loop."""
        log.error("spool: cannot read %s (%s); trying again in %.0f s", name,
                  getattr(exc, "strerror", None) or exc, _UNREADABLE_PAUSE)
        if len(self._unreadable) < _UNREADABLE_MAX:
            self._unreadable[name] = now + _UNREADABLE_PAUSE
        else:
            # So many that they cannot all be remembered: scan less often instead.
            self._next_deferred_scan = max(self._next_deferred_scan, now + _UNREADABLE_PAUSE)
        return now + BACKOFF_MIN_KEEP

    def _candidates(self, now: float, room: int, due_limit: int, skip: Container[str] = (),
                    ) -> tuple[list[str], list[str], float]:
        """Up to ``room`` incoming names; with ``due_limit``, up to that many due deferred
        names (earliest first) and when the next deferred one is due. Names in ``skip``
        (unreadable just now) are passed over."""
        names = (n for n in self.spool.names(State.INCOMING) if n not in skip)
        incoming = [n for n, _ in zip(names, range(room), strict=False)]
        if not due_limit:
            return incoming, [], float("inf")
        due, upcoming = self.spool.due(now, due_limit, skip)
        return incoming, due, upcoming

    def _deferred_until(self, when: float) -> None:
        self._next_deferred_scan = min(self._next_deferred_scan, when)

    def _spacing(self) -> float:
        return 60.0 / max(1, self.config.delivery.mailbox_limits.messages_per_minute)

    def _mailbox(self, entry: Entry) -> str | None:
        if entry.mailbox:
            return entry.mailbox
        profile = self.config.profiles.get(entry.profile)
        return profile.mailbox if profile else None

    @staticmethod
    def _pending(entry: Entry) -> list[str]:
        return [r for r in entry.rcpt_tos if r not in entry.delivered and r not in entry.failed]

    # --- one attempt --------------------------------------------------------------------------

    async def _run_attempt(self, entry: Entry, state: State, *,
                           waiter: asyncio.Future[Reply] | None = None) -> Outcome:
        """One attempt; ``waiter`` is the synchronous client's answer while it waits."""
        try:
            with message_context(entry.id):
                try:
                    await asyncio.to_thread(self.spool.move, entry, state, State.ACTIVE,
                                            rewrite=False)
                except FileNotFoundError:
                    log.info("no longer in %s (held or deleted by an operator)", state)
                    outcome = Outcome("deferred", Reply(250, "2.0.0 Ok: queued"))
                except OSError as exc:
                    moved = await self._taken(entry.id)
                    log.error("taking the message from %s/ for delivery: %s%s", state,
                              exc.strerror or exc, "" if moved else "; trying again later")
                    if moved:       # the rename was done (its directory fsync failed)
                        outcome = await self._attempt_or_keep(entry, waiter)
                    else:
                        # Still where it was. Hold the slot a moment, so that a disk that
                        # keeps refusing is not asked again in a tight loop.
                        await asyncio.sleep(BACKOFF_MIN_KEEP)
                        if state is State.DEFERRED:
                            # Still due, but no longer among the names the last scan of
                            # deferred/ found: without a new scan it would wait _IDLE_POLL.
                            self._deferred_until(self._clock())
                        outcome = Outcome("deferred",
                                          Reply(250, f"2.0.0 Ok: queued as {entry.id}"))
                else:
                    outcome = await self._attempt_or_keep(entry, waiter)
                if waiter is not None and not waiter.done():
                    waiter.set_result(_client_reply(entry.id, outcome))
                return outcome
        finally:
            if self._active.get(entry.id) is asyncio.current_task():
                del self._active[entry.id]
            self._wakeup.set()

    async def _taken(self, mid: str) -> bool:
        """Whether ``mid`` is in active/ after a take that raised. The disk may refuse the
        question too: then ask again, a few times, and else assume the take did not happen
        (if it did, the message waits in active/ for the next start, which is safe)."""
        for _ in range(5):
            try:
                return await asyncio.to_thread(self.spool.holds, State.ACTIVE, mid)
            except OSError:
                await asyncio.sleep(BACKOFF_MIN_KEEP)
        return False

    async def _attempt_or_keep(self, entry: Entry,
                               waiter: asyncio.Future[Reply] | None) -> Outcome:
        try:
            return await self._attempt(entry, waiter)
        except Exception:
            # The message is in active/, which nobody scans: never leave it there (it
            # would wait for a restart, and be sent again then).
            log.exception("attempt failed; keeping the message queued")
            return await self._keep(entry)

    async def _keep(self, entry: Entry) -> Outcome:
        """Put a message whose attempt broke down (a disk error while saving its outcome)
        back into deferred/, with what is known in memory: recipients recorded as
        delivered are not sent again. Retried while the disk refuses, until shutdown,
        after which recovery at start-up puts it back (as after a crash)."""
        delay = BACKOFF_MIN_KEEP
        while True:
            entry.next_attempt = self._clock() + self._backoff(max(1, entry.attempts))
            try:
                await asyncio.to_thread(self.spool.move, entry, State.ACTIVE, State.DEFERRED)
            except FileNotFoundError:
                # The step that failed had moved it on already (a directory fsync failed
                # after its rename): it may be waiting in deferred/, due soon, which the
                # dispatcher would otherwise look at again only after _IDLE_POLL.
                log.error("the message is no longer in active/; nothing more to do here")
                self._deferred_until(self._clock())
                break
            except OSError as exc:
                if self._stopping:
                    log.error("cannot save the message's state (%s); it stays in active/ "
                              "and is retried after a restart", exc.strerror or exc)
                    break
                log.error("cannot save the message's state (%s); trying again in %.0f s",
                          exc.strerror or exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            self._deferred_until(entry.next_attempt)
            break
        return Outcome("deferred", Reply(250, f"2.0.0 Ok: queued as {entry.id}"))

    async def _attempt(self, entry: Entry, waiter: asyncio.Future[Reply] | None) -> Outcome:
        try:
            content = await asyncio.to_thread(self.spool.content, entry.id)
        except FileNotFoundError:
            # Nothing to send, ever: set aside for an operator instead of retrying forever.
            await asyncio.to_thread(self.spool.set_aside, State.ACTIVE, entry.id,
                                    "has no message data")
            return Outcome("failed", Reply(451, "4.3.0 Message data missing from the spool"))
        pending = self._pending(entry)
        if not pending:
            # Nothing left to send: an outcome that _keep saved, now filed where it belongs.
            if entry.failed:
                await asyncio.to_thread(self.spool.move, entry, State.ACTIVE, State.FAILED)
                return Outcome("failed", Reply.parse(next(iter(entry.failed.values()))))
            await asyncio.to_thread(self.spool.remove, entry.id, State.ACTIVE)
            return Outcome("delivered", Reply(250, "2.0.0 Ok"))
        mailbox = self._mailbox(entry)
        msg = Outbound(id=entry.id, profile=entry.profile, mail_from=entry.mail_from,
                       rcpt_tos=pending, content=content, mail_options=entry.mail_options,
                       client=entry.client, user=entry.user, mailbox=mailbox)
        started = self._clock()
        if mailbox is not None:
            self.governor.started(mailbox, len(pending), started)
        timer = time.monotonic()
        recorded: list[bool] = []

        def accepted_now(accepted: list[str]) -> None:
            recorded.append(self._record_accepted(entry, pending, accepted))

        try:
            result = await self.deliverer.deliver(msg, require_all_recipients=False,
                                                  on_accepted=accepted_now)
        except Exception:
            log.exception("delivery attempt crashed; deferring")
            result = DeliveryResult(Reply(451, "4.3.0 Internal error during delivery"))
        finally:
            if mailbox is not None:
                self.governor.finished(mailbox, self._clock())
        duration = time.monotonic() - timer
        if result.offered:
            self._hooks.attempt(result.reply, duration)
        elif mailbox is not None:
            # An Entra ID outage must not use up the mailbox's day at Exchange.
            self.governor.forget(mailbox, len(pending), started)
        return await self._settle(entry, pending, result, content, mailbox, waiter, duration,
                                  claimed=any(recorded))

    def _record_accepted(self, entry: Entry, pending: list[str], accepted: list[str]) -> bool:
        """The upstream's 250 has just been read: record it in the spool at once, before
        any other step (logging, settling, the next message) can come between it and a
        crash. True if the metadata is gone (every recipient is done).

        A failure here is only logged: the message is settled properly right after, and
        the worst a crash can then do is send it again, as before this record existed.
        """
        done = set(accepted)
        complete = not entry.failed and all(rcpt in done for rcpt in pending)
        try:
            if complete:
                self.spool.record_delivered(entry, complete=True)
                return True
            snapshot = dataclasses.replace(
                entry, delivered=[*entry.delivered, *(r for r in pending if r in done)])
            self.spool.record_delivered(snapshot, complete=False)
        except Exception as exc:
            log.warning("cannot record the delivery at once (%s); recording it now",
                        getattr(exc, "strerror", None) or exc)
        return False

    async def _settle(self, entry: Entry, pending: list[str], result: DeliveryResult,
                      content: Content, mailbox: str | None,
                      waiter: asyncio.Future[Reply] | None, duration: float, *,
                      claimed: bool = False) -> Outcome:
        now = self._clock()
        entry.attempts += 1
        entry.last_reply = str(result.reply)
        accepted = set(result.accepted)
        actions: set[Action] = set()
        alerted: set[str] = set()
        for rcpt in pending:
            if rcpt in accepted:
                entry.delivered.append(rcpt)
                continue
            reply = result.refused.get(rcpt, result.reply)
            verdict = classify(reply)
            actions.add(verdict.action)
            if verdict.alert and str(reply) not in alerted:
                alerted.add(str(reply))
                log.error("upstream: %s — %s", reply, verdict.explanation,
                          extra={"profile": entry.profile, "mailbox": mailbox,
                                 "reply": str(reply)})
            if verdict.action is Action.BOUNCE:
                entry.failed[rcpt] = str(reply)
        # Mailbox-wide reactions happen once per attempt, however many recipients it had.
        if mailbox and Action.THROTTLE in actions:
            self.governor.throttled(mailbox, now)
        pause = bool(mailbox) and Action.PAUSE_MAILBOX in actions
        if pause and mailbox:
            self.governor.quota_exceeded(mailbox, now)
        still = self._pending(entry)
        reason = None
        if still and now - entry.received_at >= self.config.delivery.max_lifetime:
            reason = (f"gave up after {self.config.delivery.max_lifetime / 86400:g} days "
                      f"and {entry.attempts} attempts")
            for rcpt in still:
                # This recipient's own last reply (the overall one may be a 250 for others).
                last = result.refused.get(rcpt, result.reply)
                entry.failed[rcpt] = (str(last) if not last.ok
                                      else "451 4.4.7 Delivery time expired")
            still = []
        report = _AttemptReport(entry, mailbox, pending, accepted, still, result, duration,
                                reason)
        if not still and not entry.failed:
            await asyncio.to_thread(self.spool.remove, entry.id, State.ACTIVE, claimed=claimed)
            self._report(report, "delivered")
            return Outcome("delivered", result.reply)
        if not still and not entry.delivered and waiter is not None and not waiter.done():
            # Nobody was reached and the client is still waiting: it gets the 5xx, so the
            # failure is its own and nothing is queued or bounced. The answer is given
            # before the next await, so the client's wait cannot now expire into a
            # "250 queued" for a message that is about to be removed.
            refusal = self._permanent_reply(entry, result)
            waiter.set_result(refusal)
            await asyncio.to_thread(self.spool.remove, entry.id, State.ACTIVE)
            self._report(report, "refused")
            return Outcome("failed", refusal)
        # As Postfix does, recipients refused for good are reported now, in one DSN naming
        # only them, while the others are still retried. Earlier failures are not listed
        # again: they are in entry.failed, so they were never pending in this attempt. The
        # DSN is spooled before entry.failed is saved, so a crash in between repeats a
        # report at worst and never loses one.
        fresh = {rcpt: entry.failed[rcpt] for rcpt in pending if rcpt in entry.failed}
        if fresh:
            try:
                await self._bounce(entry, fresh, content, reason)
            except OSError as exc:
                # The report cannot be spooled (disk full): keep those recipients pending,
                # so that a later attempt reports them, rather than losing the report.
                log.error("cannot spool the delivery report (%s); its recipients stay "
                          "queued and are reported later", exc.strerror or exc)
                for rcpt in fresh:
                    del entry.failed[rcpt]
                still = self._pending(entry)
                report = dataclasses.replace(report, still=still)
            except Exception:
                # The report itself cannot be built: that will not change by retrying
                # (and retrying would send the message to Exchange again, to be refused
                # again). The failure stands; the message goes to failed/ for an operator.
                log.exception("cannot build the delivery report; the failure is kept in "
                              "failed/ without one")
        if not still:
            await asyncio.to_thread(self.spool.move, entry, State.ACTIVE, State.FAILED)
            self._report(report, "bounced")
            if entry.delivered:
                return Outcome("partial", result.reply)
            return Outcome("failed", self._permanent_reply(entry, result))
        delay = self._backoff(entry.attempts)
        if mailbox and pause:
            delay = max(delay, self.governor.ready_at(mailbox, len(still), now) - now)
        entry.next_attempt = now + delay
        # The rewrite saves entry.delivered and entry.failed: the next attempt sends only
        # to the recipients still pending, and reports none of this attempt's twice.
        await asyncio.to_thread(self.spool.move, entry, State.ACTIVE, State.DEFERRED)
        self._deferred_until(entry.next_attempt)
        self._report(report, "deferred", delay)
        return Outcome("deferred", result.reply)

    def _report(self, r: _AttemptReport, event: str, delay: float | None = None) -> None:
        """The one log line per attempt, and its counters, once the spool says so.

        ``event`` is what became of the message: delivered, deferred, bounced (a delivery
        report was queued) or refused (a waiting client was given the permanent reply).
        """
        entry = r.entry
        delivered = [x for x in r.pending if x in r.accepted]
        failed = [x for x in r.pending if x in entry.failed]
        if delivered:
            self._hooks.delivered(entry.profile, r.result.reply if r.result.reply.ok
                                  else Reply(250, "2.0.0 Ok"))
        if failed:
            self._hooks.bounced(entry.profile, Reply.parse(entry.failed[failed[0]]))
        if r.still:
            self._hooks.deferred(entry.profile,
                                 r.result.refused.get(r.still[0], r.result.reply))
        tail = ""
        if delay is not None:
            tail = f"; next attempt in {delay:.1f} s" if delay < 10 else \
                f"; next attempt in {delay:.0f} s"
        if r.reason:
            tail += f"; {r.reason}"
        # Why recipients failed: the overall reply (e.g. 250 for the others) does not say.
        failures = {rcpt: entry.failed[rcpt] for rcpt in failed[:_LOGGED_FAILURES]}
        if failures:
            more = len(failed) - len(failures)
            tail += "; failed: " + ", ".join(f"<{k}> ({v})" for k, v in failures.items()) \
                + (f" and {more} more" if more else "")
        fields: dict[str, object] = {
            "event": event, "attempt": entry.attempts, "profile": entry.profile,
            "mailbox": r.mailbox, "client": entry.client or None, "user": entry.user,
            "rcpts": len(r.pending), "delivered": len(delivered), "failed": len(failed),
            "pending": len(r.still), "reply": str(r.result.reply),
            "duration": round(r.duration, 3)}
        if failures:
            fields["failures"] = failures
        if delay is not None:
            fields["delay"] = round(delay, 1)
        log.log(logging.WARNING if event in ("bounced", "refused") or failed else logging.INFO,
                "attempt %d %s: %d delivered, %d failed, %d pending; %s (%.2f s)%s",
                entry.attempts, event, len(delivered), len(failed), len(r.still),
                r.result.reply, r.duration, tail, extra=fields)

    @staticmethod
    def _permanent_reply(entry: Entry, result: DeliveryResult) -> Reply:
        """The 5xx for a waiting client: the upstream's reply, then what it means if known."""
        if result.reply.permanent:
            reply = result.reply
        else:
            reply = Reply.parse(next(iter(entry.failed.values())))
        hint = classify(reply).hint
        if not hint:
            return reply
        # A continuation line, so the upstream's own line stays as it was (apps and people
        # search for it) and no line gets near SMTP's 512-octet limit; RFC 2034 wants the
        # enhanced code on every line.
        status = reply.enhanced or f"{reply.code // 100}.0.0"
        return Reply(reply.code, f"{reply.text.rstrip()}\n{status} {hint}")

    def _backoff(self, attempts: int) -> float:
        d = self.config.delivery
        return backoff(attempts, d.retry_initial, d.retry_max)

    # --- bounces ----------------------------------------------------------------------------

    async def _bounce(self, entry: Entry, failed: dict[str, str], content: Content,
                      reason: str | None) -> None:
        """Queue a DSN for the ``failed`` recipients, unless that would be a mail loop.

        The DSN's envelope sender is the profile's mailbox, not the null sender RFC 3464
        suggests: Exchange Online accepts submissions only from the authenticated mailbox.
        Loops are still impossible, because a DSN is recognised by its own headers
        (Auto-Submitted, multipart/report) and never bounced in turn, whatever
        delivery.bounce says: with ``operator`` too, a failed DSN would otherwise produce a
        DSN to the operator, which can fail the same way, forever. Like Postfix's double
        bounce, the buck stops with the log (and the message in failed/).
        """
        policy = self.config.delivery.bounce
        fields = {"event": "bounce", "profile": entry.profile, "rcpts": len(failed)}
        if policy == "none":
            log.warning("bounce suppressed (delivery.bounce: none) for %s",
                        ", ".join(failed), extra=fields)
            return
        sender = entry.return_path if entry.return_path is not None else entry.mail_from
        limit = self.config.server.max_header_size

        def original() -> tuple[bytes, bool]:
            # In a worker thread: reading and parsing up to 256 KiB of headers.
            headers = RawMessage(content.prefix(limit + 2)).header_section()
            return headers, is_auto_reply(headers)

        headers, auto_reply = await asyncio.to_thread(original)
        if sender in ("", "<>") or auto_reply:
            log.warning("no bounce for message %s (failed: %s): it is itself a delivery "
                        "report or an auto-reply, or has a null sender, and reporting on it "
                        "could loop", entry.id, ", ".join(failed), extra=fields)
            return
        to = sender if policy == "sender" else self.config.delivery.operator
        profile = self.config.profiles.get(entry.profile)
        if profile is None or to is None:
            log.error("no bounce: profile %s is no longer configured", entry.profile)
            return
        upstream = self.config.upstream_for(profile)
        # Built in a worker thread: the header section alone may be 256 KiB of work for
        # the email package, and the event loop serves every client meanwhile.
        dsn = await asyncio.to_thread(
            build_dsn,
            reporting_mta=self.config.server.hostname, sender_mailbox=profile.mailbox, to=to,
            original_headers=headers, arrival=entry.received_at,
            failed={r: Reply.parse(t) for r, t in failed.items()},
            remote_mta=upstream.host, original_envelope_id="", queue_id=entry.id,
            reason=reason)
        bounce = Entry(id=new_message_id(), profile=entry.profile, mail_from=profile.mailbox,
                       rcpt_tos=[to], size=len(dsn), received_at=self._clock())
        await self._accept(bounce, dsn)
        log.info("bounce %s queued to %s for %d recipient(s)", bounce.id, to, len(failed),
                 extra={**fields, "bounce_id": bounce.id, "mailbox": profile.mailbox})
        self._wakeup.set()


def backoff(attempts: int, initial: float, maximum: float) -> float:
    """The delay after the ``attempts``-th failed attempt: doubling from ``initial``, at most
    ``maximum``, with jitter so that messages deferred together do not retry together.

    The jitter (±20 %) is drawn within the bounds rather than added after the cap: a
    retry_max of one hour must mean at most one hour, and clipping instead would put half
    of the capped retries on exactly the same delay. So the result lies within
    [0.8 x step, min(1.2 x step, maximum)], where step = min(maximum, initial x 2^(n-1)).
    """
    step = min(maximum, initial * 2 ** max(0, attempts - 1))
    high = min(step * 1.2, maximum)
    low = min(step * 0.8, high)
    return random.uniform(low, high)


def _client_reply(mid: str, outcome: Outcome) -> Reply:
    """What a client still waiting for the first attempt is told about it."""
    if outcome.state == "failed":
        return outcome.reply
    if outcome.state == "delivered":
        return Reply(250, f"2.0.0 Ok: delivered as {mid}")
    if outcome.state == "partial":
        return Reply(250, f"2.0.0 Ok: delivered as {mid} to some recipients; "
                          "the others were refused for good")
    return Reply(250, f"2.0.0 Ok: queued as {mid}")
