"""The one log line, and the counters, for each delivery attempt.

- :class:`Event`: what became of the message: delivered, deferred, bounced (a delivery
  report was queued, or the failure is filed) or refused (a waiting client was given the
  permanent reply);
- :class:`AttemptReport`: what one attempt did, gathered for its line;
- :func:`report`: write the line (``attempt N EVENT: ...``, with structured fields for
  JSON logs) and tell the hooks (relay.core.events) who was delivered, failed, deferred.

It is written once the spool says so: the line never claims what a crash could undo.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from relay.core.events import Hooks
from relay.core.message import DeliveryResult
from relay.core.reply import Reply
from relay.spool.records import Entry

log = logging.getLogger(__name__)

# Failed recipients named in an attempt's log line; a message may have hundreds.
_LOGGED_FAILURES = 5


class Event(enum.StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    REFUSED = "refused"


@dataclass(frozen=True)
class AttemptReport:
    """What one attempt did: ``entry`` as saved, the recipients it tried, those the
    upstream accepted and those still pending, its result and duration, and why the
    retries end (``reason``) if they do."""

    entry: Entry
    mailbox: str | None
    tried: tuple[str, ...]
    accepted: frozenset[str]
    pending: tuple[str, ...]
    result: DeliveryResult
    duration: float
    reason: str | None


def report(r: AttemptReport, event: Event, hooks: Hooks, delay: float | None = None) -> None:
    """The one log line per attempt, and its counters, once the spool says so."""
    entry = r.entry
    delivered = [x for x in r.tried if x in r.accepted]
    failed = [x for x in r.tried if x in entry.failed]
    if delivered:
        hooks.delivered(entry.profile, r.result.reply if r.result.reply.ok
                        else Reply(250, "2.0.0 Ok"))
    if failed:
        hooks.bounced(entry.profile, entry.failed[failed[0]])
    if r.pending:
        hooks.deferred(entry.profile, r.result.refused.get(r.pending[0], r.result.reply))
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
        "event": str(event), "attempt": entry.attempts, "profile": entry.profile,
        "mailbox": r.mailbox, "client": entry.client or None, "user": entry.user,
        "rcpts": len(r.tried), "delivered": len(delivered), "failed": len(failed),
        "pending": len(r.pending), "reply": str(r.result.reply),
        "duration": round(r.duration, 3)}
    if failures:
        fields["failures"] = {rcpt: str(reply) for rcpt, reply in failures.items()}
    if delay is not None:
        fields["delay"] = round(delay, 1)
    log.log(logging.WARNING if event in (Event.BOUNCED, Event.REFUSED) or failed
            else logging.INFO,
            "attempt %d %s: %d delivered, %d failed, %d pending; %s (%.2f s)%s",
            entry.attempts, event, len(delivered), len(failed), len(r.pending),
            r.result.reply, r.duration, tail, extra=fields)
