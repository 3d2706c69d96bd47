"""One delivery attempt of one message, from taking it out of its queue to filing it.

- :class:`Attempt`: :meth:`Attempt.run` takes the message into active/, sends it to the
  recipients still pending, records the upstream's 250 the moment it is read, settles
  the outcome (relay.queue.settle) and files the message: gone (delivered, or refused to
  a waiting client), failed/ (nobody left to try; a report queued for the failures) or
  deferred/ (with the next attempt's time as the file's mtime);
- :class:`Context`: what every attempt uses, the queue's collaborators;
- :data:`BACKOFF_MIN_KEEP`: the first pause after the disk refused a step.

The record right after the 250 (:meth:`Attempt.record_accepted`) is what keeps a kill -9
from sending a message twice: between the upstream's reply and that record nothing else
runs, not even the log line. A message never stays in active/ (nobody scans it) when a
step fails: it goes back to deferred/ with what is known in memory (:meth:`Attempt.keep`),
or, at shutdown, waits there for the next start's recovery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from relay.config import Config
from relay.core.events import Hooks
from relay.core.log import message_context
from relay.core.message import Content, DeliveryResult, Outbound
from relay.core.reply import Reply
from relay.deliver.deliverer import Deliverer
from relay.queue.bounce import Bouncer
from relay.queue.governor import Admission, Governor
from relay.queue.pacing import mailbox_of
from relay.queue.report import AttemptReport, Event, report
from relay.queue.settle import RetryPolicy, backoff, settle
from relay.queue.waiters import Outcome, OutcomeState, Waiter, answer, permanent_reply
from relay.spool.facade import AsyncSpool
from relay.spool.records import Entry, State

log = logging.getLogger(__name__)

# First pause before saving a message's state again after the disk refused it.
BACKOFF_MIN_KEEP = 1.0


@dataclass
class Context:
    """What every attempt uses: the queue's collaborators and its current config.

    ``clock`` gives the times the spool keeps (received, due; wall-clock seconds, like the
    files' mtimes), ``timer`` measures durations for the log and the latency metric
    (monotonic: a clock step must not make an attempt take negative time).
    ``deferred_until(t)`` tells the dispatcher a message is due in deferred/ at ``t``,
    ``rescan()`` that one waits in incoming/ for its next pass (not handed over in memory);
    ``stopping()`` whether the queue is shutting down.
    """

    spool: AsyncSpool
    deliverer: Deliverer
    governor: Governor
    bouncer: Bouncer
    config: Config
    hooks: Hooks
    clock: Callable[[], float]
    timer: Callable[[], float]
    deferred_until: Callable[[float], None]
    rescan: Callable[[], None]
    stopping: Callable[[], bool]


class Attempt:
    """One attempt of ``entry``, now in ``state``; ``waiter`` is the synchronous client's
    answer while it waits (relay.queue.waiters); ``content``, the message's bytes if the
    queue has them already (a message just accepted), else they are found in the spool."""

    def __init__(self, ctx: Context, entry: Entry, state: State,
                 waiter: Waiter | None = None, admission: Admission | None = None,
                 content: Content | None = None) -> None:
        self.ctx = ctx
        self.entry = entry          # the record as known now (saved or about to be)
        self.state = state
        self.waiter = waiter
        self.content = content
        # The governor's count of this attempt, given back or moved when it is over.
        self.admission = admission

    async def run(self) -> Outcome:
        try:
            return await self._run()
        finally:
            self._settle_admission(sent=False)   # if the upstream was never asked

    def _settle_admission(self, *, sent: bool) -> None:
        admission, self.admission = self.admission, None
        if admission is not None:
            self.ctx.governor.settle(admission, self.ctx.clock(), sent=sent)

    async def _run(self) -> Outcome:
        ctx, entry, state = self.ctx, self.entry, self.state
        with message_context(entry.id):
            try:
                self.content = await ctx.spool.take(entry, state, self.content)
            except FileNotFoundError:
                log.info("no longer in %s (held or deleted by an operator)", state)
                outcome = Outcome(OutcomeState.DEFERRED, Reply(250, "2.0.0 Ok: queued"))
            except OSError as exc:
                moved = await self._taken()
                log.error("taking the message from %s/ for delivery: %s%s", state,
                          exc.strerror or exc, "" if moved else "; trying again later")
                if moved:       # the rename was done (its directory fsync failed)
                    outcome = await self._attempt_or_keep()
                else:
                    # Still where it was. Hold the slot a moment, so that a disk that
                    # keeps refusing is not asked again in a tight loop.
                    await asyncio.sleep(BACKOFF_MIN_KEEP)
                    # Still due, but no longer among the names the dispatcher holds (the
                    # last scan's, or the hand-over's): without a new scan it would wait
                    # for the dispatcher's idle poll.
                    if state is State.DEFERRED:
                        ctx.deferred_until(ctx.clock())
                    else:
                        ctx.rescan()
                    outcome = Outcome(OutcomeState.DEFERRED,
                                      Reply(250, f"2.0.0 Ok: queued as {entry.id}"))
            else:
                outcome = await self._attempt_or_keep()
            answer(self.waiter, entry.id, outcome)
            return outcome

    async def _taken(self) -> bool:
        """Whether the message is in active/ after a take that raised. The disk may refuse
        the question too: then ask again, a few times, and else assume the take did not
        happen (if it did, the message waits in active/ for the next start, which is safe)."""
        for _ in range(5):
            try:
                return await self.ctx.spool.holds(State.ACTIVE, self.entry.id)
            except OSError:
                await asyncio.sleep(BACKOFF_MIN_KEEP)
        return False

    async def _attempt_or_keep(self) -> Outcome:
        try:
            return await self._attempt()
        except Exception:
            # The message is in active/, which nobody scans: never leave it there (it
            # would wait for a restart, and be sent again then).
            log.exception("attempt failed; keeping the message queued")
            return await self.keep()

    async def keep(self) -> Outcome:
        """Put a message whose attempt broke down (a disk error while saving its outcome)
        back into deferred/, with what is known in memory: recipients recorded as
        delivered are not sent again. Retried while the disk refuses, until shutdown,
        after which recovery at start-up puts it back (as after a crash)."""
        ctx = self.ctx
        delay = BACKOFF_MIN_KEEP
        while True:
            d = ctx.config.delivery
            wait = backoff(max(1, self.entry.attempts), d.retry_initial, d.retry_max)
            self.entry = entry = dataclasses.replace(self.entry,
                                                     next_attempt=ctx.clock() + wait)
            try:
                await ctx.spool.move(entry, State.ACTIVE, State.DEFERRED)
            except FileNotFoundError:
                # The step that failed had moved it on already (a directory fsync failed
                # after its rename): it may be waiting in deferred/, due soon, which the
                # dispatcher would otherwise look at again only after its idle poll.
                log.error("the message is no longer in active/; nothing more to do here")
                ctx.deferred_until(ctx.clock())
                break
            except OSError as exc:
                if ctx.stopping():
                    log.error("cannot save the message's state (%s); it stays in active/ "
                              "and is retried after a restart", exc.strerror or exc)
                    break
                log.error("cannot save the message's state (%s); trying again in %.0f s",
                          exc.strerror or exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            ctx.deferred_until(entry.next_attempt)
            break
        return Outcome(OutcomeState.DEFERRED, Reply(250, f"2.0.0 Ok: queued as {entry.id}"))

    async def _attempt(self) -> Outcome:
        ctx, entry = self.ctx, self.entry
        try:
            content = (self.content if self.content is not None
                       else await ctx.spool.content(entry.id))
        except FileNotFoundError:
            # Nothing to send, ever: set aside for an operator instead of retrying forever.
            await ctx.spool.set_aside(State.ACTIVE, entry.id, "has no message data")
            return Outcome(OutcomeState.FAILED,
                           Reply(451, "4.3.0 Message data missing from the spool"))
        pending = entry.pending
        if not pending:
            # Nothing left to send: an outcome that keep() saved, now filed where it belongs.
            if entry.failed:
                await ctx.spool.move(entry, State.ACTIVE, State.FAILED)
                return Outcome(OutcomeState.FAILED, next(iter(entry.failed.values())))
            await ctx.spool.remove(entry.id, State.ACTIVE)
            return Outcome(OutcomeState.DELIVERED, Reply(250, "2.0.0 Ok"))
        mailbox = mailbox_of(entry, ctx.config)
        msg = Outbound(**(entry.envelope() | {"rcpt_tos": pending, "mailbox": mailbox}),
                       content=content)
        timer = ctx.timer()
        recorded: list[bool] = []

        def accepted_now(accepted: list[str]) -> None:
            recorded.append(self.record_accepted(pending, accepted))

        try:
            result = await ctx.deliverer.deliver(msg, require_all_recipients=False,
                                                 on_accepted=accepted_now)
        except Exception:
            log.exception("delivery attempt crashed; deferring")
            result = DeliveryResult(Reply(451, "4.3.0 Internal error during delivery"))
        # Not offered (an Entra ID outage): it must not use up the mailbox's limits.
        self._settle_admission(sent=result.offered)
        duration = ctx.timer() - timer
        if result.offered:
            ctx.hooks.attempt(result.reply, duration)
        return await self._settle(pending, result, content, mailbox, duration,
                                  claimed=any(recorded))

    def record_accepted(self, pending: list[str], accepted: list[str]) -> bool:
        """The upstream's 250 has just been read: record it in the spool at once, before
        any other step (logging, settling, the next message) can come between it and a
        crash. True if the metadata is gone (every recipient is done).

        A failure here is only logged: the message is settled properly right after, and
        the worst a crash can then do is send it again, as before this record existed.
        """
        entry = self.entry
        done = set(accepted)
        complete = not entry.failed and all(rcpt in done for rcpt in pending)
        try:
            if complete:
                self.ctx.spool.record_delivered(entry, complete=True)
                return True
            snapshot = dataclasses.replace(
                entry, delivered=[*entry.delivered, *(r for r in pending if r in done)])
            self.ctx.spool.record_delivered(snapshot, complete=False)
        except Exception as exc:
            log.warning("cannot record the delivery at once (%s); recording it now",
                        getattr(exc, "strerror", None) or exc)
        return False

    async def _settle(self, tried: list[str], result: DeliveryResult, content: Content,
                      mailbox: str | None, duration: float, *, claimed: bool) -> Outcome:
        """Apply the attempt's settlement: the mailbox's reactions, the report, the move."""
        ctx, waiter = self.ctx, self.waiter
        now = ctx.clock()
        s = settle(self.entry, tried, result, now, RetryPolicy.of(ctx.config), random.uniform)
        self.entry = entry = s.entry
        for alert in s.alerts:
            log.error("upstream: %s — %s", alert.reply, alert.explanation,
                      extra={"profile": entry.profile, "mailbox": mailbox,
                             "reply": str(alert.reply)})
        # Mailbox-wide reactions happen once per attempt, however many recipients it had.
        if mailbox and s.throttle:
            ctx.governor.throttled(mailbox, now)
        pause = bool(mailbox) and s.pause
        if pause and mailbox:
            ctx.governor.quota_exceeded(mailbox, now)
        if mailbox and result.retry_after:
            ctx.governor.hold(mailbox, now, result.retry_after)
            pause = True
        pending = list(s.pending)
        r = AttemptReport(entry, mailbox, tuple(tried), frozenset(result.accepted),
                          s.pending, result, duration, s.expired)
        if s.done and not entry.failed:
            # Delivered: a waiting client is told before the clean-up (the 250 is recorded
            # already), so that it does not wait for the spool's unlinks and fsync.
            answer(waiter, entry.id, Outcome(OutcomeState.DELIVERED, result.reply))
            await ctx.spool.remove(entry.id, State.ACTIVE, claimed=claimed)
            report(r, Event.DELIVERED, ctx.hooks)
            return Outcome(OutcomeState.DELIVERED, result.reply)
        if s.done and not entry.delivered and waiter is not None and not waiter.done():
            # Nobody was reached and the client is still waiting: it gets the 5xx, so the
            # failure is its own and nothing is queued or bounced. The answer is given
            # before the next await, so the client's wait cannot now expire into a
            # "250 queued" for a message that is about to be removed.
            refusal = permanent_reply(entry, result)
            waiter.set_result(refusal)
            await ctx.spool.remove(entry.id, State.ACTIVE)
            report(r, Event.REFUSED, ctx.hooks)
            return Outcome(OutcomeState.FAILED, refusal)
        # Recipients refused for good are reported now, in one DSN naming only them, while
        # the others are still retried. Earlier failures are not listed again: they are
        # in entry.failed, so they were never tried in this attempt. The DSN is spooled
        # before entry.failed is saved, so a crash in between repeats a report at worst
        # and never loses one.
        if s.failed:
            try:
                await ctx.bouncer.bounce(entry, s.failed, content, s.expired)
            except OSError as exc:
                # The report cannot be spooled (disk full): keep those recipients pending,
                # so that a later attempt reports them, rather than losing the report.
                log.error("cannot spool the delivery report (%s); its recipients stay "
                          "queued and are reported later", exc.strerror or exc)
                self.entry = entry = dataclasses.replace(entry, failed={
                    k: v for k, v in entry.failed.items() if k not in s.failed})
                pending = entry.pending
                r = dataclasses.replace(r, entry=entry, pending=tuple(pending))
            except Exception:
                # The report itself cannot be built: that will not change by retrying
                # (and retrying would send the message to Exchange again, to be refused
                # again). The failure stands; the message goes to failed/ for an operator.
                log.exception("cannot build the delivery report; the failure is kept in "
                              "failed/ without one")
        if not pending:
            await ctx.spool.move(entry, State.ACTIVE, State.FAILED)
            report(r, Event.BOUNCED, ctx.hooks)
            if entry.delivered:
                return Outcome(OutcomeState.PARTIAL, result.reply)
            return Outcome(OutcomeState.FAILED, permanent_reply(entry, result))
        delay = s.retry_in
        if mailbox and pause:
            delay = max(delay, ctx.governor.ready_at(mailbox, len(pending), now) - now)
        self.entry = entry = dataclasses.replace(entry, next_attempt=now + delay)
        # The rewrite saves entry.delivered and entry.failed: the next attempt sends only
        # to the recipients still pending, and reports none of this attempt's twice.
        await ctx.spool.move(entry, State.ACTIVE, State.DEFERRED)
        ctx.deferred_until(entry.next_attempt)
        report(dataclasses.replace(r, entry=entry), Event.DEFERRED, ctx.hooks, delay)
        return Outcome(OutcomeState.DEFERRED, result.reply)
