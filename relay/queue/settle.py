"""What one delivery attempt decides for its message, as a pure function.

- :func:`settle`: the message's record, the recipients the attempt tried, the upstream's
  replies, the time and the retry settings in; a :class:`Settlement` out: which
  recipients were delivered, which failed for good (the delivery report's list), which
  are still pending, whether the message's lifetime ran out, what the mailbox must do
  (slow down, pause) and the delay before the next attempt;
- :class:`RetryPolicy`: the settings it needs (``delivery.retry_initial``, ``retry_max``,
  ``max_lifetime``), from :meth:`RetryPolicy.of` a config;
- :func:`backoff`: the delay after the n-th failed attempt.

Per recipient, the upstream's reply is classified (relay.deliver.classify): accepted
recipients are done, those refused for good fail (and are reported at once, in a DSN
that names only them), the rest retry with exponential backoff and jitter until the
message's lifetime runs out, when each of them fails with its own last reply. Temporary
trouble, a login refused on the relay's side included, is never turned into a failure
before that.

Nothing here touches the spool, a clock, the governor or the log, and the jitter comes
from the caller's ``draw``: relay.queue.attempt applies the settlement, and
tests/test_settle.py checks the rules with nothing else running.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from relay.config import Config
from relay.core.message import DeliveryResult
from relay.core.reply import Reply
from relay.deliver.classify import Action, classify
from relay.spool.records import Entry

# A recipient whose last reply was an acceptance and whose time ran out all the same (it
# was accepted in an attempt whose outcome was not saved).
EXPIRED = Reply(451, "4.4.7 Delivery time expired")
# The least wait after the tenant's external recipient limit (550 5.7.233): its window is
# a rolling 24 hours shared by every sender in the tenant, so sooner only asks in vain.
TENANT_LIMIT_RETRY = 3600.0


@dataclass(frozen=True)
class RetryPolicy:
    """How long a message is retried, and how far apart (seconds)."""

    retry_initial: float
    retry_max: float
    max_lifetime: float

    @classmethod
    def of(cls, config: Config) -> RetryPolicy:
        d = config.delivery
        return cls(d.retry_initial, d.retry_max, d.max_lifetime)


@dataclass(frozen=True)
class Alert:
    """A reply that needs an operator (a login refused, a permission missing)."""

    reply: Reply
    explanation: str


@dataclass(frozen=True)
class Settlement:
    """What one attempt decided; the caller saves :attr:`entry` and acts on the rest."""

    entry: Entry                # the record to save: attempts, last reply, who is done
    delivered: tuple[str, ...]  # accepted in this attempt, in the order tried
    failed: dict[str, Reply]    # failed for good in this attempt: the report's list
    pending: tuple[str, ...]    # still to be tried (none once the lifetime has run out)
    expired: str | None         # why the retries end ("gave up after ..."), if they do
    throttle: bool              # the mailbox was told to slow down (432 4.3.2)
    pause: bool                 # the mailbox's submission quota is used up
    alerts: tuple[Alert, ...]   # replies to alert about, each once
    retry_in: float             # the delay before the next attempt, if there is one

    @property
    def done(self) -> bool:
        """No recipient is left to try: the message leaves the queue."""
        return not self.pending


def settle(entry: Entry, tried: Sequence[str], result: DeliveryResult, now: float,
           policy: RetryPolicy, draw: Callable[[float, float], float]) -> Settlement:
    """Settle one attempt of ``entry`` that tried the recipients ``tried`` and got
    ``result``, at ``now`` (the clock the record's times are in). ``draw(low, high)``
    picks the retry delay's jitter (``random.uniform``). ``entry`` is not changed."""
    accepted = set(result.accepted)
    delivered = [rcpt for rcpt in tried if rcpt in accepted]
    failed = dict(entry.failed)
    actions: set[Action] = set()
    alerts: dict[str, Alert] = {}
    for rcpt in tried:
        if rcpt in accepted:
            continue
        reply = result.refused.get(rcpt, result.reply)
        verdict = classify(reply)
        actions.add(verdict.action)
        if verdict.alert and str(reply) not in alerts:
            alerts[str(reply)] = Alert(reply, verdict.explanation)
        if verdict.action is Action.BOUNCE:
            failed[rcpt] = reply
    done = [*entry.delivered, *delivered]
    attempts = entry.attempts + 1
    pending = [r for r in entry.rcpt_tos if r not in done and r not in failed]
    expired = None
    if pending and now - entry.received_at >= policy.max_lifetime:
        expired = (f"gave up after {policy.max_lifetime / 86400:g} days "
                   f"and {attempts} attempts")
        for rcpt in pending:
            # This recipient's own last reply (the overall one may be a 250 for others).
            last = result.refused.get(rcpt, result.reply)
            failed[rcpt] = last if not last.ok else EXPIRED
        pending = []
    record = replace(entry, attempts=attempts, last_reply=result.reply, delivered=done,
                     failed=failed)
    return Settlement(
        entry=record, delivered=tuple(delivered),
        failed={rcpt: failed[rcpt] for rcpt in tried if rcpt in failed},
        pending=tuple(pending), expired=expired,
        throttle=Action.THROTTLE in actions, pause=Action.PAUSE_MAILBOX in actions,
        alerts=tuple(alerts.values()),
        retry_in=max(backoff(attempts, policy.retry_initial, policy.retry_max, draw),
                     TENANT_LIMIT_RETRY if Action.TENANT_LIMIT in actions else 0.0))


def backoff(attempts: int, initial: float, maximum: float,
            draw: Callable[[float, float], float] | None = None) -> float:
    """The delay after the ``attempts``-th failed attempt: doubling from ``initial``, at most
    ``maximum``, with jitter so that messages deferred together do not retry together.

    The jitter (±20 %) is drawn within the bounds rather than added after the cap: a
    retry_max of one hour must mean at most one hour, and clipping instead would put half
    of the capped retries on exactly the same delay. So the result lies within
    [0.8 x step, min(1.2 x step, maximum)], where step = min(maximum, initial x 2^(n-1)).
    ``draw`` picks within those bounds (``random.uniform`` when not given).
    """
    step = min(maximum, initial * 2 ** max(0, attempts - 1))
    high = min(step * 1.2, maximum)
    low = min(step * 0.8, high)
    return (draw or random.uniform)(low, high)
