"""Per-mailbox pacing within Exchange Online's submission limits.

- :class:`Governor`: per mailbox, when a message with so many recipients may go
  (:meth:`Governor.ready_at`), what was let through and sent (``admit``, ``settle``) and
  what Exchange said (``throttled``, ``quota_exceeded``); ``export``/``restore`` for
  keeping its windows across restarts (relay.queue.pacing), ``snapshot`` for the probes;
- :class:`Limits`: the limits it keeps to (``delivery.mailbox_limits``);
- :data:`MINUTE`, :data:`DAY`, :data:`SLOT_RETRY`, :data:`UNKNOWN_QUOTA_PAUSE`: its windows
  and waits.

Exchange answers a mailbox that goes over its limits with errors (432 4.3.2 for a fourth
session, SubmissionQuotaExceededException after 10,000 recipients a day) or with silent
delays. Keeping under the limits is cheaper than retrying after them, so the queue manager
asks the governor before each attempt when a message may go.

The governor is pure bookkeeping: every method takes ``now`` (seconds, from one clock the
caller chooses) and nothing sleeps, so the queue decides how to wait and tests need no
clock. Memory per mailbox is bounded whatever the traffic: the minute window keeps only
as many timestamps as the limit allows, and the day window counts recipients in one
bucket per minute (at most 1,441 buckets).

Exchange's windows do not restart with the relay, so the windows and a quota pause are
exported (:meth:`Governor.export`) for the queue to keep in the spool and restored at
start-up; with wall-clock ``now`` values they mean the same after a restart. Sessions in
flight and throttling steps describe live connections and are not kept.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MINUTE = 60.0
DAY = 86_400.0
SLOT_RETRY = 1.0       # ask again this soon when only a session slot is busy
UNKNOWN_QUOTA_PAUSE = 3600.0  # quota used up by someone the governor does not see
_SWEEP_EVERY = 3600.0


@dataclass(frozen=True)
class Admission:
    """A message :meth:`Governor.admit` let through: what to give back or move when its
    attempt is over (:meth:`Governor.settle`)."""

    mailbox: str
    recipients: int
    at: float


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 3
    messages_per_minute: int = 30
    recipients_per_day: int = 10_000
    throttle_cooldown: float = 600.0


@dataclass
class _Mailbox:
    minute: deque[float]                     # the latest sends: admitted, then sent at
    day: deque[tuple[float, int]] = field(default_factory=deque)  # (latest time, recipients)
    day_total: int = 0
    in_flight: int = 0
    lowered: int = 0                         # sessions taken off max_sessions by throttling
    recover_at: float = 0.0                  # when the next lowered step is given back
    paused_until: float = 0.0
    last_seen: float = 0.0
    limits: Limits = field(default_factory=Limits)   # this mailbox's (its upstream's)

    def expire(self, now: float) -> None:
        """Forget what no longer counts at ``now``: old sends, served pauses, cooldowns."""
        while self.minute and self.minute[0] + MINUTE <= now:
            self.minute.popleft()
        while self.day and self.day[0][0] + DAY <= now:
            self.day_total -= self.day.popleft()[1]
        if self.paused_until <= now:
            self.paused_until = 0.0
        if self.lowered and now >= self.recover_at:
            cooldown = self.limits.throttle_cooldown
            steps = 1 + int((now - self.recover_at) // cooldown) if cooldown > 0 else self.lowered
            self.lowered = max(0, self.lowered - steps)
            self.recover_at += steps * cooldown

    def session_limit(self) -> int:
        return max(1, self.limits.max_sessions - self.lowered)


def _discard_recent(window: deque[float], at: float) -> None:
    """Remove one ``at`` from ``window``, looking from its newest end.

    The time of an attempt that just ended is among the newest in the window, behind at
    most the attempts admitted while it ran; ``deque.remove`` would look from the oldest,
    through up to ``messages_per_minute`` entries, for every message. (Only an attempt
    that took over a minute, whose time has expired, is looked for through it all.)"""
    for back, value in enumerate(reversed(window)):
        if value == at:
            del window[-1 - back]
            return


def _insert_recent(window: deque[float], at: float) -> None:
    """Insert ``at`` into the sorted ``window`` (not full), from its newest end: ``at``
    is the time now, later than all or nearly all of it."""
    if not window or window[-1] <= at:
        window.append(at)
        return
    back = 1
    while back < len(window) and window[-1 - back] > at:
        back += 1
    window.insert(len(window) - back, at)


class Governor:
    """Answers "may this mailbox send now, and if not, when?" for the queue manager."""

    def __init__(self, limits: Limits | None = None,
                 special: dict[str, Limits] | None = None) -> None:
        self.limits = limits or Limits()
        # Mailboxes (lower case) that send through an upstream with limits of its own.
        self.special = dict(special or {})
        self._boxes: dict[str, _Mailbox] = {}
        self._next_sweep = 0.0
        self.changes = 0    # bumped by whatever export() would show differently

    def export(self, now: float) -> dict[str, Any]:
        """What must survive a restart, as JSON-ready data (see the module docstring)."""
        boxes: dict[str, Any] = {}
        for name, box in self._boxes.items():
            box.expire(now)
            if box.day or box.minute or box.paused_until:
                boxes[name] = {"day": [[t, n] for t, n in box.day], "minute": list(box.minute),
                               "paused_until": box.paused_until}
        return {"version": 1, "mailboxes": boxes}

    def restore(self, data: Any, now: float) -> int:
        """Take back what :meth:`export` gave (before any attempt starts); returns how many
        mailboxes. Malformed parts are skipped: pacing state is advice, never a reason not
        to start."""
        restored = 0
        boxes = data.get("mailboxes") if isinstance(data, dict) else None
        if not isinstance(boxes, dict):
            return 0
        for name, saved in boxes.items():
            try:
                day = deque((float(t), int(n)) for t, n in saved["day"])
                minute = deque((float(t) for t in saved["minute"]),
                               maxlen=self.limits_for(str(name)).messages_per_minute)
                paused_until = float(saved["paused_until"])
            except (KeyError, TypeError, ValueError):
                continue
            # A damaged file must not pause a mailbox for ever or count a window that
            # cannot be: only finite times within a day either way are believed.
            times = [paused_until, *(t for t, _ in day), *minute]
            if not all(math.isfinite(t) and abs(t - now) <= DAY for t in times if t) \
                    or any(n < 0 for _, n in day):
                continue
            box = self._box(str(name), now)
            box.day, box.day_total = day, sum(n for _, n in day)
            box.minute, box.paused_until = minute, paused_until
            box.expire(now)
            if box.day or box.minute or box.paused_until:
                restored += 1
            else:
                del self._boxes[str(name)]      # it all expired while the relay was down
        return restored

    def limits_for(self, mailbox: str) -> Limits:
        return self.special.get(mailbox.lower(), self.limits)

    def update(self, limits: Limits, special: dict[str, Limits] | None = None) -> None:
        """New limits (config reload); what was recorded still counts against them."""
        self.limits = limits
        self.special = dict(special or {})
        for name, box in self._boxes.items():
            box.limits = mine = self.limits_for(name)
            box.minute = deque(box.minute, maxlen=mine.messages_per_minute)
            box.lowered = min(box.lowered, mine.max_sessions - 1)

    def _box(self, mailbox: str, now: float) -> _Mailbox:
        if now >= self._next_sweep:
            self._sweep(now)
        box = self._boxes.get(mailbox)
        if box is None:
            limits = self.limits_for(mailbox)
            box = self._boxes[mailbox] = _Mailbox(
                deque(maxlen=limits.messages_per_minute), limits=limits)
        box.expire(now)
        box.last_seen = max(box.last_seen, now)
        return box

    def _sweep(self, now: float) -> None:
        """Drop mailboxes idle for a day: their windows are empty, so nothing is lost."""
        self._next_sweep = now + _SWEEP_EVERY
        for name, box in list(self._boxes.items()):
            if box.in_flight == 0 and box.paused_until <= now and box.last_seen + DAY <= now:
                del self._boxes[name]

    def ready_at(self, mailbox: str, recipients: int, now: float, *,
                 sessions: bool = True, ahead: int = 0) -> float:
        """``now`` if a message with ``recipients`` may start now, else the earliest time.
        With ``sessions=False`` a busy session slot does not count (the session pool
        queues for one), unless throttling has lowered the mailbox's sessions: the pool
        knows only the configured number, so that one is kept here. ``ahead``: how many
        messages of the mailbox already wait for the minute's window before this one, so
        that each waits for its own place in it, not all for the first."""
        box = self._box(mailbox, now)
        limits = box.limits
        at = max(now, box.paused_until)
        # The minute's places: those free now, then one more as each send in the window
        # becomes a minute old; the sends they admit free theirs a minute later again.
        per_minute = limits.messages_per_minute
        free = per_minute - len(box.minute)
        place, laps = ahead % per_minute, ahead // per_minute
        first = now if place < free else box.minute[place - free] + MINUTE
        at = max(at, first + MINUTE * laps)
        excess = box.day_total + recipients - limits.recipients_per_day
        # A message over the daily limit on its own never fits; let Exchange answer it.
        if excess > 0 and recipients <= limits.recipients_per_day:
            for latest, count in box.day:
                excess -= count
                if excess <= 0:
                    at = max(at, latest + DAY)
                    break
        if (sessions or box.lowered) and box.in_flight >= box.session_limit():
            at = max(at, now + SLOT_RETRY)
        return at

    def admit(self, mailbox: str, recipients: int, now: float) -> Admission:
        """Count a message the queue lets through now, before it is even taken from the
        spool: the next message asked about in the same pass must see it, or one pass of
        the dispatcher lets a whole backlog past the minute's limit."""
        box = self._box(mailbox, now)
        self.changes += 1
        box.in_flight += 1
        box.minute.append(now)
        if box.day and int(box.day[-1][0] // MINUTE) == int(now // MINUTE):
            _, count = box.day.pop()
            box.day.append((now, count + recipients))
        else:
            box.day.append((now, recipients))
        box.day_total += recipients
        return Admission(mailbox, recipients, now)

    def settle(self, admission: Admission, now: float, *, sent: bool) -> None:
        """The admitted attempt is over. If it reached Exchange (``sent``), its place in
        the minute's window moves to ``now``, when Exchange counted it: a message that
        waited for a session must not let the next minute's start before Exchange's
        does. If it did not (no token, no data), it used none of the limits."""
        box = self._box(admission.mailbox, now)
        box.in_flight = max(0, box.in_flight - 1)
        if not sent:
            self._forget(box, admission)
            return
        _discard_recent(box.minute, admission.at)   # gone if the attempt took over a minute
        if len(box.minute) == box.minute.maxlen:
            box.minute.popleft()                # the oldest counts the least
        _insert_recent(box.minute, max(now, admission.at))
        self.changes += 1

    def _forget(self, box: _Mailbox, admission: Admission) -> None:
        """Take back what :meth:`admit` recorded."""
        at, recipients = admission.at, admission.recipients
        _discard_recent(box.minute, at)
        for i in range(len(box.day) - 1, -1, -1):
            latest, count = box.day[i]
            if int(latest // MINUTE) == int(at // MINUTE):
                taken = min(count, recipients)
                box.day_total -= taken
                if count == taken:
                    del box.day[i]
                else:
                    box.day[i] = (latest, count - taken)
                self.changes += 1
                break

    def throttled(self, mailbox: str, now: float) -> None:
        """Exchange refused a session (432 4.3.2): one session fewer for a cooldown."""
        box = self._box(mailbox, now)
        box.lowered = min(box.lowered + 1, box.limits.max_sessions - 1)
        box.recover_at = now + box.limits.throttle_cooldown

    def hold(self, mailbox: str, now: float, seconds: float) -> None:
        """The upstream asked the mailbox to send nothing for ``seconds`` (Graph's 429
        with Retry-After): its mail waits that long, all of it, not only the message."""
        box = self._box(mailbox, now)
        self.changes += 1
        box.paused_until = max(box.paused_until, now + seconds)

    def quota_exceeded(self, mailbox: str, now: float) -> None:
        """Exchange says the day's recipients are used: hold the mailbox until some expire.

        When the relay's own sends explain the quota, the window frees as the oldest of
        them turns 24 hours old. When they do not, other senders used it, whose sends the
        governor cannot see: it looks again after an hour (sooner if its own expire first).
        """
        box = self._box(mailbox, now)
        self.changes += 1
        until = box.day[0][0] + DAY if box.day else math.inf
        if box.day_total < box.limits.recipients_per_day:
            until = min(until, now + UNKNOWN_QUOTA_PAUSE)
        box.paused_until = until

    def snapshot(self, mailbox: str, now: float) -> dict[str, Any]:
        """For logs and metrics; ``sent_last_minute`` counts up to the per-minute limit."""
        box = self._box(mailbox, now)
        return {
            "in_flight": box.in_flight,
            "limit": box.session_limit(),
            "sent_last_minute": len(box.minute),
            "recipients_last_24h": box.day_total,
            "paused_until": box.paused_until or None,
        }
